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

from bench_results import write_section  # noqa: E402


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


def disk_per_segment(originals, work):
    """Bytes per segment of a part made of distinct clips only: in the timed tables, hard-linked
    copies of one clip share a part and zstd would fold the repeats."""
    from dec_ray.config import load_config
    from dec_ray.featurize import write_part
    items = [{"row_id": i, "segment_id": str(i), "split": "unlabeled", "speaker": "", "path": p}
             for i, p in enumerate(originals)]
    part = os.path.join(work, "disk.parquet")
    write_part(items, part, part + ".json", load_config(None).features)
    return os.path.getsize(part) / len(originals)


def ray_ingest(unlabeled_dir, out, cpus):
    """`dec-ray ingest` on a fresh local Ray with ``cpus`` CPUs; Ray's start is not timed."""
    code = f"""
import time, ray, json
ray.init(num_cpus={cpus}, include_dashboard=False)
from dec_ray.config import load_config
from dec_ray.ingest import run_ingest
t = time.perf_counter()
run_ingest(None, {out!r}, load_config(None), [{unlabeled_dir!r}])
print(json.dumps({{"seconds": time.perf_counter() - t}}))
"""
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])["seconds"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--replicate", type=int, default=48,
                    help="hard-link each synthetic clip this many times, so that per-file work dominates")
    args = ap.parse_args()
    from dec_ray.synth import synth_corpus
    work = tempfile.mkdtemp(prefix="bench_ingest_")
    synth_corpus(os.path.join(work, "corpus"), labeled=0, unlabeled=args.files, seed=11)
    udir = os.path.join(work, "corpus", "Unlabeled")
    originals = sorted(glob.glob(os.path.join(udir, "*.wav")))
    for src in originals:
        for i in range(1, args.replicate):
            os.link(src, src.replace(".wav", f"_r{i:03d}.wav"))
    files = sorted(glob.glob(os.path.join(udir, "*.wav")))
    audio_s = sum(__import__("soundfile").info(f).duration for f in files)

    plain, ray1, ray2 = [], [], []
    for r in range(args.repeats):
        d = tempfile.mkdtemp(dir=work)
        t = time.perf_counter()
        plain_loop(files, d)
        plain.append(time.perf_counter() - t)
        for cpus, acc in ((1, ray1), (2, ray2)):
            out = os.path.join(work, f"tables_{cpus}_{r}")
            acc.append(ray_ingest(udir, out, cpus))
        print(f"repeat {r}: plain {plain[-1]:.1f}s  ray 1 cpu {ray1[-1]:.1f}s  ray 2 cpus {ray2[-1]:.1f}s", flush=True)
    n = len(files)
    med = {k: statistics.median(v) for k, v in (("plain", plain), ("ray1", ray1), ("ray2", ray2))}
    rate = {k: n / v for k, v in med.items()}
    bytes_per_seg = disk_per_segment(originals, work)
    per_core_500k_h = 500_000 / rate["ray1"] / 3600
    lines = [
        f"{n} clips ({args.files} synthetic clips x {args.replicate} hard links, {audio_s / n:.1f} s mean), "
        f"median of {args.repeats} runs, machine: {os.cpu_count()} cores. Ray's start is not timed; "
        "planning, stats and the rejects table are.",
        "",
        "| pipeline | segments/s | ratio vs plain loop |",
        "|---|---|---|",
        f"| plain sequential loop (librosa + pyarrow) | {rate['plain']:.1f} | 1.00 |",
        f"| `dec-ray ingest`, 1 CPU | {rate['ray1']:.1f} | {rate['ray1'] / rate['plain']:.2f} |",
        f"| `dec-ray ingest`, 2 CPUs | {rate['ray2']:.1f} | {rate['ray2'] / rate['plain']:.2f} |",
        "",
        f"Disk: {bytes_per_seg / 1024:.0f} KiB per segment (float16 chunks, zstd; measured on the "
        f"{len(originals)} distinct clips) -> "
        f"{bytes_per_seg * 500_000 / 2 ** 30:.0f} GiB for 500K segments.",
        f"Projection for 500K segments: {per_core_500k_h:.1f} core-hours "
        f"({per_core_500k_h / 32:.2f} h on 32 cores, assuming linear scaling as measured from 1 to 2 CPUs: "
        f"{rate['ray2'] / rate['ray1']:.2f}x). Targets: 2 CPUs >= 1.8x the loop, per core >= 0.8x.",
    ]
    write_section("Ingest (`bench/ingest.py`)", "\n".join(lines))
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
