"""Ray Tune over lambda, K and the learning rates; each trial is one TorchTrainer run.

The Ray Train V2 way: a Tune function trainable builds the TorchTrainer of dec_ray.service.train with
``TuneReportCallback`` in its RunConfig, which forwards the workers' per-epoch reports to Tune,
so ASHA sees dev_loss every epoch. Trials run side by side as far as the cluster's CPUs allow,
always leaving one CPU for Ray Data (no deadlock on a 2-CPU machine).
"""
from __future__ import annotations

import csv
import os
from typing import Dict, List, Optional

import yaml

from dec_ray.config import Config, apply_overrides, config_from_dict
from dec_ray.data.normalization import Stats

# Search space: dotted config key -> {distribution: args}; distributions: choice, grid, loguniform,
# uniform, randint, qrandint. Override with --space FILE (same form).
DEFAULT_SPACE: Dict[str, dict] = {
    "train.lambda_ce": {"loguniform": [0.1, 10.0]},
    "cluster.k": {"choice": [10, 20, 30, 50, 100, 200]},
    "train.lr": {"loguniform": [1e-4, 1e-2]},
    "train.lr_regressor": {"loguniform": [1e-4, 5e-3]},
}


def build_space(spec: Dict[str, dict]) -> dict:
    from ray import tune
    space = {}
    for key, dist in spec.items():
        (kind, args), = dist.items()
        if kind == "choice":
            space[key] = tune.choice(list(args))
        elif kind == "grid":
            space[key] = tune.grid_search(list(args))
        elif kind in ("loguniform", "uniform", "randint", "qrandint"):
            space[key] = getattr(tune, kind)(*args)
        else:
            raise ValueError(f"search space {key}: unknown distribution {kind!r}")
    return space


def trial_config(base: dict, sampled: dict) -> Config:
    data = apply_overrides(yaml.safe_load(yaml.safe_dump(base)), [f"{k}={v}" for k, v in sampled.items()])
    return config_from_dict(data)


def trial_dir(out: str, trial_id: str) -> str:
    return os.path.join(out, "trials", trial_id)


def run_trial(config: dict, base: dict, stats: dict, tables: str, out: str) -> None:
    """One trial: a TorchTrainer whose reports reach Tune through TuneReportCallback. ``config``
    holds only the sampled keys; the constants come through ``tune.with_parameters`` (once, in the
    object store), so Tune's console and state show what was searched, nothing else."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback
    from dec_ray.data.tables import labeled_stats
    from dec_ray.service.train import build_trainer, finalize, fit_or_say_why

    cfg = trial_config(base, config)
    st = labeled_stats(tables, cfg) if cfg.train.label_fraction < 1 else Stats(**stats)
    run = trial_dir(out, tune.get_context().get_trial_id())
    os.makedirs(run, exist_ok=True)
    with open(os.path.join(run, "tables.txt"), "w") as f:
        f.write(tables)
    trainer = build_trainer(tables, run, cfg, st, name="train", extra_callbacks=[TuneReportCallback()])
    cfg.save(os.path.join(run, "config.yaml"))          # with the batch size build_trainer settled
    st.save(os.path.join(run, "stats.json"))
    finalize(out=run, cfg=cfg, stats=st, result=fit_or_say_why(trainer, cfg))


def trial_lines(metric: str):
    """A Tune callback that prints the product's lines: a trial's start (what was sampled), each
    epoch's metric, its end (finished, stopped by the scheduler, or failed)."""
    from ray import tune

    class TrialLines(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            sampled = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in (trial.config or {}).items())
            print(f"[tune] trial {trial.trial_id} started: {sampled}", flush=True)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if metric in result and not result.get("final"):
                print(f"[tune] trial {trial.trial_id} epoch {result.get('epoch', '?')}: {metric}={result[metric]:.4f}",
                      flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            how = "finished" if last.get("final") else "stopped by the scheduler"
            print(f"[tune] trial {trial.trial_id} {how} after {last.get('epoch', -1) + 1} epochs", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"[tune] trial {trial.trial_id} failed: {trial.error_file or ''}", flush=True)

    return TrialLines()


def finalize_stopped(run: str) -> Optional[dict]:
    """A trial the scheduler stopped ends without ``finalize``: its folder gets model.pt (the best
    weights so far, from its last checkpoint) and a result.json that says it was stopped, with its
    best dev scores and no test scores (it was never scored on test). Nothing for a finished trial."""
    from dec_ray.service.train import finalize_from_checkpoint
    if os.path.exists(os.path.join(run, "result.json")) or not os.path.exists(os.path.join(run, "config.yaml")):
        return None
    return finalize_from_checkpoint(run)


def run_tune(tables: str, out: str, cfg: Config, space_spec: Optional[Dict[str, dict]] = None,
             resume: bool = False) -> List[dict]:
    """Run (or resume) the search; write trials.csv, best_config.yaml; return the sorted trials."""
    from ray import tune
    from dec_ray.service.cluster import ensure_ray, runs_that_fit
    from dec_ray.service.console import verbose
    out = os.path.abspath(out)
    tables = os.path.abspath(tables)
    stats = Stats.load(os.path.join(tables, "stats.json"))
    ensure_ray(cfg.scale.workers * cfg.scale.cpus_per_worker + 1)
    space = build_space(space_spec or DEFAULT_SPACE)
    t = cfg.tune
    scheduler = None
    if t.scheduler == "asha":
        # a trial reports once per epoch and once more at its end; ASHA stops a trial when it reaches
        # max_t, so max_t lies past the final report: a trial that runs every epoch ends by itself
        # and writes model.pt and result.json
        scheduler = tune.schedulers.ASHAScheduler(time_attr="training_iteration", max_t=cfg.train.epochs + 2,
                                                  grace_period=t.grace_period, reduction_factor=2)
    search_alg = None
    if t.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch
        search_alg = OptunaSearch()
    # 1 CPU for the trial driver; its TorchTrainer requests the workers
    trainable = tune.with_parameters(run_trial, base=cfg.to_dict(), stats=stats.__dict__, tables=tables, out=out)
    if resume and tune.Tuner.can_restore(os.path.join(out, "tune")):
        tuner = tune.Tuner.restore(os.path.join(out, "tune"), trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(metric=t.metric, mode=t.mode, num_samples=t.samples, scheduler=scheduler,
                                        search_alg=search_alg, max_concurrent_trials=runs_that_fit(
                                            cfg.scale.workers, cfg.scale.cpus_per_worker, cfg.scale.use_gpu,
                                            t.max_concurrent)),
            run_config=tune.RunConfig(name="tune", storage_path=out, verbose=1 if verbose() else 0,
                                      callbacks=[trial_lines(t.metric)]))
    grid = tuner.fit()
    rows = []
    for r in grid:
        conf = dict(r.config or {})
        if (r.metrics or {}).get("trial_id"):
            finalize_stopped(trial_dir(out, r.metrics["trial_id"]))
        df = r.metrics_dataframe
        best = None
        if df is not None and t.metric in df:
            best = float(df[t.metric].min() if t.mode == "min" else df[t.metric].max())
        rows.append({"trial": r.path.rstrip("/").split("/")[-1], t.metric: best,
                     "epochs": int(df["epoch"].max()) + 1 if df is not None and "epoch" in df else 0,
                     "dev_ccc": float(df["dev_ccc"].max()) if df is not None and "dev_ccc" in df else None,
                     "error": str(r.error)[:200] if r.error else "", **conf,
                     "checkpoint": (r.metrics or {}).get("checkpoint_path", "")})
    rows.sort(key=lambda x: (x[t.metric] is None, (x[t.metric] or 0) * (1 if t.mode == "min" else -1)))
    with open(os.path.join(out, "trials.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    best = rows[0]
    best_cfg = trial_config(cfg.to_dict(), {k: best[k] for k in space})
    best_cfg.save(os.path.join(out, "best_config.yaml"))
    with open(os.path.join(out, "best_checkpoint.txt"), "w") as f:
        f.write(best["checkpoint"] + "\n")
    return rows


def format_table(rows: List[dict], metric: str) -> str:
    keys = ["trial", metric, "dev_ccc", "epochs"] + [k for k in rows[0] if "." in k]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [" | ".join(keys), " | ".join("---" for _ in keys)]
    lines += [" | ".join(fmt(r.get(k)) for k in keys) for r in rows]
    return "\n".join(lines)
