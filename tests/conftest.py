"""Shared fixtures: one small synthetic corpus (plus odd files), one local Ray, one ingest."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import ray.cloudpickle
import soundfile as sf
from ray.train import UserCallback

from dec_ray.config import load_config
from dec_ray.service.cluster import free_port  # noqa: F401  (the cluster tests import it from here too)

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])     # its callbacks run in Ray's controller


def pytest_collection_modifyitems(config, items):
    """The `cluster` tests start Ray heads and nodes of their own and end this session's Ray:
    they run last, as their own group, after every test that shares the session's Ray. Those on
    the shared two-node cluster come last of all: while it runs, `ray start`'s address file names
    it, and a dec_ray driver with no address (rightly) joins it."""
    items.sort(key=lambda item: (item.get_closest_marker("cluster") is not None,
                                 "two_node_cluster" in getattr(item, "fixturenames", ())))


TINY = ["model.width=0.125", "cluster.k=4", "train.batch_sentences=4", "train.epochs=2",
        "scale.workers=2", "scale.max_failures=0", "train.patience=0"]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    from dec_ray.data.synth import synth_corpus
    root = str(tmp_path_factory.mktemp("corpus"))
    synth_corpus(root, labeled=40, unlabeled=12, seed=3, max_duration=5.0)
    return root


@pytest.fixture(scope="session")
def odd_files(corpus, tmp_path_factory):
    """Unlabeled extras: odd rates, stereo, 24-bit, flac, too short, silent, corrupt, empty."""
    d = str(tmp_path_factory.mktemp("odd"))
    y, sr = sf.read(os.path.join(corpus, "Unlabeled", sorted(os.listdir(os.path.join(corpus, "Unlabeled")))[0]))
    import librosa
    y44 = librosa.resample(y, orig_sr=sr, target_sr=44100)
    sf.write(os.path.join(d, "stereo44k_24bit.wav"), np.stack([y44, 0.5 * y44], 1), 44100, subtype="PCM_24")
    sf.write(os.path.join(d, "rate8k.flac"), librosa.resample(y, orig_sr=sr, target_sr=8000), 8000)
    sf.write(os.path.join(d, "short_0p5s.wav"), y[: sr // 2], sr)          # < 62 frames: repeated
    sf.write(os.path.join(d, "tiny_0p1s.wav"), y[: sr // 10], sr)          # below min duration: rejected
    sf.write(os.path.join(d, "silent.wav"), np.zeros(sr * 3), sr)
    with open(os.path.join(d, "corrupt.wav"), "wb") as f:
        f.write(b"RIFF\x24\x00\x00\x00WAVEfmt garbage" + os.urandom(200))
    open(os.path.join(d, "empty.wav"), "wb").close()
    return d


@pytest.fixture(scope="session")
def ray_local():
    import ray
    from dec_ray.service.cluster import start_local_ray
    # A Ray of its own (never one found on the machine), with the spare CPU that ensure_ray gives.
    start_local_ray((os.cpu_count() or 1) + 1)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tables(corpus, odd_files, ray_local, tmp_path_factory):
    from dec_ray.service.ingest import run_ingest
    out = str(tmp_path_factory.mktemp("tables"))
    cfg = load_config(None, ["ingest.min_parts_per_split=3"])
    summary = run_ingest(corpus, out, cfg, [os.path.join(corpus, "Unlabeled"), odd_files])
    return out, summary


@pytest.fixture(scope="session")
def tables_with_pool_functionals(tables, corpus, odd_files, tmp_path_factory):
    """The shared tables, ingested again into a copy with features.functionals_pool=true (what
    an eGeMAPS teacher reads): the pool's parts are redone, the labeled parts verified as they
    are. Returns (tables, {path: mtime} of every part before)."""
    from dec_ray.service.ingest import run_ingest
    out = os.path.join(str(tmp_path_factory.mktemp("pool_functionals")), "tables")
    shutil.copytree(tables[0], out)
    before = {os.path.join(out, s, f): os.stat(os.path.join(out, s, f)).st_mtime_ns
              for s in ("train", "dev", "test", "unlabeled") for f in os.listdir(os.path.join(out, s))}
    cfg = load_config(None, ["ingest.min_parts_per_split=3", "features.functionals_pool=true"])
    run_ingest(corpus, out, cfg, [os.path.join(corpus, "Unlabeled"), odd_files])
    return out, before


@pytest.fixture
def tiny_cfg():
    def make(*extra):
        return load_config(None, TINY + list(extra))
    return make


@pytest.fixture
def copy_tree(tmp_path):
    def make(src):
        dst = str(tmp_path / os.path.basename(src.rstrip("/")))
        shutil.copytree(src, dst)
        return dst
    return make


MODELS = ["deepemocluster", "cnn", "ae", "vae"]


class KillRankAfter(UserCallback):
    """A Ray Train callback: once the controller has registered the checkpoint of ``epoch``, SIGKILL
    one worker process from outside, as a real failure (its pid is in RUN/placement.jsonl). It runs
    in the controller right after the report: no polling, no sleeps."""

    def __init__(self, run: str, epoch: int, rank: int = 1):
        self.run, self.epoch, self.rank = run, epoch, rank

    def after_report(self, run_context, metrics, checkpoint):
        if checkpoint is not None and metrics[0].get("epoch") == self.epoch and not metrics[0].get("final"):
            placement = json.loads(open(os.path.join(self.run, "placement.jsonl")).read().splitlines()[-1])
            os.kill(placement["pids"][self.rank], signal.SIGKILL)


@pytest.fixture(scope="session")
def trained_runs(tables, tmp_path_factory):
    """Each model trained once (tiny network, 2 epochs, 2 workers) in the evaluate launcher's
    layout (OUT/runs/MODEL/seed0); the trainer, evaluate, analyze and predict tests read these
    runs. The AE's training is interrupted: a worker is killed after the first checkpoint with no
    restart allowed, and `--resume` finishes it; ``interrupted_run`` holds what happened."""
    from ray.train import TrainingFailedError

    from dec_ray.service.train import repeated_runs, run_training
    out = str(tmp_path_factory.mktemp("evaluate"))
    runs = dict(zip(["deepemocluster"], repeated_runs(tables[0], out, ["deepemocluster"], 1, None, TINY)))
    # the CNN run also logs to MLflow, into a local store (Ray's setup_mlflow on rank 0)
    runs["cnn"], = repeated_runs(tables[0], out, ["cnn"], 1, None,
                                 TINY + [f"tracking.mlflow_uri=sqlite:///{os.path.join(out, 'mlflow.db')}"])
    runs["vae"], = repeated_runs(tables[0], out, ["vae"], 1, None, TINY)
    ae = os.path.join(out, "runs", "ae", "seed0")
    cfg = load_config(None, TINY + ["model.name=ae", "train.seed=0"])
    try:
        run_training(tables[0], ae, cfg, callbacks=[KillRankAfter(ae, epoch=0)])
    except TrainingFailedError as e:
        INTERRUPTED["error"] = e
    INTERRUPTED["left_behind"] = [f for f in ("result.json", "model.pt") if os.path.exists(os.path.join(ae, f))]
    try:
        run_training(tables[0], ae, cfg)
    except ValueError as e:
        INTERRUPTED["refusal"] = str(e)
    INTERRUPTED["result"] = run_training(None, ae, resume=True)
    runs["ae"] = ae
    return runs


INTERRUPTED: dict = {}


@pytest.fixture(scope="session")
def speaker_run(tables, ray_local, tmp_path_factory):
    """A per-speaker model (model.norm=speaker, log-mel input, the CNN; the recommended preset's
    normalisation) trained once on 1 worker: predict, serve and export read it."""
    from dec_ray.service.train import run_training
    run = str(tmp_path_factory.mktemp("speaker") / "run")
    run_training(tables[0], run, load_config(None, TINY + ["model.name=cnn", "model.norm=speaker", "model.input=logmel",
                                                           "scale.workers=1"]))
    return run


@pytest.fixture(scope="session")
def fused_run(tables, ray_local, tmp_path_factory):
    """The recommended preset's model with the eGeMAPS functionals joined to its sentence encoding
    (DeepEmoCluster, per-speaker input and functionals, sentence head, AdamW, model.functionals=egemaps),
    trained once on 2 workers: predict, serve and export read it."""
    from dec_ray.config import preset_overrides
    from dec_ray.service.train import run_training
    run = str(tmp_path_factory.mktemp("fused") / "run")
    run_training(tables[0], run, load_config(None, preset_overrides("recommended") + TINY + [
        "model.functionals=egemaps", "train.unlabeled_limit=-1"]))
    return run


@pytest.fixture(scope="session")
def interrupted_run(trained_runs):
    return trained_runs["ae"], INTERRUPTED


BIN = os.path.dirname(sys.executable)
RAY = os.path.join(BIN, "ray")


class LocalCluster:
    """A head and worker nodes started with the `ray` CLI on loopback, as on a real cluster. Each
    node is a `ray start --block` in its own process group, so stopping or killing it ends only
    its own processes (never `ray stop`, which ends every Ray on the machine)."""

    def __init__(self, num_cpus: int = 2):
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env["PATH"] = BIN + os.pathsep + self.env.get("PATH", "")
        # Fast failure detection, so that a lost node is noticed in seconds, not half a minute.
        self.env.update(RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3",
                        RAY_health_check_timeout_ms="1000")
        # A loaded host: the raylet waits for its agents to report their ports (30 s by default)
        # and aborts when they are late; give them the time Ray allows an agent to register
        self.env["RAY_agent_register_timeout_ms"] = "120000"
        # Ray 2.60 heads enable token authentication: every node and client must present the token.
        self.env["RAY_AUTH_MODE"] = "token"
        subprocess.run([RAY, "get-auth-token", "--generate"], check=True, env=self.env, capture_output=True)
        self.num_cpus = num_cpus
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.workers = []
        self.adopted = []                            # process groups of nodes this object did not start
        self.head = self._start(["--head", f"--port={self.port}", f"--dashboard-port={self.dashboard_port}",
                                 "--include-dashboard=true"])
        from dec_ray.service.cluster import reachable
        self._wait_for(lambda: subprocess.run([RAY, "status", f"--address={self.address}"], env=self.env,
                                              capture_output=True).returncode == 0, "the head to come up")
        self._wait_for(lambda: reachable(f"127.0.0.1:{self.dashboard_port}"), "the dashboard (job API)")

    def node_command(self, args):
        # Ports of its own for every agent: a foreign Ray on the host may hold Ray's defaults
        # (52365 for the dashboard agent: the job API then finds "No available agent")
        ports = [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                         "runtime-env-agent-port", "metrics-export-port")]
        if "--head" in args:
            ports.append(f"--ray-client-server-port={free_port()}")
        return [RAY, "start", *args, *ports, f"--num-cpus={self.num_cpus}", "--block",
                "--node-ip-address=127.0.0.1", "--disable-usage-stats"]

    def _start(self, args):
        return subprocess.Popen(self.node_command(args), env=self.env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    @staticmethod
    def _wait_for(check, what, timeout=180):
        t = time.time()
        while not check():
            assert time.time() - t < timeout, f"timed out waiting for {what}"
            time.sleep(1)

    def add_node(self):
        p = self._start([f"--address={self.address}"])
        self.workers.append(p)
        return p

    @staticmethod
    def kill_node(p, sig=signal.SIGKILL):
        """The node dies at once: raylet, object store and its Ray worker processes."""
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        p.wait(timeout=60)

    def alive_nodes(self):
        import ray
        return [n for n in ray.nodes() if n["Alive"]]

    def wait_nodes(self, n, timeout=180, restarts=3):
        """Until ``n`` nodes are alive. A worker node whose `ray start` exited before the cluster
        had ``n`` nodes (its raylet aborted while starting: on a loaded host its agents can miss
        the raylet's wait for their ports) is started again, up to ``restarts`` times."""
        import ray
        assert ray.is_initialized() and ray.get_runtime_context().gcs_address.endswith(f":{self.port}"), \
            "the driver is not connected to this cluster (a fixture started another Ray after it)"
        t = time.time()
        while len(self.alive_nodes()) != n:
            assert time.time() - t < timeout, f"timed out waiting for {n} nodes"
            for i, p in enumerate(self.workers):
                if p.poll() is not None and restarts > 0:
                    restarts -= 1
                    print(f"[conftest] worker node exited with {p.returncode} while starting; starting it again")
                    self.workers[i] = self._start([f"--address={self.address}"])
            time.sleep(1)

    def stop(self):
        import ray
        from dec_ray.service.cluster import ADDRESS_FILE, started_cluster_address
        ray.shutdown()
        for p in self.workers + [self.head]:
            if p.poll() is None:
                self.kill_node(p)
        for pid in self.adopted:                     # nodes started by someone else for this cluster
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        started = started_cluster_address()
        if started and started.rpartition(":")[2] == str(self.port):    # what `ray stop` would clean up
            os.remove(ADDRESS_FILE)


@pytest.fixture(scope="session")
def two_node_cluster(ray_local):
    """A head and a worker node of 2 CPUs each, started with the `ray` CLI, that the driver joins
    as a user's would (token auth, Ray Train's own defaults, not those of a private local Ray).
    The cluster tests share it; they run last, so the session's Ray is ended first (``ray_local``
    is set up before it: set up after, as a test's ``tables`` would when the cluster tests run
    alone, it would take the driver off this cluster)."""
    import ray

    from dec_ray.service.cluster import LOCAL_RAY_TRAIN_ENV, join_with_token_if_any
    ray.shutdown()
    saved = {k: os.environ.pop(k) for k in (*LOCAL_RAY_TRAIN_ENV, "RAY_ADDRESS", "RAY_AUTH_MODE") if k in os.environ}
    c = LocalCluster(num_cpus=2)
    try:
        c.add_node()
        # token mode as dec_ray joins (the token `ray get-auth-token --generate` wrote); setting
        # RAY_AUTH_MODE here instead would leave Ray's config, read once per process, at "disabled"
        # when no Ray ran before in this process (`pytest -m cluster` alone)
        os.environ["RAY_ADDRESS"] = c.address
        join_with_token_if_any()
        ray.init(address=c.address)
        c.wait_nodes(2)
        yield c
    finally:
        c.stop()
        for k in ("RAY_ADDRESS", "RAY_AUTH_MODE"):
            os.environ.pop(k, None)
        os.environ.update(saved)
