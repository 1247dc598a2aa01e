"""Two Ray nodes on one machine: `ray start --head` and a second `ray start --address` (its own
raylet on loopback). Training with one worker per node (STRICT_SPREAD); when the worker node is
killed mid-run and a new node joins (what the autoscaler does), the run resumes from its checkpoint
and finishes, one worker per node at every start."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import ray.cloudpickle
from ray.train import UserCallback

from dec_ray.service.train import run_training

pytestmark = [pytest.mark.slow, pytest.mark.cluster]
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])    # the callbacks run in the controller

SPREAD = ["scale.placement_strategy=STRICT_SPREAD", "scale.cpus_per_worker=1", "scale.max_failures=2"]


@pytest.fixture
def cluster(two_node_cluster):
    two_node_cluster.wait_nodes(2)
    return two_node_cluster


def _placements(run):
    return [json.loads(x) for x in open(os.path.join(run, "placement.jsonl"))]


class LoseNodeAfterFirstCheckpoint(UserCallback):
    """In the controller, right after the first checkpoint is registered: SIGKILL the worker node's
    process group, then start a replacement node (what the autoscaler does). Its pid goes to a file
    so the test can stop it. Event-driven: no polling, no sleeps."""

    def __init__(self, node_pid, command, env, pid_file):
        self.node_pid, self.command, self.env, self.pid_file = node_pid, command, env, pid_file

    def after_report(self, run_context, metrics, checkpoint):
        if checkpoint is None or os.path.exists(self.pid_file):
            return
        os.killpg(self.node_pid, signal.SIGKILL)
        new = subprocess.Popen(self.command, env=self.env, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        with open(self.pid_file, "w") as f:
            f.write(str(new.pid))


def test_lost_node_recovers_from_checkpoint(cluster, tables, tiny_cfg, tmp_path):
    run = str(tmp_path / "node_lost")
    pid_file = str(tmp_path / "replacement.pid")
    lose = LoseNodeAfterFirstCheckpoint(cluster.workers[0].pid, cluster.node_command([f"--address={cluster.address}"]),
                                        cluster.env, pid_file)
    try:
        result = run_training(tables[0], run, tiny_cfg("train.epochs=4", *SPREAD), callbacks=[lose])
    finally:
        if os.path.exists(pid_file):
            cluster.adopted.append(int(open(pid_file).read()))
    assert os.path.exists(pid_file), "no checkpoint was reported, the node was never killed"
    assert result["epochs_run"] == 4
    starts = _placements(run)
    assert len(starts) >= 2, starts                             # the worker group was restarted
    assert starts[-1]["start_epoch"] >= 1                        # ... from a checkpoint, not from scratch
    assert all(len(set(s["nodes"])) == 2 for s in starts)
    assert set(starts[0]["nodes"]) != set(starts[-1]["nodes"])  # one rank moved to the new node
    epochs = [json.loads(x)["epoch"] for x in open(os.path.join(run, "metrics.jsonl"))]
    assert epochs[-1] == 3 and sorted(set(epochs)) == [0, 1, 2, 3]


PROBE = """
import ray
from dec_ray.service.cluster import ensure_ray
ensure_ray()

@ray.remote
def alive_actors():
    from ray.util.state import list_actors       # no address: how Ray Train's own actors call it
    return len(list_actors(filters=[("state", "=", "ALIVE")]))

ray.get(alive_actors.remote(), timeout=120)
print("STATE_API_OK")
"""


def test_dec_ray_never_joins_a_ray_it_was_not_told_about(tmp_path):
    """Another user's private head, on its own port and temp dir, runs on this machine: a dec_ray
    driver with no address starts its own local Ray instead of attaching to it, and the processes
    of that Ray find their own cluster, not the other."""
    from conftest import RAY, free_port
    from dec_ray.service.cluster import reachable
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    other_tmp = f"/tmp/rayo{os.getpid()}"                   # short: Ray's socket paths have a length limit
    port = free_port()
    head = subprocess.Popen([RAY, "start", "--head", f"--port={port}", f"--temp-dir={other_tmp}",
                             "--num-cpus=1", "--include-dashboard=false", "--block", "--disable-usage-stats"],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not reachable(f"127.0.0.1:{port}"):             # the other head is up before we look
            assert head.poll() is None and time.time() < deadline, "the other head did not start"
            time.sleep(0.5)
        proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "started a private local Ray" in proc.stdout, proc.stdout
        # Ray's own processes (Train's placement-group cleaner) ask the state API with no address:
        # beside another Ray that scan found two ("Found multiple active Ray instances"), the
        # cleaner died and ended runs kept their placement groups
        assert "STATE_API_OK" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    finally:
        os.killpg(head.pid, 9)
        head.wait(60)
