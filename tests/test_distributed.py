"""The method on 2 torch.distributed (gloo) ranks against 1 rank over the same data, no Ray.

What must agree exactly between 2 ranks and 1 rank: the initial weights, the embeddings of the
same weights, the K-means centroids and assignment from them, the fresh top layer, and the dev/test
scores of the same weights. Within ranks: BatchNorm buffers and weights at every evaluation.
The objective of a batch is the same: the CCC loss of 2 ranks' shares has the 1-rank gradient of
the whole batch, and the sampler draws each global cluster as often as 1 rank does.
What differs by design: dropout masks (one stream per rank) and each rank draws from its own rows,
so the weights after an epoch agree only approximately (bound below, measured).
"""

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dec_ray.config import load_config
from dec_ray.service.cluster import free_port
from dec_ray.data.pools import Pool
from dec_ray.method.epoch import Epoch, Stage, emotion, epoch_subset, pseudo_label_ce, pseudo_labels_stage, supervised_stage
from dec_ray.method.learner import Batch, Learner, stage_total, step_bounds
from dec_ray.method.loop import fit
from dec_ray.method.sampler import cluster_shares, uniform_cluster_indices
from gloo_ranks import join, result
from plain_pools import shard, synth_pools

CFG = ["model.width=0.125", "cluster.k=4", "train.batch_sentences=4", "train.epochs=2", "scale.workers=2",
       "model.dropout=0.5"]


# 80 chunks in 4 clusters; rank 0's half holds all of cluster 0 (4 chunks), which 1 rank draws
# 80 // 4 + 1 = 21 times; rank 0 alone would draw it 40 // 4 + 1 = 11 times
CLUSTERS = torch.tensor([0] * 4 + [1, 2, 3] * 12 + [1, 2, 3] * 13 + [1])


def _emotion_gradient(learner: Learner, pool: Pool) -> torch.Tensor:
    """The gradient of the emotion loss over this rank's share of one batch: the whole Train pool
    (eval mode: no dropout, BatchNorm's running statistics, so ranks differ only in their rows)."""
    learner.model.eval()
    idx = torch.arange(pool.n_chunks)
    batch = Batch(pool.chunk_inputs(idx, learner.normalize), idx, pool)
    out = learner.model(batch.x)
    loss = emotion(out, batch) + sum(0.0 * v.float().sum() for v in out.values())   # every parameter in the graph
    loss.backward()
    grad = torch.cat([p.grad.flatten().clone() for p in learner.net.parameters() if p.grad is not None])
    learner.model.zero_grad(set_to_none=True)
    return grad


def _ce_gradient(learner: Learner, pool: Pool, pseudo: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The gradient of the pseudo-label cross-entropy over this rank's ``rows`` of one global batch,
    weighted by the rank's share as a training pass weighs it (eval mode, as above)."""
    learner.model.eval()
    stage = pseudo_labels_stage(pseudo)
    n = torch.tensor([len(rows)])
    from dec_ray.method.distributed import sum_over_ranks
    batch = Batch(pool.chunk_inputs(rows, learner.normalize), rows, pool,
                  share=(2 if dist.is_initialized() else 1) * len(rows) / sum_over_ranks(int(n)))
    out = learner.model(batch.x)
    loss = stage_total(stage, {k: f(out, batch) for k, f in stage.losses.items()}, batch.share)
    (loss + sum(0.0 * v.float().sum() for v in out.values())).backward()
    grad = torch.cat([p.grad.flatten().clone() for p in learner.net.parameters() if p.grad is not None])
    learner.model.zero_grad(set_to_none=True)
    return grad


def _sampled_pass(rank: int, world: int, stats, pools, wrap) -> dict:
    """The training path itself on clusters that follow the ranks: rank 0's Train chunks hold
    clusters 0-2, rank 1's cluster 3 (1 rank: both halves). Then a supervised pass in which rank 1
    has nothing to train."""
    learner = Learner(load_config(None, CFG), stats, torch.device("cpu"), wrap=wrap)
    train = pools["train"]
    n = train.n_chunks
    pseudo = torch.arange(n) % 3 if rank == 0 else torch.full((n,), 3)
    if world == 1:
        half = n // 2
        pseudo = torch.cat([torch.arange(half) % 3, torch.full((n - half,), 3)])
    idx = uniform_cluster_indices(pseudo, seed=5, rank=rank, k=4)
    seen = []

    def recorded(out, batch):
        seen.append(batch.idx.clone())
        return pseudo_label_ce(pseudo)(out, batch)
    learner.reset_top(5)
    out = learner.train(train, idx, Stage({"ce": recorded}, top=True))
    trained = torch.cat(seen) if seen else torch.zeros(0, dtype=torch.int64)
    lone = learner.train(train, idx if rank == 0 else idx[:0], supervised_stage(1.0, pseudo))
    return {"drawn": len(idx), "trained": out["chunks"], "clusters": pseudo[trained], "lone": lone["chunks"],
            "lone_ccc": lone.get("ccc", np.nan)}


def _sentence_pass(rank: int, world: int, stats, pools, wrap) -> dict:
    """The sentence head's pass over each rank's sentences in a shuffled order, 5 of rank 1's
    12 left out (1 rank: the same 19 sentences): which chunks each step reads."""
    learner = Learner(load_config(None, CFG + ["model.head=sentence", "model.functionals=egemaps"]), stats,
                      torch.device("cpu"), wrap=wrap)
    train = pools["train"]
    train.functionals = torch.tensor(train.row_ids, dtype=torch.float32)[:, None].repeat(1, 88)   # a row's id
    c = train.chunks.shape[1]
    keep = (torch.arange(train.chunks.shape[0]) < (train.chunks.shape[0] - (5 if rank == 1 else 0)))
    if world == 1:
        keep = torch.arange(train.chunks.shape[0]) < 19
    order = Epoch(learner, 0).shuffled(train)
    idx = order[keep[order // c]]
    seen = []

    def recorded(out, batch):
        seen.append(batch.idx.clone())
        if len(batch.idx):                  # (a step where this rank holds no sentence has none)
            joined.append((train.row_ids[batch.idx[::c].numpy() // c], batch.functionals[:, 0].numpy().copy()))
        return emotion(out, batch)
    recorded.global_batch = True
    joined = []
    out = learner.train(train, idx, Stage({"ccc": recorded}, regressor=True))
    return {"batches": [b.numpy() for b in seen], "trained": out["chunks"], "chunks": c, "joined": joined}


def _run(rank: int, world: int, port: int, q, stats, arrays) -> None:
    join(rank, world, port)
    full = {k: Pool(*v) for k, v in arrays.items()}
    pools = {k: shard(v, rank, world) for k, v in full.items()}
    # one test sentence in all: rank 1 holds none of it, yet scoring is a collective
    pools["test"] = shard(shard(full["test"], 0, len(full["test"].row_ids)), rank, world)
    cfg = load_config(None, CFG)
    wrap = torch.nn.parallel.DistributedDataParallel if world > 1 else None
    learner = Learner(cfg, stats, torch.device("cpu"), wrap=wrap)
    res = {"world": world, "rank": rank, "mask": torch.nn.functional.dropout(torch.ones(4096), 0.5, training=True),
           "init": learner.model_copy(), "emb": learner.embed(pools["train"]),
           "grad": _emotion_gradient(learner, pools["train"])}
    res["subset"] = [epoch_subset(pools["unlabeled"], 5, seed=s).row_ids for s in (9, 10)]
    mine = CLUSTERS if world == 1 else CLUSTERS[:40] if rank == 0 else CLUSTERS[40:]
    res["draws"] = mine[uniform_cluster_indices(mine, seed=3, rank=rank, n=10_000, k=4)]
    # unequal shares of one global batch: rank 0 its first 30 chunks, rank 1 its first 10
    ce_rows = torch.arange(40) if world == 1 else torch.arange(30 if rank == 0 else 10)
    if world == 1:
        ce_rows = torch.cat([torch.arange(30), pools["train"].n_chunks // 2 + torch.arange(10)])
    res["ce_grad"] = _ce_gradient(learner, pools["train"], torch.arange(pools["train"].n_chunks) % 4, ce_rows)
    km = learner.pseudo_labels(pools["train"], seed=7)
    res.update(centroids=km.centroids, assignment=km.assignment, sizes=km.sizes)
    learner.reset_top(7)
    res["top"] = learner.net.top.weight.detach().clone()
    res["dev0"] = learner.evaluate(pools["dev"], "dev")["metrics"]
    seen = []
    fit_out = fit(learner, pools, report=lambda m, st: seen.append(
        {"epoch": m["epoch"], "buffers": {k: v.clone() for k, v in learner.net.named_buffers()},
         "weights": learner.model_copy()}))
    res.update(seen=seen, final=fit_out["metrics"], test_rows=fit_out["evals"]["test"]["row_ids"])
    res["sampled"] = _sampled_pass(rank, world, stats, pools, wrap)
    res["sentences"] = _sentence_pass(rank, world, stats, pools, wrap)
    q.put(_numpy(res))      # tensors through a queue would be shared memory the child frees
    if world > 1:
        dist.destroy_process_group()


def _numpy(obj):
    if isinstance(obj, torch.Tensor):
        return obj.numpy().copy()
    if isinstance(obj, dict):
        return {k: _numpy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_numpy(v) for v in obj]
    return obj



@pytest.fixture(scope="module")
def runs():
    """The 1-rank and the 2-rank run side by side (three processes, one thread each), on the
    same pools, rendered once here."""
    stats, full = synth_pools()
    arrays = {k: (p.chunks.numpy(), p.labels.numpy(), p.row_ids) for k, p in full.items()}
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_run, args=(r, world, port, q, stats, arrays)) for world in (1, 2)
             for r in range(world)]
    for p in procs:
        p.start()
    got = [result(q, procs) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return {world: sorted((r for r in got if r["world"] == world), key=lambda r: r["rank"]) for world in (1, 2)}


def _flat(state):
    return torch.cat([torch.from_numpy(v).float().flatten() for k, v in state.items()
                      if "running" not in k and "num_batches" not in k])


def test_what_agrees_exactly_between_two_ranks_and_one(runs):
    one, (r0, r1) = runs[1][0], runs[2]
    for a, b in ((one, r0), (one, r1)):
        assert all(np.array_equal(a["init"][k], b["init"][k]) for k in a["init"])      # seeded initialisation
        assert np.array_equal(a["top"], b["top"])                                    # fresh top layer
    np.testing.assert_allclose(np.concatenate([r0["emb"], r1["emb"]]), one["emb"], rtol=1e-5, atol=1e-5)
    for r in (r0, r1):
        np.testing.assert_allclose(r["centroids"], one["centroids"], rtol=1e-5, atol=1e-5)
        assert np.array_equal(r["sizes"], one["sizes"])
        for key, v in one["dev0"].items():                                       # scoring the same weights
            assert np.isclose(r["dev0"][key], v, rtol=1e-6, atol=1e-6), key
    assert np.array_equal(np.concatenate([r0["assignment"], r1["assignment"]]), one["assignment"])


def test_ranks_read_the_same_model_at_every_evaluation(runs):
    r0, r1 = runs[2]
    assert [s["epoch"] for s in r0["seen"]] == [0, 1]
    for a, b in zip(r0["seen"], r1["seen"]):
        for k, v in a["buffers"].items():
            assert np.array_equal(v, b["buffers"][k]), f"epoch {a['epoch']}: {k} differs between ranks"
        assert all(np.array_equal(v, b["weights"][k]) for k, v in a["weights"].items())
    assert r0["final"] == r1["final"]


def test_dropout_masks_differ_between_ranks_and_are_reproducible(runs):
    one, (r0, r1) = runs[1][0], runs[2]
    assert not np.array_equal(r0["mask"], r1["mask"])
    assert np.array_equal(one["mask"], r0["mask"])           # rank 0's stream is the same in both runs


def test_a_one_row_test_split_on_two_ranks_is_scored_without_a_hang(runs):
    (r0, r1), one = runs[2], runs[1][0]
    assert list(r0["test_rows"]) == list(r1["test_rows"]) == list(one["test_rows"]) and len(one["test_rows"]) == 1
    assert np.isfinite(r0["final"]["test_loss"])


def test_weights_after_an_epoch_agree_within_the_measured_bound(runs):
    one, r0 = runs[1][0], runs[2][0]
    start = _flat(one["init"])
    w1, w2 = _flat(one["seen"][0]["weights"]), _flat(r0["seen"][0]["weights"])
    step1, step2 = w1 - start, w2 - start
    # Different draws (each rank samples its own rows) and per-rank BatchNorm batch statistics:
    # the epoch's update has the same size and direction, not the same value. Measured on this
    # data with the global CCC and sampler: cosine 0.75, norm ratio 0.91.
    cos = float(torch.nn.functional.cosine_similarity(step1, step2, dim=0))
    ratio = float(step2.norm() / step1.norm())
    assert cos > 0.5 and 0.5 < ratio < 2.0, (cos, ratio)


def test_the_ccc_loss_of_two_ranks_has_the_gradient_of_the_whole_batch_on_one(runs):
    one, (r0, r1) = runs[1][0], runs[2]
    np.testing.assert_allclose(r0["grad"], r1["grad"], rtol=0, atol=0)       # DDP: one gradient
    scale = np.abs(one["grad"]).max()
    np.testing.assert_allclose(r0["grad"], one["grad"], rtol=1e-4, atol=1e-5 * scale)


def test_the_sampler_draws_each_global_cluster_as_often_as_one_rank_does(runs):
    one, (r0, r1) = runs[1][0], runs[2]
    on_one = np.bincount(one["draws"], minlength=4)
    on_two = np.bincount(np.concatenate([r0["draws"], r1["draws"]]), minlength=4)
    assert list(on_one) == [21] * 4                   # 80 // 4 + 1 per cluster (n large: nothing cut)
    assert list(on_two) == list(on_one)              # rank 0 alone would have drawn cluster 0 11 times


def test_cluster_shares_add_up_to_the_one_rank_count():
    counts = torch.tensor([[4, 12, 12, 12, 0], [0, 13, 13, 14, 0], [0, 1, 0, 3, 0]])
    shares = torch.stack([cluster_shares(counts, r) for r in range(3)])
    per = int(counts.sum()) // 4 + 1
    assert shares.sum(0).tolist() == [per] * 4 + [0]
    assert shares[1, 0] == 0 and shares[0, 0] == per    # a cluster one rank holds: all its draws there
    assert torch.equal(cluster_shares(counts.sum(0, keepdim=True), 0), torch.tensor([per] * 4 + [0]))


def test_a_draw_of_the_pool_per_epoch_has_its_size_on_any_number_of_ranks(runs):
    """train.unlabeled_per_epoch: 5 of the 12 unlabeled sentences, on 1 rank and over 2 ranks (each
    rank its share of its own rows), a fresh draw for another epoch's seed."""
    one, (r0, r1) = runs[1][0], runs[2]
    for i in range(2):
        two = np.concatenate([r0["subset"][i], r1["subset"][i]])
        assert len(one["subset"][i]) == len(two) == len(set(two)) == 5
        assert {len(r0["subset"][i]), len(r1["subset"][i])} == {2, 3}
    assert list(one["subset"][0]) != list(one["subset"][1])


def test_a_pass_trains_on_two_ranks_what_one_rank_trains_when_clusters_follow_the_ranks(runs):
    """The training path: K = 4, rank 0 holds clusters 0-2 and rank 1 cluster 3. Each cluster is
    drawn 264 // 4 + 1 = 67 times over all ranks, the draws are cut to the 264 rows, and all of them
    are trained in the steps 1 rank makes (rank 0 198 draws, rank 1 66). Before: rank 0 cut its
    draws to its 132 rows and both stopped at rank 1's 3 steps: 132 chunks, clusters 0-2 22 times."""
    one, (r0, r1) = runs[1][0]["sampled"], [r["sampled"] for r in runs[2]]
    assert one["trained"] == r0["trained"] + r1["trained"] == 264
    assert (r0["drawn"], r1["drawn"]) == (r0["trained"], r1["trained"]) == (198, 66)
    for counts in (np.bincount(one["clusters"], minlength=4),
                   np.bincount(np.concatenate([r0["clusters"], r1["clusters"]]), minlength=4)):
        assert counts.min() >= 67 - 4 and counts.max() <= 67, counts     # 4 of the 268 draws cut
    # a pass in which rank 1 has nothing to train: rank 0 trains its draws in 198 // 44 steps of
    # the global batch (the last 22 dropped, as 1 rank drops them), rank 1 joins every step
    assert (r0["lone"], r1["lone"]) == (176, 0) and np.isfinite(r0["lone_ccc"])


def test_the_sentence_head_trains_whole_sentences_in_the_one_rank_steps(runs):
    """model.head=sentence: the step bounds count sentences, so every batch of every rank is whole
    sentences, each in chunk order, and 2 ranks (12 + 7 sentences) train what 1 rank trains (19).
    With model.functionals, every batch reads its own sentences' functionals, on either rank."""
    one, (r0, r1) = runs[1][0]["sentences"], [r["sentences"] for r in runs[2]]
    c = one["chunks"]
    assert one["trained"] == r0["trained"] + r1["trained"] == 16 * c          # 19 // 4 steps of 4 sentences
    for r in (one, r0, r1):
        for b in r["batches"]:
            rows = b.reshape(-1, c)
            assert np.all(rows % c == np.arange(c)) and np.all(rows // c == rows[:, :1] // c)
    assert len(r0["batches"]) == len(one["batches"]) == 4
    for r in (one, r0, r1):
        assert r["joined"] and all(np.array_equal(rows, f) for rows, f in r["joined"])


def test_unequal_shares_of_a_batch_have_the_one_rank_gradient_of_the_cross_entropy(runs):
    one, (r0, r1) = runs[1][0], runs[2]
    np.testing.assert_allclose(r0["ce_grad"], r1["ce_grad"], rtol=0, atol=0)
    scale = np.abs(one["ce_grad"]).max()
    np.testing.assert_allclose(r0["ce_grad"], one["ce_grad"], rtol=1e-4, atol=1e-5 * scale)


def test_step_bounds_give_every_rank_its_share_of_each_step():
    assert step_bounds([100], 44, 0) == [0, 44, 88]                       # 1 rank: the last 12 dropped
    assert step_bounds([30], 44, 0) == [0, 30]                            # fewer than a batch: one step
    b0, b1 = step_bounds([198, 66], 44, 0), step_bounds([198, 66], 44, 1)
    assert len(b0) == len(b1) == 7 and b0[-1] == 198 and b1[-1] == 66
    assert all(x1 - x0 + y1 - y0 == 44 for x0, x1, y0, y1 in zip(b0, b0[1:], b1, b1[1:]))   # each step: the batch
    assert step_bounds([50, 0], 44, 1) == [0, 0] and step_bounds([0, 0], 44, 0) == [0]
