"""A bounded load check of `dec-ray serve`: a few clients POST real wav files over HTTP to the Ray
Serve deployment; latency p50/p95/p99 and throughput, against the model's own work on one request
(decoding, features, one forward) measured in the same run, in-process, without Serve.

    .venv/bin/python bench/serve.py [--requests N] [--clients C] [--replicas R]

The model is the demo preset's network (width 0.25) with untrained weights (bench/predict.py's
make_run): speed does not depend on the weights. Writes the serving section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench_results import replicated_clips, write_section  # noqa: E402
from predict import make_run  # noqa: E402


def post(url: str, body: bytes) -> float:
    t = time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=120) as r:
        r.read()
        assert r.status == 200
    return time.perf_counter() - t


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--replicas", type=int, default=1)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bench_serve_")
    _, files, _ = replicated_clips(work, 24, 1, seed=13)
    run = os.path.join(work, "run")
    make_run(files, run)
    bodies = [open(f, "rb").read() for f in files]

    from dec_ray.report.inference import Predictor
    p = Predictor(run)
    own = []
    for f in files * 2:                            # the model's own work per request, no Serve
        t = time.perf_counter()
        p.predict_file(f)
        own.append(time.perf_counter() - t)

    import ray
    from ray import serve
    from dec_ray.service.cluster import free_port
    from dec_ray.service.serve import run_serve
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    port = free_port()
    run_serve(run, replicas=args.replicas, port=port, blocking=False)
    url = f"http://127.0.0.1:{port}/"
    for b in bodies[:4]:                           # warm: the replica's first requests
        post(url, b)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as ex:
        lat = list(ex.map(lambda i: post(url, bodies[i % len(bodies)]), range(args.requests)))
    wall = time.perf_counter() - t0
    serve.shutdown()
    ray.shutdown()

    own_ms = statistics.median(own) * 1000
    ms = [x * 1000 for x in lat]
    rows = [("p50", percentile(ms, 50)), ("p95", percentile(ms, 95)), ("p99", percentile(ms, 99))]
    body = (f"{args.requests} HTTP POSTs of {len(files)} synthetic wav clips (2-4 s) from {args.clients} client threads "
            f"to `dec-ray serve` ({args.replicas} replica, 1 CPU, `@serve.batch` up to 16, 10 ms wait), demo-size "
            f"network (width 0.25), machine: {os.cpu_count()} cores, clients on the same machine.\n\n"
            "| measure | value | ratio vs the model's own work per request |\n|---|---|---|\n"
            f"| the model's own work per request (decode, features, forward; in-process, median) | {own_ms:.1f} ms | 1.00 |\n"
            + "".join(f"| latency {q} | {v:.1f} ms | {v / own_ms:.2f} |\n" for q, v in rows)
            + f"| throughput | {args.requests / wall:.1f} requests/s | "
              f"{args.requests / wall * own_ms / 1000:.2f} x one request's own work rate |\n")
    write_section("Serving (`bench/serve.py`)", body)
    print(body)


if __name__ == "__main__":
    main()
