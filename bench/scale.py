"""The scale simulation: the product's training job on pools of growing size, on this machine.

Chunk tables are made directly (no audio): random float16 mel chunks in the ingest's schema, a
fixed labeled part and N unlabeled sentences. For each N, one epoch of ``dec-ray train`` (Ray
Train, 1 worker, a small network so that the run fits a 2-core machine) measures the worker's
load time, its peak host memory and the epoch's steps. A least-squares line per quantity checks
that the cost grows linearly in N and projects 500K unlabeled segments from the measured slope.

    .venv/bin/python bench/scale.py [--sizes 2000 8000 32000] [--workdir DIR]

Writes the "Scale simulation" section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from bench_results import write_section  # noqa: E402

LABELED = {"train": 400, "dev": 100}
ROWS_PER_FILE = 1000                 # ~175 MB of float16 chunks per Parquet file
TARGET = 500_000
NETWORK = ["model.width=0.0625", "cluster.k=30", "train.epochs=1", "train.batch_sentences=64",
           "train.min_steps_per_epoch=0", "scale.workers=1", "scale.max_failures=0"]


def write_tables(out: str, n_unlabeled: int, seed: int = 0) -> None:
    """Tables in the ingest's layout and schema, random features, labels in [1, 7]."""
    from dec_ray.config import FeatureConfig
    from dec_ray.data.normalization import Stats
    from dec_ray.data.parts import _tensor_column, table_schema
    fc = FeatureConfig()
    schema = table_schema(fc)
    rng = np.random.default_rng(seed)
    first = 0
    for split, n in (*LABELED.items(), ("unlabeled", n_unlabeled)):
        os.makedirs(os.path.join(out, split), exist_ok=True)
        for part, start in enumerate(range(0, n, ROWS_PER_FILE)):
            k = min(ROWS_PER_FILE, n - start)
            chunks = rng.lognormal(0.0, 1.5, size=(k, fc.num_chunks, fc.chunk_frames, fc.n_mels)).astype(np.float16)
            labels = np.full(k, np.nan, np.float32) if split == "unlabeled" else rng.uniform(1, 7, k).astype(np.float32)
            cols = {"row_id": np.arange(first, first + k), "segment_id": [f"{split}_{first + i}" for i in range(k)],
                    "split": [split] * k, "speaker": ["s"] * k, "path": [""] * k,
                    "duration": np.full(k, 11.0, np.float32), "num_frames": np.full(k, 688, np.int32),
                    "arousal": labels, "valence": labels, "dominance": labels,
                    "frame_sum": [np.zeros(fc.n_mels)] * k, "frame_sumsq": [np.zeros(fc.n_mels)] * k,
                    "logframe_sum": [np.zeros(fc.n_mels)] * k, "logframe_sumsq": [np.zeros(fc.n_mels)] * k}
            arrays = [_tensor_column(chunks, f.type) if f.name == "chunks" else pa_array(cols[f.name], f.type)
                      for f in schema]
            write_parquet(arrays, schema, os.path.join(out, split, f"part-{part:05d}.parquet"))
            first += k
    m = float(np.exp(1.5 ** 2 / 2))
    s = float(np.sqrt((np.exp(1.5 ** 2) - 1) * np.exp(1.5 ** 2)))
    stats = Stats([m] * fc.n_mels, [s] * fc.n_mels, {a: 4.0 for a in ("arousal", "valence", "dominance")},
                  {a: 1.7 for a in ("arousal", "valence", "dominance")}, 0, LABELED["train"], vars(fc))
    stats.save(os.path.join(out, "stats.json"))
    with open(os.path.join(out, "_SUCCESS"), "w") as f:
        json.dump({"simulated": True}, f)


def pa_array(values, typ):
    import pyarrow as pa
    return pa.array(values, type=typ)


def write_parquet(arrays, schema, path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_arrays(arrays, schema=schema), path, compression="zstd")


def fit_line(x, y):
    """Slope, intercept and R^2 of a least-squares line."""
    slope, intercept = np.polyfit(x, y, 1)
    pred = slope * np.asarray(x) + intercept
    ss = float(((np.asarray(y) - np.mean(y)) ** 2).sum())
    return float(slope), float(intercept), 1.0 - float(((np.asarray(y) - pred) ** 2).sum()) / ss if ss else 1.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000, 32000])
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    import ray
    from dec_ray.config import load_config
    from dec_ray.service.train import run_training
    work = args.workdir or tempfile.mkdtemp(prefix="bench_scale_")
    cpus = os.cpu_count()
    ray.init(num_cpus=cpus + 1)
    rows = []
    for n in args.sizes:
        tables = os.path.join(work, f"tables_{n}")
        t = time.perf_counter()
        write_tables(tables, n)
        made = time.perf_counter() - t
        cfg = load_config(None, NETWORK + [f"scale.cpus_per_worker={cpus}"])
        run = os.path.join(work, f"run_{n}")
        t = time.perf_counter()
        run_training(tables, run, cfg)
        job = time.perf_counter() - t
        m = json.loads(open(os.path.join(run, "metrics.jsonl")).readline())
        rows.append({"n": n, "tables_s": made, "job_s": job, "load_s": m["load_s"], "pool_gb": m["pool_gb"],
                     "rss_gb": m["worker_peak_rss_gb"], "epoch_s": m["epoch_time_s"],
                     "embed_s": m["unlabeled_embed_s"], "kmeans_s": m["unlabeled_kmeans_s"],
                     "train_s": m["unlabeled_train_s"]})
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(tables)
    ray.shutdown()
    ns = [r["n"] for r in rows]
    lines = [f"1 Ray Train worker with {cpus} CPUs, this machine; the compact CNN at width 0.0625 (the cost per "
             "chunk of a bigger network scales the compute rows, not their linearity); K = 30; one epoch; "
             f"labeled part fixed ({LABELED['train']} Train, {LABELED['dev']} dev sentences); random float16 "
             "chunks written directly as tables (no audio).", "",
             "| unlabeled sentences | pool GB (all splits) | load s | worker peak RSS GB | epoch s | embed s | "
             "K-means s | train s (unlabeled stage) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['pool_gb']:.2f} | {r['load_s']:.1f} | {r['rss_gb']:.2f} | "
                     f"{r['epoch_s']:.1f} | {r['embed_s']:.1f} | {r['kmeans_s']:.2f} | {r['train_s']:.1f} |")
    lines += ["", f"Least-squares lines in N (measured at {', '.join(f'{n:,}' for n in ns)}) and the projection to "
              f"{TARGET:,} on one such worker (projected, not measured):", "",
              "| quantity | per 1K sentences | intercept | R^2 | projected at 500K, 1 worker | "
              "per worker at 8 workers |",
              "|---|---|---|---|---|---|"]
    for key, label, unit in (("pool_gb", "pool", "GB"), ("rss_gb", "worker peak RSS", "GB"),
                             ("load_s", "load", "s"), ("epoch_s", "epoch", "s"), ("kmeans_s", "K-means", "s")):
        slope, icpt, r2 = fit_line(ns, [r[key] for r in rows])
        at = slope * TARGET + icpt
        per8 = slope * TARGET / 8 + icpt
        lines.append(f"| {label} ({unit}) | {1000 * slope:.4g} | {icpt:.3g} | {r2:.4f} | {at:,.1f} | {per8:,.1f} |")
    write_section("Scale simulation (`bench/scale.py`)", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
