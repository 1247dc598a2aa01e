"""DeepCluster's pseudo-label sampler: uniform over the non-empty clusters, on the device.

On 1 rank: int(N / non_empty) + 1 draws per non-empty cluster (without replacement from clusters
that have that many rows, with replacement from smaller ones), shuffled and truncated to N.

Under data parallelism the draws are uniform over the *global* clusters: the per-cluster draw count
comes from the global N and the global non-empty clusters, and each rank draws its share of every
cluster in proportion to the rows of it that the rank holds (``cluster_shares``; the shares of a
cluster add up exactly to the 1-rank count). A cluster held by one rank gets as many draws as on
1 rank, not 1/W of them. Each rank then draws its share from its own rows and truncates to its own
row count. Seeded by (seed, rank): draws differ between ranks but are reproducible. One host sync
reads the number of non-empty clusters.
"""
from __future__ import annotations

from typing import Optional

import torch

from dec_ray.method.distributed import gather_tensors, proportional_share, rank_seed, world


def cluster_shares(counts: torch.Tensor, rank: int) -> torch.Tensor:
    """(W, K) rows of each cluster held by each rank -> this rank's draws of each cluster: the
    1-rank draws per non-empty cluster, split between ranks in proportion to their rows of it
    (cumulative floors: the shares of a cluster sum to the 1-rank count exactly)."""
    counts = counts.long()
    total = counts.sum(0)
    nonempty = int((total > 0).sum())
    if nonempty == 0:
        return torch.zeros(counts.shape[1], dtype=torch.int64, device=counts.device)
    per = int(total.sum()) // nonempty + 1
    upto = torch.cumsum(counts, 0)                                 # rows of ranks 0..r
    below = upto - counts                                          # rows of ranks 0..r-1
    safe = total.clamp(min=1)
    share = per * upto[rank] // safe - per * below[rank] // safe
    return torch.where(total > 0, share, torch.zeros_like(share))


def kept_draws(draws: torch.Tensor, n: int, rank: int) -> int:
    """(W,) draws of each rank, cut to ``n`` in all: this rank's share of the ``n`` kept, in
    proportion to its draws (cumulative floors: the shares add up to ``n`` exactly)."""
    draws = [int(d) for d in draws]
    return draws[rank] if sum(draws) <= n else proportional_share(n, draws, rank)


def uniform_cluster_indices(assignment: torch.Tensor, seed: int = 0, rank: int = 0, n: int = -1,
                            k: Optional[int] = None) -> torch.Tensor:
    """Indices into ``assignment`` (this rank's rows), int64 on the assignment's device: this rank's
    share of at most ``n`` draws over all ranks (default: the global row count, as 1 rank draws at
    most its rows); ``rank`` seeds the draws. ``k``: the number of clusters (the same on every rank; by
    default one more than the largest label here, which only 1 rank may use). A collective when
    there is a process group: every rank calls it."""
    assignment = torch.as_tensor(assignment)
    dev = assignment.device
    k = int(assignment.max()) + 1 if k is None and len(assignment) else (k or 0)
    counts = torch.bincount(assignment, minlength=k)
    every = gather_tensors(counts)                                 # (W, K): one collective
    me, size = world()
    share = cluster_shares(every, me)
    draws = torch.stack([cluster_shares(every, r).sum() for r in range(size)]).cpu()
    keep = kept_draws(draws, int(every.sum()) if n < 0 else n, me)
    g = torch.Generator(device=dev)
    g.manual_seed(rank_seed(seed, rank))
    if int(share.sum()) == 0 or keep == 0:
        return torch.zeros(0, dtype=torch.int64, device=dev)
    # rows sorted by cluster, in random order within each cluster
    keys = assignment.double() + torch.rand(len(assignment), generator=g, device=dev, dtype=torch.float64)
    order = torch.argsort(keys)
    clusters = torch.nonzero(share).flatten()
    starts = (torch.cumsum(counts, 0) - counts)[clusters]
    sizes, wants = counts[clusters], share[clusters]
    most = int(wants.max())
    j = torch.arange(most, device=dev).expand(len(clusters), most)
    drawn = (torch.rand(len(clusters), most, generator=g, device=dev, dtype=torch.float64)
             * sizes[:, None]).long()                                              # with replacement
    offsets = torch.where(sizes[:, None] >= wants[:, None], j, drawn)             # or without
    picks = order[(starts[:, None] + offsets)[j < wants[:, None]]]
    return picks[torch.randperm(len(picks), generator=g, device=dev)][:keep]
