"""A bounded load check of `dec-ray serve` at 1, 4, 16 and 64 concurrent clients: clients POST
real wav files over HTTP to the Ray Serve deployment; latency p50/p99, throughput, the batch sizes
the model actually saw (the replica's own count per forward pass) and the 503s of back-pressure,
against the model's own work on one request (decoding, features, one forward) measured in the same
run, in-process, without Serve.

    .venv/bin/python bench/serve.py [--requests N] [--clients 1 4 16 64] [--replicas R]

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
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench_results import replicated_clips, write_section  # noqa: E402
from predict import make_run  # noqa: E402


def post(url: str, body: bytes):
    """(seconds, HTTP status)."""
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=120) as r:
            r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    return time.perf_counter() - t, status


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def batches_between(before: dict, after: dict) -> Counter:
    return Counter({k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) > before.get(k, 0)})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=256, help="per client level")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="serve settings (ServeConfig)")
    ap.add_argument("--no-write", action="store_true", help="print, do not write bench/RESULTS.md")
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
    own_ms = statistics.median(own) * 1000

    import ray
    from ray import serve
    from dec_ray.config import serve_config
    from dec_ray.service.cluster import free_port
    from dec_ray.service.serve import run_serve
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")      # Serve's lines to Ray's logs, as `dec-ray serve`
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    port = free_port()
    s = serve_config(None, args.set)
    handle = run_serve(run, replicas=args.replicas, port=port, blocking=False, settings=s)
    url = f"http://127.0.0.1:{port}/"
    for b in bodies[:4]:                           # warm: the replica's first requests
        post(url, b)
    rows = []
    for clients in args.clients:
        before = handle.batch_sizes.remote().result()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as ex:
            out = list(ex.map(lambda i: post(url, bodies[i % len(bodies)]), range(args.requests)))
        wall = time.perf_counter() - t0
        seen = batches_between(before, handle.batch_sizes.remote().result())
        ms = [t * 1000 for t, status in out if status == 200]
        rejected = sum(status == 503 for _, status in out)
        mean_batch = sum(k * v for k, v in seen.items()) / max(1, sum(seen.values()))
        rows.append((clients, percentile(ms, 50), percentile(ms, 99), len(ms) / wall, mean_batch, max(seen), rejected))
        print(rows[-1], dict(seen), flush=True)
    serve.shutdown()
    ray.shutdown()

    body = (f"{args.requests} HTTP POSTs of {len(files)} synthetic wav clips (2-4 s) per level of concurrent clients "
            f"to `dec-ray serve` ({args.replicas} replica, 1 CPU, `@serve.batch` up to {s.max_batch_size}, "
            f"{s.batch_wait_timeout_s * 1000:g} ms wait, max_ongoing_requests {s.max_ongoing_requests}, "
            f"max_queued_requests {s.max_queued_requests}), demo-size network (width 0.25), machine: {os.cpu_count()} "
            "cores, clients on the same machine. The model's own work per request (decode, features, forward; "
            f"in-process, median): **{own_ms:.1f} ms**. Batch sizes: the replica's count of the requests in each "
            "forward pass.\n\n"
            "| clients | latency p50 | p99 | p50 / own work | throughput | x one request's own work rate "
            "| mean batch | largest batch | 503 |\n|---|---|---|---|---|---|---|---|---|\n"
            + "".join(f"| {c} | {p50:.0f} ms | {p99:.0f} ms | {p50 / own_ms:.1f} | {rps:.1f} req/s | "
                      f"{rps * own_ms / 1000:.2f} | {mb:.1f} | {mx} | {rej} |\n"
                      for c, p50, p99, rps, mb, mx, rej in rows))
    if not args.no_write:
        write_section("Serving (`bench/serve.py`)", body)
    print(body)


if __name__ == "__main__":
    main()
