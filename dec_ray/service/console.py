"""What reaches the console: the product's own lines by default, Ray's internals in Ray's logs
(``/tmp/ray/session_*/logs``); ``--verbose`` (DEC_RAY_VERBOSE=1) brings Ray's back. Warnings
stay visible either way: only INFO-level chatter is routed away."""
from __future__ import annotations

import os
import sys

RAY_DATA_LOGGING = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ray_data_logging.yaml")


def verbose() -> bool:
    return os.environ.get("DEC_RAY_VERBOSE", "") not in ("", "0")


def ray_log_level() -> str:
    """Ray's own loggers in this driver (``ray.init(logging_level=...)``)."""
    return "INFO" if verbose() else "WARNING"


def quiet_ray() -> None:
    """Before Ray starts in this process: Ray Data's console at WARNING (its file log unchanged);
    Ray Tune's classic console, which ``verbose=0`` silences (its newer one prints an experiment
    header and result paths whatever the verbosity; dec_ray prints its own lines per trial)."""
    if verbose():
        return
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", RAY_DATA_LOGGING)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if "ray.data" in sys.modules:               # imported already: configure it again
        from ray.data._internal.logging import configure_logging
        configure_logging()


def train_logging_config():
    """Ray Train's console: its INFO lines (worker group start, each report, each checkpoint)
    stay in its log files under the Ray session's logs/train/."""
    from ray.train import LoggingConfig
    return LoggingConfig(log_level="INFO" if verbose() else "WARNING")


def quiet_train_worker() -> None:
    """In a Ray Train worker: its report lines ("Reporting training result ...", every rank, every
    epoch) come from a logger named after its source file, outside ``ray.train``, so Ray Train's
    LoggingConfig does not reach them. The console handler Ray Train gave the root logger drops
    their INFO records; its log-file handler keeps them."""
    if verbose():
        return
    import logging

    from ray.train.v2._internal.execution import context
    name = context.__file__
    for handler in logging.getLogger().handlers:
        if type(handler).__name__ == "PlainRayHandler":          # Ray Train's "console" handler
            handler.addFilter(lambda record: record.name != name or record.levelno >= logging.WARNING)
