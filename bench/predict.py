"""Batch prediction throughput: `dec-ray predict` (Ray Data actor pool) against a plain loop of
`Predictor.predict_file` over the same files, measured in one run; 1 and 2 CPUs.

    .venv/bin/python bench/predict.py [--files N] [--replicate R] [--repeats K]

The model is the demo preset's network (width 0.25) with untrained weights and statistics from the
bench files: the speed of inference does not depend on the weights. Writes the prediction
section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench_results import on_fresh_ray, replicated_clips, write_section  # noqa: E402


def make_run(files, run):
    """RUN/model.pt as `dec-ray train` writes it: config, Train-style statistics, weights."""
    from dataclasses import asdict

    import numpy as np
    import torch

    from dec_ray.config import load_config
    from dec_ray.config import preset_path
    from dec_ray.data.audio import load_audio
    from dec_ray.data.features import mel_spectrogram
    from dec_ray.data.normalization import FrameSums, Stats
    from dec_ray.method.models import model_from_config
    cfg = load_config(preset_path("demo"))
    f = cfg.features
    sums = [FrameSums.of(mel_spectrogram(load_audio(p, f.sample_rate), f.sample_rate, f.n_fft, f.hop_length,
                                         f.n_mels)) for p in files[:32]]
    stats = Stats.from_sums(sum(s.n for s in sums), sum(s.s for s in sums), sum(s.ss for s in sums),
                            {a: np.array([1.0, 7.0]) for a in cfg.model.attributes}, 2, asdict(f))
    os.makedirs(run, exist_ok=True)
    torch.save({"config": cfg.to_dict(), "stats": asdict(stats), "model": model_from_config(cfg).state_dict()},
               os.path.join(run, "model.pt"))


def plain_loop(run, files):
    from dec_ray.report.inference import Predictor
    p = Predictor(run)
    return [p.predict_file(f) for f in files]


def ray_predict(run, audio_dir, out, cpus):
    """`dec-ray predict` on a fresh local Ray with ``cpus`` CPUs (one actor per CPU); Ray's start is not timed."""
    code = f"""
import time, json
from dec_ray.service.batch_predict import run_predict
t = time.perf_counter()
info = run_predict({run!r}, [{audio_dir!r}], {out!r}, actors={cpus})
print(json.dumps({{"seconds": time.perf_counter() - t, "predicted": info["predicted"]}}))
"""
    return on_fresh_ray(code, cpus)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=48)
    ap.add_argument("--replicate", type=int, default=8, help="hard links per synthetic clip")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bench_predict_")
    udir, _, files = replicated_clips(work, args.files, args.replicate, seed=12)
    run = os.path.join(work, "run")
    make_run(files, run)

    plain, ray1, ray2 = [], [], []
    for r in range(args.repeats):
        t = time.perf_counter()
        plain_loop(run, files)
        plain.append(time.perf_counter() - t)
        for cpus, acc in ((1, ray1), (2, ray2)):
            res = ray_predict(run, udir, os.path.join(work, f"preds_{cpus}_{r}.parquet"), cpus)
            assert res["predicted"] == len(files), res
            acc.append(res["seconds"])
        print(f"repeat {r}: plain {plain[-1]:.1f}s  ray 1 cpu {ray1[-1]:.1f}s  ray 2 cpus {ray2[-1]:.1f}s", flush=True)
    n = len(files)
    rate = {k: n / statistics.median(v) for k, v in (("plain", plain), ("ray1", ray1), ("ray2", ray2))}
    lines = [
        f"{n} clips ({args.files} synthetic clips x {args.replicate} hard links), demo-size network "
        f"(width 0.25), CPU, median of {args.repeats} runs, machine: {os.cpu_count()} cores. Ray's start is "
        "not timed; actor start-up, model loading and writing the output are.",
        "",
        "| pipeline | files/s | ratio vs plain loop |",
        "|---|---|---|",
        f"| plain loop of `Predictor.predict_file` (torch with all cores) | {rate['plain']:.1f} | 1.00 |",
        f"| `dec-ray predict`, 1 CPU (1 actor) | {rate['ray1']:.1f} | {rate['ray1'] / rate['plain']:.2f} |",
        f"| `dec-ray predict`, 2 CPUs (2 actors) | {rate['ray2']:.1f} | {rate['ray2'] / rate['plain']:.2f} |",
    ]
    write_section("Batch prediction (`bench/predict.py`)", "\n".join(lines))
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
