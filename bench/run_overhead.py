"""The fixed cost of one Ray Train run on a small corpus, with Ray's defaults and with the settings
dec_ray gives a private local Ray, in one Ray session.

A run of the tiny network on a small corpus is nearly all fixed cost: the controller, the worker
group, the Ray Data executions that stream the shards, the end of the run. The variants, each run
``--rounds`` times, alternated so that the machine's drift falls on all of them:

- ``ray-defaults``: the Train controller polling every 2 s, the preemption watcher on (what a run
  on a cluster gets);
- ``local-ray``: 0.5 s polls, no preemption watcher (``cluster.LOCAL_RAY_TRAIN_ENV``, what
  `dec-ray` and the test suite get on one machine).

The reference measured in the same run is the runs' own training time (the sum of their epochs'
``epoch_time_s``): the rest of a run's wall time is its fixed cost.

    .venv/bin/python bench/run_overhead.py [--rounds 3]

Writes the "Fixed cost of a run" section of bench/RESULTS.md.
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

from dec_ray.service.cluster import LOCAL_RAY_TRAIN_ENV  # noqa: E402

TINY = ["model.width=0.125", "cluster.k=4", "train.batch_sentences=4", "train.epochs=2", "scale.workers=2",
        "scale.max_failures=0", "train.patience=0"]
RAY_DEFAULTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1"}
VARIANTS = {"ray-defaults": RAY_DEFAULTS, "local-ray": LOCAL_RAY_TRAIN_ENV}       # what start_local_ray sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import ray

    from dec_ray.config import load_config
    from dec_ray.data.synth import synth_corpus
    from dec_ray.service.ingest import run_ingest
    from dec_ray.service.train import run_training

    work = tempfile.mkdtemp(prefix="bench_overhead_")
    synth_corpus(os.path.join(work, "corpus"), labeled=40, unlabeled=12, seed=3, max_duration=5.0)
    # Ray started plainly (none of dec_ray's local settings); each variant's settings are set in
    # the driver's environment before its run: Ray Train hands them to the controller and workers.
    ray.init(num_cpus=(os.cpu_count() or 1) + 1, include_dashboard=False)
    tables = os.path.join(work, "tables")
    run_ingest(os.path.join(work, "corpus"), tables, load_config(None, ["ingest.min_parts_per_split=3"]),
               [os.path.join(work, "corpus", "Unlabeled")])
    times = {v: {"wall": [], "train": []} for v in VARIANTS}
    for r in range(args.rounds + 1):                  # round 0 warms the workers' imports, not counted
        for name, env in VARIANTS.items():
            os.environ.update(env)
            run = os.path.join(work, "runs", f"{name}_{r}")
            t = time.perf_counter()
            run_training(tables, run, load_config(None, TINY))
            wall = time.perf_counter() - t
            train = sum(json.loads(x)["epoch_time_s"] for x in open(os.path.join(run, "metrics.jsonl")))
            print(f"[bench] round {r} {name}: {wall:.1f} s, of which training {train:.1f} s", flush=True)
            if r:
                times[name]["wall"].append(wall)
                times[name]["train"].append(train)
    ray.shutdown()

    med = {v: {k: statistics.median(x) for k, x in t.items()} for v, t in times.items()}
    base = med["ray-defaults"]["wall"]
    lines = ["One Ray Train run (2 CPU workers, tiny network, 2 epochs; 24 Train, 12 unlabeled, 8 dev sentences), "
             f"{os.cpu_count()} cores, medians of {args.rounds} alternated runs per variant (a first round "
             "not counted).", "",
             "| variant | wall s | training s | fixed cost s | wall / ray-defaults |", "|---|---|---|---|---|"]
    for v, m in med.items():
        lines.append(f"| {v} | {m['wall']:.1f} | {m['train']:.1f} | {m['wall'] - m['train']:.1f} | "
                     f"{m['wall'] / base:.2f} |")
    body = "\n".join(lines)
    print(body)
    write_section("Fixed cost of a run (`bench/run_overhead.py`)", body)


if __name__ == "__main__":
    main()
