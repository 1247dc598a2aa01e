"""Ranks of torch.distributed (gloo) in spawned processes, for the tests that run the method on N
ranks against 1 without Ray: joining the group, and collecting each rank's result."""
from __future__ import annotations

import os
import queue
import time

import torch
import torch.distributed as dist


def join(rank: int, world: int, port: int) -> None:
    """One thread per rank (the machine has 2 cores); a process group when there are several."""
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)


def result(q, procs, timeout: float = 300):
    """The next rank's result; fails at once when a rank died, and after ``timeout`` on a hang (a
    skipped collective)."""
    t = time.time()
    while time.time() - t < timeout:
        try:
            return q.get(timeout=1)
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            assert not dead, f"a rank died (exit codes {dead})"
    raise AssertionError("timed out waiting for the ranks")
