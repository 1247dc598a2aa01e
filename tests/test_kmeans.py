"""The K-means against faiss, and under torch.distributed with 2 gloo ranks."""
import os

import faiss
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dec_ray.method.kmeans import kmeans
from dec_ray.service.cluster import free_port
from dec_ray.method.sampler import uniform_cluster_indices


def blobs(n=6000, d=32, centers=25, seed=0, spread=3.0):
    rng = np.random.default_rng(seed)
    c = rng.normal(scale=spread, size=(centers, d))
    return (c[rng.integers(centers, size=n)] + rng.normal(size=(n, d))).astype(np.float32)


def test_objective_median_within_2pct_of_faiss():
    # overlapping clusters, like real embeddings: seeds differ by a few %, so compare medians
    x = blobs(spread=0.7)
    ours = [kmeans(x, 40, seed=s).objective for s in range(7)]
    ref = []
    for s in range(7):
        km = faiss.Kmeans(x.shape[1], 40, niter=20, seed=s, max_points_per_centroid=10**7)
        km.train(x)
        ref.append(km.index.search(x, 1)[0].sum())
    assert abs(np.median(ours) / np.median(ref) - 1) < 0.02, (ours, ref)


def test_no_empty_cluster_survives():
    x = blobs(n=500, centers=3)
    x[:300] = x[0]                                      # many duplicates: empty clusters happen
    res = kmeans(x, 30, seed=1)
    assert (res.sizes > 0).all() and res.sizes.sum() == 500
    assert np.array_equal(np.bincount(res.assignment, minlength=30), res.sizes)


def test_pca_whitening_and_l2():
    res = kmeans(blobs(), 10, pca_dim=8, l2=True)
    assert res.centroids.shape == (10, 8)


def _rank_main(rank, world, port, x, init, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    part = np.array_split(x, world)[rank]
    res = kmeans(part, init.shape[0], seed=0, init_centroids=init, threads=1)
    auto = kmeans(part, init.shape[0], seed=5, threads=1)     # its own initialisation (global row draw)
    balanced = kmeans(part, init.shape[0], seed=0, init_centroids=init, threads=1, balance="sinkhorn")
    q.put((rank, res.centroids, res.objective, res.sizes, auto.centroids, balanced.assignment))
    dist.destroy_process_group()



def test_two_gloo_ranks_give_the_one_rank_centroids():
    x = blobs(n=4000)
    init = x[np.random.default_rng(1).choice(len(x), 20, replace=False)]
    single = kmeans(x, 20, seed=0, init_centroids=init)
    single_auto = kmeans(x, 20, seed=5)
    single_balanced = kmeans(x, 20, seed=0, init_centroids=init, balance="sinkhorn")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, x, init, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(q.get(timeout=120) for _ in range(2))
    for p in procs:
        p.join(30)
    # the Sinkhorn equipartition sums its columns over ranks: the 1-rank pseudo-labels
    balanced = np.concatenate([g[5] for g in got])
    assert (balanced != single_balanced.assignment).mean() < 0.002
    for rank, centroids, obj, sizes, auto, _ in got:
        np.testing.assert_allclose(centroids, single.centroids, rtol=1e-4, atol=1e-4)
        assert np.isclose(obj, single.objective, rtol=1e-5)
        assert np.array_equal(sizes, single.sizes)
        # the initial centroids are the rows a single process draws: the same clustering
        np.testing.assert_allclose(auto, single_auto.centroids, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got[0][4], got[1][4])


def test_sampler_is_uniform_over_nonempty_clusters():
    assign = torch.tensor([0] * 90 + [1] * 9 + [3] * 1)
    idx = uniform_cluster_indices(assign, seed=0)
    assert len(idx) == 100 and idx.dtype == torch.int64
    counts = torch.bincount(assign[idx], minlength=4).numpy()
    assert counts[2] == 0 and all(32 <= c <= 34 for c in counts[[0, 1, 3]])  # 34 drawn each, 2 cut
    # aligned: every drawn index points at a row of the cluster it was drawn for
    assert set(idx[assign[idx] == 3].tolist()) == {99}
    # the big cluster gives 34 distinct rows (drawn without replacement), the small ones repeat
    assert len(set(idx[assign[idx] == 0].tolist())) == counts[0]
    other = uniform_cluster_indices(assign, seed=0, rank=1)
    assert not torch.equal(idx, other)
    assert torch.equal(idx, uniform_cluster_indices(assign, seed=0))


def _lloyd(x, init, niter):
    """Textbook Lloyd iterations in numpy (float64 distances): the independent reference."""
    c = init.astype(np.float64).copy()
    for _ in range(niter):
        a = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        c = np.stack([x[a == j].mean(0) for j in range(len(c))])
    return ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1), c


def test_torch_tensors_and_both_assigners_equal_the_numpy_path_from_the_same_centroids():
    x = blobs(n=3000, d=16, centers=12)
    init = x[np.random.default_rng(3).choice(len(x), 12, replace=False)]
    ref_assign, ref_centroids = _lloyd(x, init, 20)
    numpy_path = kmeans(x, 12, init_centroids=init, assign="faiss")
    assert isinstance(numpy_path.assignment, np.ndarray) and numpy_path.n_split == 0
    for assign in ("faiss", "torch"):
        res = kmeans(torch.from_numpy(x), 12, init_centroids=torch.from_numpy(init), assign=assign)
        assert isinstance(res.assignment, torch.Tensor)
        assert np.array_equal(res.assignment.numpy(), numpy_path.assignment)
        assert np.array_equal(res.assignment.numpy(), ref_assign)
        np.testing.assert_allclose(res.centroids.numpy(), ref_centroids, rtol=1e-5, atol=1e-5)
        assert res.objective == pytest.approx(numpy_path.objective, rel=1e-5)
        assert np.array_equal(res.sizes, np.bincount(ref_assign, minlength=12))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("assign", ["torch", "faiss"])
def test_kmeans_on_cuda_tensors_equals_the_cpu(assign):
    if assign == "faiss" and not hasattr(faiss, "StandardGpuResources"):
        pytest.skip("faiss without GPU support")
    x = torch.from_numpy(blobs(n=20000, d=32))
    cpu = kmeans(x, 25, seed=2, assign=assign)
    gpu = kmeans(x.cuda(), 25, seed=2, assign=assign)
    assert gpu.assignment.is_cuda
    assert (gpu.assignment.cpu() == cpu.assignment).float().mean() > 0.999
    assert gpu.objective == pytest.approx(cpu.objective, rel=1e-4)


def test_sinkhorn_pseudo_labels_are_balanced_where_kmeans_is_not():
    """A dense cloud of 900 rows inside a wide one of 100: K-means gives the dense cloud two big
    clusters and the wide one a handful of rows each; the Sinkhorn equipartition around the same
    centroids gives every cluster about N/K rows (SeLa/SwAV), and the centroids stay K-means'."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (900, 4)), rng.normal(0, 6, (100, 4))]).astype(np.float32)
    plain = kmeans(x, 5, niter=10, seed=0)
    balanced = kmeans(x, 5, niter=10, seed=0, balance="sinkhorn")
    assert plain.sizes.max() / plain.sizes.min() > 10
    assert np.allclose(plain.centroids, balanced.centroids)
    assert balanced.sizes.min() >= 0.85 * 200 and balanced.sizes.max() <= 1.15 * 200, balanced.sizes
    assert balanced.objective >= plain.objective          # balance costs distortion, by construction


def _empty_rank_main(rank, port, x, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    part = x if rank == 0 else x[:0]
    res = kmeans(part, 5, niter=5, seed=0, threads=1, balance="sinkhorn")
    q.put((rank, res.assignment, res.sizes))
    dist.destroy_process_group()


def test_sinkhorn_on_a_rank_without_rows_takes_part_and_gets_no_labels():
    """A pool with fewer sentences than workers, or a per-epoch draw that gives a rank none."""
    x = blobs(n=400, centers=5)
    single = kmeans(x, 5, niter=5, seed=0, balance="sinkhorn")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_empty_rank_main, args=(r, port, x, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted((q.get(timeout=120) for _ in range(2)), key=lambda g: g[0])
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    (_, a0, s0), (_, a1, s1) = got
    assert len(a1) == 0 and np.array_equal(a0, single.assignment)
    assert np.array_equal(s0, s1) and np.array_equal(s0, single.sizes)
