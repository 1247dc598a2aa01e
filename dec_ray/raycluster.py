"""Connecting to Ray: the running cluster if there is one (``ray job submit``, RAY_ADDRESS), else a
local one sized so that Ray Data always has a CPU beside the training workers."""
from __future__ import annotations

import os


def ensure_ray(min_cpus_for_training: float = 0.0) -> None:
    """Start or join Ray. A local Ray gets at least training CPUs + 1 logical CPUs: with every
    CPU held by a train worker, Ray Data could not schedule the reads that feed it (deadlock)."""
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
    cpus = max(os.cpu_count() or 1, int(min_cpus_for_training + 1.999))
    ray.init(num_cpus=cpus)   # the dashboard also serves the State API that Ray Train uses for cleanup
