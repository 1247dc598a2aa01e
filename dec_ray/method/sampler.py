"""DeepCluster's pseudo-label sampler: uniform over the non-empty clusters, on the device.

Draws int(N / non_empty) + 1 rows per non-empty cluster (without replacement from clusters that
have that many rows, with replacement from smaller ones), shuffles, and truncates to N. Under
data parallelism each rank calls it on its own shard's assignment, so the indices it returns are
local rows of that shard; seeded by (seed, rank): draws differ between ranks but are reproducible.
All work happens on the assignment's device; one host sync reads the number of non-empty clusters.
"""
from __future__ import annotations

import torch

from dec_ray.method.distributed import rank_seed


def uniform_cluster_indices(assignment: torch.Tensor, seed: int = 0, rank: int = 0, n: int = -1) -> torch.Tensor:
    """Indices into ``assignment`` (this shard's rows), ``n`` of them (default: all rows), int64 on
    the assignment's device."""
    assignment = torch.as_tensor(assignment)
    dev = assignment.device
    n = len(assignment) if n < 0 else n
    g = torch.Generator(device=dev)
    g.manual_seed(rank_seed(seed, rank))
    counts = torch.bincount(assignment)
    clusters = torch.nonzero(counts).flatten()
    if len(clusters) == 0 or n == 0:
        return torch.zeros(0, dtype=torch.int64, device=dev)
    per = n // len(clusters) + 1
    # rows sorted by cluster, in random order within each cluster
    keys = assignment.double() + torch.rand(len(assignment), generator=g, device=dev, dtype=torch.float64)
    order = torch.argsort(keys)
    starts = (torch.cumsum(counts, 0) - counts)[clusters]
    sizes = counts[clusters]
    first = torch.arange(per, device=dev).expand(len(clusters), per)              # without replacement
    drawn = (torch.rand(len(clusters), per, generator=g, device=dev, dtype=torch.float64)
             * sizes[:, None]).long()                                              # with replacement
    offsets = torch.where(sizes[:, None] >= per, first, drawn)
    picks = order[(starts[:, None] + offsets).flatten()]
    return picks[torch.randperm(len(picks), generator=g, device=dev)][:n]
