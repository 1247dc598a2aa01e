"""K-means with faiss assignment, plain or distributed over torch.distributed ranks.

Each rank holds only its own embeddings. Per iteration: E-step with a faiss flat index over the
centroids on the rank's rows (a GPU index when the rank has one); M-step from an all-reduce of
per-cluster sums and counts (DeepCluster-v2's scheme, swav main_deepclusterv2.py). Initial
centroids are k rows drawn by global row index, the same rows for any number of ranks. Empty
clusters are re-seeded by splitting a large one, as faiss' Clustering.cpp does. Optional
PCA-whitening and L2 normalisation (DeepCluster's preprocessing) use an all-reduced covariance.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import faiss
import numpy as np
import torch
import torch.distributed as dist

SPLIT_EPS = 1.0 / 1024


@dataclass
class KMeansResult:
    centroids: np.ndarray      # (k, d) in the (preprocessed) space the assignment was made in
    assignment: np.ndarray     # (n_local,) int64 cluster of each local row
    objective: float           # global sum of squared distances to the assigned centroid
    sizes: np.ndarray          # (k,) global cluster sizes
    n_split: int = 0           # empty clusters re-seeded over all iterations


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def comm_device() -> torch.device:
    """Where collectives need their tensors: the GPU under NCCL, else the CPU."""
    if _distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(a: np.ndarray) -> np.ndarray:
    """Sum a float64/int64 array over ranks (identity without a process group)."""
    if not _distributed():
        return a
    t = torch.from_numpy(np.ascontiguousarray(a)).to(comm_device())
    dist.all_reduce(t)
    return t.cpu().numpy()


def _as_float32(x: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def pca_whiten(x: np.ndarray, dim: int, eps: float = 1e-5) -> np.ndarray:
    """Project to ``dim`` principal components and whiten; mean and covariance all-reduced."""
    n = _all_reduce(np.array([x.shape[0]], dtype=np.float64))[0]
    mean = _all_reduce(x.sum(0, dtype=np.float64)) / n
    xc = x.astype(np.float64) - mean
    cov = _all_reduce(xc.T @ xc) / max(n - 1, 1)
    eigval, eigvec = np.linalg.eigh(cov)                       # ascending
    order = np.argsort(eigval)[::-1][:dim]
    proj = eigvec[:, order] / np.sqrt(eigval[order] + eps)
    return np.ascontiguousarray(xc @ proj, dtype=np.float32)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-10)


def _initial_centroids(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k distinct rows drawn over the global row order (rank 0's rows, then rank 1's, ...): every
    rank draws the same global indices, fills in the rows it holds, and a sum over ranks gives
    each rank all of them. The same rows as a single process drawing from the concatenation."""
    n_local, d = x.shape
    counts = np.array([n_local], dtype=np.int64)
    if _distributed():
        counts = np.zeros(dist.get_world_size(), dtype=np.int64)
        counts[dist.get_rank()] = n_local
        counts = _all_reduce(counts)
    offset = int(counts[:dist.get_rank()].sum()) if _distributed() else 0
    if counts.sum() < k:
        raise ValueError(f"k-means: {int(counts.sum())} points for k={k}")
    picks = rng.choice(int(counts.sum()), k, replace=False) - offset
    mine = (picks >= 0) & (picks < n_local)
    init = np.zeros((k, d), dtype=np.float64)
    init[mine] = x[picks[mine]]
    return _all_reduce(init).astype(np.float32)


def _split_empty(centroids: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> int:
    """Re-seed each empty cluster from a large one (faiss split_clusters). Same on every rank."""
    k, d = centroids.shape
    n_split = 0
    sign = np.where(np.arange(d) % 2 == 0, 1.0, -1.0).astype(np.float32)
    for ci in np.flatnonzero(counts == 0):
        weights = np.maximum(counts - 1, 0).astype(np.float64)
        if weights.sum() <= 0:
            break
        cj = rng.choice(k, p=weights / weights.sum())
        centroids[ci] = centroids[cj] * (1 + sign * SPLIT_EPS)
        centroids[cj] = centroids[cj] * (1 - sign * SPLIT_EPS)
        counts[ci] = counts[cj] // 2
        counts[cj] -= counts[ci]
        n_split += 1
    return n_split


class _Assigner:
    """Nearest centroid with a faiss flat L2 index; on the GPU when asked and available."""

    def __init__(self, d: int, use_gpu: bool):
        self.res = None
        if use_gpu and hasattr(faiss, "StandardGpuResources") and torch.cuda.is_available():
            self.res = faiss.StandardGpuResources()
            cfg = faiss.GpuIndexFlatConfig()
            cfg.device = torch.cuda.current_device()
            self.index = faiss.GpuIndexFlatL2(self.res, d, cfg)
        else:
            self.index = faiss.IndexFlatL2(d)

    def __call__(self, x: np.ndarray, centroids: np.ndarray):
        self.index.reset()
        self.index.add(centroids)
        dists, idx = self.index.search(x, 1)
        return dists[:, 0].astype(np.float64), idx[:, 0].astype(np.int64)


def kmeans(x: Union[np.ndarray, torch.Tensor], k: int, niter: int = 20, seed: int = 0,
           pca_dim: int = 0, l2: bool = False, use_gpu: Optional[bool] = None,
           threads: int = 0, init_centroids: Optional[np.ndarray] = None) -> KMeansResult:
    """K-means of this rank's rows ``x`` (n_local, d); a plain K-means without a process group.

    All ranks must call it together (collectives). ``threads`` caps faiss' OpenMP threads so
    they do not oversubscribe the cores torch uses; 0 leaves faiss' setting alone.
    """
    x = _as_float32(x)
    if threads > 0:
        faiss.omp_set_num_threads(threads)
    if pca_dim:
        x = pca_whiten(x, pca_dim)
    if l2:
        x = l2_normalize(x).astype(np.float32)
    n, d = x.shape
    rng = np.random.default_rng(seed)           # same seed on every rank: same splits everywhere
    if init_centroids is not None:
        centroids = np.ascontiguousarray(init_centroids, dtype=np.float32).copy()
    else:
        centroids = _initial_centroids(x, k, rng)
    assign = _Assigner(d, torch.cuda.is_available() if use_gpu is None else use_gpu)
    x_t = torch.from_numpy(x).double()
    n_split = 0
    for _ in range(niter):
        _, idx = assign(x, centroids)
        sums = torch.zeros(k, d, dtype=torch.float64).index_add_(0, torch.from_numpy(idx), x_t).numpy()
        counts = np.bincount(idx, minlength=k).astype(np.int64)
        sums, counts = _all_reduce(sums), _all_reduce(counts)
        nonempty = counts > 0
        centroids[nonempty] = (sums[nonempty] / counts[nonempty, None]).astype(np.float32)
        n_split += _split_empty(centroids, counts.copy(), rng)
    dists, idx = assign(x, centroids)
    objective = float(_all_reduce(np.array([dists.sum()]))[0])
    sizes = _all_reduce(np.bincount(idx, minlength=k).astype(np.int64))
    return KMeansResult(centroids, idx, objective, sizes, n_split)
