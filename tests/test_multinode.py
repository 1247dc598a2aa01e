"""Two Ray nodes on one machine: `ray start --head` and a second `ray start --address` (its own
raylet on loopback). Training with one worker per node finishes; when the worker node is killed
mid-run and a new node joins (what the autoscaler does), the run resumes from its checkpoint."""
import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from dec_ray.trainer import run_training

pytestmark = pytest.mark.slow

BIN = os.path.dirname(sys.executable)
RAY = os.path.join(BIN, "ray")
SPREAD = ["scale.placement_strategy=STRICT_SPREAD", "scale.cpus_per_worker=1", "scale.max_failures=2"]


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """A head and worker nodes started with the `ray` CLI, as on a real cluster."""

    def __init__(self):
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env["PATH"] = BIN + os.pathsep + self.env.get("PATH", "")
        # Fast failure detection, so that a lost node is noticed in seconds, not half a minute.
        self.env.update(RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3",
                        RAY_health_check_timeout_ms="1000")
        # Ray 2.60 heads enable token authentication: every node and client must present the token.
        self.env["RAY_AUTH_MODE"] = "token"
        subprocess.run([RAY, "get-auth-token", "--generate"], check=True, env=self.env, capture_output=True)
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.workers = []
        # 2 CPUs per node: one for the node's training worker, one for Ray Data reads
        subprocess.run([RAY, "start", "--head", f"--port={self.port}", "--num-cpus=2",
                        "--node-ip-address=127.0.0.1", f"--dashboard-port={_free_port()}", "--include-dashboard=true",
                        "--disable-usage-stats"], check=True, env=self.env, capture_output=True, timeout=180)

    def add_node(self):
        """`ray start --address ... --block` in its own process group, so it can be killed alone."""
        p = subprocess.Popen([RAY, "start", f"--address={self.address}", "--num-cpus=2", "--block",
                              "--node-ip-address=127.0.0.1",
                              "--disable-usage-stats"], env=self.env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.workers.append(p)
        return p

    @staticmethod
    def kill_node(p):
        """The node dies at once: raylet, object store and its Ray worker processes (SIGKILL)."""
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=60)

    def alive_nodes(self):
        import ray
        return [n for n in ray.nodes() if n["Alive"]]

    def wait_nodes(self, n, timeout=120):
        t = time.time()
        while len(self.alive_nodes()) != n:
            assert time.time() - t < timeout, f"{len(self.alive_nodes())} nodes alive, waiting for {n}"
            time.sleep(1)

    def stop(self):
        import ray
        ray.shutdown()
        for p in self.workers:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        subprocess.run([RAY, "stop", "--force"], env=self.env, capture_output=True, timeout=120)


@pytest.fixture
def cluster(monkeypatch):
    import ray
    ray.shutdown()                      # the session's local Ray: `ray stop` below would end it anyway
    c = LocalCluster()
    try:
        c.add_node()
        monkeypatch.setenv("RAY_ADDRESS", c.address)
        monkeypatch.setenv("RAY_AUTH_MODE", "token")
        ray.init(address=c.address)
        c.wait_nodes(2)
        yield c
    finally:
        c.stop()


def _placements(run):
    return [json.loads(x) for x in open(os.path.join(run, "placement.jsonl"))]


def test_two_workers_on_two_nodes_finish(cluster, tables, tiny_cfg, tmp_path):
    run = str(tmp_path / "two_nodes")
    result = run_training(tables[0], run, tiny_cfg("train.epochs=1", *SPREAD))
    assert result["epochs_run"] == 1
    (placement,) = _placements(run)
    assert len(placement["nodes"]) == 2 and len(set(placement["nodes"])) == 2, placement


def test_lost_node_recovers_from_checkpoint(cluster, tables, tiny_cfg, tmp_path):
    run = str(tmp_path / "node_lost")
    first = cluster.workers[0]
    killed = {}

    def kill_after_first_checkpoint():
        t = time.time()
        while time.time() - t < 600:
            if glob.glob(os.path.join(run, "ray", "train", "checkpoint_*", "state.pt")):
                time.sleep(2)               # the controller registers the report
                cluster.kill_node(first)
                killed["at"] = time.time()
                time.sleep(3)
                cluster.add_node()          # a replacement node joins, as the autoscaler would do
                return
            time.sleep(0.5)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    result = run_training(tables[0], run, tiny_cfg("train.epochs=4", *SPREAD))
    killer.join(timeout=5)
    assert "at" in killed, "no checkpoint appeared, the node was never killed"
    assert result["epochs_run"] == 4
    starts = _placements(run)
    assert len(starts) >= 2, starts                             # the worker group was restarted
    assert starts[-1]["start_epoch"] >= 1                        # ... from a checkpoint, not from scratch
    assert all(len(set(s["nodes"])) == 2 for s in starts)
    assert set(starts[0]["nodes"]) != set(starts[-1]["nodes"])  # one rank moved to the new node
    epochs = [json.loads(x)["epoch"] for x in open(os.path.join(run, "metrics.jsonl"))]
    assert epochs[-1] == 3 and sorted(set(epochs)) == [0, 1, 2, 3]
