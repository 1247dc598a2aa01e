"""Ingest throughput: `dec-ray ingest` (Ray Data) against a plain sequential loop, same files,
same features, measured in one run; 1 and 2 CPUs; bytes per segment; 500K projection.

    .venv/bin/python bench/ingest.py [--files N] [--repeats R]

Writes the ingest section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench_results import on_fresh_ray, replicated_clips, write_section  # noqa: E402


def cpu_counters():
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v) - v[3] - v[4], sum(v)


def cores_busy(before, after):
    """Average number of cores kept busy, machine-wide, between two cpu_counters() readings:
    each pipeline's parallelism is measured, not assumed."""
    return (after[0] - before[0]) / max(after[1] - before[1], 1) * (os.cpu_count() or 1)


def plain_loop(files, out):
    """The reference: librosa + pyarrow in one process, the same features, one Parquet file."""
    import librosa
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = []
    for p in files:
        y, _ = librosa.load(p, sr=16000)
        y = y / np.abs(y).max()
        mel = librosa.feature.melspectrogram(y=y, sr=16000, n_fft=512, hop_length=256, n_mels=128).T
        step = (mel.shape[0] - 62) // 10
        rows.append(np.stack([mel[k * step:k * step + 62] for k in range(11)]).astype(np.float16))
    flat = pa.array(np.stack(rows).reshape(-1))
    typ = pa.fixed_shape_tensor(pa.float16(), (11, 62, 128))
    col = pa.ExtensionArray.from_storage(typ, pa.FixedSizeListArray.from_arrays(flat, 11 * 62 * 128))
    pq.write_table(pa.table({"path": files, "chunks": col}), os.path.join(out, "plain.parquet"), compression="zstd")


def parallel_plain_loops(files, out, procs):
    """The hardware ceiling: ``procs`` independent plain loops on disjoint halves, no Ray. Each
    process imports first and all start together at a fixed wall-clock time, so the figure is
    the featurisation work alone (what the cores can give), not process start-up."""
    start = time.time() + 15
    code = f"""
import json, sys, time
sys.path.insert(0, {HERE!r})
from ingest import cpu_counters, plain_loop
import librosa, numpy, pyarrow
files = json.load(open(sys.argv[1]))
plain_loop(files[:1], sys.argv[2])     # warm up librosa's caches, as the timed loops are warm
time.sleep(max(0.0, {start} - time.time()))
c0 = cpu_counters()
plain_loop(files, sys.argv[2])
print(json.dumps([time.time(), c0, cpu_counters()]))
"""
    shares = [files[i::procs] for i in range(procs)]
    jobs = []
    for i, share in enumerate(shares):
        d = os.path.join(out, f"proc{i}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "files.json"), "w") as f:
            json.dump(share, f)
        # one BLAS/OpenMP thread per process, as Ray gives each 1-CPU task
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        jobs.append(subprocess.Popen([sys.executable, "-c", code, os.path.join(d, "files.json"), d],
                                     stdout=subprocess.PIPE, text=True, env=env))
    ends = [json.loads(j.communicate()[0].strip().splitlines()[-1]) for j in jobs]
    last = max(ends, key=lambda e: e[0])
    return last[0] - start, cores_busy(ends[0][1], last[2])


def disk_per_segment(originals, work):
    """Bytes per segment of a part made of distinct clips only: in the timed tables, hard-linked
    copies of one clip share a part and zstd would fold the repeats."""
    from dec_ray.config import load_config
    from dec_ray.data.parts import write_part
    items = [{"row_id": i, "segment_id": str(i), "split": "unlabeled", "speaker": "", "path": p}
             for i, p in enumerate(originals)]
    part = os.path.join(work, "disk.parquet")
    write_part(items, part, part + ".json", load_config(None).features)
    return os.path.getsize(part) / len(originals)


def ray_ingest(unlabeled_dir, out, cpus):
    """`dec-ray ingest` on a fresh local Ray with ``cpus`` CPUs; Ray's start is not timed."""
    code = f"""
import sys, time, json
sys.path.insert(0, {HERE!r})
from ingest import cpu_counters
from dec_ray.config import load_config
from dec_ray.service.ingest import run_ingest
c0, t = cpu_counters(), time.perf_counter()
run_ingest(None, {out!r}, load_config(None), [{unlabeled_dir!r}])
print(json.dumps([time.perf_counter() - t, c0, cpu_counters()]))
"""
    seconds, c0, c1 = on_fresh_ray(code, cpus)
    return seconds, cores_busy(c0, c1), steady_rate(out, cpus)


def steady_rate(out, cpus):
    """Segments/s once every CPU is busy: the parts after the first wave of ``cpus`` parts,
    over the time from the first part's completion to the last's (sidecar write times). This
    leaves out the fixed start-up of a job (Ray Data's executor, worker processes importing
    librosa: ~10 s here), which is paid once per job whatever its size."""
    sidecars = glob.glob(os.path.join(out, "_meta", "*", "*.json"))
    done = sorted((os.path.getmtime(p), json.load(open(p))["rows"]) for p in sidecars)
    span = done[-1][0] - done[0][0]
    return sum(rows for _, rows in done[cpus:]) / span if span > 0 else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--replicate", type=int, default=48,
                    help="hard-link each synthetic clip this many times, so that per-file work dominates")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bench_ingest_")
    udir, originals, files = replicated_clips(work, args.files, args.replicate, seed=11)
    audio_s = sum(__import__("soundfile").info(f).duration for f in files)

    plain_loop(files[:1], tempfile.mkdtemp(dir=work))   # warm: librosa's import is not timed
    runs = {"plain": [], "plain2": [], "ray1": [], "ray2": []}    # (seconds, cores busy[, steady]) per repeat
    for r in range(args.repeats):
        d = tempfile.mkdtemp(dir=work)
        c0, t = cpu_counters(), time.perf_counter()
        plain_loop(files, d)
        runs["plain"].append((time.perf_counter() - t, cores_busy(c0, cpu_counters())))
        runs["plain2"].append(parallel_plain_loops(files, tempfile.mkdtemp(dir=work), 2))
        for cpus in (1, 2):
            runs[f"ray{cpus}"].append(ray_ingest(udir, os.path.join(work, f"tables_{cpus}_{r}"), cpus))
        print(f"repeat {r}: " + "  ".join(f"{k} {v[-1][0]:.1f}s ({v[-1][1]:.2f} cores)" for k, v in runs.items()),
              flush=True)
    n = len(files)
    med = {k: statistics.median(r[0] for r in v) for k, v in runs.items()}
    busy = {k: statistics.median(r[1] for r in v) for k, v in runs.items()}
    rate = {k: n / v for k, v in med.items()}
    steady = {k: statistics.median(r[2] for r in runs[k]) for k in ("ray1", "ray2")}
    bytes_per_seg = disk_per_segment(originals, work)
    per_core_500k_h = 500_000 / steady["ray1"] / 3600
    lines = [
        f"{n} clips ({args.files} synthetic clips x {args.replicate} hard links, {audio_s / n:.1f} s mean), "
        f"median of {args.repeats} runs, machine: {os.cpu_count()} cores. Ray's start is not timed; "
        "planning, stats and the rejects table are.",
        "",
        "| pipeline | segments/s | ratio vs plain loop | steady-state segments/s | steady ratio | "
        "cores busy (machine-wide) |",
        "|---|---|---|---|---|---|",
        *(f"| {label} | {rate[k]:.1f} | {rate[k] / rate['plain']:.2f} | "
          + (f"{steady[k]:.1f} | {steady[k] / rate['plain']:.2f}" if k in steady else "- | -")
          + f" | {busy[k]:.2f} |" for k, label in (
            ("plain", "plain sequential loop (librosa + pyarrow, default threads)"),
            ("plain2", "ceiling: 2 plain loops in 2 processes (1 thread each), half the files each, no Ray"),
            ("ray1", "`dec-ray ingest`, 1 CPU"),
            ("ray2", "`dec-ray ingest`, 2 CPUs"))),
        "",
        f"Disk: {bytes_per_seg / 1024:.0f} KiB per segment (float16 chunks, zstd; measured on the "
        f"{len(originals)} distinct clips) -> "
        f"{bytes_per_seg * 500_000 / 2 ** 30:.0f} GiB for 500K segments.",
        "Steady state: segments/s from the first part's completion to the last's (the job's fixed "
        "start-up left out: Ray Data's executor, worker processes importing librosa). The plain loop "
        "is timed warm, without start-up, and is not single-core: its BLAS/FFT threads keep "
        f"{busy['plain']:.2f} cores busy. Cores busy counts Ray's own processes too (raylet, GCS, the "
        "driver's streaming executor), which share the 2 cores with the tasks.",
        "",
        f"Projection for 500K segments (steady state, 1 CPU): {per_core_500k_h:.1f} core-hours "
        f"({per_core_500k_h / 32:.2f} h on 32 cores, assuming the 1 -> 2 CPU steady-state scaling measured "
        f"here, {steady['ray2'] / steady['ray1']:.2f}x, holds per core), plus ~10 s of start-up per job. "
        "Targets: 2 CPUs >= 1.8x the loop, per core >= 0.8x. On this machine the ceiling itself is "
        f"{rate['plain2'] / rate['plain']:.2f}x; `dec-ray ingest` on 2 CPUs reaches "
        f"{steady['ray2'] / rate['plain2']:.0%} of it in steady state ({rate['ray2'] / rate['plain2']:.0%} "
        "end to end).",
    ]
    write_section("Ingest (`bench/ingest.py`)", "\n".join(lines))
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
