"""Ray Tune searches with tiny models on the test corpus: grid + random with ASHA, optuna + resume."""
import csv
import glob
import json
import os

import pytest

from dec_ray.config import load_config
from dec_ray.service.tune import run_tune

pytestmark = pytest.mark.slow


def test_search_with_asha_stops_the_trial_that_cannot_learn(tables, tiny_cfg, tmp_path, ray_local):
    """Two trials, one after the other (a grid runs in its order), both with the encoder held
    (train.lr=0): the first trains its regressor, the second's regressor has learning rate 0 too,
    so its dev loss stays the untrained regressor's and ASHA stops it at its first rung. K and
    lambda are sampled."""
    out, _ = tables
    cfg = tiny_cfg("train.epochs=4", "scale.workers=1", "tune.samples=1", "tune.grace_period=1",
                   "tune.scheduler=asha", "tune.max_concurrent=1", "train.lr=0")
    space = {"train.lr_regressor": {"grid": [0.005, 0.0]}, "cluster.k": {"choice": [3, 5]},
             "train.lambda_ce": {"loguniform": [0.1, 10.0]}}
    run = str(tmp_path / "tune")
    rows = run_tune(out, run, cfg, space)
    assert len(rows) == 2 and not any(r["error"] for r in rows)
    losses = [r["dev_loss"] for r in rows]
    assert losses == sorted(losses)
    table = list(csv.DictReader(open(os.path.join(run, "trials.csv"))))
    assert [float(r["dev_loss"]) for r in table] == pytest.approx(losses)
    assert {"train.lr_regressor", "cluster.k", "train.lambda_ce", "checkpoint"} <= set(table[0])
    assert all(r["cluster.k"] in (3, 5) and 0.1 <= r["train.lambda_ce"] <= 10 for r in rows)
    best = load_config(os.path.join(run, "best_config.yaml"))
    assert best.cluster.k == rows[0]["cluster.k"] and best.train.lr_regressor == rows[0]["train.lr_regressor"] == 0.005
    assert os.path.exists(rows[0]["checkpoint"])
    # the trial that learns runs every epoch and ends by itself (max_t past its final report); ASHA
    # stops the other
    assert [(r["train.lr_regressor"], r["epochs"]) for r in rows] == [(0.005, 4), (0.0, 1)], rows
    # every trial folder holds its model and result: the finished trial scored on test, the
    # stopped one with its best weights so far and no test score ("done" in the final report once
    # ended the finishing trial before it could write them)
    results = [json.load(open(os.path.join(t, "result.json"))) for t in glob.glob(os.path.join(run, "trials", "*"))]
    assert all(os.path.exists(os.path.join(t, "model.pt")) for t in glob.glob(os.path.join(run, "trials", "*")))
    finished = [r for r in results if not r.get("stopped")]
    stopped = [r for r in results if r.get("stopped")]
    assert len(finished) == len(stopped) == 1
    assert finished[0]["test_ccc"]["arousal"] is not None and stopped[0]["test_ccc"]["arousal"] is None


def test_optuna_search_then_resume_of_the_finished_search(tables, tiny_cfg, tmp_path, ray_local):
    """The optuna searcher runs its trials; `tune --resume` on a finished search restores it
    (Tuner.restore) and gives the same trials without training again."""
    out, _ = tables
    cfg = tiny_cfg("train.epochs=1", "scale.workers=1", "tune.samples=1", "tune.scheduler=none",
                   "tune.search=optuna")
    space = {"train.lr": {"loguniform": [1e-3, 1e-2]}, "cluster.k": {"choice": [3, 5]}}
    run = str(tmp_path / "tune")
    rows = run_tune(out, run, cfg, space)
    assert len(rows) == 1 and not any(r["error"] for r in rows), rows
    assert all(1e-3 <= r["train.lr"] <= 1e-2 and r["cluster.k"] in (3, 5) for r in rows)
    assert glob.glob(os.path.join(run, "tune", "searcher-state-*.pkl"))    # the optuna searcher's state
    trial_dirs = sorted(os.listdir(os.path.join(run, "trials")))
    again = run_tune(out, run, cfg, space, resume=True)
    assert [(r["trial"], r["dev_loss"]) for r in again] == [(r["trial"], r["dev_loss"]) for r in rows]
    assert sorted(os.listdir(os.path.join(run, "trials"))) == trial_dirs    # nothing trained again
