"""Ray Train end to end on a local Ray with 2 CPU workers and a tiny network."""
import json
import os
import subprocess
import time

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from conftest import MODELS, RAY
from ray.train import TrainingFailedError

from dec_ray.data.tables import split_files
from dec_ray.method.losses import ccc
from dec_ray.report.inference import Predictor
from dec_ray.service.train import run_training

pytestmark = pytest.mark.slow


def _recomputed_ccc(preds, attr="arousal"):
    return ccc(preds[f"pred_{attr}"].to_numpy(), preds[f"gold_{attr}"].to_numpy())


@pytest.mark.parametrize("model", MODELS)
def test_two_epoch_run_of_each_model(model, trained_runs, tables, tiny_cfg):
    out, _ = tables
    run = trained_runs[model]
    result = json.load(open(os.path.join(run, "result.json")))
    assert result["epochs_run"] == 2 and result["model"] == model
    assert result["checkpoint"].startswith(run + os.sep)             # everything the run writes is under RUN/
    with pytest.raises(ValueError, match="already holds a run"):     # never silently over a finished run
        run_training(out, run, tiny_cfg(f"model.name={model}"))
    for f in ("config.yaml", "stats.json", "model.pt", "result.json", "metrics.jsonl", "test_predictions.parquet"):
        assert os.path.exists(os.path.join(run, f)), f
    assert os.listdir(os.path.join(run, "tensorboard"))
    lines = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    assert sorted({m["epoch"] for m in lines}) == [0, 1]          # the AE run was interrupted and resumed
    assert lines[0]["pool_gb"] > 0 and lines[0]["load_s"] > 0          # the memory the pools take, reported
    if model == "deepemocluster":
        assert lines[0]["unlabeled_nonempty"] >= 2 and "train_ce" in lines[0] and "train_ccc" in lines[0]
    preds = pq.read_table(os.path.join(run, "test_predictions.parquet")).to_pandas()
    n_test = json.load(open(os.path.join(out, "_SUCCESS")))["rows"]["test"]
    assert len(preds) == n_test and preds["row_id"].nunique() == n_test
    assert result["test_ccc"]["arousal"] == pytest.approx(_recomputed_ccc(preds), abs=1e-6)
    assert 1 <= preds["gold_arousal"].min() and preds["gold_arousal"].max() <= 7


@pytest.mark.parametrize("split", ["dev", "test"])
def test_model_pt_reproduces_the_runs_own_predictions(split, trained_runs, tables):
    """Both ranks scored with the model that model.pt saves (BatchNorm statistics included)."""
    run = trained_runs["deepemocluster"]
    saved = pq.read_table(os.path.join(run, f"{split}_predictions.parquet")).to_pandas().set_index("row_id")
    table = pads.dataset(split_files(tables[0], split), format="parquet").to_table(columns=["row_id", "chunks"])
    chunks = table["chunks"].combine_chunks().to_numpy_ndarray()
    got = Predictor(run).predict_chunks(chunks)
    pred = pd.Series([g["arousal"] for g in got], index=table["row_id"].to_numpy())
    np.testing.assert_allclose(pred.loc[saved.index].to_numpy(), saved["pred_arousal"].to_numpy(), rtol=1e-5,
                               atol=1e-5)


def _epochs_per_start(run: str):
    starts = [json.loads(x)["start_epoch"] for x in open(os.path.join(run, "placement.jsonl"))]
    epochs = [json.loads(x)["epoch"] for x in open(os.path.join(run, "metrics.jsonl"))]
    return starts, epochs


def test_interrupted_run_resumes_with_resume_flag(interrupted_run):
    """The AE run of the session fixture: a worker killed with no restarts allowed fails the run,
    leaving no result that looks complete; a plain re-run into the folder is refused; `--resume`
    continues from the last checkpoint. (Ray Train's automatic restart after a failure,
    scale.max_failures > 0, is tested with a lost node in test_multinode.py.)"""
    run, what = interrupted_run
    assert isinstance(what.get("error"), TrainingFailedError)
    assert what["left_behind"] == []
    assert "--resume" in what["refusal"]
    assert what["result"]["epochs_run"] == 2
    starts, epochs = _epochs_per_start(run)
    assert len(starts) == 2 and starts[1] >= 1 and sorted(set(epochs)) == [0, 1]    # resumed, not from scratch
    first, again = [json.loads(x)["rows"] for x in open(os.path.join(run, "placement.jsonl"))]
    assert first == again                                   # each rank holds the same rows after the restart


def test_metrics_go_where_ray_users_look(trained_runs, tables):
    """TensorBoard tags grouped, losses named as losses, hyperparameters logged; the CNN run also
    went to MLflow (a local SQLite store) through Ray's setup_mlflow; predictions carry the
    sentence's segment_id, speaker and path."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = trained_runs["cnn"]
    events = EventAccumulator(os.path.join(run, "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"dev/ccc_loss", "dev/ccc_arousal", "train/ccc_loss", "time/epoch_time_s", "data/train_rows"} <= tags
    assert not any(t.startswith(("train_", "dev_")) for t in tags)        # nothing left ungrouped
    store = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(run))), "mlflow.db")
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    (mlrun,) = client.search_runs([client.get_experiment_by_name("dec_ray").experiment_id])
    assert mlrun.data.params["model.name"] == "cnn" and mlrun.data.params["cluster.k"] == "4"
    assert [m.step for m in client.get_metric_history(mlrun.info.run_id, "dev/ccc_arousal")] == [0, 1]
    assert "result/test_ccc_arousal" in mlrun.data.metrics and mlrun.info.status == "FINISHED"
    preds = pq.read_table(os.path.join(run, "test_predictions.parquet"))
    assert preds.column_names[:4] == ["row_id", "segment_id", "speaker", "path"]
    assert all(os.path.exists(p) for p in preds["path"].to_pylist())


def test_a_label_scarce_run_trains_on_the_same_labeled_sentences_for_any_number_of_workers(tables, tiny_cfg,
                                                                                        tmp_path):
    """A quarter of Train keeps its labels (drawn with train.label_seed, not the run's seed); the
    rest joins the unlabeled pool without labels, never twice; the ridge fits the same sentences."""
    from dec_ray.data.tables import block_of, labeled_stats, row_ids, training_rows
    from dec_ray.report.ridge import run_ridge
    from dec_ray.service.train import rows_digest
    out, _ = tables
    cfg = tiny_cfg("train.label_fraction=0.25", "train.epochs=1")
    train, unlabeled = row_ids(split_files(out, "train")), row_ids(split_files(out, "unlabeled"))
    kept, pool = training_rows(out, "train", cfg), training_rows(out, "unlabeled", cfg)
    assert len(kept) == round(0.25 * len(train)) and not set(kept) & set(pool)
    assert sorted(set(pool)) == sorted(pool) and set(pool) == set(unlabeled) | (set(train) - set(kept))
    assert np.array_equal(kept, training_rows(out, "train", tiny_cfg("train.label_fraction=0.25", "train.seed=3")))
    assert not np.array_equal(kept, training_rows(out, "train", tiny_cfg("train.label_fraction=0.25",
                                                                           "train.label_seed=1")))
    assert len(training_rows(out, "unlabeled", tiny_cfg("train.label_fraction=0.25", "train.label_rest=drop"))) \
        == len(unlabeled)
    run = str(tmp_path / "run")
    run_training(out, run, cfg)
    m = json.loads(open(os.path.join(run, "metrics.jsonl")).readline())
    assert (m["train_rows"], m["unlabeled_rows"]) == (len(kept), len(pool))
    held = json.loads(open(os.path.join(run, "placement.jsonl")).readline())["rows"]
    for n, ids in (("train", kept), ("unlabeled", pool)):       # each worker read its block of them
        assert [h[n] for h in held] == [rows_digest(block_of(ids, r, 2)) for r in range(2)]
        assert sorted(np.concatenate([block_of(ids, r, 2) for r in range(2)])) == list(block_of(ids, 0, 1))
    stats = labeled_stats(out, cfg)                            # labels z-scored with the kept ones only
    gold = pads.dataset(split_files(out, "train"), format="parquet").to_table(columns=["row_id", "arousal"])
    gold = gold.to_pandas().set_index("row_id").loc[kept, "arousal"]
    assert stats.label_mean["arousal"] == pytest.approx(gold.mean()) and stats.num_train_sentences == len(kept)
    assert json.load(open(os.path.join(run, "stats.json")))["label_mean"]["arousal"] == pytest.approx(gold.mean())
    assert run_ridge(out, str(tmp_path / "ridge"), ["arousal"], kept)["train_sentences"] == len(kept)


def test_a_run_that_cannot_get_its_cpus_says_what_holds_them_and_stops(tables, tmp_path, capsys, ray_local):
    """A placement group left by another run holds 2 of the 3 CPUs: a 2-worker run waits its
    bound, then stops with exit status 4 and names the group, instead of waiting forever."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from dec_ray.cli import main
    held = placement_group([{"CPU": 1}, {"CPU": 1}], name="left-by-another-run")
    ray_local.get(held.ready(), timeout=60)
    try:
        t0 = time.time()
        code = main(["train", "--tables", tables[0], "--out", str(tmp_path / "run"), "--set", "scale.workers=2",
                     "--set", "scale.resource_wait_s=2"])
        err = capsys.readouterr().err
        assert code == 4 and time.time() - t0 < 60, err
        assert "left-by-another-run" in err and "2 CPU" in err and "scale.resource_wait_s" in err
    finally:
        remove_placement_group(held)


def test_every_train_and_unlabeled_row_is_trained_on_by_one_rank(trained_runs, tables):
    """Ray Data's equal split dropped up to workers - 1 rows per dataset, a different one each time;
    the tables here have an odd number of unlabeled rows."""
    rows = json.load(open(os.path.join(tables[0], "_SUCCESS")))["rows"]
    assert rows["unlabeled"] % 2 == 1
    for model in ("deepemocluster", "vae"):
        m = json.loads(open(os.path.join(trained_runs[model], "metrics.jsonl")).readline())
        assert (m["train_rows"], m["unlabeled_rows"]) == (rows["train"], rows["unlabeled"]), model
        held = json.loads(open(os.path.join(trained_runs[model], "placement.jsonl")).readline())["rows"]
        counts = [r["unlabeled"][0] for r in held]
        assert sum(counts) == rows["unlabeled"] and max(counts) - min(counts) == 1
    cnn = json.loads(open(os.path.join(trained_runs["cnn"], "metrics.jsonl")).readline())
    assert cnn["unlabeled_rows"] == 0                       # the CNN has no use for the pool


@pytest.mark.cluster
def test_ray_job_submit_to_a_ray_cluster(tables, tmp_path, two_node_cluster):
    """`ray job submit --working-dir . -- dec-ray train ...` to the dashboard of a head started
    with `ray start --head` (the two-node cluster of the cluster tests)."""
    out, _ = tables
    head = two_node_cluster
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = str(tmp_path / "job_run")
    cmd = [RAY, "job", "submit", f"--address=http://127.0.0.1:{head.dashboard_port}", f"--working-dir={repo}",
           "--", "dec-ray", "train", "--tables", out, "--out", run, "--epochs", "1",
           "--set", "model.width=0.125", "--set", "cluster.k=4", "--set", "train.batch_sentences=4"]
    for _ in range(12):   # a new head's job agent can take a while to come up on a loaded machine
        proc = subprocess.run(cmd, env=head.env, capture_output=True, text=True, timeout=600)
        if "No available agent to submit job" not in proc.stdout + proc.stderr:
            break
        time.sleep(10)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout
    assert json.load(open(os.path.join(run, "result.json")))["epochs_run"] == 1
