"""Shared fixtures: one small synthetic corpus (plus odd files), one local Ray, one ingest."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import soundfile as sf

from dec_ray.config import load_config

TINY = ["model.width=0.125", "cluster.k=4", "train.batch_sentences=4", "train.epochs=2",
        "scale.workers=2", "scale.max_failures=0", "train.patience=0"]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    from dec_ray.synth import synth_corpus
    root = str(tmp_path_factory.mktemp("corpus"))
    synth_corpus(root, labeled=40, unlabeled=12, seed=3, max_duration=5.0)
    return root


@pytest.fixture(scope="session")
def odd_files(corpus, tmp_path_factory):
    """Unlabeled extras: odd rates, stereo, 24-bit, flac, too short, silent, corrupt, empty."""
    d = str(tmp_path_factory.mktemp("odd"))
    y, sr = sf.read(os.path.join(corpus, "Unlabeled", sorted(os.listdir(os.path.join(corpus, "Unlabeled")))[0]))
    import librosa
    y44 = librosa.resample(y, orig_sr=sr, target_sr=44100)
    sf.write(os.path.join(d, "stereo44k_24bit.wav"), np.stack([y44, 0.5 * y44], 1), 44100, subtype="PCM_24")
    sf.write(os.path.join(d, "rate8k.flac"), librosa.resample(y, orig_sr=sr, target_sr=8000), 8000)
    sf.write(os.path.join(d, "short_0p5s.wav"), y[: sr // 2], sr)          # < 62 frames: repeated
    sf.write(os.path.join(d, "tiny_0p1s.wav"), y[: sr // 10], sr)          # below min duration: rejected
    sf.write(os.path.join(d, "silent.wav"), np.zeros(sr * 3), sr)
    with open(os.path.join(d, "corrupt.wav"), "wb") as f:
        f.write(b"RIFF\x24\x00\x00\x00WAVEfmt garbage" + os.urandom(200))
    open(os.path.join(d, "empty.wav"), "wb").close()
    return d


@pytest.fixture(scope="session")
def ray_local():
    import ray
    # A Ray of its own (never one found on the machine), with the spare CPU that ensure_ray gives.
    ray.init(num_cpus=(os.cpu_count() or 1) + 1)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tables(corpus, odd_files, ray_local, tmp_path_factory):
    from dec_ray.ingest import run_ingest
    out = str(tmp_path_factory.mktemp("tables"))
    cfg = load_config(None, ["ingest.min_parts_per_split=3"])
    summary = run_ingest(corpus, out, cfg, [os.path.join(corpus, "Unlabeled"), odd_files])
    return out, summary


@pytest.fixture
def tiny_cfg():
    def make(*extra):
        return load_config(None, TINY + list(extra))
    return make


@pytest.fixture
def copy_tree(tmp_path):
    def make(src):
        dst = str(tmp_path / os.path.basename(src.rstrip("/")))
        shutil.copytree(src, dst)
        return dst
    return make


@pytest.fixture(scope="session")
def trained_runs(tables, tmp_path_factory):
    """One tiny DeepEmoCluster and one CNN run (1 epoch each), trained through the evaluate launcher."""
    from dec_ray.evaluation import repeated_runs
    out = str(tmp_path_factory.mktemp("evaluate"))
    runs = repeated_runs(tables[0], out, ["deepemocluster", "cnn"], 1, None, TINY + ["train.epochs=1"])
    return dict(zip(["deepemocluster", "cnn"], runs))
