"""The method on 3 and 4 torch.distributed (gloo) ranks against 1 rank, no Ray: what users run
(8-64 workers) has middle ranks, which 2 ranks never have. Ranks hold very unequal parts (one
sentence on a middle rank), where cumulative floors of each rank's share once made a middle
rank's step bound go back: a step of -1 chunks, a NaN cross-entropy of no rows all-reduced into
every rank's gradients, and one draw trained twice."""
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dec_ray.config import load_config
from dec_ray.data.pools import Pool
from dec_ray.method.epoch import Stage, pseudo_label_ce, run_epoch
from dec_ray.method.learner import Learner, step_bounds
from dec_ray.service.cluster import free_port
from gloo_ranks import join, result
from plain_pools import synth_pools

CFG = ["model.width=0.125", "cluster.k=4", "train.epochs=1", "model.dropout=0.5"]
# the global batch (sentences) of each world, a multiple of its ranks; 1 rank runs each of them
BATCH = {3: 3, 4: 4}
# sentences per rank: a middle rank with one sentence (train 24, pool 12 in all)
LAYOUT = {3: {"train": [11, 1, 12], "unlabeled": [5, 1, 6]}, 4: {"train": [10, 1, 1, 12], "unlabeled": [4, 1, 1, 6]}}
# draws per rank of one pass that the old bounds took back on the middle rank (found by search)
DRAWS = {3: [2, 1, 261], 4: [8, 1, 2, 253]}


def _part(pool: Pool, sizes, rank: int) -> Pool:
    start = sum(sizes[:rank])
    rows = np.arange(start, start + sizes[rank])
    return Pool(pool.chunks[rows], pool.labels[rows], pool.row_ids[rows])


def _run(rank: int, world: int, port: int, q, stats, arrays) -> None:
    join(rank, world, port)
    full = {k: Pool(*v) for k, v in arrays.items()}
    for like in ([world] if world > 1 else list(BATCH)):
        pools = full if world == 1 else {k: _part(v, LAYOUT[world][k], rank) for k, v in full.items()}
        q.put({"world": world, "like": like, "rank": rank, **_epoch_and_pass(rank, world, like, pools, stats)})
    if world > 1:
        dist.destroy_process_group()


def _epoch_and_pass(rank: int, world: int, like: int, pools, stats) -> dict:
    """A DeepEmoCluster epoch, then one pass with the draws the old bounds got wrong (1 rank: all
    of them), recording every step's rows and loss."""
    wrap = torch.nn.parallel.DistributedDataParallel if world > 1 else None
    cfg = load_config(None, CFG + [f"train.batch_sentences={BATCH[like]}"])
    learner = Learner(cfg, stats, torch.device("cpu"), wrap=wrap)
    logs = run_epoch(learner, 0, pools["train"], pools["unlabeled"])
    weights = learner.model_copy()
    n = pools["train"].n_chunks
    draws = sum(DRAWS[like]) if world == 1 else DRAWS[like][rank]
    idx = torch.arange(draws) % n
    pseudo = torch.arange(n) % 4
    seen, losses = [], []

    def recorded(out, batch):
        seen.append(len(batch.idx))
        loss = pseudo_label_ce(pseudo)(out, batch)
        losses.append(float(loss))
        return loss
    learner.reset_top(3)
    out = learner.train(pools["train"], idx, Stage({"ce": recorded}, top=True))
    return {"logs": logs, "steps": seen, "losses": losses, "trained": out["chunks"],
            "weights": {k: v.numpy().copy() for k, v in weights.items()},
            "after": {k: v.numpy().copy() for k, v in learner.model_copy().items()}}


@pytest.fixture(scope="module")
def runs():
    """1 rank, then 3, then 4 (one thread each), on the same pools."""
    stats, full = synth_pools()
    arrays = {k: (p.chunks.numpy(), p.labels.numpy(), p.row_ids) for k, p in full.items() if k in ("train", "unlabeled")}
    ctx = mp.get_context("spawn")
    out = {}
    for world in (1, 3, 4):
        q = ctx.Queue()
        port = free_port()
        procs = [ctx.Process(target=_run, args=(r, world, port, q, stats, arrays)) for r in range(world)]
        for p in procs:
            p.start()
        got = [result(q, procs) for _ in procs for _ in ([world] if world > 1 else BATCH)]
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        for r in got:
            out.setdefault((r["world"], r["like"]), []).append(r)
    return {k: sorted(v, key=lambda r: r["rank"]) for k, v in out.items()}


def test_step_bounds_never_go_back_on_any_number_of_ranks():
    """Random passes over 1-8 ranks, with empty and tiny ranks among them: every rank's bound is
    monotone, the shares of every step add up to the global batch, every rank ends with all its
    draws but what 1 rank drops (< one batch), and the steps are the ones 1 rank makes."""
    rng = random.Random(0)
    assert step_bounds([2969, 14, 2939], 64, 1)[-1] == 14       # the case: it went 1, 0, 1
    for trial in range(600):
        ranks = rng.randint(1, 8)
        lengths = [rng.choice([0, 1, 2, rng.randint(0, 40), rng.randint(500, 20_000)]) for _ in range(ranks)]
        batch = rng.choice([4, 44, 64, 704])
        total = sum(lengths)
        bounds = [step_bounds(lengths, batch, r) for r in range(ranks)]
        steps = max(1, total // batch) if total else 0
        for r, b in enumerate(bounds):
            assert len(b) == steps + 1 and b[0] == 0
            assert all(y >= x for x, y in zip(b, b[1:])), (lengths, batch, r, b)
            assert b[-1] <= lengths[r]
        for s in range(steps):
            took = sum(b[s + 1] - b[s] for b in bounds)
            assert took == min(batch, total), (lengths, batch, s)
        assert total - sum(b[-1] for b in bounds) == (total % batch if total >= batch else 0)


@pytest.mark.parametrize("world", [3, 4])
def test_a_deepemocluster_epoch_on_many_ranks_trains_what_one_rank_trains(runs, world):
    """Both passes of the epoch (the pool's pseudo-labels, then Train's CCC + CE) train as many
    chunks over all ranks as 1 rank does, with finite losses, and the ranks end with one model."""
    one, many = runs[1, world][0], runs[world, world]
    for key in ("unlabeled_chunks", "train_chunks"):
        assert sum(r["logs"][key] for r in many) == one["logs"][key] > 0, key
    for r in many:
        assert all(np.isfinite(v) for k, v in r["logs"].items() if k.endswith(("ce", "ccc"))), r["logs"]
        for k, v in r["weights"].items():
            assert np.array_equal(v, many[0]["weights"][k]), f"rank {r['rank']}: {k}"


@pytest.mark.parametrize("world", [3, 4])
def test_a_pass_whose_old_bounds_went_back_trains_every_draw_once(runs, world):
    """The draws of DRAWS (a middle rank holding 1 or 2 of them): every step takes the global
    batch over all ranks, no rank a negative count, no loss is NaN, the weights stay finite and
    equal on every rank, and the ranks train what 1 rank trains (264 draws: 8 steps of 33, or 6
    of 44)."""
    one, many = runs[1, world][0], runs[world, world]
    batch = BATCH[world] * 11
    assert one["steps"] == [batch] * (264 // batch) and one["trained"] == 264
    assert sum(r["trained"] for r in many) == 264
    for r in many:
        assert len(r["steps"]) <= 264 // batch and all(s > 0 for s in r["steps"]), (r["rank"], r["steps"])
        assert all(np.isfinite(r["losses"])), r["losses"]
        assert all(np.isfinite(v).all() and np.array_equal(v, many[0]["after"][k]) for k, v in r["after"].items())
