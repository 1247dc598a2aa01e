"""Training throughput against the model's own ceiling, in one run on one device.

- The ceiling: chunks/s of the bare model in a tight loop on the same device and batch, with the
  batch already normalised on the device: forward only (eval, no grad: the embedding pass) and
  forward + backward + SGD step (a training step).
- The product's epoch (``training.run_epoch`` on pools read by ``tables.read_pool``): its embedding
  passes and its training passes in chunks/s, each as a ratio to the ceiling.
- K-means (20 iterations) as a share of an epoch over 100K and 1M embeddings, with the faiss and
  the torch E-step; the epoch's other steps projected from the product's measured chunks/s.
- The old path (numpy batches, host embeddings; ``--old-commit``, run from a git worktree) against
  the new one, on the same tables, as a ratio of epoch times.
- The Ray Train loop (1 worker) against the plain loop, and the BatchNorm buffer broadcast (2 gloo
  ranks) against one training step.

    .venv/bin/python bench/train.py [--labeled N] [--unlabeled M] [--epochs E] [--old-commit SHA]

Writes the training section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from bench_results import write_section  # noqa: E402

BASE = ["model.width=0.25", "cluster.k=10", "train.batch_sentences=8", "train.min_steps_per_epoch=0",
        "scale.workers=1", "scale.max_failures=0"]
OLD_COMMIT = "4622ad8"          # the last commit whose epoch gathered and normalised batches in numpy

# One script for both paths, so both are timed the same way; {imports} is each path's API.
IMPORTS = {
    "old": "from dec_ray.normalization import Stats\nfrom dec_ray.training import Learner, run_epoch\n"
           "from dec_ray.ingest import split_files\nfrom dec_ray.trainer import load_eval_pool\n"
           "read = lambda files, cfg, stats: load_eval_pool(files, cfg, stats, 0, 1)\n",
    "new": "from dec_ray.data.normalization import Stats\nfrom dec_ray.method.learner import Learner\n"
           "from dec_ray.method.epoch import run_epoch\n"
           "from dec_ray.data.tables import read_pool as read, split_files\n",
}
EPOCH_SCRIPT = r"""
import json, sys, time, torch
from dec_ray.config import load_config
{imports}
tables, overrides, epochs, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
cfg = load_config(None, overrides)
stats = Stats.load(tables + "/stats.json")
pools = {{s: read(split_files(tables, s), cfg, stats) for s in ("train", "dev", "unlabeled")}}
learner = Learner(cfg, stats, torch.device("cpu"))
out = []
for e in range(epochs):
    t = time.perf_counter()
    logs = run_epoch(learner, e, pools["train"], pools["unlabeled"])
    learner.evaluate(pools["dev"], "dev")
    out.append({{"epoch_s": time.perf_counter() - t, **logs}})
result = {{"epochs": out, "chunks": {{s: int(p.n_chunks) for s, p in pools.items()}}}}
if {ceiling}:     # the bare model's ceiling, in this process after the epochs (same threads, warm)
    sys.path.insert(0, {here!r})
    from train import ceiling
    b = cfg.train.batch_sentences * cfg.features.num_chunks
    batch = pools["train"].chunk_inputs(torch.arange(b), stats.feature_normalizer(torch.device("cpu")))
    result["ceiling"] = ceiling(cfg, batch)
print(json.dumps(result))
"""


def run_epochs(tables, overrides, epochs, threads, api="new", cwd=ROOT):
    """The plain epoch loop in a fresh process (``api="old"``: the code of a git worktree at ``cwd``)."""
    env = dict(os.environ, PYTHONPATH=cwd)
    script = EPOCH_SCRIPT.format(imports=IMPORTS[api], ceiling=api == "new", here=HERE)
    res = subprocess.run([sys.executable, "-c", script, tables, json.dumps(overrides), str(epochs), str(threads)],
                         capture_output=True, text=True, env=env, cwd=cwd)
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def ceiling(cfg, batch, reps=12):
    """chunks/s of the bare model on ``batch`` (normalised, on the device): forward; training step."""
    import torch
    from dec_ray.method.models import model_from_config
    torch.manual_seed(0)
    net = model_from_config(cfg)
    opt = torch.optim.SGD(net.parameters(), lr=1e-4)
    target = torch.randint(0, cfg.cluster.k, (len(batch),))

    def forward():
        with torch.no_grad():
            net(batch)["embedding"].sum().item()

    def step():
        out = net(batch)
        loss = out["pred"].float().pow(2).mean() + torch.nn.functional.cross_entropy(out["logits"].float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()

    rates = {}
    for name, fn, mode in (("forward", forward, net.eval), ("train", step, net.train)):
        mode()
        fn()
        fn()                                     # warm-up
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        rates[name] = len(batch) / statistics.median(times)
    return rates


def product_rates(run):
    """Median over epochs 1.. of the product's embedding and training chunks/s."""
    embed, train = [], []
    for e in run["epochs"][1:]:
        emb_s = e["unlabeled_embed_s"] + e["train_embed_s"]
        embed.append((run["chunks"]["unlabeled"] + run["chunks"]["train"]) / emb_s)
        train.append((e["unlabeled_chunks"] + e["train_chunks"]) / (e["unlabeled_train_s"] + e["train_train_s"]))
    return statistics.median(embed), statistics.median(train)


def kmeans_times(n, k, threads, reps=2):
    """Median seconds of a 20-iteration K-means of n random 256-d embeddings, per E-step backend."""
    import torch
    from dec_ray.method.kmeans import kmeans
    x = torch.randn(n, 256, generator=torch.Generator().manual_seed(0))
    out = {}
    for assign in ("faiss", "torch"):
        times = []
        for s in range(reps):
            t = time.perf_counter()
            kmeans(x, k, niter=20, seed=s, assign=assign, threads=threads)
            times.append(time.perf_counter() - t)
        out[assign] = statistics.median(times)
    return out


def old_worktree(commit):
    path = tempfile.mkdtemp(prefix="bench_old_")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", path, commit], check=True,
                   capture_output=True)
    return path


def ray_epochs(tables, cfg, out):
    from dec_ray.service.train import run_training
    run_training(tables, out, cfg)
    m = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    return [x["epoch_time_s"] for x in m]


def _sync_rank(rank, port, q):
    import numpy as np
    import torch
    import torch.distributed as dist
    from dec_ray.config import load_config
    from dec_ray.data.normalization import Stats
    from dec_ray.data.pools import Pool
    from dec_ray.method.epoch import supervised_stage
    from dec_ray.method.learner import Learner
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    cfg = load_config(None, ["train.batch_sentences=64", "model.name=cnn"])   # the same encoder and BatchNorms
    stats = Stats([0.0] * 128, [1.0] * 128, {"arousal": 0.0}, {"arousal": 1.0})
    learner = Learner(cfg, stats, torch.device("cpu"), wrap=torch.nn.parallel.DistributedDataParallel)
    rng = np.random.default_rng(rank)
    pool = Pool(rng.normal(size=(32, 11, 62, 128)).astype(np.float16), rng.normal(size=(32, 1)).astype(np.float32),
                np.arange(32))
    syncs = []
    for _ in range(50):
        dist.barrier()
        t = time.perf_counter()
        learner.sync_buffers()
        syncs.append(time.perf_counter() - t)
    learner.train(pool, np.arange(pool.n_chunks), supervised_stage(1.0))       # warm-up
    t = time.perf_counter()
    learner.train(pool, np.arange(pool.n_chunks), supervised_stage(1.0))       # one step (+ one sync)
    step = time.perf_counter() - t
    floats = sum(b.numel() for b in learner.net.buffers() if b.is_floating_point())
    q.put({"sync_ms": 1e3 * statistics.median(syncs), "step_ms": 1e3 * step, "floats": floats})
    dist.destroy_process_group()


def buffer_sync_cost() -> dict:
    """Median time of Learner.sync_buffers and of one training step, on 2 gloo ranks (the slower rank)."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_sync_rank, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = [q.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(60)
    return {k: max(g[k] for g in got) for k in got[0]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--labeled", type=int, default=120)
    ap.add_argument("--unlabeled", type=int, default=120)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--old-commit", default=OLD_COMMIT)
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray Train and buffer-sync rows")
    args = ap.parse_args()
    import torch
    from dec_ray.config import load_config
    from dec_ray.data.synth import synth_corpus
    from dec_ray.service.ingest import run_ingest
    import ray
    work = tempfile.mkdtemp(prefix="bench_train_")
    corpus, tables = os.path.join(work, "corpus"), os.path.join(work, "tables")
    synth_corpus(corpus, labeled=args.labeled, unlabeled=args.unlabeled, seed=5, max_duration=6)
    ray.init(num_cpus=os.cpu_count() + 1)   # Train V2 cleans up through the State API (dashboard)
    run_ingest(corpus, tables, load_config(None), [os.path.join(corpus, "Unlabeled")])
    cpus = os.cpu_count()
    overrides = BASE + [f"train.epochs={args.epochs}", f"scale.cpus_per_worker={cpus}"]
    cfg = load_config(None, overrides)
    torch.set_num_threads(cpus)

    ray.shutdown()          # nothing of Ray runs beside the plain loops
    # 1.-2. the product's epoch (new path) and the ceiling on its batch, in one fresh process; 4. the old
    # path; alternated, twice each (this machine's speed drifts by tens of percent within minutes)
    b = cfg.train.batch_sentences * cfg.features.num_chunks
    wt = old_worktree(args.old_commit)
    news, olds = [], []
    try:
        for _ in range(2):
            news.append(run_epochs(tables, overrides, args.epochs, cpus))
            olds.append(run_epochs(tables, overrides, args.epochs, cpus, api="old", cwd=wt))
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", wt], capture_output=True)
    pairs = [(product_rates(n), n["ceiling"]) for n in news]
    embed_ratio = statistics.median(r[0] / c["forward"] for r, c in pairs)
    train_ratio = statistics.median(r[1] / c["train"] for r, c in pairs)
    embed_rate = statistics.median(r[0] for r, _ in pairs)
    train_rate = statistics.median(r[1] for r, _ in pairs)
    ceil = {k: statistics.median(c[k] for _, c in pairs) for k in ("forward", "train")}
    new_s = statistics.median(e["epoch_s"] for n in news for e in n["epochs"][1:])
    old_s = statistics.median(e["epoch_s"] for o in olds for e in o["epochs"][1:])
    # 3. K-means share at 100K and 1M embeddings
    km_rows = []
    for n in (100_000, 1_000_000):
        km = kmeans_times(n, 30, cpus)
        rest = n / embed_rate + n / train_rate
        km_rows.append(f"| {n:,} | {km['faiss']:.2f} | {km['torch']:.2f} | {rest:.0f} | "
                       f"{km['faiss'] / (rest + km['faiss']):.2%} | {km['torch'] / (rest + km['torch']):.2%} |")
        print(km_rows[-1], flush=True)

    lines = [
        f"Device: CPU, {cpus} cores (no GPU lent in this session: every GPU row is **not measured**). "
        f"Width-0.25 compact CNN, K = 10, batch {cfg.train.batch_sentences} sentences x 11 = {b} chunks; "
        f"{args.labeled} labeled ({int(args.labeled * 0.6)} Train) + {args.unlabeled} unlabeled synthetic "
        f"sentences; epochs 1..{args.epochs - 1} of 2 runs of each path, alternated (medians; ratios per run, "
        "each against the ceiling measured in the same process right after its epochs).", "",
        "| | chunks/s | ratio to the ceiling | target |", "|---|---|---|---|",
        f"| ceiling: bare model, forward only | {ceil['forward']:.0f} | 1.00 | |",
        f"| ceiling: bare model, training step | {ceil['train']:.0f} | 1.00 | |",
        f"| product: embedding passes (eval, gather + normalise on the device) | {embed_rate:.0f} | "
        f"{embed_ratio:.2f} | >= 0.9 (CPU) |",
        f"| product: training passes (CE / CCC, 3 optimisers) | {train_rate:.0f} | {train_ratio:.2f} | "
        ">= 0.9 (CPU) |",
        "| GPU, full width compact CNN and VGG-16-BN, bf16 | not measured | not measured | >= 0.8 |", "",
        f"Old path (commit {args.old_commit}: numpy gather + normalise per batch, embeddings copied to the host, "
        f"numpy K-means) vs new, same tables and settings: {old_s:.2f} s vs {new_s:.2f} s per epoch, "
        f"**old / new = {old_s / new_s:.2f}**.", "",
        "K-means (20 iterations, K = 30, 256-d, all cores) as a share of an epoch over that many embeddings; "
        "the epoch's embedding and training passes projected from the product's chunks/s above:", "",
        "| embeddings | K-means s (faiss E-step) | K-means s (torch E-step) | embed + train s | share (faiss) | "
        "share (torch) |", "|---|---|---|---|---|---|", *km_rows]
    print("\n".join(lines), flush=True)
    if not args.no_ray:
        ray.init(num_cpus=os.cpu_count() + 1)
        rt = ray_epochs(tables, cfg, os.path.join(work, "run"))
        ray_s = statistics.median(rt[1:])
        ray.shutdown()
        sync = buffer_sync_cost()
        lines += ["", f"Ray Train (1 worker, {cpus} CPUs) vs the plain loop above: {ray_s:.2f} vs {new_s:.2f} s per "
                  f"epoch ({ray_s / new_s - 1:+.1%}; target <= 15 %).", "",
                  "BatchNorm statistics on every rank: the full-width compact CNN on 2 gloo ranks (1 thread each). "
                  f"Broadcasting rank 0's buffers ({sync['floats']} floats) takes {sync['sync_ms']:.2f} ms (median "
                  f"of 50), once per training stage; one training step of 32 sentences x 11 chunks per rank takes "
                  f"{sync['step_ms']:.0f} ms ({sync['sync_ms'] / sync['step_ms']:.2%} of one step)."]
    write_section("Training (`bench/train.py`)", "\n".join(lines))
    print("\n".join(lines[-3:]))


if __name__ == "__main__":
    main()
