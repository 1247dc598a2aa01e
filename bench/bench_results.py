"""What the benchmark scripts share: replicated synthetic clips, a timed snippet on a fresh local
Ray, and writing one section of bench/RESULTS.md (keeping the others)."""
import glob
import json
import os
import re
import subprocess
import sys
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def write_section(title: str, body: str) -> None:
    text = open(RESULTS).read() if os.path.exists(RESULTS) else "# Benchmark results\n"
    block = f"## {title}\n\n_measured {time.strftime('%Y-%m-%d')}_\n\n{body}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda m: block + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    with open(RESULTS, "w") as f:
        f.write(text)


def replicated_clips(work: str, n: int, replicate: int, seed: int):
    """``n`` synthetic unlabeled clips, each hard-linked ``replicate`` times, so that per-file work
    dominates a run. Returns (folder, the n originals, all files), sorted."""
    from dec_ray.data.synth import synth_corpus
    synth_corpus(os.path.join(work, "corpus"), labeled=0, unlabeled=n, seed=seed)
    folder = os.path.join(work, "corpus", "Unlabeled")
    originals = sorted(glob.glob(os.path.join(folder, "*.wav")))
    for src in originals:
        for i in range(1, replicate):
            os.link(src, src.replace(".wav", f"_r{i:03d}.wav"))
    return folder, originals, sorted(glob.glob(os.path.join(folder, "*.wav")))


def on_fresh_ray(code: str, cpus: int):
    """Run ``code`` in a new Python process on a new local Ray with ``cpus`` CPUs (Ray's start comes
    before ``code`` and is not part of what it times); return the JSON of its last output line."""
    prelude = f"import ray\nray.init(num_cpus={cpus}, include_dashboard=False)\n"
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    res = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, env=env)
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])
