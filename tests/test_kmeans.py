"""The K-means against faiss, and under torch.distributed with 2 gloo ranks."""
import os
import socket

import faiss
import numpy as np
import torch.distributed as dist
import torch.multiprocessing as mp

from dec_ray.clustering import kmeans
from dec_ray.sampler import uniform_cluster_indices


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
    q.put((rank, res.centroids, res.objective, res.sizes, auto.centroids))
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_give_the_one_rank_centroids():
    x = blobs(n=4000)
    init = x[np.random.default_rng(1).choice(len(x), 20, replace=False)]
    single = kmeans(x, 20, seed=0, init_centroids=init)
    single_auto = kmeans(x, 20, seed=5)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, x, init, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(q.get(timeout=120) for _ in range(2))
    for p in procs:
        p.join(30)
    for rank, centroids, obj, sizes, auto in got:
        np.testing.assert_allclose(centroids, single.centroids, rtol=1e-4, atol=1e-4)
        assert np.isclose(obj, single.objective, rtol=1e-5)
        assert np.array_equal(sizes, single.sizes)
        # the initial centroids are the rows a single process draws: the same clustering
        np.testing.assert_allclose(auto, single_auto.centroids, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got[0][4], got[1][4])


def test_sampler_is_uniform_over_nonempty_clusters():
    assign = np.array([0] * 90 + [1] * 9 + [3] * 1)
    idx = uniform_cluster_indices(assign, seed=0)
    assert len(idx) == 100
    counts = np.bincount(assign[idx], minlength=4)
    assert counts[2] == 0 and all(32 <= c <= 34 for c in counts[[0, 1, 3]])  # 34 drawn each, 2 cut
    # aligned: every drawn index points at a row of the cluster it was drawn for
    assert set(idx[assign[idx] == 3]) == {99}
    other = uniform_cluster_indices(assign, seed=0, rank=1)
    assert not np.array_equal(idx, other)
    assert np.array_equal(idx, uniform_cluster_indices(assign, seed=0))
