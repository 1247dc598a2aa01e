"""DeepCluster's pseudo-label sampler: uniform over the non-empty clusters.

Draws int(N / non_empty) + 1 rows per non-empty cluster (with replacement only for clusters
smaller than that), shuffles, and truncates to N. Under data parallelism each rank calls it on
its own shard's assignment, so the indices it returns are local rows of that shard; with the
same seed on every rank plus the rank number, draws differ between ranks but are reproducible.
"""
from __future__ import annotations

import numpy as np


def uniform_cluster_indices(assignment: np.ndarray, seed: int = 0, rank: int = 0,
                            n: int = -1) -> np.ndarray:
    """Indices into ``assignment`` (this shard's rows), ``n`` of them (default: all rows)."""
    assignment = np.asarray(assignment)
    n = len(assignment) if n < 0 else n
    rng = np.random.default_rng([seed, rank])
    clusters = [np.flatnonzero(assignment == c) for c in np.unique(assignment)]
    clusters = [c for c in clusters if len(c)]
    if not clusters or n == 0:
        return np.zeros(0, dtype=np.int64)
    per = n // len(clusters) + 1
    picks = [rng.choice(c, per, replace=len(c) < per) for c in clusters]
    out = np.concatenate(picks)
    rng.shuffle(out)
    return out[:n].astype(np.int64)
