"""The optimisers and their schedule (``train.recipe``). No Ray.

- ``official``: the official code's: plain SGD (``train.lr``, momentum and weight decay as set) on
  the encoder and cluster classifier, Adam (``train.lr_regressor``) on the regressor, constant rates.
- ``adamw``: AdamW on both parameter groups (``train.lr``, ``train.lr_regressor``; decoupled weight
  decay ``train.weight_decay``), a linear warm-up over the first ``train.warmup_fraction`` of the
  run, then a cosine decay to 0 at the last step: a recipe that converges in the 10 epochs a
  label-scarce study affords, for every network alike.
The fresh top layer after each clustering keeps its own constant SGD (``train.lr_top``) in both.
"""
from __future__ import annotations

import math
from typing import List, Tuple

import torch

from dec_ray.config import TrainConfig

RECIPES = ("official", "adamw")


def optimisers(t: TrainConfig, body: List[torch.nn.Parameter],
               regressor: List[torch.nn.Parameter]) -> Tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """(the encoder + classifier's, the regressor's)."""
    if t.recipe == "adamw":
        return (torch.optim.AdamW(body, lr=t.lr, weight_decay=t.weight_decay),
                torch.optim.AdamW(regressor, lr=t.lr_regressor, weight_decay=t.weight_decay))
    return (torch.optim.SGD(body, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay),
            torch.optim.Adam(regressor, lr=t.lr_regressor))


def rate_factor(t: TrainConfig, progress: float) -> float:
    """The multiplier of the base rates at ``progress`` epochs into the run (1 under ``official``)."""
    if t.recipe != "adamw":
        return 1.0
    warm = t.warmup_fraction * t.epochs
    if progress < warm:
        return max(progress / warm, 1e-3)
    span = max(t.epochs - warm, 1e-9)
    return 0.5 * (1.0 + math.cos(math.pi * min((progress - warm) / span, 1.0)))


def set_rates(opts, base: List[float], factor: float) -> None:
    for opt, lr in zip(opts, base):
        for g in opt.param_groups:
            g["lr"] = lr * factor
