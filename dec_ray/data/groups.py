"""A group's input statistics, in one place: per-speaker normalisation (``model.norm: speaker``)
z-scores each sentence's input with its group's own per-bin mean/std instead of Train's, then
NaN -> 0 and clipped to [-3, 3] as the official normalisation. Training (the tables' groups),
cross-corpus scoring, `dec-ray predict`, the service (a speaker's running statistics) and the export
(the formula and the population's numbers) all use ``Moments`` and ``GroupMoments`` below.

A group is a speaker within one split (``group_key``: a speaker ID that two splits share is two
groups, so test audio never enters the statistics Train is normalised with); sentences that name
no speaker form one group per split. ``POPULATION`` is the Train audio as one group: what a
per-speaker model normalises a clip with when no speaker is named (never the clip by itself, which
erases its level and tilt relative to its speaker, the main arousal cue). Statistics of audio only,
never of labels: a test speaker's come from that speaker's audio, as they would at deployment. No
Ray here.

The statistics are over the frames of the stored chunks (the network's input, which the chunking
overlaps), of the mel power or its log (``model.input``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
import pyarrow.dataset as pads

from dec_ray.data.normalization import CLIP, input_values, zscore_clip
from dec_ray.data.pools import positions_of

SPLITS = ("train", "dev", "test", "unlabeled")
FUNCTIONALS = "egemaps"            # a TableGroups of the sentences' eGeMAPS functionals (model.functionals)
FUNCTIONALS_FILE = "functional_norm.npz"   # RUN/functional_norm.npz: their groups
FILE = "speaker_norm.npz"          # RUN/speaker_norm.npz: the groups of the run's tables
POPULATION = "<population>"        # the Train audio as one group


def group_key(speaker: Optional[str], split: str) -> str:
    """A sentence's group: its speaker within its split, or ``<split>`` when it names none."""
    return f"{split}/{speaker}" if speaker else f"<{split}>"


@dataclass
class Moments:
    """One group's per-bin running sums of its input values (frames, sum, sum of squares): fitted
    in one pass or clip by clip (``+``: ranks, batches and replicas merge them exactly)."""
    n: int
    s: np.ndarray             # (F,) float64
    ss: np.ndarray            # (F,) float64

    @classmethod
    def of(cls, chunks: np.ndarray, input: str) -> "Moments":
        """The sums of these raw chunks' input values ((..., m, F): one sentence or many)."""
        v = input_values(chunks, input).astype(np.float64).reshape(-1, chunks.shape[-1])
        return cls(len(v), v.sum(0), (v * v).sum(0))

    @classmethod
    def of_rows(cls, x: np.ndarray) -> "Moments":
        """The sums of feature rows (n, D) that may hold NaN (a functional a clip lacks): ``n`` counts
        each column's values (the linear references' per-speaker and Train statistics)."""
        x = np.asarray(x, dtype=np.float64)
        return cls((~np.isnan(x)).sum(0), np.nansum(x, 0), np.nansum(x * x, 0))

    def __add__(self, other: "Moments") -> "Moments":
        return Moments(self.n + other.n, self.s + other.s, self.ss + other.ss)

    def mean_std(self, dtype=np.float32) -> Tuple[np.ndarray, np.ndarray]:
        """Per-bin (mean, std): the population moments (ddof 0) of the values summed; a column
        with no value has mean and std NaN."""
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = self.s / self.n
            std = np.sqrt(np.maximum(self.ss / self.n - mean * mean, 0.0))
        return mean.astype(dtype), std.astype(dtype)


def row_mean_std(m: Moments) -> Tuple[np.ndarray, np.ndarray]:
    """Per-column (mean, std) of feature rows (float64), as the linear references and the fused
    network z-score functionals: a column with no value has mean 0, a constant or empty one std 1."""
    mean, std = m.mean_std(np.float64)
    return np.nan_to_num(mean), np.where(np.isfinite(std) & (std > 1e-8), std, 1.0)


def zscore_rows(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(x - mean) / std of feature rows, NaN (a functional a clip lacks) and +-inf -> 0: the linear
    references' input (float64)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.nan_to_num((np.asarray(x, np.float64) - mean) / std, nan=0.0, posinf=0.0, neginf=0.0)


class GroupSums:
    """Per-group ``Moments``, added up batch by batch."""

    def __init__(self):
        self.sums: Dict[str, Moments] = {}

    def add(self, chunks: np.ndarray, keys: Sequence[str], input: str) -> None:
        keys = np.asarray(keys, dtype=object)
        for k in np.unique(keys):
            self.add_moments(k, Moments.of(chunks[keys == k], input))

    def add_moments(self, key: str, m: Moments) -> None:
        self.sums[key] = self.sums[key] + m if key in self.sums else m

    def moments(self, rows: bool = False) -> "GroupMoments":
        """Each group's (mean, std); ``rows``: of feature rows (``row_mean_std``: NaN-free, std floored)."""
        names = sorted(self.sums)
        pairs = [row_mean_std(self.sums[k]) if rows else self.sums[k].mean_std() for k in names]
        return GroupMoments(names, np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))


@dataclass
class GroupMoments:
    names: list               # group keys
    mean: np.ndarray          # (G, F) per-bin mean of the input values
    std: np.ndarray           # (G, F)

    @classmethod
    def of(cls, chunks: np.ndarray, keys: Sequence[str], input: str) -> "GroupMoments":
        """The groups of these sentences, from their own chunks (prediction: the files given together)."""
        sums = GroupSums()
        sums.add(chunks, keys, input)
        return sums.moments()

    @classmethod
    def one(cls, name: str, mean, std) -> "GroupMoments":
        return cls([name], np.asarray(mean, np.float32)[None], np.asarray(std, np.float32)[None])

    @classmethod
    def concat(cls, parts: Sequence["GroupMoments"]) -> "GroupMoments":
        return cls([n for p in parts for n in p.names], np.concatenate([p.mean for p in parts]),
                   np.concatenate([p.std for p in parts]))

    @classmethod
    def of_rows(cls, x: np.ndarray, keys: Sequence[str]) -> "GroupMoments":
        """The groups of feature rows (n, D), NaN allowed (``row_mean_std``)."""
        sums, keys = GroupSums(), np.asarray(keys, dtype=object)
        for k in np.unique(keys):
            sums.add_moments(k, Moments.of_rows(np.asarray(x)[keys == k]))
        return sums.moments(rows=True)

    def of_group(self, name: str) -> Tuple[np.ndarray, np.ndarray]:
        i = self.names.index(name)
        return self.mean[i], self.std[i]

    def _index(self, keys: Sequence[str]) -> np.ndarray:
        where = {k: i for i, k in enumerate(self.names)}
        missing = sorted({k for k in keys if k not in where})
        if missing:
            raise KeyError(f"no statistics for group(s) {missing[:5]}")
        return np.array([where[k] for k in keys], dtype=np.int64)

    def normalize(self, chunks: np.ndarray, keys: Sequence[str], input: str) -> np.ndarray:
        """(n, C, m, F) raw chunks of sentences in groups ``keys`` -> z-scored, NaN -> 0, clipped,
        float32; ``input`` FUNCTIONALS: (n, D) functionals -> ``functional_input``."""
        g = self._index(keys)
        if input == FUNCTIONALS:
            return functional_input(chunks, self.mean[g], self.std[g])
        shape = (len(g),) + (1,) * (chunks.ndim - 2) + (chunks.shape[-1],)
        return zscore_clip(input_values(chunks, input), self.mean[g].reshape(shape), self.std[g].reshape(shape))


@dataclass
class TableGroups:
    """The groups of a run's tables: which group each row is in, and each group's moments."""
    moments: GroupMoments
    row_ids: np.ndarray       # sorted
    keys: np.ndarray          # the group key of each row in ``row_ids``
    input: str

    def keys_of(self, rows: np.ndarray) -> np.ndarray:
        at = positions_of(self.row_ids, rows)
        if at is None:
            raise KeyError("rows outside the tables these speaker statistics were computed on")
        return self.keys[at]

    def normalize_rows(self, chunks: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return self.moments.normalize(chunks, self.keys_of(np.asarray(rows)), self.input)

    def save(self, path: str) -> None:
        np.savez(path, names=np.array(self.moments.names, dtype=str), mean=self.moments.mean,
                 std=self.moments.std, row_ids=self.row_ids, keys=self.keys.astype(str), input=np.array(self.input))

    @classmethod
    def load(cls, path: str) -> "TableGroups":
        z = np.load(path)
        return cls(GroupMoments([str(n) for n in z["names"]], z["mean"], z["std"]), z["row_ids"],
                   z["keys"].astype(object), str(z["input"]))


def functional_input(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """A sentence's functionals as the fused network reads them (``model.functionals``): the
    references' z-score (``zscore_rows``: NaN -> 0) with its group's statistics, clipped to +-3 as
    the mel input is (a clip from another corpus can sit far outside Train's), float32."""
    return np.clip(zscore_rows(x, mean, std), -CLIP, CLIP).astype(np.float32)


def functional_rows(column) -> np.ndarray:
    """A Parquet column of functionals (fixed-size lists) -> (n, D) float64, NaN rows where a row
    has none (the pool's, ingested without ``features.functionals_pool``)."""
    import pyarrow as pa
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width, n = arr.type.list_size, len(arr)
    x = arr.values.slice(arr.offset * width, n * width).to_numpy(zero_copy_only=False).astype(np.float64)
    x = x.reshape(n, width)            # a null row still holds its slots in a fixed-size list
    x[arr.is_null().to_numpy(zero_copy_only=False)] = np.nan
    return x


def functional_groups(tables: str, per_speaker: bool, splits: Sequence[str] = SPLITS) -> TableGroups:
    """Every row's functionals group and each group's ``row_mean_std``: per speaker within a split
    (``per_speaker``, as ``table_groups``; from the functionals alone, no labels) with the Train rows
    as ``POPULATION`` too, or else every row in ``POPULATION``, whose statistics are Train's either way."""
    from dec_ray.data.tables import split_files
    sums, ids, keys = GroupSums(), [], []
    for split in splits:
        files = split_files(tables, split)
        if not files:
            continue
        for t in pads.dataset(files, format="parquet").to_batches(columns=["row_id", FUNCTIONALS, "speaker"],
                                                                   batch_size=16384):     # bounded memory
            x = functional_rows(t.column(FUNCTIONALS))
            k = [group_key(s, split) if per_speaker else POPULATION for s in t.column("speaker").to_pylist()]
            if split == "train":
                sums.add_moments(POPULATION, Moments.of_rows(x))
            if per_speaker:
                kk = np.asarray(k, dtype=object)
                for g in np.unique(kk):
                    sums.add_moments(g, Moments.of_rows(x[kk == g]))
            ids.append(t.column("row_id").to_numpy())
            keys.extend(k)
    if not ids or (not per_speaker and POPULATION not in sums.sums):
        raise ValueError(f"{tables}: no Train rows to compute the functionals' statistics on")
    rid = np.concatenate(ids)
    order = np.argsort(rid)
    return TableGroups(sums.moments(rows=True), rid[order], np.array(keys, dtype=object)[order], FUNCTIONALS)


def run_functional_groups(run: str, tables: str, per_speaker: bool) -> TableGroups:
    """RUN/functional_norm.npz (``functional_groups``), computed by the driver before the workers start."""
    groups = functional_groups(tables, per_speaker)
    path = os.path.join(run, FUNCTIONALS_FILE)
    tmp = path + ".tmp.npz"
    groups.save(tmp)
    os.replace(tmp, path)
    return groups


def _split_batches(tables: str, split: str, batch_size: int = 256) -> Iterable[Tuple[np.ndarray, np.ndarray, list]]:
    from dec_ray.data.tables import split_files          # (tables imports this module)
    files = split_files(tables, split)
    if not files:
        return
    for b in pads.dataset(files, format="parquet").to_batches(columns=["row_id", "speaker", "chunks"],
                                                              batch_size=batch_size):
        yield (b.column("row_id").to_numpy(), b.column("chunks").to_numpy_ndarray(),
               [group_key(s, split) for s in b.column("speaker").to_pylist()])


def table_groups(tables: str, input: str, splits: Sequence[str] = SPLITS) -> TableGroups:
    """Every row's group and every group's moments, in one pass over the chunks of ``splits``
    (only the row_id, speaker and chunks columns are read: no labels); with Train among them, the
    ``POPULATION`` group too (every Train sentence)."""
    sums, ids, keys = GroupSums(), [], []
    for split in splits:
        for rid, chunks, k in _split_batches(tables, split):
            sums.add(chunks, k, input)
            if split == "train":
                sums.add(chunks, [POPULATION] * len(k), input)
            ids.append(rid)
            keys.extend(k)
    if not ids:
        raise ValueError(f"{tables}: no rows to compute speaker statistics on")
    rid = np.concatenate(ids)
    order = np.argsort(rid)
    return TableGroups(sums.moments(), rid[order], np.array(keys, dtype=object)[order], input)


def run_groups(run: str, tables: str, input: str) -> TableGroups:
    """RUN/speaker_norm.npz, computed on the first call (the driver's, before the workers start)."""
    path = os.path.join(run, FILE)
    if os.path.exists(path):
        groups = TableGroups.load(path)
        if groups.input == input and POPULATION in groups.moments.names:
            return groups
    groups = table_groups(tables, input)
    tmp = path + ".tmp.npz"
    groups.save(tmp)
    os.replace(tmp, path)
    return groups
