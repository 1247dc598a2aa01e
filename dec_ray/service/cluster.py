"""Connecting to Ray, by Ray's own conventions: the cluster named by ``--address`` or RAY_ADDRESS,
else the one this user started with ``ray start`` (its address file), else a private local Ray
with one logical CPU more than the machine has (a Tune trial's driver beside workers that hold
every core). Never a Ray found by scanning the machine's processes (``address="auto"``), which may
be another user's, with another Python and another dec_ray.

Ray's own processes of a job (Ray Train's controller and its placement-group cleaner, Tune's
trial drivers) call Ray's state API without an address; with more than one Ray on the host that
scan fails ("Found multiple active Ray instances"), the cleaner dies and the placement groups of
ended runs stay reserved. So they are told their cluster's address: RAY_ADDRESS in the job's
runtime_env when joining, and in the environment a private Ray starts with.
"""
from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from typing import Dict, List, Optional

import dec_ray
from dec_ray.service.console import quiet_ray, ray_log_level, verbose


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
    quiet_ray()
    address = os.environ.get("RAY_ADDRESS")                 # `--address` sets it too
    started = started_cluster_address()
    if not address and started:
        if reachable(started):
            address = started
        else:
            print(f"[dec-ray] the cluster `ray start` recorded ({started}) is gone; starting a local Ray", flush=True)
    if address:
        join_with_token_if_any()
        runtime_env = None
        if not os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):       # set in a `ray job submit` driver
            runtime_env = {"py_modules": [os.path.dirname(os.path.abspath(dec_ray.__file__))]}
            env = {"DEC_RAY_VERBOSE": "1"} if verbose() else {}     # the workers' console too
            if "://" not in address:                                 # not a Ray Client address
                env["RAY_ADDRESS"] = address
            runtime_env["env_vars"] = env
        ray.init(address=address, runtime_env=runtime_env, logging_level=ray_log_level())
        print(f"[dec-ray] joined the Ray cluster at {address}", flush=True)
        return
    cpus = max((os.cpu_count() or 1) + 1, int(min_cpus_for_training + 1.999))
    start_local_ray(cpus)
    print(f"[dec-ray] started a private local Ray ({cpus} logical CPUs)", flush=True)


def join_with_token_if_any() -> None:
    """Before joining a cluster: token authentication on when this user has a token, as the `ray`
    CLI does (a `ray start` head of Ray 2.60 requires it). Ray reads RAY_AUTH_MODE once per process,
    so setting the variable later is not enough; this is Ray's own call for it."""
    from ray._private.authentication.authentication_token_setup import \
        maybe_enable_token_auth_if_token_available
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


# Ray Train settings for a private local Ray (environment variables, Ray Train's own; a value
# already in the environment wins). The controller polls its workers every 0.5 s instead of 2 s:
# on one machine that is cheap, and each run ends seconds sooner (the end of a run is seen at the
# next poll). No preemption watcher (one more actor process per run): a one-machine Ray has no
# node an autoscaler could reclaim. On a cluster, Ray's defaults hold.
LOCAL_RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
PRIVATE: Dict[str, Optional[str]] = {"address": None}      # the address of the Ray this process started


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def environment(**values: str):
    """These environment variables for the block only (the processes Ray starts inherit them)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_local_ray(cpus: int, tries: int = 3) -> str:
    """A private Ray on this machine; returns its address. Started with LOCAL_RAY_TRAIN_ENV, and
    with RAY_ADDRESS naming its own GCS (a port chosen here) for the processes it starts; the
    driver's own environment keeps no RAY_ADDRESS, so programs it runs do not join this Ray."""
    import ray
    for key, value in LOCAL_RAY_TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    for attempt in range(tries):
        port = free_port()
        address = f"{ray.util.get_node_ip_address()}:{port}"
        try:
            with environment(RAY_GCS_SERVER_PORT=str(port), RAY_ADDRESS=address):
                ray.init(num_cpus=cpus, address="local", logging_level=ray_log_level())
            PRIVATE["address"] = address
            return address
        except Exception:               # the port was taken between the check and the start
            ray.shutdown()
            if attempt == tries - 1:
                raise
    return ""


class ResourcesUnavailable(RuntimeError):
    """A run could not get the resources of its workers within its bound (``scale.resource_wait_s``)."""


def resource_holders(limit: int = 8) -> List[str]:
    """What holds the cluster's resources now: the placement groups that reserve them (with their
    bundles and state) and the actors alive outside them, one line each."""
    import ray
    lines = []
    for pg_id, pg in ray.util.placement_group_table().items():
        if pg.get("state") == "REMOVED":
            continue
        bundles = list((pg.get("bundles") or {}).values())
        cpus = sum(b.get("CPU", 0) for b in bundles)
        gpus = sum(b.get("GPU", 0) for b in bundles)
        lines.append(f"placement group {pg_id[:12]} ({pg.get('name') or 'unnamed'}, {pg.get('state')}): "
                     f"{cpus:g} CPU" + (f", {gpus:g} GPU" if gpus else "") + f" in {len(bundles)} bundles")
    try:
        from ray.util.state import list_actors
        gcs = ray.get_runtime_context().gcs_address
        for a in list_actors(address=gcs, filters=[("state", "=", "ALIVE")], limit=200, raise_on_missing_output=False):
            res = getattr(a, "required_resources", None) or {}
            if res.get("CPU") or res.get("GPU"):
                lines.append(f"actor {a.class_name} (pid {a.pid}): {res.get('CPU', 0):g} CPU")
    except Exception as e:                # the state API needs the dashboard; the groups say most
        lines.append(f"(actors not listed: {type(e).__name__})")
    return lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])


def wait_for_room(need: Dict[str, float], timeout_s: float, poll_s: float = 1.0) -> None:
    """Wait until the cluster has ``need`` (e.g. {"CPU": 2}) free, at most ``timeout_s``; then stop
    with ResourcesUnavailable naming what holds them. For a Ray with no autoscaler (a private
    local Ray): on a cluster, the run's own request is what makes an autoscaler add nodes."""
    import ray
    deadline = time.monotonic() + timeout_s
    said = False
    while True:
        free = ray.available_resources()
        short = {k: v for k, v in need.items() if v and free.get(k, 0) + 1e-9 < v}
        if not short:
            return
        if time.monotonic() >= deadline:
            raise ResourcesUnavailable(
                "the run's workers need " + ", ".join(f"{v:g} {k}" for k, v in need.items() if v) +
                "; free now: " + ", ".join(f"{free.get(k, 0):g} {k}" for k in need) +
                f" (waited {timeout_s:g} s, scale.resource_wait_s). Held by:\n  " +
                "\n  ".join(resource_holders() or ["(nothing listed)"]))
        if not said:
            print(f"[dec-ray] waiting up to {timeout_s:g} s for " +
                  ", ".join(f"{v:g} {k}" for k, v in short.items()) + " (busy: other runs hold them)", flush=True)
            said = True
        time.sleep(poll_s)


def is_private() -> bool:
    """Whether this process started the Ray it is connected to (no autoscaler to wait for)."""
    import ray
    return PRIVATE["address"] is not None and ray.is_initialized()


def runs_that_fit(workers: int, cpus_per_worker: float, use_gpu: bool = False, cap: int = 0) -> int:
    """How many training runs (Tune trials) fit on the cluster at once: each holds its workers plus
    one CPU for the trial's own driver, one CPU stays free (the driver's spare); with GPUs, one per worker.
    ``cap`` > 0 lowers it."""
    import ray
    res = ray.cluster_resources()
    fit = max(1, int((res.get("CPU", 1) - 1) // (workers * cpus_per_worker + 1)))
    if use_gpu:
        fit = min(fit, max(1, int(res.get("GPU", 0) // workers)))
    return min(fit, cap) if cap else fit
