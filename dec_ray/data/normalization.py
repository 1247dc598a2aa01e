"""Train-only statistics and the normalisation applied identically in training and inference.

Features: per-mel-bin z-score with mean/std over all Train frames, NaN -> 0, clip to [-3, 3], of
the mel power (``model.input: power``, the official) or of its log (``logmel``: log(power + 1e-10),
z-scored with the Train mean/std of the log, which ingest sums beside the power's).
Labels: z-score with Train mean/std; de-normalised for reporting.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch

from dec_ray.data.files import write_json

CLIP = 3.0
LOG_EPS = 1e-10          # log(power + LOG_EPS): the log-mel input and the ridge's utterance statistics


def input_values(x: np.ndarray, input: str) -> np.ndarray:
    """Raw mel power -> the values the network's input z-scores (float32): the power or its log."""
    x = x.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(x + np.float32(LOG_EPS)) if input == "logmel" else x


def zscore_clip(values: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """The official input normalisation's tail, for Train's statistics or a speaker's:
    (values - mean) / std, NaN -> 0, +-inf and the rest clipped to [-3, 3], float32."""
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (values - mean) / std
    z = np.nan_to_num(z, nan=0.0, posinf=CLIP, neginf=-CLIP)
    return np.clip(z, -CLIP, CLIP).astype(np.float32)


INPUTS = ("power", "logmel")


@dataclass
class FrameSums:
    """Sufficient statistics of a set of frames; add them up across files and workers."""
    n: int
    s: np.ndarray       # (n_mels,) sum
    ss: np.ndarray      # (n_mels,) sum of squares

    @classmethod
    def of(cls, mel: np.ndarray) -> "FrameSums":
        m = mel.astype(np.float64)
        return cls(m.shape[0], m.sum(0), (m * m).sum(0))


@dataclass
class Stats:
    feat_mean: List[float]
    feat_std: List[float]
    label_mean: Dict[str, float]
    label_std: Dict[str, float]
    num_train_frames: int = 0
    num_train_sentences: int = 0
    features: dict = field(default_factory=dict)   # the FeatureConfig the tables were made with
    log_mean: Optional[List[float]] = None         # per-bin mean/std of log(power + LOG_EPS) over Train
    log_std: Optional[List[float]] = None          # frames (None: tables ingested before they were kept)

    @classmethod
    def from_sums(cls, n: int, s: np.ndarray, ss: np.ndarray, labels: Dict[str, np.ndarray],
                  num_sentences: int, features: dict, log_sums: Optional[tuple] = None) -> "Stats":
        """``log_sums``: (sum, sum of squares) of the log-mel frames, for the log-mel input."""
        def moments(a, b):
            mean = a / n
            return mean, np.sqrt(np.maximum(b / n - mean * mean, 0.0))
        mean, std = moments(s, ss)
        log_mean, log_std = moments(*log_sums) if log_sums is not None else (None, None)
        return cls(mean.tolist(), std.tolist(),
                   {a: float(np.mean(v)) for a, v in labels.items()},
                   {a: float(np.std(v)) for a, v in labels.items()},
                   int(n), int(num_sentences), features,
                   None if log_mean is None else log_mean.tolist(), None if log_std is None else log_std.tolist())

    def input_moments(self, input: str = "power"):
        """Per-bin (mean, std) of the network's input before its z-score: the mel power's or its log's."""
        if input not in INPUTS:
            raise ValueError(f"model.input={input!r}; choose one of {INPUTS}")
        if input == "power":
            return self.feat_mean, self.feat_std
        if self.log_mean is None:
            raise ValueError("model.input=logmel needs the Train statistics of log-mel, which these tables "
                             "predate: ingest them again (dec-ray ingest, the same command)")
        return self.log_mean, self.log_std

    def save(self, path: str) -> None:
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str) -> "Stats":
        with open(path) as f:
            return cls(**json.load(f))

    # --- applied in training and inference alike ---
    def normalize_features(self, x: np.ndarray, input: str = "power") -> np.ndarray:
        """(..., n_mels) raw mel power -> (its log, for ``logmel``) z-scored, NaN -> 0, clipped to
        [-3, 3], float32."""
        mean, std = (np.asarray(v, dtype=np.float32) for v in self.input_moments(input))
        return zscore_clip(input_values(x, input), mean, std)

    def feature_normalizer(self, device: torch.device, input: str = "power", norm: str = "train") -> "FeatureNormalizer":
        """``norm="speaker"``: the pools hold inputs already z-scored per speaker (data/groups.py);
        the normaliser only casts them."""
        return FeatureNormalizer(self, device, input, identity=norm == "speaker")

    def normalize_labels(self, y: np.ndarray, attributes: List[str]) -> np.ndarray:
        m = np.array([self.label_mean[a] for a in attributes], dtype=np.float32)
        s = np.array([self.label_std[a] for a in attributes], dtype=np.float32)
        return (y - m) / s

    def denormalize_labels(self, z: np.ndarray, attributes: List[str]) -> np.ndarray:
        m = np.array([self.label_mean[a] for a in attributes], dtype=np.float32)
        s = np.array([self.label_std[a] for a in attributes], dtype=np.float32)
        return z * s + m


class FeatureNormalizer:
    """``Stats.normalize_features`` in torch, on the device the batch is on: the training loop
    gathers float16 chunks on the device and normalises them there (the same float32 arithmetic,
    so the same values as the numpy reference). ``identity``: inputs normalised before (per speaker)."""

    def __init__(self, stats: Stats, device: torch.device, input: str = "power", identity: bool = False):
        mean, std = stats.input_moments(input)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(std, dtype=torch.float32, device=device)
        self.log = input == "logmel" and not identity
        if identity:
            self.mean, self.std = torch.zeros_like(self.mean), torch.ones_like(self.std)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.mean.device, torch.float32, non_blocking=True)
        if self.log:
            x = torch.log(x + LOG_EPS)
        z = (x - self.mean) / self.std
        return torch.nan_to_num(z, nan=0.0, posinf=CLIP, neginf=-CLIP).clamp_(-CLIP, CLIP)
