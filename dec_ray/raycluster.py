"""Connecting to Ray: the running cluster if there is one (``ray job submit``, RAY_ADDRESS), else a
local one with one logical CPU more than the machine has, so that Ray Data always has a CPU
beside training workers that hold every core."""
from __future__ import annotations

import os


def ensure_ray(min_cpus_for_training: float = 0.0) -> None:
    """Start or join Ray. Without the spare logical CPU, Ray Data could not schedule the reads
    that feed workers holding every CPU (a deadlock, e.g. 2 workers on a 2-core laptop)."""
    import ray
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    try:
        ray.init(address="auto")
        return
    except ConnectionError:
        pass
    cpus = max((os.cpu_count() or 1) + 1, int(min_cpus_for_training + 1.999))
    ray.init(num_cpus=cpus)   # the dashboard also serves the State API that Ray Train uses for cleanup


def check_room_for_data(training_cpus: float) -> None:
    """Warn when training would hold every CPU of the cluster (Ray Data would then stall)."""
    import ray
    total = ray.cluster_resources().get("CPU", 0)
    if total < training_cpus + 1:
        print(f"[dec-ray] warning: the cluster has {total:g} CPUs and training holds {training_cpus:g}; "
              "Ray Data needs at least one more to read the tables. Lower scale.workers or "
              "scale.cpus_per_worker, or add a node.", flush=True)
