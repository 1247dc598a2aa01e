"""The chunk tables on disk, read without Ray: which files hold a split, how many rows, whether an
ingest finished, and a rank's stride of a split read into a Pool.

TABLES/SPLIT/*.parquet hold one row per sentence: row_id, the (C, m, F) chunk tensor (raw mel
power, float16), the three attributes (NaN when unlabeled) and the source path; TABLES/stats.json
holds the Train statistics; TABLES/_SUCCESS marks a finished ingest (README, "Schema").
"""
from __future__ import annotations

import os
from typing import Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch

from dec_ray.config import ATTRIBUTES, Config
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


def pool_batches(batches, cfg: Config, stats: Stats) -> Iterator[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(chunks, z-scored labels, row ids) from table batches (dicts of numpy columns); labels are
    normalised row by row, so a NaN stays NaN and leaves the rest of its batch alone."""
    attrs = cfg.model.attributes
    for b in batches:
        y = np.stack([np.asarray(b[a], dtype=np.float32) for a in attrs], axis=1)
        yield b["chunks"], stats.normalize_labels(y, attrs), np.asarray(b["row_id"])


def _numpy_batches(batches: Iterator[pa.RecordBatch]):
    for b in batches:
        d = {c: b.column(c).to_numpy(zero_copy_only=False) for c in COLUMNS if c != "chunks"}
        d["chunks"] = b.column("chunks").to_numpy_ndarray()
        yield d


def read_pool(files: List[str], cfg: Config, stats: Stats, rank: int = 0, world_size: int = 1,
              storage: torch.device = torch.device("cpu"), pin: bool = False,
              label_device: torch.device = torch.device("cpu")) -> Optional[Pool]:
    """Rows i with i % world_size == rank (in row-id order) of these files, streamed batch by batch
    into a Pool: every sentence is read by exactly one rank, and no rank holds the whole split.
    None when there are no files."""
    if not files:
        return None
    ds = pads.dataset(files, format="parquet")
    ids = np.sort(ds.to_table(columns=["row_id"])["row_id"].to_numpy())
    mine = ids[rank::world_size]
    scan = ds.to_batches(columns=COLUMNS, filter=pc.field("row_id").isin(pa.array(mine)), batch_size=READ_BATCH)
    pool, _ = build_pool(pool_batches(_numpy_batches(scan), cfg, stats), len(mine), chunk_shape(cfg),
                         len(cfg.model.attributes), storage, pin, label_device, dtype=storage_dtype(cfg))
    return pool
