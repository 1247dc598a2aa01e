"""Concordance correlation coefficient as a loss (1 - CCC over a batch) and as a metric."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]


def ccc_torch(pred: torch.Tensor, gold: torch.Tensor, reduce: Optional[Reduce] = None) -> torch.Tensor:
    """CCC per column of (N, A) tensors: 2 cov / (var_p + var_g + (mean_p - mean_g)^2).

    CCC is not a mean over samples: the CCC of a batch split between ranks is not the mean of the
    parts' CCCs. So the five moments are computed from sums that ``reduce`` adds up over ranks
    (differentiably, ``distributed.all_reduce_differentiable``): N ranks then optimise the CCC of
    the global batch, the objective of 1 rank. The sums (count, sums, sums of squares and
    products) are taken in float64: on z-scored values the raw moments lose nothing that matters."""
    reduce = reduce or (lambda t: t)
    p, g = pred.double(), gold.double()
    n = torch.full((1, p.shape[1]), float(len(p)), dtype=p.dtype, device=p.device)   # also for no rows
    sums = reduce(torch.cat([n, p.sum(0, keepdim=True), g.sum(0, keepdim=True), (p * p).sum(0, keepdim=True),
                             (g * g).sum(0, keepdim=True), (p * g).sum(0, keepdim=True)]))
    n, sp, sg, spp, sgg, spg = sums
    pm, gm = sp / n, sg / n
    pv, gv, cov = spp / n - pm * pm, sgg / n - gm * gm, spg / n - pm * gm
    return (2 * cov / (pv + gv + (pm - gm) ** 2 + 1e-8)).to(pred.dtype)


def ccc_loss(pred: torch.Tensor, gold: torch.Tensor, reduce: Optional[Reduce] = None) -> torch.Tensor:
    """1 - CCC, averaged over attributes; ``reduce``: see ``ccc_torch``."""
    return (1 - ccc_torch(pred.float(), gold.float(), reduce)).mean()


def ccc(pred: np.ndarray, gold: np.ndarray) -> float:
    """CCC of two 1-d arrays of equal length (the metric, in numpy).

    Anything else is refused: an (n, 1) prediction against an (n,) label would broadcast to an
    n x n matrix and score about 0 whatever the fit (the ridge reference once chose its alpha so).
    """
    pred = np.asarray(pred, dtype=np.float64)
    gold = np.asarray(gold, dtype=np.float64)
    if pred.ndim != 1 or gold.ndim != 1 or pred.shape != gold.shape:
        raise ValueError(f"ccc needs two 1-d arrays of equal length, got shapes {pred.shape} and {gold.shape}")
    cov = np.mean((pred - pred.mean()) * (gold - gold.mean()))
    return float(2 * cov / (pred.var() + gold.var() + (pred.mean() - gold.mean()) ** 2 + 1e-12))


def sentence_means(values: np.ndarray, sentence_ids: np.ndarray):
    """Average chunk-level rows (N, A) per sentence: a sentence's prediction is its chunks' mean."""
    ids, inverse = np.unique(sentence_ids, return_inverse=True)
    sums = np.zeros((len(ids), values.shape[1]))
    np.add.at(sums, inverse, values)
    return ids, sums / np.bincount(inverse)[:, None]


def vae_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)): summed over latent units, averaged over the batch."""
    return -0.5 * torch.mean(torch.sum(1 + logvar - mu ** 2 - logvar.exp(), dim=1))
