"""Ray Train layer: a TorchTrainer whose workers load their shards and run dec_ray.method.loop.fit.

RUN/ holds: config.yaml, stats.json, ray/ (Ray Train storage: checkpoints, per-epoch results),
metrics.jsonl, placement.jsonl (the node of each rank, per start), tensorboard/, model.pt (best
weights + config + stats), dev/test_predictions.parquet and result.json (best epoch, dev and test
CCC per attribute, de-normalised labels).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import tempfile
import time
from dataclasses import asdict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dec_ray.config import MODEL_PRESETS, Config, config_from_dict, load_config, model_label, preset_overrides
from dec_ray.data.files import atomic_path, write_json
from dec_ray.data.groups import (FILE as GROUPS_FILE, FUNCTIONALS_FILE, POPULATION, TableGroups,
                                 run_functional_groups, run_groups)
from dec_ray.data.normalization import Stats
from dec_ray.data.pools import Pool, placement, positions_of, row_bytes
from dec_ray.data.tables import (block_of, chunk_shape, is_complete, labeled_stats, pool_files, read_rows,
                                 row_ids, run_tables, split_files, split_rows, storage_dtype, stride_of,
                                 training_rows, with_sentence_info)
from dec_ray.method.distributed import gather_objects
from dec_ray.method.learner import MIN_SENTENCES_PER_WORKER_BATCH, Learner, batch_sentences
from dec_ray.method.loop import LoopState, fit
from dec_ray.method.models import functionals_dim
from dec_ray.report.evaluation import predictions_table
from dec_ray.service.cluster import ResourcesUnavailable, ensure_ray, is_private, resource_holders, wait_for_room
from dec_ray.service.console import quiet_train_worker, train_logging_config
from dec_ray.service.progress import ProgressLine
from dec_ray.service.tracking import open_log, say

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
    width = functionals_dim(cfg)
    need = sum(len(ids) for ids in mine.values()) * row_bytes(shape, attrs, dtype, width)
    storage, pin, where = placement(need, device, cfg.scale.pool_device_fraction)
    groups = TableGroups.load(os.path.join(config["out"], GROUPS_FILE)) if cfg.model.norm == "speaker" else None
    functionals = TableGroups.load(os.path.join(config["out"], FUNCTIONALS_FILE)) if width else None
    pools: Dict[str, Optional[Pool]] = {n: None for n in (*DATASETS, *EVAL_SPLITS)}
    for n, ids in mine.items():        # a rank with no rows of a split still gets an empty pool
        pools[n] = read_rows(pool_files(tables, n, cfg), ids, cfg, stats, storage, pin, device,
                             labels=n != "unlabeled", groups=groups, functionals=functionals)
    if cfg.train.teacher != "none" and pools["unlabeled"] is not None:
        pools["unlabeled"].labels = teacher_targets(config["out"], pools["unlabeled"].row_ids).to(device)
    sizes = ", ".join(f"{n} {len(p.row_ids)}" for n, p in pools.items() if p is not None)
    load = {"load_s": time.perf_counter() - t0,
            "pool_gb": sum(p.nbytes for p in pools.values() if p is not None) / 1e9,
            "worker_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}    # kB -> GB (Linux)
    line = (f"pools per worker: {sizes} sentences = {load['pool_gb']:.2f} GB, {where}; "
            f"{load['pool_gb'] * world_size:.2f} GB over {world_size} workers; loaded in {load['load_s']:.1f} s, "
            f"peak host memory of the worker {load['worker_peak_rss_gb']:.2f} GB")
    return pools, load, line


TEACHER_FILE = "teacher.npz"       # RUN/teacher.npz: train.teacher's targets on the pool


def write_teacher(out: str, tables: str, cfg: Config, stats: Stats) -> int:
    """RUN/teacher.npz: the ``train.teacher`` reference, fitted on the run's labeled sentences, and
    its predictions on the run's pool, z-scored with the run's label statistics (the driver's, once)."""
    from dec_ray.report.ridge import REFERENCES, teacher_predictions
    ids, preds = teacher_predictions(tables, cfg.model.attributes, training_rows(tables, "train", cfg),
                                     training_rows(tables, "unlabeled", cfg), *REFERENCES[cfg.train.teacher])
    z = stats.normalize_labels(preds.astype(np.float32), cfg.model.attributes)
    order = np.argsort(ids)
    np.savez(os.path.join(out, TEACHER_FILE), row_ids=ids[order], targets=z[order])
    return len(ids)


def teacher_targets(out: str, rows: np.ndarray) -> torch.Tensor:
    """The teacher's z-scored targets of these pool rows (RUN/teacher.npz)."""
    t = np.load(os.path.join(out, TEACHER_FILE))
    at = positions_of(t["row_ids"], rows)
    if at is None:
        raise ValueError(f"{out}/{TEACHER_FILE} lacks some of the pool's rows: the run's pool changed")
    return torch.from_numpy(t["targets"][at])


def rows_digest(ids: np.ndarray) -> list:
    """[count, digest] of a rank's row ids: which rows it holds, in a few bytes."""
    return [len(ids), hashlib.sha1(np.sort(ids).astype(np.int64).tobytes()).hexdigest()[:12]]


def batch_progress(every_s: float = 30.0):
    """Rank 0's line within a long training pass: batches done of the pass and the time left; a
    pass shorter than ``every_s`` prints nothing (the epoch line reports it)."""
    bar = None

    def on_batch(done: int, total: int) -> None:
        nonlocal bar
        if done == 1:
            bar = ProgressLine("[dec-ray]   training pass: batches", total, every_s, say)
        if done < total:
            bar.step()
    return on_batch


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

    quiet_train_worker()
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
    if rank == 0:
        learner.on_batch = batch_progress()

    state = LoopState()
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            st = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        learner.load_state(st["learner"])
        state = LoopState(**st["loop"])
        if rank == 0:
            say(f"[dec-ray] resumed from checkpoint after epoch {state.epoch}")
    log = open_log(out, cfg, rank)
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
            if not metrics["final"]:
                log.write(metrics)
            else:
                log.close(metrics)
        # only rank 0's metrics reach Ray (Train's results, Tune); every rank takes part in the report
        ray.train.report(metrics if rank == 0 else {}, checkpoint=checkpoint,
                         delete_local_checkpoint_after_upload=True)

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
    if cfg.model.norm == "speaker":      # once, here: every worker needs every speaker's statistics
        g = run_groups(out, tables, cfg.model.input)
        if all(n.startswith("<") for n in g.moments.names):
            raise ValueError(f"{tables}: model.norm=speaker needs speakers, and these tables name none "
                             "(each split would be one group); use model.norm=train")
        lines.append(f"input z-scored per speaker ({len(g.moments.names)} groups, {GROUPS_FILE})")
    if cfg.model.functionals != "none":
        g = run_functional_groups(out, tables, cfg.model.norm == "speaker")
        lines.append(f"{cfg.model.functionals} functionals joined to the sentence encoding, z-scored "
                     + (f"per speaker ({len(g.moments.names)} groups, " if cfg.model.norm == "speaker"
                        else "with Train's statistics (") + f"{FUNCTIONALS_FILE})")
    if cfg.train.teacher != "none":
        n = write_teacher(out, tables, cfg, stats)
        lines.append(f"teacher: the {cfg.train.teacher} reference's predictions on {n} pool sentences, "
                     f"weight {cfg.train.teacher_weight:g}"
                     + (f", on {', '.join(cfg.train.teacher_attributes)}" if cfg.train.teacher_attributes else ""))
    t = cfg.train
    if t.label_fraction < 1:
        rest = split_rows(tables, "train") - rows["train"]
        lines.append(f"labels: {rows['train']} of {split_rows(tables, 'train')} Train sentences (train.label_fraction "
                     f"{t.label_fraction:g}, seed {t.label_seed}); the other {rest} "
                     + ("join the pool without labels" if t.label_rest == "pool" else "are left out"))
    available = split_rows(tables, "unlabeled")
    if 0 < t.unlabeled_limit < available:
        lines.append(f"unlabeled: {rows['unlabeled']} sentences, of them a random {t.unlabeled_limit} of the "
                     f"{available} unlabeled (train.unlabeled_limit, seed {t.seed})")
    elif cfg.model.name != "cnn" and (available or rows["unlabeled"]):
        lines.append(f"unlabeled: {rows['unlabeled']} sentences")
    m = cfg.model
    print(f"[dec-ray] {m.name} ({m.encoder} encoder, width {m.width:g}, init {m.init}), K={cfg.cluster.k}, "
          f"{cfg.train.epochs} epochs, {recipe_line(cfg.train)}; " + "; ".join(lines), flush=True)
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
                             failure_config=FailureConfig(max_failures=s.max_failures,
                                                          controller_failure_limit=start_tries(s) - 1),
                             callbacks=extra_callbacks, logging_config=train_logging_config()),
    )


WORKER_GROUP_START_S = 60.0      # Ray Train's wait for a worker group (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S)


def recipe_line(t) -> str:
    if t.recipe == "adamw":
        return (f"AdamW lr {t.lr:g} / {t.lr_regressor:g} (regressor), weight decay {t.weight_decay:g}, "
                f"warm-up {t.warmup_fraction:g} of the run then cosine")
    return f"SGD lr {t.lr:g} momentum {t.momentum:g}, Adam lr {t.lr_regressor:g}"


def start_tries(s) -> int:
    """How often Ray Train may try to start the worker group: ``scale.resource_wait_s`` in all."""
    timeout = float(os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", WORKER_GROUP_START_S))
    return max(1, math.ceil(s.resource_wait_s / timeout))


def worker_resources(cfg: Config) -> Dict[str, float]:
    s = cfg.scale
    return {"CPU": s.workers * s.cpus_per_worker, "GPU": float(s.workers) if s.use_gpu else 0.0}


def fit_or_say_why(trainer, cfg: Config):
    """``trainer.fit()``; a run whose workers never got their resources stops with
    ResourcesUnavailable, naming what holds them (Ray Train alone would keep trying)."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
    from ray.train.v2.api.exceptions import ControllerError
    if is_private():
        wait_for_room(worker_resources(cfg), cfg.scale.resource_wait_s)
    try:
        return trainer.fit()
    except ControllerError as e:
        if not isinstance(e.controller_failure, WorkerGroupStartupTimeoutError):
            raise
        need = ", ".join(f"{v:g} {k}" for k, v in worker_resources(cfg).items() if v)
        raise ResourcesUnavailable(
            f"the run's workers ({need}) did not start within scale.resource_wait_s = {cfg.scale.resource_wait_s:g} s. "
            "Held by:\n  " + "\n  ".join(resource_holders() or ["(nothing listed)"])) from None


def save_model(out: str, cfg: Config, stats: Stats, weights: dict) -> None:
    """RUN/model.pt: the weights, config and Train statistics; for a per-speaker model also the
    population statistics (its Train audio as one group), what it reads when no speaker is named."""
    state = {"config": cfg.to_dict(), "stats": asdict(stats), "model": weights}
    if cfg.model.norm == "speaker":
        mean, std = TableGroups.load(os.path.join(out, GROUPS_FILE)).moments.of_group(POPULATION)
        state["population"] = {"mean": mean.tolist(), "std": std.tolist()}
    if cfg.model.functionals != "none":     # the functionals' Train statistics: the population's and train norm's
        mean, std = TableGroups.load(os.path.join(out, FUNCTIONALS_FILE)).moments.of_group(POPULATION)
        state["functionals"] = {"mean": mean.tolist(), "std": std.tolist()}
    with atomic_path(os.path.join(out, "model.pt")) as tmp:
        torch.save(state, tmp)


def finalize(out: str, cfg: Config, stats: Stats, result) -> dict:
    """model.pt, predictions and result.json from the run's last checkpoint."""
    ckpt = result.checkpoint
    if ckpt is None:
        raise RuntimeError("training finished without a checkpoint")
    with ckpt.as_directory() as d:
        st = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        for split in EVAL_SPLITS:
            f = f"{split}_predictions.parquet"
            if os.path.exists(os.path.join(d, f)):
                with atomic_path(os.path.join(out, f)) as tmp:
                    pq.write_table(with_sentence_info(pq.read_table(os.path.join(d, f)), run_tables(out), split), tmp)
    save_model(out, cfg, stats, st["loop"]["best_model"])
    m = result.metrics or {}
    attrs = cfg.model.attributes
    loop = st["loop"]
    summary = {
        "model": model_label(cfg), "attributes": attrs, "best_epoch": loop["best_epoch"],
        "epochs_run": loop["epoch"] + 1, "best_dev_loss": loop["best_loss"],
        "batch_sentences": cfg.train.batch_sentences,
        "dev_ccc": {a: m.get(f"dev_ccc_{a}") for a in attrs},
        "test_ccc": {a: m.get(f"test_ccc_{a}") for a in attrs},
        "model_path": os.path.join(out, "model.pt"),
        "checkpoint": ckpt.path,
    }
    write_json(os.path.join(out, "result.json"), summary)
    return summary


def finalize_from_checkpoint(out: str) -> dict:
    """model.pt and result.json of a run that ended without ``finalize`` (a Tune trial its scheduler
    stopped): the best weights so far from its newest checkpoint, the dev scores of its best epoch
    from metrics.jsonl, ``stopped: true``, and no test scores: it was never scored on test."""
    import glob
    cfg = load_config(os.path.join(out, "config.yaml"))
    stats = Stats.load(os.path.join(out, "stats.json"))
    states = sorted(glob.glob(os.path.join(out, "ray", "*", "checkpoint_*", STATE_FILE)), key=os.path.getmtime)
    if not states:
        raise RuntimeError(f"{out}: no checkpoint to finalize from")
    loop = torch.load(states[-1], map_location="cpu", weights_only=True)["loop"]
    save_model(out, cfg, stats, loop["best_model"])
    epochs = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    best = next((m for m in epochs if m["epoch"] == loop["best_epoch"]), {})
    attrs = cfg.model.attributes
    summary = {"model": model_label(cfg), "attributes": attrs, "stopped": True, "best_epoch": loop["best_epoch"],
               "epochs_run": loop["epoch"] + 1, "best_dev_loss": loop["best_loss"],
               "batch_sentences": cfg.train.batch_sentences,
               "dev_ccc": {a: best.get(f"dev_ccc_{a}") for a in attrs}, "test_ccc": {a: None for a in attrs},
               "model_path": os.path.join(out, "model.pt"), "checkpoint": os.path.dirname(states[-1])}
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
    stats = labeled_stats(tables, cfg)
    ensure_ray(cfg.scale.workers * cfg.scale.cpus_per_worker)
    os.makedirs(out, exist_ok=True)
    trainer = build_trainer(os.path.abspath(tables), out, cfg, stats, extra_callbacks=callbacks)  # settles the batch
    cfg.save(os.path.join(out, "config.yaml"))                            # as run, for --resume
    stats.save(os.path.join(out, "stats.json"))
    with open(os.path.join(out, "tables.txt"), "w") as f:
        f.write(os.path.abspath(tables))
    return finalize(out, cfg, stats, fit_or_say_why(trainer, cfg))


def differences(run: str, cfg: Config) -> List[str]:
    """The method keys (features, model, cluster, train) in which a finished run's saved config
    differs from ``cfg``: a run kept for reuse must be the run asked for."""
    saved = load_config(os.path.join(run, "config.yaml")).to_dict()
    wanted = cfg.to_dict()
    derived = {"train.batch_sentences"}         # saved as the run resolved it (train.min_steps_per_epoch)
    return [f"{part}.{k}: {saved[part][k]!r} there, {wanted[part][k]!r} asked"
            for part in ("features", "model", "cluster", "train") for k in wanted[part]
            if saved[part].get(k) != wanted[part][k] and f"{part}.{k}" not in derived]


def ridge_labels(cfg: Config) -> Dict:
    """Which Train labels a ridge is fitted on, as recorded in its result.json."""
    return {"label_fraction": cfg.train.label_fraction, "label_seed": cfg.train.label_seed}


def fit_reference(tables: str, run: str, name: str, cfg: Config) -> None:
    """A linear reference (``ridge.REFERENCES``: its input and normalisation) fitted on the Train
    labels ``cfg`` keeps, into RUN; a finished fit on the same labels is kept, one on other labels
    is refused."""
    from dec_ray.report.ridge import REFERENCES, run_ridge
    rows = training_rows(tables, "train", cfg) if cfg.train.label_fraction < 1 else None
    labels = ridge_labels(cfg)
    if os.path.exists(os.path.join(run, "result.json")):
        with open(os.path.join(run, "result.json")) as f:
            fitted = json.load(f)
        other_rows = rows is not None and fitted["train_sentences"] != len(rows)
        if fitted.get("labels", labels) != labels or other_rows:
            raise ValueError(f"{run} was fitted on other Train labels ({fitted.get('labels')}, "
                             f"{fitted['train_sentences']} sentences) than asked ({labels}); use another --out")
        return
    inputs, norm = REFERENCES[name]
    run_ridge(tables, run, cfg.model.attributes, rows, labels, inputs, norm, name)


def repeated_runs(tables: str, out: str, models: Sequence[str], repeats: int, cfg_path=None,
                  overrides: Sequence[str] = ()) -> List[str]:
    """Train each model ``repeats`` times (train.seed = 0..R-1) into OUT/runs/MODEL/seedR, one
    Ray Train run after the other; finished runs are kept and interrupted ones resumed, so the
    command can be re-run after a failure. A model may be a preset that names one (``MODEL_PRESETS``:
    ``recommended``), laid over the config. The linear references (``ridge``, ``egemaps``,
    ``egemaps-speaker``) are deterministic: one fit each, no Ray."""
    from dec_ray.report.ridge import REFERENCES
    runs = []
    for model in models:
        if model in REFERENCES:
            run = os.path.join(out, "runs", model)
            runs.append(run)
            fit_reference(tables, run, model, load_config(cfg_path, list(overrides)))
            continue
        for seed in range(repeats):
            run = os.path.join(out, "runs", model, f"seed{seed}")
            runs.append(run)
            chosen = preset_overrides(model) if model in MODEL_PRESETS else [f"model.name={model}"]
            cfg = load_config(cfg_path, [*overrides, *chosen, f"train.seed={seed}"])
            if os.path.exists(os.path.join(run, "config.yaml")) and differences(run, cfg):
                raise ValueError(f"{run} holds a run trained with another config ("
                                 + "; ".join(differences(run, cfg)[:4]) + "); use another --out")
            if os.path.exists(os.path.join(run, "result.json")):
                continue
            print(f"[dec-ray evaluate] training {model} seed {seed} -> {run}", flush=True)
            if os.path.exists(os.path.join(run, "ray")):
                run_training(None, run, resume=True)
            else:
                run_training(tables, run, cfg)
    return runs
