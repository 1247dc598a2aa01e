"""Connecting to Ray, by Ray's own conventions: the cluster named by ``--address`` or RAY_ADDRESS,
else the one this user started with ``ray start`` (its address file), else a private local Ray
with one logical CPU more than the machine has, so that Ray Data always has a CPU beside training
workers that hold every core. Never a Ray found by scanning the machine's processes
(``address="auto"``), which may be another user's, with another Python and another dec_ray."""
from __future__ import annotations

import os
import socket
import tempfile
from typing import Optional

import dec_ray


ADDRESS_FILE = os.path.join(tempfile.gettempdir(), "ray", "ray_current_cluster")


def started_cluster_address() -> Optional[str]:
    """The address `ray start` recorded for this user (Ray's ray_current_cluster file), if any."""
    try:
        if os.stat(ADDRESS_FILE).st_uid != os.getuid():
            return None
        with open(ADDRESS_FILE) as f:
            return f.read().strip() or None
    except OSError:
        return None


def reachable(address: str, timeout_s: float = 2.0) -> bool:
    """Whether anything listens at host:port. A cluster killed without `ray stop` leaves its
    address file behind, and ray.init would wait minutes on it."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def ensure_ray(min_cpus_for_training: float = 0.0) -> None:
    """Join or start Ray (see the module docstring). When joining from a shell (not from inside a
    `ray job submit` job, which ships its working dir), this dec_ray goes with the driver as a
    runtime_env py_module, so the cluster's workers run the driver's code, not whatever is there."""
    import ray
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")                 # `--address` sets it too
    started = started_cluster_address()
    if not address and started:
        if reachable(started):
            address = started
        else:
            print(f"[dec-ray] the cluster `ray start` recorded ({started}) is gone; starting a local Ray", flush=True)
    if address:
        runtime_env = None
        if not os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):       # set in a `ray job submit` driver
            runtime_env = {"py_modules": [os.path.dirname(os.path.abspath(dec_ray.__file__))]}
        ray.init(address=address, runtime_env=runtime_env)
        print(f"[dec-ray] joined the Ray cluster at {address}", flush=True)
        return
    cpus = max((os.cpu_count() or 1) + 1, int(min_cpus_for_training + 1.999))
    start_local_ray(cpus)
    print(f"[dec-ray] started a private local Ray ({cpus} logical CPUs)", flush=True)


# Ray Train settings for a private local Ray (environment variables, Ray Train's own; a value
# already in the environment wins). The controller polls its workers every 0.5 s instead of 2 s:
# on one machine that is cheap, and each run ends seconds sooner (the end of a run is seen at the
# next poll). No preemption watcher (one more actor process per run): a one-machine Ray has no
# node an autoscaler could reclaim. On a cluster, Ray's defaults hold.
LOCAL_RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def start_local_ray(cpus: int) -> None:
    """A private Ray on this machine, with LOCAL_RAY_TRAIN_ENV (set before Ray starts, so every
    Ray process of it has them)."""
    import ray
    for key, value in LOCAL_RAY_TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    ray.init(num_cpus=cpus, address="local")


def runs_that_fit(workers: int, cpus_per_worker: float, use_gpu: bool = False, cap: int = 0) -> int:
    """How many training runs (Tune trials) fit on the cluster at once: each holds its workers plus
    one CPU for the trial's own driver, one CPU stays free for Ray Data; with GPUs, one per worker.
    ``cap`` > 0 lowers it."""
    import ray
    res = ray.cluster_resources()
    fit = max(1, int((res.get("CPU", 1) - 1) // (workers * cpus_per_worker + 1)))
    if use_gpu:
        fit = min(fit, max(1, int(res.get("GPU", 0) // workers)))
    return min(fit, cap) if cap else fit
