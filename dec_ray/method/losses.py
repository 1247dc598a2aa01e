"""Concordance correlation coefficient as a loss (1 - CCC over a batch) and as a metric."""
from __future__ import annotations

import numpy as np
import torch


def ccc_torch(pred: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """CCC per column of (N, A) tensors: 2 cov / (var_p + var_g + (mean_p - mean_g)^2)."""
    pm, gm = pred.mean(0), gold.mean(0)
    pv, gv = pred.var(0, unbiased=False), gold.var(0, unbiased=False)
    cov = ((pred - pm) * (gold - gm)).mean(0)
    return 2 * cov / (pv + gv + (pm - gm) ** 2 + 1e-8)


def ccc_loss(pred: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """1 - CCC, averaged over attributes."""
    return (1 - ccc_torch(pred.float(), gold.float())).mean()


def ccc(pred: np.ndarray, gold: np.ndarray) -> float:
    """CCC of two 1-d arrays (the metric, in numpy)."""
    pred = np.asarray(pred, dtype=np.float64)
    gold = np.asarray(gold, dtype=np.float64)
    cov = np.mean((pred - pred.mean()) * (gold - gold.mean()))
    return float(2 * cov / (pred.var() + gold.var() + (pred.mean() - gold.mean()) ** 2 + 1e-12))


def sentence_means(values: np.ndarray, sentence_ids: np.ndarray):
    """Average chunk-level rows (N, A) per sentence: a sentence's prediction is its chunks' mean."""
    ids, inverse = np.unique(sentence_ids, return_inverse=True)
    sums = np.zeros((len(ids), values.shape[1]))
    np.add.at(sums, inverse, values)
    return ids, sums / np.bincount(inverse)[:, None]


def vae_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return -0.5 * torch.mean(torch.sum(1 + logvar - mu ** 2 - logvar.exp(), dim=1))
