"""The torch.distributed helpers the method uses, in one place; each is the identity without a
process group, so the same code runs in one process, under plain torchrun or under Ray Train."""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> tuple:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def comm_device() -> torch.device:
    """Where collectives need their tensors: the GPU under NCCL, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    """Sum (or ``op``) of a tensor over ranks, returned on the tensor's own device."""
    if not is_distributed():
        return t
    c = t.to(comm_device())
    dist.all_reduce(c, op=op or dist.ReduceOp.SUM)
    return c.to(t.device)


def all_reduce_differentiable(t: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over ranks through which gradients flow back to every rank's input (the
    backward is the same all-reduce of the gradients): a statistic of the global batch as a
    differentiable term."""
    if not is_distributed():
        return t
    from torch.distributed import _functional_collectives as fc
    c = t.to(comm_device())
    if hasattr(fc, "all_reduce_backward"):            # the functional collective has a backward
        out = fc.all_reduce(c, "sum", dist.group.WORLD)
        return (out.wait() if hasattr(out, "wait") else out).to(t.device)
    from torch.distributed.nn.functional import all_reduce as autograd_all_reduce    # older torch
    return autograd_all_reduce(c).to(t.device)


def _reduce_int(n: int, op) -> int:
    if not is_distributed():
        return n
    return int(all_reduce(torch.tensor([n], dtype=torch.int64), op).item())


def min_over_ranks(n: int) -> int:
    return _reduce_int(n, dist.ReduceOp.MIN)


def sum_over_ranks(n: int) -> int:
    return _reduce_int(n, dist.ReduceOp.SUM)


def broadcast(t: torch.Tensor, src: int = 0) -> None:
    """In place: every rank takes rank ``src``'s values."""
    if not is_distributed():
        return
    c = t.to(comm_device())
    dist.broadcast(c, src=src)
    if c is not t:
        t.copy_(c)


def gather_tensors(t: torch.Tensor) -> torch.Tensor:
    """(world, *t.shape): every rank's tensor of the same shape, in rank order, on t's device."""
    rank, size = world()
    if size == 1:
        return t[None]
    c = t.to(comm_device())
    out = [torch.empty_like(c) for _ in range(size)]
    dist.all_gather(out, c)
    return torch.stack(out).to(t.device)


def gather_objects(obj):
    """All ranks' objects, in rank order (just [obj] without a process group)."""
    rank, size = world()
    if size == 1:
        return [obj]
    out = [None] * size
    dist.all_gather_object(out, obj)
    return out


def rank_seed(seed: int, rank: int) -> int:
    """An independent, reproducible random stream per (seed, rank)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def proportional_share(n: int, sizes, rank: int) -> int:
    """Rank ``rank``'s part of ``n`` split between ranks in proportion to ``sizes`` (one per rank),
    by cumulative floors: the parts add up to ``n`` exactly, for any number of ranks."""
    sizes = [int(x) for x in sizes]
    total, below = sum(sizes), sum(sizes[:rank])
    return n * (below + sizes[rank]) // total - n * below // total if total else 0
