"""What eGeMAPS costs at ingest, and what computing it only where it is read saves: per clip (one
process, mel alone vs mel + eGeMAPS, the same clips) and end to end (`dec-ray ingest` of a pool
on a fresh 1-CPU Ray, ``features.functionals_pool`` on, as every ingest was before, vs off, the
default now), both measured in the same run, alternating; 500K projection.

    .venv/bin/python bench/ingest_functionals.py --pool ../shared/corpora/real-speech/Unlabeled \
        [--clips ../shared/corpora/real-speech/Audios] [--repeats 3]

Writes the "Ingest: eGeMAPS where it is read" section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench_results import on_fresh_ray, write_section  # noqa: E402
from ingest import steady_rate  # noqa: E402


def per_clip(files, repeats):
    """Median seconds per clip of featurize_file with and without the functionals (one process,
    one thread, warm), each clip timed both ways back to back."""
    import torch
    torch.set_num_threads(1)
    from dec_ray.config import load_config
    from dec_ray.data.parts import featurize_file
    fc = load_config(None).features
    featurize_file(files[0], fc, True)                  # warm: openSMILE and librosa loaded
    mel, both = [], []
    for _ in range(repeats):
        for f in files:
            t = time.perf_counter()
            featurize_file(f, fc, False)
            mel.append(time.perf_counter() - t)
            t = time.perf_counter()
            featurize_file(f, fc, True)
            both.append(time.perf_counter() - t)
    return statistics.median(mel), statistics.median(both)


def ingest(pool_dir, out, functionals_pool: bool):
    """`dec-ray ingest` of the pool on a fresh 1-CPU Ray: (seconds, segments, steady-state segments/s)."""
    code = f"""
import json, time
from dec_ray.config import load_config
from dec_ray.service.ingest import run_ingest
cfg = load_config(None, ["features.functionals_pool={str(functionals_pool).lower()}"])
t = time.perf_counter()
s = run_ingest(None, {out!r}, cfg, [{pool_dir!r}])
print(json.dumps([time.perf_counter() - t, s.rows["unlabeled"]]))
"""
    return (*on_fresh_ray(code, 1), steady_rate(out, 1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", required=True, help="a folder of unlabeled clips")
    ap.add_argument("--clips", help="labeled clips for the per-clip timing (default: the pool's)")
    ap.add_argument("--per-clip", type=int, default=60, help="clips timed one by one")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    some = sorted(glob.glob(os.path.join(args.clips or args.pool, "*.*")))[:args.per_clip]
    mel_s, both_s = per_clip(some, 1)
    work = tempfile.mkdtemp(prefix="bench_functionals_")
    runs = {True: [], False: []}
    for r in range(args.repeats):
        for flag in (True, False):
            runs[flag].append(ingest(args.pool, os.path.join(work, f"t_{flag}_{r}"), flag))
        print(f"repeat {r}: before {runs[True][-1][0]:.1f}s, after {runs[False][-1][0]:.1f}s", flush=True)
    n = runs[True][0][1]
    rate = {flag: n / statistics.median(r[0] for r in v) for flag, v in runs.items()}
    steady = {flag: statistics.median(r[2] for r in v) for flag, v in runs.items()}
    hours = {flag: 500_000 / steady[flag] / 3600 for flag in rate}
    import soundfile
    dur = statistics.mean(soundfile.info(f).duration for f in some)
    pool_dur = statistics.mean(soundfile.info(f).duration for f in glob.glob(os.path.join(args.pool, "*.*")))
    lines = [
        f"Per clip, one process, one thread, warm ({len(some)} real clips from `{os.path.basename(os.path.abspath(args.clips or args.pool))}`, "
        f"{dur:.1f} s mean, decoded and resampled to 16 kHz): median **{mel_s * 1000:.0f} ms** for the mel chunks alone, "
        f"**{both_s * 1000:.0f} ms** with the 88 eGeMAPS functionals ({both_s / mel_s:.1f}x).",
        "",
        f"`dec-ray ingest` of a pool of {n} real clips (`{os.path.basename(os.path.abspath(args.pool))}`, "
        f"{pool_dur:.1f} s mean) on a fresh 1-CPU local Ray, median of {args.repeats} alternating runs, machine: "
        f"{os.cpu_count()} cores. End to end: Ray's start not timed, the job's own start-up (~10 s) is; steady "
        "state: from the first part's completion to the last's (bench/ingest.py's definition):",
        "",
        "| pool ingest | segments/s per core, end to end | steady state | ratio (steady) | 500K segments (steady) |",
        "|---|---|---|---|---|",
        f"| before: eGeMAPS for every clip (`features.functionals_pool=true`) | {rate[True]:.1f} | {steady[True]:.1f} "
        f"| 1.00 | {hours[True]:.1f} core-hours |",
        f"| after: eGeMAPS where read, the pool's only on request (default) | {rate[False]:.1f} | {steady[False]:.1f} "
        f"| {steady[False] / steady[True]:.2f} | {hours[False]:.1f} core-hours |",
        "",
        "The labeled splits keep their functionals (the references read them): for MSP-Podcast's ~50K "
        f"labeled sentences that is {50_000 * both_s / 3600:.1f} core-hours of the per-clip figure above.",
    ]
    write_section("Ingest: eGeMAPS where it is read (`bench/ingest_functionals.py`)", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
