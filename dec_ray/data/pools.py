"""A worker's sentences in memory as torch tensors, where the epoch reads them.

A ``Pool`` holds one dataset's shard as stored (raw mel, float16 by default, (n, C, m, F)) plus z-scored
labels and global row ids. Chunk index i is sentence i // C, chunk i % C, so pseudo-labels and
sampler draws are plain index tensors that stay aligned however the sampler shuffles.

Where the chunks live (``placement``): on a GPU worker, on the GPU when all of the worker's pools
fit in ``scale.pool_device_fraction`` of its free memory, else in pinned host memory (batches are
gathered on the host and copied asynchronously); on a CPU worker, in host memory. Labels always
live on the compute device. ``PoolBuilder`` fills a buffer allocated once from the expected row
count, so loading a shard never holds it twice (no concatenation at the end).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

import numpy as np
import torch

from dec_ray.data.normalization import FeatureNormalizer

GROWTH = 1.25              # when a shard outgrows its estimate (rare): grow the buffer by this factor


@dataclass
class Pool:
    chunks: torch.Tensor        # (n, C, m, F) as stored, on the device or in (pinned) host memory
    labels: torch.Tensor        # (n, A) float32 z-scored, NaN for unlabeled; on the compute device
    row_ids: np.ndarray         # (n,) global ids from ingest
    # (n, D) float32 normalised functionals per sentence (model.functionals), beside the labels; or None
    functionals: Optional[torch.Tensor] = None

    def __post_init__(self):
        self.chunks = torch.as_tensor(self.chunks)
        self.labels = torch.as_tensor(self.labels)
        if self.functionals is not None:
            self.functionals = torch.as_tensor(self.functionals)
        self.row_ids = np.asarray(self.row_ids)
        self._staging: Optional[torch.Tensor] = None
        self._copied: Optional[torch.cuda.Event] = None

    @property
    def n_chunks(self) -> int:
        return self.chunks.shape[0] * self.chunks.shape[1]

    @property
    def nbytes(self) -> int:
        f = 0 if self.functionals is None else self.functionals.numel() * 4
        return self.chunks.numel() * self.chunks.element_size() + self.labels.numel() * 4 + f

    def _flat(self) -> torch.Tensor:
        return self.chunks.view(-1, *self.chunks.shape[2:])

    def chunk_inputs(self, idx: torch.Tensor, normalize: FeatureNormalizer) -> torch.Tensor:
        """Normalised float32 inputs (len(idx), m, F) on the normaliser's device. ``idx`` must be
        on the chunks' device (the training loop moves a stage's indices there once)."""
        target = normalize.mean.device
        if self.chunks.device == target or target.type != "cuda":
            return normalize(torch.index_select(self._flat(), 0, idx))
        # host pool, GPU worker: gather into a pinned staging buffer, copy asynchronously
        if self._staging is None or self._staging.shape[0] < len(idx):
            self._staging = torch.empty((len(idx), *self.chunks.shape[2:]), dtype=self.chunks.dtype, pin_memory=True)
            self._copied = None
        if self._copied is not None:
            self._copied.synchronize()           # the previous batch's copy has left the buffer
        buf = self._staging[:len(idx)]
        torch.index_select(self._flat(), 0, idx, out=buf)
        x = buf.to(target, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        return normalize(x)

    def chunk_labels(self, idx: torch.Tensor) -> torch.Tensor:
        """Labels of chunks ``idx`` (on the labels' device)."""
        return self.labels[idx // self.chunks.shape[1]]

    def sentence_functionals(self, idx: torch.Tensor) -> Optional[torch.Tensor]:
        """The functionals of the sentences whose chunks ``idx`` are (whole sentences, in order, as
        the sentence head's batches are; on the labels' device), one row per sentence; None when
        the pool has none."""
        if self.functionals is None:
            return None
        c = self.chunks.shape[1]
        return self.functionals[idx.reshape(-1, c)[:, 0].to(self.functionals.device) // c]

    def take(self, rows: torch.Tensor) -> "Pool":
        """A new pool of these sentences (indices into this pool; copied where the pool lives)."""
        rows = torch.as_tensor(rows, dtype=torch.int64)
        f = None if self.functionals is None else self.functionals[rows.to(self.functionals.device)]
        return Pool(self.chunks[rows.to(self.chunks.device)], self.labels[rows.to(self.labels.device)],
                    self.row_ids[rows.cpu().numpy()], f)

    @staticmethod
    def concat(pools: List["Pool"]) -> "Pool":
        pools = [p for p in pools if p is not None]
        f = None if any(p.functionals is None for p in pools) else torch.cat([p.functionals for p in pools])
        return Pool(torch.cat([p.chunks for p in pools]), torch.cat([p.labels for p in pools]),
                    np.concatenate([p.row_ids for p in pools]), f)


def positions_of(sorted_ids: np.ndarray, rows: np.ndarray) -> Optional[np.ndarray]:
    """Where each of ``rows`` sits in ``sorted_ids`` (global row ids, sorted), or None when some
    are not there: the lookup of per-row data saved once per run (speaker groups, teacher targets)."""
    rows = np.asarray(rows)
    at = np.searchsorted(sorted_ids, rows)
    if len(rows) and (at.max() >= len(sorted_ids) or np.any(sorted_ids[at] != rows)):
        return None
    return at


def placement(pool_bytes: int, device: torch.device, fraction: float) -> Tuple[torch.device, bool, str]:
    """(where the chunks live, pinned?, why) for a worker whose pools take ``pool_bytes``."""
    gb = pool_bytes / 1e9
    if device.type != "cuda":
        return device, False, f"in host memory ({gb:.2f} GB; the worker computes on the CPU)"
    free, _ = torch.cuda.mem_get_info(device)
    if pool_bytes <= fraction * free:
        return device, False, (f"on {device} ({gb:.2f} GB <= scale.pool_device_fraction {fraction:g} x "
                               f"{free / 1e9:.1f} GB free)")
    return torch.device("cpu"), True, (f"in pinned host memory ({gb:.2f} GB > scale.pool_device_fraction "
                                       f"{fraction:g} x {free / 1e9:.1f} GB free on {device})")


def row_bytes(chunk_shape: Tuple[int, int, int], n_attributes: int, dtype: torch.dtype = torch.float16,
              functionals: int = 0) -> int:
    """Memory of one sentence in a Pool."""
    c, m, f = chunk_shape
    return c * m * f * torch.empty(0, dtype=dtype).element_size() + (n_attributes + functionals) * 4


class PoolBuilder:
    """Fills a Pool batch by batch into one buffer of ``capacity`` rows allocated up front."""

    def __init__(self, capacity: int, chunk_shape: Tuple[int, int, int], n_attributes: int,
                 storage: torch.device, pin: bool, label_device: torch.device, dtype: torch.dtype = torch.float16,
                 functionals: int = 0):
        self.storage, self.pin, self.label_device, self.dtype = storage, pin, label_device, dtype
        self.chunk_shape = chunk_shape
        self.chunks = self._alloc(max(capacity, 0))
        self.labels = np.zeros((max(capacity, 0), n_attributes), np.float32)
        self.functionals = np.zeros((max(capacity, 0), functionals), np.float32) if functionals else None
        self.ids: List[np.ndarray] = []
        self.n = 0
        self.grown = 0

    def _alloc(self, rows: int) -> torch.Tensor:
        return torch.empty((rows, *self.chunk_shape), dtype=self.dtype, device=self.storage, pin_memory=self.pin)

    def _grow(self, need: int) -> None:
        rows = max(need, int(self.chunks.shape[0] * GROWTH) + 1)
        bigger = self._alloc(rows)
        bigger[:self.n] = self.chunks[:self.n]
        self.chunks = bigger
        self.labels = np.concatenate([self.labels, np.zeros((rows - len(self.labels), self.labels.shape[1]),
                                                            np.float32)])
        if self.functionals is not None:
            self.functionals = np.concatenate([self.functionals, np.zeros(
                (rows - len(self.functionals), self.functionals.shape[1]), np.float32)])
        self.grown += 1

    def add(self, chunks: np.ndarray, labels: np.ndarray, row_ids: np.ndarray,
            functionals: Optional[np.ndarray] = None) -> None:
        k = len(row_ids)
        if self.n + k > self.chunks.shape[0]:
            self._grow(self.n + k)
        rows = self.chunks[self.n:self.n + k]
        if rows.device.type == "cpu":
            rows.numpy()[...] = chunks             # one copy, straight from the (read-only) batch
        else:
            rows.copy_(torch.from_numpy(np.array(chunks, copy=True)))
        self.labels[self.n:self.n + k] = labels
        if self.functionals is not None:
            self.functionals[self.n:self.n + k] = functionals
        self.ids.append(np.asarray(row_ids, dtype=np.int64))
        self.n += k

    def build(self) -> Pool:
        ids = np.concatenate(self.ids) if self.ids else np.zeros(0, np.int64)
        f = None if self.functionals is None else torch.from_numpy(self.functionals[:self.n].copy()).to(self.label_device)
        return Pool(self.chunks[:self.n], torch.from_numpy(self.labels[:self.n].copy()).to(self.label_device), ids, f)


def build_pool(batches: Iterable[tuple], capacity: int,
               chunk_shape: Tuple[int, int, int], n_attributes: int, storage: torch.device = torch.device("cpu"),
               pin: bool = False, label_device: torch.device = torch.device("cpu"),
               dtype: torch.dtype = torch.float16, functionals: int = 0) -> Tuple[Pool, int]:
    """A Pool from (chunks, z-scored labels, row ids[, normalised functionals]) batches; returns it
    and how often the buffer had to grow past ``capacity`` (0 when the estimate held)."""
    b = PoolBuilder(capacity, chunk_shape, n_attributes, storage, pin, label_device, dtype, functionals)
    for batch in batches:
        b.add(*batch)
    return b.build(), b.grown
