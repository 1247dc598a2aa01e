"""Rank 0's record of a run, where Ray users look: one console line per epoch, metrics.jsonl,
TensorBoard (tags grouped as train/, dev/, cluster/, time/, data/; losses named as losses; the
run's hyperparameters), and, when configured, MLflow and Weights & Biases through Ray's own
integrations (``ray.air.integrations.mlflow.setup_mlflow`` / ``wandb.setup_wandb``)."""
from __future__ import annotations

import json
import os
import sys
from typing import Dict, Optional

from dec_ray.config import Config

STAGE_LOSSES = ("ce", "ccc", "recon")          # the loss terms a Stage names (method/epoch.py)
HPARAMS = ("model.name", "model.encoder", "model.width", "cluster.k", "train.lambda_ce", "train.lr",
           "train.lr_regressor", "train.lr_top", "train.batch_sentences", "train.seed", "train.unlabeled_limit",
           "scale.workers")


def say(line: str) -> None:
    """One console line from a worker. Ray Train V2 patches ``print`` in its workers to both
    print and log each message, so the driver would show every line twice; writing to the
    stream directly shows it once."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def tag(key: str) -> str:
    """The TensorBoard tag of a metric key: its group, and losses named as losses."""
    if key in ("best_dev_loss", "best_epoch"):
        return f"dev/{key.replace('dev_loss', 'ccc_loss')}"
    if key.startswith(("dev_", "test_")):
        split, rest = key.split("_", 1)
        return f"{split}/{'ccc_loss' if rest == 'loss' else rest}"
    if key.endswith("_s"):
        return f"time/{key}"
    if key.endswith(("_kmeans_obj", "_nonempty")):
        return f"cluster/{key}"
    if key in ("pool_gb", "worker_peak_rss_gb") or key.endswith("_rows"):
        return f"data/{key}"
    for loss in STAGE_LOSSES:
        if key == loss or key.endswith("_" + loss):
            return f"train/{key}_loss"
    return f"train/{key}"


def hparams(cfg: Config) -> Dict[str, object]:
    d = cfg.to_dict()
    out = {}
    for key in HPARAMS:
        section, name = key.split(".")
        out[key] = d[section][name]
    return out


class MetricsLog:
    """Rank 0's per-epoch line, metrics.jsonl, TensorBoard, and the configured trackers."""

    def __init__(self, out: str, cfg: Config):
        from torch.utils.tensorboard import SummaryWriter
        self.cfg = cfg
        self.jsonl = open(os.path.join(out, "metrics.jsonl"), "a")
        self.tb = SummaryWriter(os.path.join(out, "tensorboard"))
        self.mlflow = self.wandb = None
        t = cfg.tracking
        if t.mlflow_uri:
            from ray.air.integrations.mlflow import setup_mlflow
            self.mlflow = setup_mlflow(hparams(cfg), tracking_uri=t.mlflow_uri, experiment_name=t.experiment,
                                       run_name=t.run_name or os.path.basename(out),
                                       create_experiment_if_not_exists=True)
        if t.wandb_project:
            from ray.air.integrations.wandb import setup_wandb
            self.wandb = setup_wandb(hparams(cfg), project=t.wandb_project, name=t.run_name or os.path.basename(out),
                                     dir=out)

    def write(self, m: Dict) -> None:
        self.jsonl.write(json.dumps(m) + "\n")
        self.jsonl.flush()
        scalars = {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and k not in ("epoch", "final")}
        for k, v in scalars.items():
            self.tb.add_scalar(tag(k), v, m["epoch"])
        self.tb.flush()
        if self.mlflow is not None:
            self.mlflow.log_metrics({tag(k): v for k, v in scalars.items()}, step=m["epoch"])
        if self.wandb is not None:
            self.wandb.log({tag(k): v for k, v in scalars.items()}, step=m["epoch"])
        ccc = " ".join(f"{k[8:]}={v:.3f}" for k, v in m.items() if k.startswith("dev_ccc_"))
        say(f"[dec-ray] epoch {m['epoch']:3d}  dev_loss={m['dev_loss']:.4f}  dev CCC {ccc}  "
            f"best={m['best_dev_loss']:.4f}@{m['best_epoch']}  {m['epoch_time_s']:.1f}s")

    def close(self, final: Dict) -> None:
        """The run's hyperparameters beside its final scores (TensorBoard's HPARAMS tab)."""
        scores = {f"hparam/{k}": float(v) for k, v in final.items()
                  if k in ("best_dev_loss", "dev_ccc", "test_ccc") and isinstance(v, (int, float))}
        self.tb.add_hparams({k: v if isinstance(v, (int, float, str, bool)) else str(v)
                             for k, v in hparams(self.cfg).items()}, scores, run_name=".")
        self.tb.close()
        if self.mlflow is not None:      # the best weights' scores, apart from the per-epoch series
            self.mlflow.log_metrics({f"result/{k}": float(v) for k, v in final.items()
                                     if k.startswith(("dev_", "test_")) and isinstance(v, (int, float))})
            self.mlflow.end_run()
        if self.wandb is not None:
            self.wandb.summary.update({k: v for k, v in final.items() if isinstance(v, (int, float))})
            self.wandb.finish()
        self.jsonl.close()


def open_log(out: str, cfg: Config, rank: int) -> Optional[MetricsLog]:
    return MetricsLog(out, cfg) if rank == 0 else None
