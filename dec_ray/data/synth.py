"""A small emotional-speech corpus in the MSP-Podcast layout: the embedded default of the demo.

Each sentence is a voiced, syllabic harmonic source with formants, shaped by hidden emotional
attributes on the 1..7 scale:
  arousal   -> pitch level, speaking rate, vocal effort (flatter spectral tilt), fewer pauses
  dominance -> pitch level (lower), vocal effort
  valence   -> pitch range and spectral tilt, more weakly
Speakers differ in base pitch, formant scale (timbre) and breathiness, and each split has its own
speakers. Labels are the mean of five noisy, rounded raters. Same seed, same bytes.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from typing import List

import numpy as np
import soundfile as sf

SR = 16000
CTRL = 160  # control-rate hop (10 ms) for slowly varying parameters
VOWELS = np.array([[730, 1090, 2440], [530, 1840, 2480], [270, 2290, 3010],
                   [570, 840, 2410], [300, 870, 2240], [660, 1720, 2410]], dtype=np.float64)
SPLITS = (("Train", 0.6), ("Development", 0.2), ("Test1", 0.2))
COLUMNS = ["FileName", "EmoClass", "EmoAct", "EmoVal", "EmoDom", "SpkrID", "Gender", "Split_Set"]


@dataclass
class Speaker:
    spk_id: int
    gender: str
    f0: float
    formant_scale: float
    breath: float


def _speakers(rng: np.random.Generator, n: int, first_id: int) -> List[Speaker]:
    out = []
    for i in range(n):
        g = "Female" if (first_id + i) % 2 else "Male"
        f0 = rng.normal(205, 20) if g == "Female" else rng.normal(115, 12)
        scale = rng.uniform(1.05, 1.2) if g == "Female" else rng.uniform(0.88, 1.02)
        out.append(Speaker(first_id + i, g, float(f0), float(scale), float(rng.uniform(0.01, 0.05))))
    return out


def _attributes(rng: np.random.Generator) -> np.ndarray:
    """Hidden (arousal, valence, dominance) on 1..7, dominance correlated with arousal."""
    a = np.clip(rng.normal(4.0, 1.3), 1, 7)
    v = np.clip(rng.normal(4.0, 1.2), 1, 7)
    d = np.clip(4.0 + 0.6 * (a - 4.0) + rng.normal(0, 0.9), 1, 7)
    return np.array([a, v, d])


def _raters(rng: np.random.Generator, true: np.ndarray, n: int = 5) -> np.ndarray:
    votes = np.clip(np.round(true[None, :] + rng.normal(0, 0.9, size=(n, 3))), 1, 7)
    return votes.mean(axis=0)


def _emo_class(a: float, v: float) -> str:
    if a >= 5:
        return "A" if v < 4 else "H"
    if a <= 3:
        return "S" if v < 4 else "N"
    return "N" if abs(v - 4) < 1 else ("H" if v > 4 else "D")


def render(rng: np.random.Generator, spk: Speaker, attrs: np.ndarray, duration: float) -> np.ndarray:
    """One utterance as float32 samples at 16 kHz."""
    za, zv, zd = (attrs - 4.0) / 3.0                      # each in [-1, 1]
    n = int(duration * SR)
    nc = n // CTRL + 2
    tc = np.arange(nc) * CTRL / SR

    # syllables: rate and pause share from arousal
    rate = 4.0 + 1.8 * za + rng.normal(0, 0.2)
    pause = np.clip(0.30 - 0.15 * za + rng.normal(0, 0.03), 0.05, 0.5)
    env = np.zeros(nc)
    vowel_f = np.zeros((nc, 3))
    t = rng.uniform(0, 0.2)
    while t < duration:
        syl = 1.0 / rate
        if rng.random() < pause:
            t += syl * rng.uniform(1.0, 2.5)
            continue
        i0, i1 = int(t * SR / CTRL), int(min(t + 0.8 * syl, duration) * SR / CTRL)
        if i1 > i0:
            env[i0:i1] = np.hanning(i1 - i0 + 2)[1:-1] * rng.uniform(0.6, 1.0)
            vowel_f[i0:i1] = VOWELS[rng.integers(len(VOWELS))] * spk.formant_scale
        t += syl
    vowel_f[env == 0] = VOWELS[0] * spk.formant_scale

    # pitch: level from arousal and dominance, range from valence (and arousal), slow declination
    semis = 5.0 * za + 2.0 * zd
    f0_mean = spk.f0 * 2 ** (semis / 12.0)
    f0_range = max(1.0, 3.0 + 1.5 * zv + 1.5 * za)
    contour = (np.sin(2 * np.pi * rng.uniform(0.4, 0.9) * tc + rng.uniform(0, 6.28))
               + 0.5 * np.sin(2 * np.pi * rng.uniform(1.5, 3) * tc + rng.uniform(0, 6.28)))
    f0 = f0_mean * 2 ** ((f0_range / 12.0) * contour / 1.5 - 0.02 * tc)
    f0 *= 1 + 0.005 * rng.standard_normal(nc)        # jitter

    # spectral tilt (dB/octave): effort from arousal and dominance, valence more weakly
    tilt = -12.0 + 5.0 * za + 2.0 * zd + 1.5 * zv

    up = lambda x: np.repeat(x, CTRL, axis=0)[:n]   # noqa: E731 - control rate -> sample rate
    f0_s = up(f0)
    phase = 2 * np.pi * np.cumsum(f0_s) / SR
    n_harm = int(7600 / f0.min())
    h = np.arange(1, n_harm + 1)
    freqs = f0[:, None] * h[None, :]                                  # (nc, H)
    amp = h[None, :] ** (tilt / 6.02)
    form = np.zeros_like(freqs)
    for k, bw in enumerate((90.0, 110.0, 170.0)):
        fk = vowel_f[:, k:k + 1]
        form += (1.0 / (1 + ((freqs - fk) / bw) ** 2)) * (0.8 ** k)
    amp = amp * (0.05 + form) * (freqs < 7800)
    y = np.zeros(n)
    for j in range(n_harm):
        y += up(amp[:, j]) * np.sin((j + 1) * phase)
    y *= up(env)
    y /= np.max(np.abs(y)) + 1e-9
    y += spk.breath * rng.standard_normal(n) * (0.3 + up(env))        # breath + room noise
    y += 0.003 * rng.standard_normal(n)
    return (0.9 * y / np.max(np.abs(y))).astype(np.float32)


def synth_corpus(out: str, labeled: int = 240, unlabeled: int = 120, seed: int = 0,
                 min_duration: float = 2.75, max_duration: float = 11.0,
                 speakers_per_split: int = 0) -> dict:
    """Write OUT/Audios/*.wav, OUT/Labels/labels_consensus.csv and OUT/Unlabeled/*.wav."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out, "Audios"), exist_ok=True)
    os.makedirs(os.path.join(out, "Labels"), exist_ok=True)
    os.makedirs(os.path.join(out, "Unlabeled"), exist_ok=True)

    n_spk = speakers_per_split or max(2, labeled // 40)
    rows = []
    next_spk = 1
    counter = 0
    for split, share in SPLITS:
        spks = _speakers(rng, max(2, int(round(n_spk * share / 0.2)) // 2), next_spk)
        next_spk += len(spks)
        count = int(round(labeled * share))
        for i in range(count):
            counter += 1
            spk = spks[i % len(spks)]
            r = np.random.default_rng([seed, 1, counter])
            true = _attributes(r)
            dur = r.uniform(min_duration, max_duration)
            name = f"SYN_{spk.spk_id:04d}_{counter:05d}.wav"
            sf.write(os.path.join(out, "Audios", name), render(r, spk, true, dur), SR, subtype="PCM_16")
            a, v, d = _raters(r, true)
            rows.append([name, _emo_class(true[0], true[1]), f"{a:.1f}", f"{v:.1f}", f"{d:.1f}",
                         str(spk.spk_id), spk.gender, split])
    with open(os.path.join(out, "Labels", "labels_consensus.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows(rows)

    spks = _speakers(rng, max(2, n_spk), next_spk)
    for i in range(unlabeled):
        r = np.random.default_rng([seed, 2, i])
        spk = spks[i % len(spks)]
        y = render(r, spk, _attributes(r), r.uniform(min_duration, max_duration))
        sf.write(os.path.join(out, "Unlabeled", f"UNL_{spk.spk_id:04d}_{i:05d}.wav"), y, SR,
                 subtype="PCM_16")
    return {"labeled": len(rows), "unlabeled": unlabeled, "out": out}
