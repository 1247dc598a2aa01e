"""Ray Train layer: a TorchTrainer whose workers load their shards and run dec_ray.method.loop.fit.

RUN/ holds: config.yaml, stats.json, ray/ (Ray Train storage: checkpoints, per-epoch results),
metrics.jsonl, placement.jsonl (the node of each rank, per start), tensorboard/, model.pt (best
weights + config + stats), dev/test_predictions.parquet and result.json (best epoch, dev and test
CCC per attribute, de-normalised labels).
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch

from dec_ray.config import Config, config_from_dict, load_config
from dec_ray.data.files import atomic_path, write_json
from dec_ray.data.normalization import Stats
from dec_ray.data.pools import Pool, placement, row_bytes
from dec_ray.data.tables import (block_of, chunk_shape, is_complete, read_rows, row_ids, run_tables,
                                 split_files, split_rows, storage_dtype, stride_of, training_rows)
from dec_ray.method.distributed import gather_objects
from dec_ray.method.learner import MIN_SENTENCES_PER_WORKER_BATCH, Learner, batch_sentences
from dec_ray.method.loop import LoopState, fit
from dec_ray.report.evaluation import predictions_table
from dec_ray.service.cluster import ensure_ray

DATASETS = ("train", "unlabeled")          # trained on: each worker reads its block of the rows
EVAL_SPLITS = ("dev", "test")              # scored: each worker reads its stride
STATE_FILE = "state.pt"


def load_pools(config: dict, cfg: Config, stats: Stats, rank: int, world_size: int,
               device: torch.device) -> Tuple[Dict[str, Optional[Pool]], Dict[str, float], str]:
    """This worker's pools: its block of the train and unlabeled rows (``tables.block_of``) and its
    stride of dev/test, each streamed into a buffer of exactly its size, placed by
    ``pools.placement``. Returns them, the load metrics (``load_s``, ``pool_gb``,
    ``worker_peak_rss_gb``) and the line that says where they are and how much memory they take."""
    t0 = time.perf_counter()
    shape, attrs, dtype = chunk_shape(cfg), len(cfg.model.attributes), storage_dtype(cfg)
    tables = config["tables"]
    selected = {n: training_rows(tables, n, cfg) for n in DATASETS}
    mine = {n: block_of(ids, rank, world_size) for n, ids in selected.items() if len(ids)}
    mine.update({n: stride_of(row_ids(split_files(tables, n)), rank, world_size) for n in EVAL_SPLITS
                 if split_files(tables, n)})
    need = sum(len(ids) for ids in mine.values()) * row_bytes(shape, attrs, dtype)
    storage, pin, where = placement(need, device, cfg.scale.pool_device_fraction)
    pools: Dict[str, Optional[Pool]] = {n: None for n in (*DATASETS, *EVAL_SPLITS)}
    for n, ids in mine.items():        # a rank with no rows of a split still gets an empty pool
        pools[n] = read_rows(split_files(tables, n), ids, cfg, stats, storage, pin, device)
    sizes = ", ".join(f"{n} {len(p.row_ids)}" for n, p in pools.items() if p is not None)
    load = {"load_s": time.perf_counter() - t0,
            "pool_gb": sum(p.nbytes for p in pools.values() if p is not None) / 1e9,
            "worker_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}    # kB -> GB (Linux)
    line = (f"pools per worker: {sizes} sentences = {load['pool_gb']:.2f} GB, {where}; "
            f"{load['pool_gb'] * world_size:.2f} GB over {world_size} workers; loaded in {load['load_s']:.1f} s, "
            f"peak host memory of the worker {load['worker_peak_rss_gb']:.2f} GB")
    return pools, load, line


def rows_digest(ids: np.ndarray) -> list:
    """[count, digest] of a rank's row ids: which rows it holds, in a few bytes."""
    return [len(ids), hashlib.sha1(np.sort(ids).astype(np.int64).tobytes()).hexdigest()[:12]]


def say(line: str) -> None:
    """One console line from a worker. Ray Train V2 patches ``print`` in its workers to both
    print and log each message, so the driver would show every line twice; writing to the
    stream directly shows it once."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class MetricsLog:
    """Rank 0's per-epoch line, metrics.jsonl and TensorBoard scalars."""

    def __init__(self, out: str):
        from torch.utils.tensorboard import SummaryWriter
        self.jsonl = open(os.path.join(out, "metrics.jsonl"), "a")
        self.tb = SummaryWriter(os.path.join(out, "tensorboard"))

    def write(self, m: Dict) -> None:
        self.jsonl.write(json.dumps(m) + "\n")
        self.jsonl.flush()
        for k, v in m.items():
            if isinstance(v, (int, float)) and k != "epoch":
                self.tb.add_scalar(k, v, m["epoch"])
        self.tb.flush()
        ccc = " ".join(f"{k[8:]}={v:.3f}" for k, v in m.items() if k.startswith("dev_ccc_"))
        say(f"[dec-ray] epoch {m['epoch']:3d}  dev_loss={m['dev_loss']:.4f}  dev CCC {ccc}  "
            f"best={m['best_dev_loss']:.4f}@{m['best_epoch']}  {m['epoch_time_s']:.1f}s")


def _save_checkpoint(out: str, payload: dict, extra_files: Optional[Dict[str, pa.Table]] = None):
    """A Ray Checkpoint from a fresh dir under RUN/ (Ray deletes it after the upload); the state
    file is written then renamed (atomic)."""
    from ray.train import Checkpoint
    os.makedirs(os.path.join(out, ".checkpoint_tmp"), exist_ok=True)
    d = tempfile.mkdtemp(prefix="ckpt_", dir=os.path.join(out, ".checkpoint_tmp"))
    with atomic_path(os.path.join(d, STATE_FILE)) as tmp:
        torch.save(payload, tmp)
    for name, table in (extra_files or {}).items():
        pq.write_table(table, os.path.join(d, name))
    return Checkpoint.from_directory(d)


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: load its shards, restore the loop state, run ``loop.fit``."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = config_from_dict(config["cfg"])
    stats = Stats(**config["stats"])
    out = config["out"]
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.scale.cpus_per_worker)))
    if cfg.cluster.faiss_threads == 0:
        cfg.cluster.faiss_threads = max(1, int(cfg.scale.cpus_per_worker))
    device = ray.train.torch.get_device()
    pools, load, pool_line = load_pools(config, cfg, stats, rank, world_size, device)
    if rank == 0:
        say(f"[dec-ray] {pool_line}")
    learner = Learner(cfg, stats, device, wrap=ray.train.torch.prepare_model)

    state = LoopState()
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            st = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        learner.load_state(st["learner"])
        state = LoopState(**st["loop"])
        if rank == 0:
            say(f"[dec-ray] resumed from checkpoint after epoch {state.epoch}")
    log = MetricsLog(out) if rank == 0 else None
    placement = gather_objects({"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                                "rows": {n: rows_digest(p.row_ids) for n, p in pools.items() if p is not None}})
    # the true counts: every row of every split, each on one rank
    load.update({f"{n}_rows": sum(p["rows"].get(n, [0])[0] for p in placement) for n in DATASETS})
    if rank == 0:       # where each rank runs and which rows it holds, once per (re)start
        with open(os.path.join(out, "placement.jsonl"), "a") as f:
            f.write(json.dumps({"time": time.time(), "start_epoch": state.epoch + 1,
                                "nodes": [p["node"] for p in placement],
                                "pids": [p["pid"] for p in placement],
                                "rows": [p["rows"] for p in placement]}) + "\n")

    def report(metrics: Dict, st: LoopState, tables: Optional[Dict[str, pa.Table]] = None) -> None:
        metrics = {**metrics, **load}
        checkpoint = None
        if rank == 0:
            checkpoint = _save_checkpoint(out, {"learner": learner.state(), "loop": st.to_dict()}, tables)
            if not metrics["done"]:
                log.write(metrics)
        ray.train.report(metrics, checkpoint=checkpoint, delete_local_checkpoint_after_upload=True)

    result = fit(learner, pools, state, report)
    if state.epoch + 1 < cfg.train.epochs and rank == 0:
        say(f"[dec-ray] early stop: no dev improvement for {state.bad_epochs} epochs")
    attrs = cfg.model.attributes
    tables = {f"{split}_predictions.parquet": predictions_table(ev["row_ids"], ev["pred"], ev["gold"], attrs)
              for split, ev in result["evals"].items()}
    report(result["metrics"], state, tables)


def resolve_batch(cfg: Config, n_train: int) -> str:
    """Shrink ``train.batch_sentences`` when an epoch would make too few steps; returns the line
    that says what was chosen."""
    t, workers = cfg.train, cfg.scale.workers
    chosen = batch_sentences(n_train, workers, t.batch_sentences, t.min_steps_per_epoch)
    why = "" if chosen == t.batch_sentences else (
        f" (configured {t.batch_sentences} would make {n_train // max(t.batch_sentences, 1)} steps per epoch; "
        f"train.min_steps_per_epoch={t.min_steps_per_epoch})")
    t.batch_sentences = chosen
    return (f"batch {chosen} sentences x {cfg.features.num_chunks} chunks = {chosen // workers} sentences per "
            f"worker x {workers} workers, {n_train // chosen} steps per epoch over {n_train} Train sentences{why}")


def build_trainer(tables: str, out: str, cfg: Config, stats: Stats, name: str = "train",
                  extra_callbacks=None):
    """The TorchTrainer for one run; also used by the tuner inside each trial."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    for split in ("train", "dev"):
        if not split_files(tables, split):
            raise ValueError(f"{tables}: the {split} split is empty; training needs train and dev")
    rows = {s: len(training_rows(tables, s, cfg)) for s in DATASETS}
    if rows["train"] < MIN_SENTENCES_PER_WORKER_BATCH * cfg.scale.workers:
        raise ValueError(f"{tables}: {rows['train']} Train sentences for {cfg.scale.workers} workers; each worker "
                         f"needs at least {MIN_SENTENCES_PER_WORKER_BATCH}")
    lines = [resolve_batch(cfg, rows["train"])]
    available = split_rows(tables, "unlabeled")
    if rows["unlabeled"] < available and rows["unlabeled"] > 0:
        lines.append(f"unlabeled: a random {rows['unlabeled']} of {available} sentences (train.unlabeled_limit, "
                     f"seed {cfg.train.seed})")
    elif available and cfg.model.name != "cnn":
        lines.append(f"unlabeled: {rows['unlabeled']} sentences")
    m = cfg.model
    print(f"[dec-ray] {m.name} ({m.encoder} encoder, width {m.width:g}, init {m.init}), K={cfg.cluster.k}, "
          f"{cfg.train.epochs} epochs, SGD lr {cfg.train.lr:g} momentum {cfg.train.momentum:g}, "
          f"Adam lr {cfg.train.lr_regressor:g}; " + "; ".join(lines), flush=True)
    s = cfg.scale
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "stats": asdict(stats), "out": out,
                           "tables": tables},
        scaling_config=ScalingConfig(num_workers=s.workers, use_gpu=s.use_gpu,
                                     resources_per_worker={"CPU": s.cpus_per_worker},
                                     placement_strategy=s.placement_strategy),
        run_config=RunConfig(name=name, storage_path=os.path.join(out, "ray"),
                             checkpoint_config=CheckpointConfig(num_to_keep=s.num_to_keep),
                             failure_config=FailureConfig(max_failures=s.max_failures),
                             callbacks=extra_callbacks),
    )


def finalize(out: str, cfg: Config, stats: Stats, result) -> dict:
    """model.pt, predictions and result.json from the run's last checkpoint."""
    ckpt = result.checkpoint
    if ckpt is None:
        raise RuntimeError("training finished without a checkpoint")
    with ckpt.as_directory() as d:
        st = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        for f in ("dev_predictions.parquet", "test_predictions.parquet"):
            if os.path.exists(os.path.join(d, f)):
                shutil.copy(os.path.join(d, f), os.path.join(out, f))
    with atomic_path(os.path.join(out, "model.pt")) as tmp:
        torch.save({"config": cfg.to_dict(), "stats": asdict(stats), "model": st["loop"]["best_model"]}, tmp)
    m = result.metrics or {}
    attrs = cfg.model.attributes
    loop = st["loop"]
    summary = {
        "model": cfg.model.name, "attributes": attrs, "best_epoch": loop["best_epoch"],
        "epochs_run": loop["epoch"] + 1, "best_dev_loss": loop["best_loss"],
        "batch_sentences": cfg.train.batch_sentences,
        "dev_ccc": {a: m.get(f"dev_ccc_{a}") for a in attrs},
        "test_ccc": {a: m.get(f"test_ccc_{a}") for a in attrs},
        "model_path": os.path.join(out, "model.pt"),
        "checkpoint": ckpt.path,
    }
    write_json(os.path.join(out, "result.json"), summary)
    return summary


def run_training(tables: str, out: str, cfg: Optional[Config] = None, resume: bool = False,
                 callbacks: Optional[list] = None) -> dict:
    """Train one model end to end; returns the content of RUN/result.json. ``callbacks``: Ray Train
    ``UserCallback``s, run by the controller after each report (e.g. to watch or act on a run)."""
    out = os.path.abspath(out)
    if resume:
        if not os.path.exists(os.path.join(out, "config.yaml")):
            raise ValueError(f"{out}: nothing to resume (no config.yaml)")
        cfg = load_config(os.path.join(out, "config.yaml"))
        tables = run_tables(out)
    elif os.path.exists(os.path.join(out, "ray")):
        raise ValueError(f"{out} already holds a run; use --resume {out} or a new folder")
    if not is_complete(tables):
        raise ValueError(f"{tables}: not a finished ingest (no _SUCCESS); run `dec-ray ingest` first")
    stats = Stats.load(os.path.join(tables, "stats.json"))
    ensure_ray(cfg.scale.workers * cfg.scale.cpus_per_worker)
    os.makedirs(out, exist_ok=True)
    trainer = build_trainer(os.path.abspath(tables), out, cfg, stats, extra_callbacks=callbacks)  # settles the batch
    cfg.save(os.path.join(out, "config.yaml"))                            # as run, for --resume
    stats.save(os.path.join(out, "stats.json"))
    with open(os.path.join(out, "tables.txt"), "w") as f:
        f.write(os.path.abspath(tables))
    return finalize(out, cfg, stats, trainer.fit())


def repeated_runs(tables: str, out: str, models: Sequence[str], repeats: int, cfg_path=None,
                  overrides: Sequence[str] = ()) -> List[str]:
    """Train each model ``repeats`` times (train.seed = 0..R-1) into OUT/runs/MODEL/seedR, one
    Ray Train run after the other; finished runs are kept and interrupted ones resumed, so the
    command can be re-run after a failure. ``ridge`` (the linear reference) is deterministic:
    one fit, no Ray."""
    from dec_ray.report.ridge import run_ridge
    runs = []
    for model in models:
        if model == "ridge":
            run = os.path.join(out, "runs", "ridge")
            runs.append(run)
            if not os.path.exists(os.path.join(run, "result.json")):
                run_ridge(tables, run, load_config(cfg_path, list(overrides)).model.attributes)
            continue
        for seed in range(repeats):
            run = os.path.join(out, "runs", model, f"seed{seed}")
            runs.append(run)
            if os.path.exists(os.path.join(run, "result.json")):
                continue
            print(f"[dec-ray evaluate] training {model} seed {seed} -> {run}", flush=True)
            if os.path.exists(os.path.join(run, "ray")):
                run_training(None, run, resume=True)
            else:
                run_training(tables, run, load_config(cfg_path, [*overrides, f"model.name={model}",
                                                                 f"train.seed={seed}"]))
    return runs
