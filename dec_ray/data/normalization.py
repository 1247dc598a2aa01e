"""Train-only statistics and the normalisation applied identically in training and inference.

Features: per-mel-bin z-score with mean/std over all Train frames, NaN -> 0, clip to [-3, 3].
Labels: z-score with Train mean/std; de-normalised for reporting.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Dict, List

import numpy as np
import torch

from dec_ray.data.files import write_json

CLIP = 3.0


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

    @classmethod
    def from_sums(cls, n: int, s: np.ndarray, ss: np.ndarray, labels: Dict[str, np.ndarray],
                  num_sentences: int, features: dict) -> "Stats":
        mean = s / n
        var = np.maximum(ss / n - mean * mean, 0.0)
        std = np.sqrt(var)
        return cls(mean.tolist(), std.tolist(),
                   {a: float(np.mean(v)) for a, v in labels.items()},
                   {a: float(np.std(v)) for a, v in labels.items()},
                   int(n), int(num_sentences), features)

    def save(self, path: str) -> None:
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str) -> "Stats":
        with open(path) as f:
            return cls(**json.load(f))

    # --- applied in training and inference alike ---
    def normalize_features(self, x: np.ndarray) -> np.ndarray:
        """(..., n_mels) raw mel power -> z-scored, NaN -> 0, clipped to [-3, 3], float32."""
        mean = np.asarray(self.feat_mean, dtype=np.float32)
        std = np.asarray(self.feat_std, dtype=np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = (x.astype(np.float32) - mean) / std
        z = np.nan_to_num(z, nan=0.0, posinf=CLIP, neginf=-CLIP)
        return np.clip(z, -CLIP, CLIP)

    def feature_normalizer(self, device: torch.device) -> "FeatureNormalizer":
        return FeatureNormalizer(self, device)

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
    so the same values as the numpy reference)."""

    def __init__(self, stats: Stats, device: torch.device):
        self.mean = torch.tensor(stats.feat_mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(stats.feat_std, dtype=torch.float32, device=device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.to(self.mean.device, torch.float32, non_blocking=True) - self.mean) / self.std
        return torch.nan_to_num(z, nan=0.0, posinf=CLIP, neginf=-CLIP).clamp_(-CLIP, CLIP)
