"""Training throughput: the Ray Train loop (1 worker) against a plain single-process PyTorch loop on
the same model, data and epoch; the share of an epoch spent embedding + clustering, with and
without the embedding reuse mode.

    .venv/bin/python bench/train.py [--labeled N] [--unlabeled M] [--epochs E]

Writes the training section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from bench_results import write_section  # noqa: E402

BASE = ["model.width=0.25", "cluster.k=10", "train.batch_sentences=8", "train.patience=0",
        "scale.workers=1", "scale.max_failures=0"]


def plain_loop(tables, cfg):
    """The reference: the same epoch function, one process, no Ray, no DDP."""
    import torch
    from dec_ray.ingest import split_files
    from dec_ray.normalization import Stats
    from dec_ray.trainer import load_eval_pool
    from dec_ray.training import Learner, run_epoch
    stats = Stats.load(os.path.join(tables, "stats.json"))
    torch.manual_seed(0)
    torch.set_num_threads(int(cfg.scale.cpus_per_worker))
    pools = {s: load_eval_pool(split_files(tables, s), cfg, stats, 0, 1) for s in ("train", "dev", "unlabeled")}
    learner = Learner(cfg, stats, torch.device("cpu"))
    times, shares = [], []
    for e in range(cfg.train.epochs):
        t = time.perf_counter()
        logs = run_epoch(learner, e, pools["train"], pools["unlabeled"])
        learner.evaluate(pools["dev"], "dev")
        times.append(time.perf_counter() - t)
        shares.append(sum(v for k, v in logs.items() if k.endswith("_cluster_s")) / times[-1])
    chunks = (pools["train"].n_chunks + pools["unlabeled"].n_chunks)
    return times, shares, chunks


def ray_loop(tables, cfg, out):
    from dec_ray.trainer import run_training
    run_training(tables, out, cfg)
    m = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    times = [x["epoch_time_s"] for x in m]
    shares = [sum(v for k, v in x.items() if k.endswith("_cluster_s")) / x["epoch_time_s"] for x in m]
    return times, shares


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--labeled", type=int, default=120)
    ap.add_argument("--unlabeled", type=int, default=120)
    ap.add_argument("--epochs", type=int, default=4)
    args = ap.parse_args()
    import ray
    from dec_ray.config import load_config
    from dec_ray.ingest import run_ingest
    from dec_ray.synth import synth_corpus
    work = tempfile.mkdtemp(prefix="bench_train_")
    corpus, tables = os.path.join(work, "corpus"), os.path.join(work, "tables")
    synth_corpus(corpus, labeled=args.labeled, unlabeled=args.unlabeled, seed=5, max_duration=6)
    ray.init(num_cpus=os.cpu_count() + 1)   # Train V2 cleans up through the State API (dashboard)
    run_ingest(corpus, tables, load_config(None), [os.path.join(corpus, "Unlabeled")])
    cpus = os.cpu_count()
    rows = ["| mode | plain loop s/epoch | Ray Train s/epoch | overhead | embed+cluster share (Ray) | "
            "chunks/s (Ray) |", "|---|---|---|---|---|---|"]
    for mode, extra in (("separate embedding pass", []), ("reuse embeddings (DeepCluster-v2)",
                                                           ["cluster.reuse_embeddings=true"])):
        cfg = load_config(None, BASE + extra + [f"train.epochs={args.epochs}", f"scale.cpus_per_worker={cpus}"])
        pt, ps, chunks = plain_loop(tables, cfg)
        rt, rs = ray_loop(tables, cfg, os.path.join(work, "run_" + str(len(rows))))
        # epoch 0 includes warm-up in both; the reuse mode's first epoch also embeds: use later epochs
        p, r, share = statistics.median(pt[1:]), statistics.median(rt[1:]), statistics.median(rs[1:])
        rows.append(f"| {mode} | {p:.2f} | {r:.2f} | {r / p - 1:+.1%} | {share:.1%} | {chunks / r:.0f} |")
        print(rows[-1], flush=True)
    lines = rows + ["", f"{args.labeled} labeled ({int(args.labeled * 0.6)} train) + {args.unlabeled} unlabeled "
                    f"synthetic sentences x 11 chunks, width-0.25 compact CNN, K = 10, batch 8 sentences, "
                    f"1 worker with {cpus} CPUs; medians over epochs 1..{args.epochs - 1}. Targets: overhead <= 15%, "
                    f"embed+cluster share <= 20%. No GPU in this session: GPU figures not measured."]
    write_section("Training (`bench/train.py`)", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
