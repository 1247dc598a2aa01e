"""`dec-ray experiment` on the test corpus (Table 2: DeepEmoCluster and the CNN, 2 runs): killed from
outside after its first finished run, restarted, and its report checked against the runs' own saved
predictions. The laptop preset's plan (11 cells) and the layouts of the other tables (a row per pool
size; K x pool grids) are checked without training in test_experiment_spec.py."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from dec_ray.config import ConfigError, load_config
from dec_ray.data.tables import split_rows
from dec_ray.report.evaluation import split_test_set
from dec_ray.report.experiment import LINEAR
from dec_ray.service.experiment import all_runs, config_path, load_spec, plan, run_experiment, spec_from_dict

from conftest import TINY

pytestmark = pytest.mark.slow

# the tiny network of the other tests, 1 epoch, 1 worker; K from the preset's studies
FAST = [o for o in TINY if not o.startswith(("scale.workers", "cluster.k"))] + ["train.epochs=1", "scale.workers=1"]


def plain_ccc(x, y):
    x, y = np.asarray(x, float), np.asarray(y, float)
    cov = np.mean((x - x.mean()) * (y - y.mean()))
    return 2 * cov / (x.var() + y.var() + (x.mean() - y.mean()) ** 2)


def result_files(out):
    found = {}
    for root, dirs, files in os.walk(os.path.join(out, "runs")):
        dirs[:] = [d for d in dirs if d != "cross"]         # a run's scores on other corpora are not runs
        if "result.json" in files:
            found[root] = os.stat(os.path.join(root, "result.json")).st_mtime_ns
    return found


SPEC = """
config: demo
seeds: 1
parallel_runs: 1
studies:
  - name: models
    title: "Table 2: DeepEmoCluster against the CNN, supervised (no unlabeled pool)"
    models: [deepemocluster]
    pool: [0]
"""


@pytest.fixture(scope="module")
def experiment(tables, tmp_path_factory, ray_local):
    """The spec above (tiny network) run by a driver that joins this session's Ray (as a job on a
    cluster would), killed with SIGKILL right after it printed the line of the first finished run
    (read from its output: no polling), then run again to the end. Ray ends a dead driver's
    actors and placement groups; what is on disk is all the restart has."""
    out = str(tmp_path_factory.mktemp("experiment"))
    spec_file = os.path.join(out, "..", "spec.yaml")
    with open(spec_file, "w") as f:
        f.write(SPEC)
    cmd = [sys.executable, "-m", "dec_ray", "experiment", "--tables", tables[0], "--out", out, "--spec", spec_file,
           *[a for o in FAST for a in ("--set", o)]]
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    proc = subprocess.Popen(cmd, start_new_session=True, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    log = []
    for line in proc.stdout:                    # blocks until the driver says something
        log.append(line)
        if line.startswith("[experiment] 1/"):
            break
    assert proc.poll() is None, "".join(log)[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)         # the driver; Ray then ends its trials and workers
    proc.wait()
    before = result_files(out)
    spec = load_spec(spec_file)
    spec.cross = [f"again={tables[0]}"]         # "another corpus": the same tables, so the numbers must agree
    res = run_experiment(tables[0], out, spec, FAST, command="pytest resume")
    base = load_config(config_path(spec), [*spec.set, *FAST])
    cells = plan(spec, base, split_rows(tables[0], "unlabeled"))
    return {"out": out, "before": before, "after": result_files(out), "res": res, "cells": cells,
            "runs": all_runs(cells, 1, out), "log": "".join(log)}


def test_restart_keeps_finished_runs_and_trains_the_rest(experiment):
    out, before, after, runs = experiment["out"], experiment["before"], experiment["after"], experiment["runs"]
    assert len(runs) == 2 and experiment["res"]["failed"] == []
    refs = {os.path.join(out, "runs", r) for r in LINEAR}
    assert set(runs) | refs == set(after)
    assert len(refs) + 1 <= len(before) < len(after)     # the linear references and the first run
    for run, mtime in before.items():
        assert after[run] == mtime, f"{run} was trained again"
    info = json.load(open(os.path.join(out, "experiment.json")))
    assert [i["trained"] for i in info["invocations"]] == [len(runs) - len(before) + len(refs)]
    assert re.search(r"^\[experiment\] 1/2 runs/\S+/seed0: test CCC arousal", experiment["log"], re.M)


def test_report_numbers_are_recomputed_from_the_saved_predictions(experiment):
    out, cells = experiment["out"], experiment["cells"]
    dec = cells["models"][0].name
    report = open(os.path.join(out, "report.md")).read()
    for title in ("Table 2", "Clusters of the best DeepEmoCluster run"):
        assert title in report
    for fig in ("models.png", "models.svg", "analysis/cluster_attributes.png", "analysis/cluster_attributes.svg"):
        assert os.path.exists(os.path.join(out, fig)), fig
    runs = pd.read_csv(os.path.join(out, "ccc_values.csv"))["run"]       # portable: relative to the report
    assert all(not os.path.isabs(r) and os.path.isdir(os.path.join(out, r)) for r in runs)

    def cell_stats(cell_dirs):
        values = []
        for run in cell_dirs:
            pred = pd.read_parquet(os.path.join(run, "test_predictions.parquet")).set_index("row_id")
            for sub in split_test_set(pred.index.to_numpy(), 4, seed=0):
                values.append(plain_ccc(pred.loc[sub, "pred_arousal"], pred.loc[sub, "gold_arousal"]))
        return np.mean(values), np.std(values, ddof=1)

    # Table 2 rows: "| <model label> | mean ± std [mark] |", one attribute (arousal)
    rows = (("DeepEmoCluster", dec), ("CNN-regressor (test reference)", "cnn"), ("ridge (log-mel statistics)", "ridge"),
            ("ridge (eGeMAPS, Train norm.)", "egemaps"), ("ridge (eGeMAPS, per-speaker norm.)", "egemaps-speaker"))
    for label, cell in rows:
        row = re.search(rf"^\| {re.escape(label)} \| ([-0-9.]+) ± ([0-9.]+)", report, re.M)
        assert row, label
        d = os.path.join(out, "runs", cell)
        mean, std = cell_stats([d] if cell in LINEAR else [os.path.join(d, "seed0")])
        assert float(row.group(1)) == pytest.approx(mean, abs=6e-4)
        assert float(row.group(2)) == pytest.approx(std, abs=6e-4)


def test_every_run_is_scored_on_the_other_corpora_from_its_saved_model(experiment):
    """The spec's cross corpora: each run and the ridge scored again from its model (here on the
    very tables it was tested on, under another name), a section of the report per corpus whose
    numbers equal those of the home test set."""
    out = experiment["out"]
    report = open(os.path.join(out, "report.md")).read()
    assert "tested on again" in report and "tested on again (adapted)" in report
    home = pd.read_csv(os.path.join(out, "cells.csv")).set_index("cell")
    for name in ("again", "again-adapted"):        # adapted to the same tables: their own statistics
        again = pd.read_csv(os.path.join(out, f"cells_{name}.csv")).set_index("cell")
        assert sorted(again.index) == sorted(home.index) and len(home) == 2 + len(LINEAR)
        np.testing.assert_allclose(again["ccc_mean"], home.loc[again.index, "ccc_mean"], atol=1e-5)
    for run in [*experiment["runs"], *(os.path.join(out, "runs", r) for r in LINEAR)]:
        mine = pd.read_parquet(os.path.join(run, "test_predictions.parquet")).set_index("row_id").sort_index()
        there = pd.read_parquet(os.path.join(run, "cross", "again", "test_predictions.parquet")).set_index("row_id")
        np.testing.assert_allclose(there.loc[mine.index, "pred_arousal"], mine["pred_arousal"], atol=1e-4)


def test_a_run_trained_otherwise_stops_a_restart_before_any_work(experiment, tables, tmp_path):
    """A finished run that is not what the spec now asks for (here: an option set edited after the
    run was trained with the published method) stops the experiment with what differs, before a
    ridge is fitted or a run trained; reusing it would put the old run under the new name."""
    dec = next(r for r, (cell, _) in experiment["runs"].items() if cell.model == "deepemocluster")
    study = {"name": "a", "models": ["deepemocluster"], "pool": [0], "options": ["edited"]}
    spec = spec_from_dict({"config": "demo", "seeds": 1, "options": {"edited": ["cluster.balance=sinkhorn"]},
                           "studies": [study]})
    cell = next(c for c in plan(spec, load_config(config_path(spec), FAST), 0)["a"] if c.model == "deepemocluster")
    out = str(tmp_path / "edited")
    shutil.copytree(dec, os.path.join(out, "runs", cell.name, "seed0"))
    with pytest.raises(ConfigError, match="cluster.balance: 'none' there, 'sinkhorn' asked"):
        run_experiment(tables[0], out, spec, FAST)
    assert sorted(os.listdir(os.path.join(out, "runs"))) == [cell.name]
