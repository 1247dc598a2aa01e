"""The chunk tables on disk, read without Ray: which files hold a split, how many rows, whether an
ingest finished, and a rank's stride of a split read into a Pool.

TABLES/SPLIT/*.parquet hold one row per sentence: row_id, the (C, m, F) chunk tensor (raw mel
power, float16), the three attributes (NaN when unlabeled) and the source path; TABLES/stats.json
holds the Train statistics; TABLES/_SUCCESS marks a finished ingest (README, "Schema").
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch

from dec_ray.config import ATTRIBUTES, Config
from dec_ray.data.groups import TableGroups, functional_rows
from dec_ray.data.normalization import Stats
from dec_ray.data.pools import Pool, build_pool

COLUMNS = ["row_id", "chunks", *ATTRIBUTES]
READ_BATCH = 256               # sentences per batch when a split is read into memory


def split_files(tables: str, split: str) -> List[str]:
    """The Parquet files of one split (sorted); empty when the split has no rows."""
    d = os.path.join(tables, split)
    if not os.path.isdir(d):
        return []
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".parquet") and f[0] != ".")


def files_rows(files: List[str]) -> int:
    """Rows in these Parquet files, from their footers (no data read)."""
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def split_rows(tables: str, split: str) -> int:
    """Sentences in one split, from the Parquet footers (no data read)."""
    return files_rows(split_files(tables, split))


def is_complete(tables: str) -> bool:
    return os.path.exists(os.path.join(tables, "_SUCCESS"))


def run_tables(run: str) -> str:
    """The tables folder a run was trained on (RUN/tables.txt)."""
    with open(os.path.join(run, "tables.txt")) as f:
        return f.read().strip()


def chunk_shape(cfg: Config) -> Tuple[int, int, int]:
    f = cfg.features
    return f.num_chunks, f.chunk_frames, f.n_mels


def storage_dtype(cfg: Config) -> torch.dtype:
    return torch.float16 if cfg.features.storage_dtype == "float16" else torch.float32


def pool_batches(batches, cfg: Config, stats: Stats, groups: Optional[TableGroups] = None,
                 functionals: Optional[TableGroups] = None) -> Iterator[tuple]:
    """(chunks, z-scored labels, row ids[, normalised functionals]) from table batches (dicts of
    numpy columns); labels are normalised row by row, so a NaN stays NaN and leaves the rest of its
    batch alone. ``groups`` (``model.norm: speaker``): the chunks come out z-scored with their
    speaker's statistics. ``functionals`` (``model.functionals``): each row's functionals z-scored
    with its group's (``groups.functional_input``)."""
    attrs = cfg.model.attributes
    for b in batches:
        y = np.stack([np.asarray(b[a], dtype=np.float32) for a in attrs], axis=1)
        rows = np.asarray(b["row_id"])
        chunks = b["chunks"] if groups is None else groups.normalize_rows(b["chunks"], rows)
        if functionals is None:
            yield chunks, stats.normalize_labels(y, attrs), rows
        else:
            f = functionals.normalize_rows(functional_rows(b[functionals.input]), rows)
            yield chunks, stats.normalize_labels(y, attrs), rows, f


def _numpy_batches(batches: Iterator[pa.RecordBatch]):
    for b in batches:
        d = {c: b.column(c).to_numpy(zero_copy_only=False) for c in COLUMNS if c != "chunks"}
        d["chunks"] = b.column("chunks").to_numpy_ndarray()
        d.update({c: b.column(c) for c in b.schema.names if c not in d})      # functionals: a list column
        yield d


def block_of(ids: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s contiguous block of the sorted row ids. The blocks differ in size by at most
    one row, every row is in exactly one, and a row is in the same rank's block on every run: the
    train and unlabeled pools are split so (Ray Data's equal split dropped up to world_size - 1
    rows, a different one each execution). Contiguous, so each rank reads only the row groups that
    hold its rows."""
    ids = np.sort(np.asarray(ids, dtype=np.int64))
    return ids[len(ids) * rank // world_size:len(ids) * (rank + 1) // world_size]


def stride_of(ids: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rows i with i % world_size == rank, in row-id order (dev and test: every rank a sample of
    every speaker, for small splits)."""
    return np.sort(np.asarray(ids, dtype=np.int64))[rank::world_size]


def row_ids(files: List[str]) -> np.ndarray:
    """The sorted row ids of these files (one column read)."""
    if not files:
        return np.zeros(0, np.int64)
    return np.sort(pads.dataset(files, format="parquet").to_table(columns=["row_id"])["row_id"].to_numpy())


SENTENCE_INFO = ["row_id", "segment_id", "speaker", "path"]


def with_sentence_info(predictions: pa.Table, tables: str, split: str) -> pa.Table:
    """A predictions table with each sentence's segment_id (MSP-Podcast's FileName), speaker and
    path beside its row_id, read from the tables."""
    files = split_files(tables, split)
    if not files or "segment_id" in predictions.column_names:
        return predictions
    info = pads.dataset(files, format="parquet").to_table(columns=SENTENCE_INFO)
    joined = predictions.join(info, "row_id", join_type="left outer").sort_by("row_id")
    return joined.select(SENTENCE_INFO + [c for c in predictions.column_names if c != "row_id"])


def labeled_rows(train_ids: np.ndarray, cfg: Config) -> np.ndarray:
    """The Train sentences that keep their labels: all, or a random ``train.label_fraction`` of
    them drawn with ``train.label_seed`` (at least 2)."""
    f = cfg.train.label_fraction
    if f >= 1:
        return np.sort(train_ids)
    n = min(len(train_ids), max(2, int(round(f * len(train_ids)))))
    return np.sort(np.random.default_rng(cfg.train.label_seed).choice(np.sort(train_ids), n, replace=False))


def training_rows(tables: str, split: str, cfg: Config) -> np.ndarray:
    """The sentences a run trains on as ``split`` (train: labeled; unlabeled: the pool), decided
    from the tables and the config alone: the same rows on every run and for any number of workers.
    Train: ``labeled_rows``. The pool: none (``train.unlabeled_limit`` 0, or the CNN, which has no
    use for it); else the unlabeled split, all of it or a seeded random ``train.unlabeled_limit`` of
    it (the official code draws a random 40K with a fixed seed; the CNN gets one only to distil a
    ``train.teacher`` on it), plus, in the label-scarce setting
    with ``train.label_rest: pool``, the Train sentences whose labels were set aside."""
    train = row_ids(split_files(tables, "train"))
    kept = labeled_rows(train, cfg)
    if split == "train":
        return kept
    limit = cfg.train.unlabeled_limit
    if limit == 0 or (cfg.model.name == "cnn" and cfg.train.teacher == "none"):
        return train[:0]
    ids = row_ids(split_files(tables, "unlabeled"))
    if 0 < limit < len(ids):
        ids = np.sort(np.random.default_rng(cfg.train.seed).choice(ids, limit, replace=False))
    if cfg.train.label_rest == "pool":
        ids = np.union1d(ids, np.setdiff1d(train, kept))
    return ids


def pool_files(tables: str, split: str, cfg: Config) -> List[str]:
    """The files that hold ``training_rows(tables, split, cfg)``."""
    files = split_files(tables, split)
    if split == "unlabeled" and cfg.train.label_fraction < 1 and cfg.train.label_rest == "pool":
        files = files + split_files(tables, "train")
    return files


def labeled_stats(tables: str, cfg: Config) -> Stats:
    """The run's statistics: the tables' (feature statistics over all Train audio, labels or not),
    with the label mean and std over the sentences that keep their labels: a label-scarce run
    never sees the others' labels, not even through the normalisation."""
    stats = Stats.load(os.path.join(tables, "stats.json"))
    if cfg.train.label_fraction >= 1:
        return stats
    kept = training_rows(tables, "train", cfg)
    t = pads.dataset(split_files(tables, "train"), format="parquet").to_table(
        columns=["row_id", *cfg.model.attributes], filter=pc.field("row_id").isin(pa.array(kept)))
    values = {a: t[a].to_numpy(zero_copy_only=False).astype(np.float64) for a in cfg.model.attributes}
    return dataclasses.replace(stats, label_mean={**stats.label_mean, **{a: float(v.mean()) for a, v in values.items()}},
                               label_std={**stats.label_std, **{a: float(v.std()) for a, v in values.items()}},
                               num_train_sentences=len(kept))


def read_rows(files: List[str], mine: np.ndarray, cfg: Config, stats: Stats,
              storage: torch.device = torch.device("cpu"), pin: bool = False,
              label_device: torch.device = torch.device("cpu"), labels: bool = True,
              groups: Optional[TableGroups] = None, functionals: Optional[TableGroups] = None) -> Pool:
    """The rows ``mine`` of these files, streamed batch by batch into a Pool sized exactly. The
    range bounds let Parquet skip row groups that hold none of them. ``labels=False``: the pool
    holds NaN labels whatever the files say (Train sentences set aside in the unlabeled pool).
    ``groups``: chunks normalised per speaker as they are read (``model.norm: speaker``);
    ``functionals``: the rows' functionals too, normalised with their groups (``model.functionals``)."""
    mine = np.sort(np.asarray(mine, dtype=np.int64))
    batches = iter(())
    if len(mine):
        ds = pads.dataset(files, format="parquet")
        f = pc.field("row_id")
        where = (f >= int(mine[0])) & (f <= int(mine[-1])) & f.isin(pa.array(mine))
        columns = COLUMNS + ([functionals.input] if functionals is not None else [])
        batches = _numpy_batches(ds.to_batches(columns=columns, filter=where, batch_size=READ_BATCH))
        if not labels:
            batches = ({**b, **{a: np.full(len(b["row_id"]), np.nan, np.float32) for a in ATTRIBUTES}}
                       for b in batches)
    width = functionals.moments.mean.shape[1] if functionals is not None else 0
    pool, _ = build_pool(pool_batches(batches, cfg, stats, groups, functionals), len(mine), chunk_shape(cfg),
                         len(cfg.model.attributes), storage, pin, label_device, dtype=storage_dtype(cfg),
                         functionals=width)
    return pool


def read_pool(files: List[str], cfg: Config, stats: Stats, rank: int = 0, world_size: int = 1,
              storage: torch.device = torch.device("cpu"), pin: bool = False,
              label_device: torch.device = torch.device("cpu"), groups: Optional[TableGroups] = None,
              functionals: Optional[TableGroups] = None) -> Optional[Pool]:
    """This rank's stride (``stride_of``) of these files: every sentence is read by exactly one
    rank, and no rank holds the whole split. None when there are no files."""
    if not files:
        return None
    return read_rows(files, stride_of(row_ids(files), rank, world_size), cfg, stats, storage, pin, label_device,
                     groups=groups, functionals=functionals)
