"""`dec_ray.method.kmeans.kmeans` against `faiss.Kmeans` (time, objective), 1 and 2 gloo ranks,
N x 256 embeddings; projection for the 5.5M chunk embeddings of 500K segments.

    .venv/bin/python bench/kmeans.py [--sizes 10000 100000 1000000] [--ks 10 100 1000] [--seeds 3]

Writes the K-means section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from bench_results import write_section  # noqa: E402

D = 256


def data(n, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(200, D)).astype(np.float32)
    return centers[rng.integers(200, size=n)] + rng.normal(scale=1.5, size=(n, D)).astype(np.float32)


def _rank(rank, port, n, k, seed, q):
    import torch.distributed as dist
    from dec_ray.method.kmeans import kmeans
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    x = np.array_split(data(n), 2)[rank]
    dist.barrier()
    t = time.perf_counter()
    res = kmeans(x, k, seed=seed, threads=1)
    q.put((time.perf_counter() - t, res.objective))
    dist.destroy_process_group()


def two_ranks(n, k, seed):
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ps = [ctx.Process(target=_rank, args=(r, port, n, k, seed, q)) for r in range(2)]
    for p in ps:
        p.start()
    out = [q.get() for _ in ps]
    for p in ps:
        p.join()
    return max(o[0] for o in out), out[0][1]


def main():
    import faiss
    from dec_ray.method.kmeans import kmeans
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--ks", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--max-work", type=float, default=2e8, help="skip N*K above this (time budget)")
    args = ap.parse_args()
    threads = os.cpu_count()
    rows = ["| N | K | faiss.Kmeans s | ours 1 rank s | ours 2 ranks s | time ratio 1 rank | "
            "objective ratio (median) |", "|---|---|---|---|---|---|---|"]
    per_point_iter = []
    for n in args.sizes:
        x = data(n)
        for k in args.ks:
            if n * k > args.max_work or k * 39 > n:
                continue
            tf, of, t1, o1, t2 = [], [], [], [], []
            for s in range(args.seeds):
                faiss.omp_set_num_threads(threads)
                t = time.perf_counter()
                km = faiss.Kmeans(D, k, niter=20, seed=s, max_points_per_centroid=10 ** 7)
                km.train(x)
                tf.append(time.perf_counter() - t)
                of.append(float(km.index.search(x, 1)[0].sum()))
                t = time.perf_counter()
                res = kmeans(x, k, seed=s, threads=threads)
                t1.append(time.perf_counter() - t)
                o1.append(res.objective)
            t2.append(two_ranks(n, k, 0)[0])
            m = {name: statistics.median(v) for name, v in (("tf", tf), ("of", of), ("t1", t1), ("o1", o1), ("t2", t2))}
            per_point_iter.append(m["t1"] / (n * k * 20))
            rows.append(f"| {n:,} | {k} | {m['tf']:.2f} | {m['t1']:.2f} | {m['t2']:.2f} | "
                        f"{m['t1'] / m['tf']:.2f} | {m['o1'] / m['of']:.4f} |")
            print(rows[-1], flush=True)
    sec_per = statistics.median(per_point_iter)
    lines = rows + [
        "",
        f"Median of {args.seeds} seeds; 2 ranks = 2 gloo processes with 1 faiss thread each, time of the "
        f"slower rank; {threads} cores. Cells above --max-work ({args.max_work:.0e} N*K) are skipped.",
        f"Projection, 5.5M chunk embeddings x 256 (500K segments x 11 chunks), 20 iterations, at "
        f"{sec_per * 1e9:.2f} ns per point-centroid-iteration on this CPU: K=10: "
        f"{5.5e6 * 10 * 20 * sec_per:.0f} s, K=30: {5.5e6 * 30 * 20 * sec_per:.0f} s per clustering on one "
        f"machine like this one, divided by the number of ranks (E-step is local). Memory per rank: "
        f"5.5M x 256 x 4 B / ranks = {5.5e6 * 256 * 4 / 2 ** 30:.1f} GiB / ranks (+ a float64 copy for the "
        f"M-step sums: x3 in all).",
    ]
    write_section("K-means (`bench/kmeans.py`)", "\n".join(lines))
    print("\n".join(lines[-3:]))


if __name__ == "__main__":
    main()
