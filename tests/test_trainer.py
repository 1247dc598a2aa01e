"""Ray Train end to end on a local Ray with 2 CPU workers and a tiny network."""
import json
import os
import socket
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from dec_ray.trainer import KILL_ENV, run_training

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("model", ["deepemocluster", "cnn", "ae", "vae"])
def test_two_epoch_run_of_each_model(model, tables, tiny_cfg, tmp_path, ray_local):
    out, _ = tables
    run = str(tmp_path / model)
    result = run_training(out, run, tiny_cfg(f"model.name={model}"))
    assert result["epochs_run"] == 2 and result["model"] == model
    for f in ("config.yaml", "stats.json", "model.pt", "result.json", "metrics.jsonl", "test_predictions.parquet"):
        assert os.path.exists(os.path.join(run, f)), f
    assert os.listdir(os.path.join(run, "tensorboard"))
    lines = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    assert [m["epoch"] for m in lines] == [0, 1]
    if model == "deepemocluster":
        assert lines[0]["unlabeled_nonempty"] >= 2 and "train_ce" in lines[0] and "train_ccc" in lines[0]
    preds = pq.read_table(os.path.join(run, "test_predictions.parquet"))
    n_test = json.load(open(os.path.join(out, "_SUCCESS")))["rows"]["test"]
    assert preds.num_rows == n_test and len(set(preds["row_id"].to_pylist())) == n_test
    assert -1 <= result["test_ccc"]["arousal"] <= 1
    assert 1 <= min(preds["gold_arousal"].to_pylist()) and max(preds["gold_arousal"].to_pylist()) <= 7


def test_early_stopping(tables, tiny_cfg, tmp_path, ray_local):
    out, _ = tables
    # Learning rates of zero: only BatchNorm's running statistics move, so the dev loss wanders
    # at random and stalls within a few epochs; the run must stop at the first stalled epoch.
    cfg = tiny_cfg("train.epochs=8", "train.patience=1", "train.lr=0.0", "train.lr_regressor=0.0",
                   "train.lr_top=0.0", "model.dropout=0.0")
    run = str(tmp_path / "es")
    result = run_training(out, run, cfg)
    lines = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    stalled = [m["epoch"] for m in lines if m["epoch"] - m["best_epoch"] >= 1]
    assert stalled, "the dev loss improved 8 times in a row with frozen weights"
    assert result["epochs_run"] == stalled[0] + 1 < 8
    assert [m["epoch"] for m in lines] == list(range(stalled[0] + 1))


def test_killed_worker_restarts_from_checkpoint(tables, tiny_cfg, tmp_path, ray_local, monkeypatch):
    out, _ = tables
    run = str(tmp_path / "ft")
    monkeypatch.setenv(KILL_ENV, "1")
    result = run_training(out, run, tiny_cfg("train.epochs=3", "scale.max_failures=1"))
    assert os.path.exists(os.path.join(run, ".test_killed"))
    assert result["epochs_run"] == 3
    epochs = [json.loads(x)["epoch"] for x in open(os.path.join(run, "metrics.jsonl"))]
    assert epochs == [0, 1, 2], epochs      # epoch 1 redone after the restart, epoch 0 not


def test_interrupted_run_resumes_with_resume_flag(tables, tiny_cfg, tmp_path, ray_local, monkeypatch):
    out, _ = tables
    run = str(tmp_path / "resume")
    monkeypatch.setenv(KILL_ENV, "1")
    with pytest.raises(Exception):
        run_training(out, run, tiny_cfg("train.epochs=3", "scale.max_failures=0"))
    assert not os.path.exists(os.path.join(run, "result.json"))
    with pytest.raises(ValueError, match="--resume"):
        run_training(out, run, tiny_cfg())
    result = run_training(None, run, resume=True)
    assert result["epochs_run"] == 3
    epochs = [json.loads(x)["epoch"] for x in open(os.path.join(run, "metrics.jsonl"))]
    assert epochs == [0, 1, 2], epochs


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_to_a_local_head(tables, tmp_path):
    """`ray start --head`, then `ray job submit --working-dir . -- dec-ray train ...`."""
    import ray
    ray.shutdown()            # `ray stop` below ends every Ray process on this machine
    out, _ = tables
    bindir = os.path.dirname(sys.executable)
    ray_bin = os.path.join(bindir, "ray")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    port, dash = _free_port(), _free_port()
    # Ray 2.60 enables token authentication: make sure a token exists and the client sends it
    subprocess.run([ray_bin, "get-auth-token", "--generate"], check=True, env=env, capture_output=True)
    subprocess.run([ray_bin, "start", "--head", f"--port={port}", f"--dashboard-port={dash}",
                    "--num-cpus=3", "--include-dashboard=true", "--disable-usage-stats"],
                   check=True, env=env, capture_output=True, timeout=180)
    try:
        run = str(tmp_path / "job_run")
        cmd = [ray_bin, "job", "submit", f"--address=http://127.0.0.1:{dash}", f"--working-dir={repo}",
               "--", "dec-ray", "train", "--tables", out, "--out", run, "--epochs", "1",
               "--set", "model.width=0.125", "--set", "cluster.k=4", "--set", "train.batch_sentences=4"]
        for _ in range(12):   # a new head's job agent can take a while to come up on a loaded machine
            proc = subprocess.run(cmd, env=dict(env, RAY_AUTH_MODE="token"), capture_output=True, text=True,
                                  timeout=600)
            if "No available agent to submit job" not in proc.stdout + proc.stderr:
                break
            time.sleep(10)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "succeeded" in proc.stdout
        assert json.load(open(os.path.join(run, "result.json")))["epochs_run"] == 1
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)
