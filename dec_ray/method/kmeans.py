"""K-means on torch tensors, on the device the embeddings are on; plain or distributed.

Each rank holds only its own embeddings. Per iteration: the E-step finds each local row's nearest
centroid, either with a faiss flat index fed torch tensors (``faiss.contrib.torch_utils``: a CPU
index for CPU tensors, a GPU index for CUDA tensors when faiss has GPU support) or in torch (a
matmul and an argmin over blocks of rows); the M-step divides an all-reduce of per-cluster sums
and counts (DeepCluster-v2's scheme, swav main_deepclusterv2.py). Initial centroids are k rows
drawn by global row index, the same rows for any number of ranks. Empty clusters are re-seeded
by splitting a large one, as faiss' Clustering.cpp does. Optional PCA-whitening and L2
normalisation (DeepCluster's preprocessing) use an all-reduced covariance. Nothing leaves the
device but k x d centroids when a cluster is empty, and the scalars the result reports.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Optional, Union

# faiss's loader reports at INFO each CPU build it probes and fails to find (ModuleNotFoundError
# lines), which Ray Train's workers print; its warnings and errors still show
logging.getLogger("faiss.loader").setLevel(logging.WARNING)
import faiss  # noqa: E402
import faiss.contrib.torch_utils  # noqa: F401,E402  (lets faiss indexes take torch tensors)
import numpy as np
import torch
import torch.distributed as dist

from dec_ray.method.distributed import all_reduce, is_distributed, world

SPLIT_EPS = 1.0 / 1024
ASSIGNERS = ("faiss", "torch")
ROW_BLOCK = 65536          # rows per matmul / float64 accumulation: bounds the temporary memory


@dataclass
class KMeansResult:
    centroids: Union[np.ndarray, torch.Tensor]   # (k, d) in the (preprocessed) space of the assignment
    assignment: Union[np.ndarray, torch.Tensor]  # (n_local,) int64 cluster of each local row
    objective: float                             # global sum of squared distances to the assigned centroid
    sizes: np.ndarray                            # (k,) global cluster sizes
    n_split: int = 0                             # empty clusters re-seeded over all iterations


def pca_whiten(x: torch.Tensor, dim: int, eps: float = 1e-5) -> torch.Tensor:
    """Project to ``dim`` principal components and whiten; mean and covariance all-reduced."""
    n = all_reduce(torch.tensor([x.shape[0]], dtype=torch.float64, device=x.device))[0]
    mean = all_reduce(x.double().sum(0)) / n
    xc = x.double() - mean
    cov = all_reduce(xc.T @ xc) / max(float(n) - 1, 1.0)
    eigval, eigvec = torch.linalg.eigh(cov)                       # ascending
    order = torch.argsort(eigval, descending=True)[:dim]
    proj = eigvec[:, order] / torch.sqrt(eigval[order] + eps)
    return (xc @ proj).float().contiguous()


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / (torch.linalg.norm(x, dim=1, keepdim=True) + 1e-10)


def _initial_centroids(x: torch.Tensor, k: int, rng: np.random.Generator) -> torch.Tensor:
    """k distinct rows drawn over the global row order (rank 0's rows, then rank 1's, ...): every
    rank draws the same global indices, fills in the rows it holds, and a sum over ranks gives
    each rank all of them. The same rows as a single process drawing from the concatenation."""
    n_local, d = x.shape
    rank, size = world()
    counts = torch.zeros(size, dtype=torch.int64)
    counts[rank] = n_local
    counts = all_reduce(counts).numpy()
    offset = int(counts[:rank].sum())
    if counts.sum() < k:
        raise ValueError(f"k-means: {int(counts.sum())} points for k={k}")
    picks = rng.choice(int(counts.sum()), k, replace=False) - offset
    mine = torch.from_numpy((picks >= 0) & (picks < n_local))
    init = torch.zeros((k, d), dtype=torch.float64, device=x.device)
    init[mine.to(x.device)] = x[torch.from_numpy(picks[mine.numpy()]).to(x.device)].double()
    return all_reduce(init).float()


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


class FaissAssigner:
    """Nearest centroid with a faiss flat L2 index, fed torch tensors on their own device."""

    def __init__(self, d: int, device: torch.device):
        if device.type == "cuda":
            self.res = faiss.StandardGpuResources()
            cfg = faiss.GpuIndexFlatConfig()
            cfg.device = device.index if device.index is not None else torch.cuda.current_device()
            self.index = faiss.GpuIndexFlatL2(self.res, d, cfg)
        else:
            self.index = faiss.IndexFlatL2(d)

    def __call__(self, x: torch.Tensor, centroids: torch.Tensor):
        self.index.reset()
        self.index.add(centroids)
        dists, idx = self.index.search(x, 1)
        return dists[:, 0], idx[:, 0]


class TorchAssigner:
    """Nearest centroid by ||x||^2 - 2 x.c + ||c||^2 (the expansion faiss uses), in row blocks."""

    def __init__(self, d: int, device: torch.device):
        pass

    def __call__(self, x: torch.Tensor, centroids: torch.Tensor):
        cn = (centroids * centroids).sum(1)
        dists = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        idx = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
        for s in range(0, x.shape[0], ROW_BLOCK):
            b = x[s:s + ROW_BLOCK]
            m = torch.addmm(cn, b, centroids.t(), alpha=-2.0).min(1)
            dists[s:s + ROW_BLOCK] = (m.values + (b * b).sum(1)).clamp_(min=0)
            idx[s:s + ROW_BLOCK] = m.indices
        return dists, idx


def _cluster_sums(x: torch.Tensor, idx: torch.Tensor, k: int) -> torch.Tensor:
    """Per-cluster float64 sums of the rows, accumulated a block at a time."""
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[0], ROW_BLOCK):
        sums.index_add_(0, idx[s:s + ROW_BLOCK], x[s:s + ROW_BLOCK].double())
    return sums


def _logsumexp_rows(a: torch.Tensor) -> torch.Tensor:
    """log of the column sums of exp(a) over the rows of every rank: (1, K). A rank with no rows
    takes part with -inf maxima and zero sums."""
    m = (a.max(0, keepdim=True).values if len(a)
         else torch.full((1, a.shape[1]), -torch.inf, dtype=a.dtype, device=a.device))
    if is_distributed():
        m = all_reduce(m, op=dist.ReduceOp.MAX)
    return m + torch.log(all_reduce(torch.exp(a - m).sum(0, keepdim=True)))


def sinkhorn_assignment(x: torch.Tensor, centroids: torch.Tensor, eps: float = 0.05,
                        iters: int = 50) -> torch.Tensor:
    """Balanced pseudo-labels: the Sinkhorn-Knopp equipartition of the rows over the centroids
    (SeLa; SwAV's ``distributed_sinkhorn``), in the log domain: Q ~ exp(-squared distance / (eps *
    mean squared distance)), scaled in turn so that every cluster holds N/K rows' mass and every row
    a mass of 1; each row takes its argmax. Column sums are all-reduced, so N ranks compute the
    1-rank result."""
    k = centroids.shape[0]
    d2 = ((x * x).sum(1, keepdim=True) - 2 * x @ centroids.T + (centroids * centroids).sum(1)).double()
    n = all_reduce(torch.tensor([x.shape[0]], dtype=torch.float64, device=x.device))[0]
    scale = all_reduce(d2.sum().reshape(1))[0] / (n * k)
    log_q = -d2 / (eps * scale.clamp(min=1e-12))
    for _ in range(iters):
        log_q = log_q + torch.log(n / k) - _logsumexp_rows(log_q)            # clusters: N/K each
        log_q = log_q - torch.logsumexp(log_q, 1, keepdim=True)             # rows: 1 each
    return log_q.argmax(1)


def kmeans(x: Union[np.ndarray, torch.Tensor], k: int, niter: int = 20, seed: int = 0,
           pca_dim: int = 0, l2: bool = False, assign: str = "faiss", threads: int = 0,
           init_centroids: Optional[Union[np.ndarray, torch.Tensor]] = None, balance: str = "none",
           sinkhorn_eps: float = 0.05) -> KMeansResult:
    """K-means of this rank's rows ``x`` (n_local, d); a plain K-means without a process group.
    ``balance="sinkhorn"``: the final assignment is the equipartition of ``sinkhorn_assignment``
    around the K-means centroids instead of the nearest centroid (SeLa, SwAV).

    Runs on ``x``'s device; returns numpy arrays for numpy input and tensors (on that device) for
    a tensor. All ranks must call it together (collectives). ``threads`` caps faiss' OpenMP
    threads so they do not oversubscribe the cores torch uses; 0 leaves faiss' setting alone.
    """
    as_numpy = isinstance(x, np.ndarray)
    x = (torch.from_numpy(np.ascontiguousarray(x)) if as_numpy else x.detach()).float().contiguous()
    if assign not in ASSIGNERS:
        raise ValueError(f"cluster.assign must be one of {ASSIGNERS}, not {assign!r}")
    if threads > 0:
        faiss.omp_set_num_threads(threads)
    if pca_dim:
        x = pca_whiten(x, pca_dim)
    if l2:
        x = l2_normalize(x)
    n, d = x.shape
    rng = np.random.default_rng(seed)           # same seed on every rank: same splits everywhere
    if init_centroids is not None:
        centroids = torch.as_tensor(init_centroids, dtype=torch.float32).to(x.device).clone()
    else:
        centroids = _initial_centroids(x, k, rng)
    if assign == "faiss" and x.device.type == "cuda" and not hasattr(faiss, "StandardGpuResources"):
        warnings.warn("cluster.assign=faiss: this faiss build has no GPU support (faiss-cpu); the E-step "
                      "runs in torch on the GPU instead (install faiss-gpu, or set cluster.assign=torch)")
        assign = "torch"
    nearest = (FaissAssigner if assign == "faiss" else TorchAssigner)(d, x.device)
    n_split = 0
    for _ in range(niter):
        _, idx = nearest(x, centroids)
        sums = all_reduce(_cluster_sums(x, idx, k))
        counts = all_reduce(torch.bincount(idx, minlength=k))
        nonempty = counts > 0
        centroids[nonempty] = (sums[nonempty] / counts[nonempty, None]).float()
        if not bool(nonempty.all()):            # rare: re-seed on the host (k x d values)
            c = centroids.cpu().numpy()
            n_split += _split_empty(c, counts.cpu().numpy().copy(), rng)
            centroids = torch.from_numpy(c).to(x.device)
    dists, idx = nearest(x, centroids)
    if balance == "sinkhorn":
        idx = sinkhorn_assignment(x, centroids, sinkhorn_eps)
        dists = ((x - centroids[idx]) ** 2).sum(1)
    objective = float(all_reduce(dists.double().sum().reshape(1))[0])
    sizes = all_reduce(torch.bincount(idx, minlength=k)).cpu().numpy()
    if as_numpy:
        return KMeansResult(centroids.cpu().numpy(), idx.cpu().numpy(), objective, sizes, n_split)
    return KMeansResult(centroids, idx, objective, sizes, n_split)

