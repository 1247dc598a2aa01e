"""Pools of real mel chunks without Ray or Parquet: synthetic speech rendered in memory, run
through the method's own features and chunking, normalised with Train-only statistics."""
from __future__ import annotations

import numpy as np

from dec_ray.data.features import make_chunks, mel_spectrogram
from dec_ray.data.normalization import FrameSums, Stats
from dec_ray.data.pools import Pool
from dec_ray.data.synth import _speakers, render

ATTRS = ["arousal"]


def synth_pools(sizes=(("train", 24), ("dev", 8), ("test", 8), ("unlabeled", 12)), seed: int = 0):
    """(stats, {split: Pool}) with labels z-scored (NaN for the unlabeled pool)."""
    rng = np.random.default_rng(seed)
    spks = _speakers(rng, 4, 1)
    raw, row = {}, 0
    for split, n in sizes:
        chunks, gold = [], []
        for i in range(n):
            r = np.random.default_rng([seed, row])
            arousal = float(r.uniform(1.5, 6.5))
            y = render(r, spks[row % len(spks)], np.array([arousal, 4.0, 4.0]), float(r.uniform(2.0, 4.0)))
            chunks.append(make_chunks(mel_spectrogram(y)))
            gold.append(arousal if split != "unlabeled" else np.nan)
            row += 1
        raw[split] = (np.stack(chunks), np.array(gold, np.float32)[:, None])
    frames = raw["train"][0].reshape(-1, raw["train"][0].shape[-1])
    sums = FrameSums.of(frames)
    logs = FrameSums.of(np.log(frames.astype(np.float16).astype(np.float32) + np.float32(1e-10)))
    stats = Stats.from_sums(sums.n, sums.s, sums.ss, {"arousal": raw["train"][1][:, 0]}, len(raw["train"][1]), {},
                            (logs.s, logs.ss))
    pools, first = {}, 0
    for split, (chunks, gold) in raw.items():
        ids = np.arange(first, first + len(gold))
        first += len(gold)
        pools[split] = Pool(chunks.astype(np.float16), stats.normalize_labels(gold, ATTRS).astype(np.float32), ids)
    return stats, pools


def shard(pool: Pool, rank: int, world: int) -> Pool:
    """Rank r's contiguous share of the sentences (global order: rank 0's, then rank 1's, ...)."""
    parts = np.array_split(np.arange(len(pool.row_ids)), world)[rank]
    return Pool(pool.chunks[parts], pool.labels[parts], pool.row_ids[parts])
