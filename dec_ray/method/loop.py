"""The epoch loop: train, score dev, keep the best weights, stop early, score the best on test. No Ray.

Plain code that any process runs (the tests run it without Ray); the Ray Train worker restores a
``LoopState`` from its checkpoint and passes a ``report`` that saves the next one.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional

from dec_ray.data.pools import Pool
from dec_ray.method.epoch import run_epoch
from dec_ray.method.learner import Learner


@dataclass
class LoopState:
    """What the epoch loop carries from epoch to epoch (and through a checkpoint)."""
    epoch: int = -1                       # last finished epoch
    best_loss: float = float("inf")
    best_epoch: int = -1
    bad_epochs: int = 0
    best_model: Optional[dict] = None
    finished: bool = False

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "best_loss": self.best_loss, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs, "best_model": self.best_model, "finished": self.finished}


def is_better(loss: float, best: float) -> bool:
    return math.isfinite(loss) and loss < best


def fit(learner: Learner, pools: Dict[str, Optional[Pool]], state: Optional[LoopState] = None,
        report: Optional[Callable[[Dict, LoopState], None]] = None) -> Dict:
    """The epoch loop: train, score dev, keep the best weights by dev loss, stop after
    ``train.patience`` epochs without improvement (0: run every epoch, as the official code), and
    finally score the best weights on dev and test. ``report(metrics, state)`` is called after each
    epoch (the Ray worker saves its checkpoint there). Every rank calls this; ``pools["test"]`` is
    None only when there is no test split at all. Returns the final metrics (``final == 1``; not ``done``, a key Ray Tune reserves: it ends the trial there) and the
    dev/test evaluations of the best weights."""
    cfg = learner.cfg
    state = state or LoopState()
    if state.best_model is None:
        state.best_model = learner.model_copy()
    report = report or (lambda metrics, st: None)
    for epoch in range(state.epoch + 1, cfg.train.epochs):
        t0 = time.time()
        logs = run_epoch(learner, epoch, pools["train"], pools.get("unlabeled"))
        ev = learner.evaluate(pools["dev"], "dev")["metrics"]
        if cfg.train.test_curve and pools.get("test") is not None:      # a curve only: never selects
            ev.update(learner.evaluate(pools["test"], "curve_test")["metrics"])
        state.epoch = epoch
        if is_better(ev["dev_loss"], state.best_loss):
            state.best_loss, state.best_epoch, state.bad_epochs = ev["dev_loss"], epoch, 0
            state.best_model = learner.model_copy()
        else:
            state.bad_epochs += 1
        report({"epoch": epoch, **logs, **ev, "best_dev_loss": state.best_loss, "best_epoch": state.best_epoch,
                "epoch_time_s": time.time() - t0, "final": 0}, state)
        if cfg.train.patience > 0 and state.bad_epochs >= cfg.train.patience:
            break

    learner.net.load_state_dict(state.best_model)
    final = {"epoch": max(state.epoch, 0), "best_epoch": state.best_epoch, "best_dev_loss": state.best_loss,
             "final": 1, "early_stopped": int(state.epoch + 1 < cfg.train.epochs)}
    evals = {"dev": learner.evaluate(pools["dev"], "dev")}
    if pools.get("test") is not None:
        evals["test"] = learner.evaluate(pools["test"], "test")
    for ev in evals.values():
        final.update(ev["metrics"])
    state.finished = True
    return {"metrics": final, "evals": evals}
