"""Inference with a trained run: same decoding, features, float16 storage cast and normalisation as
training; sentence prediction = mean over its chunks, on the 1..7 scale; the sentence's cluster
is the cluster head's arg-max of the mean chunk logits (DeepEmoCluster only). A per-speaker model
(``model.norm: speaker``) normalises each sentence with its speaker's statistics when they are
given (files predicted together by groups, or a speaker's ``GroupMoments``), else with the
population statistics its run saved (the Train audio as one group): never a clip by itself.
Every answer says which (``normalization``: train | speaker | population).

    import dec_ray
    dec_ray.predict("runs/r1", "clip.wav")            # or a (samples, sample_rate) tuple, or a list of paths
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from dec_ray.config import config_from_dict
from dec_ray.data.audio import load_audio, prepare_signal
from dec_ray.data.groups import POPULATION, GroupMoments
from dec_ray.data.normalization import Stats
from dec_ray.data.parts import as_stored, featurize_signal
from dec_ray.method.models import model_from_config


def model_file(run: str) -> str:
    """RUN/model.pt, or a clear error (checked before any inference starts)."""
    path = os.path.join(run, "model.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run}: no model.pt - not a finished training run (train it, or "
                                f"`dec-ray train --resume {run}`)")
    return path


class Predictor:
    """A trained model from RUN/model.pt, ready for files or arrays."""

    def __init__(self, run: str, device: str = "cpu"):
        state = torch.load(model_file(run), map_location="cpu", weights_only=True)
        self.cfg = config_from_dict(state["config"])
        self.stats = Stats(**state["stats"])
        self.device = torch.device(device)
        self.model = model_from_config(self.cfg)
        self.model.load_state_dict(state["model"])
        self.model.to(self.device).eval()
        self.attributes = self.cfg.model.attributes
        self.normalize = self.stats.feature_normalizer(self.device, self.cfg.model.input, self.cfg.model.norm)
        self.per_speaker = self.cfg.model.norm == "speaker"
        pop = state.get("population")           # a per-speaker run's Train audio as one group
        self.population = GroupMoments.one(POPULATION, pop["mean"], pop["std"]) if pop else None

    def population_moments(self) -> GroupMoments:
        if self.population is None:
            raise ValueError("this per-speaker run predates population statistics (model.pt without them): "
                             "name each file's speaker (groups), or train it again")
        return self.population

    def model_input(self, chunks: np.ndarray, groups: Optional[Sequence[str]] = None,
                    moments: Optional[GroupMoments] = None) -> Tuple[np.ndarray, str]:
        """(n, C, m, F) raw chunks -> (what the normaliser then the network read, as training read
        them; the normalisation used). A per-speaker model z-scores each sentence with its group's
        moments: ``moments`` (keyed by ``groups``), else those of the sentences given here grouped by
        ``groups``, else the population's; then the storage cast, as the training pools hold them."""
        if not self.per_speaker:
            return chunks, "train"
        inp, n = self.cfg.model.input, len(chunks)
        if groups is None:
            moments, groups, how = self.population_moments(), [POPULATION] * n, "population"
        else:
            moments, how = moments or GroupMoments.of(chunks, list(groups), inp), "speaker"
        z = moments.normalize(chunks, list(groups), inp)
        return as_stored(z, self.cfg.features)[0], how

    def chunks_of(self, y: np.ndarray) -> np.ndarray:
        """The chunks of decoded samples exactly as training read them from the tables."""
        return as_stored(featurize_signal(y, self.cfg.features)["chunks"], self.cfg.features)[0]

    def predict_chunks(self, chunks: np.ndarray, groups: Optional[Sequence[str]] = None,
                       moments: Optional[GroupMoments] = None, per_chunk: bool = False) -> List[Dict]:
        """(n_sentences, C, m, F) raw chunks -> one dict per sentence (``per_chunk``: with each
        chunk's values under "chunks"); normalised as ``model_input`` says."""
        x, how = self.model_input(chunks, groups, moments)
        return [{**r, "normalization": how} for r in self.forward(x, per_chunk)]

    @torch.no_grad()
    def forward(self, inputs: np.ndarray, per_chunk: bool = False) -> List[Dict]:
        """``model_input``'s output for n sentences -> one dict per sentence."""
        n, c = inputs.shape[:2]
        x = self.normalize(torch.tensor(inputs.reshape(n * c, *inputs.shape[2:])))     # as in training
        out = self.model(x)
        chunk_pred = out["pred"].float().cpu().numpy().reshape(n, c, -1)
        pred = self.stats.denormalize_labels(chunk_pred.mean(1), self.attributes)
        clusters = [-1] * n                       # -1: the model has no cluster head
        if "logits" in out:
            clusters = out["logits"].float().cpu().numpy().reshape(n, c, -1).mean(1).argmax(1).tolist()
        res = [{**{a: float(pred[i, j]) for j, a in enumerate(self.attributes)}, "cluster": clusters[i]}
               for i in range(n)]
        if per_chunk:
            values = self.stats.denormalize_labels(chunk_pred.reshape(n * c, -1), self.attributes).reshape(n, c, -1)
            for i, r in enumerate(res):
                r["chunks"] = [{a: float(values[i, k, j]) for j, a in enumerate(self.attributes)} for k in range(c)]
        return res

    def predict_audio(self, y: np.ndarray, sample_rate: int) -> Dict:
        """Samples in any layout and rate, with the checks a file gets (AudioError, ShortClipError)."""
        f = self.cfg.features
        y = prepare_signal(y, sample_rate, f.sample_rate, f.silence_peak, f.min_duration_s)
        return self.predict_chunks(self.chunks_of(y)[None])[0]

    def file_chunks(self, path: str) -> np.ndarray:
        f = self.cfg.features
        return self.chunks_of(load_audio(path, f.sample_rate, f.silence_peak, f.min_duration_s))

    def predict_file(self, path: str) -> Dict:
        """One file; a per-speaker model normalises it with the population statistics."""
        return self.predict_chunks(self.file_chunks(path)[None])[0]

    def predict_files(self, paths: Sequence[str], groups: Optional[Sequence[str]] = None) -> List[Dict]:
        """Files predicted together: a per-speaker model normalises each ``groups`` group (each
        file's speaker) with the group's own statistics, or without groups each file with the
        population's; other models predict each file alone. (Holds the files' chunks in memory:
        `dec-ray predict` streams any number of files.)"""
        if not self.per_speaker or groups is None:
            return [self.predict_file(p) for p in paths]
        return self.predict_chunks(np.stack([self.file_chunks(p) for p in paths]), groups)


def predict(run: str, audio: Union[str, Sequence[str], Tuple[np.ndarray, int]],
            groups: Optional[Sequence[str]] = None):
    """Notebook API: one file, a list of files (``groups``: each file's speaker, for a per-speaker
    model), or (samples, sample_rate)."""
    p = Predictor(os.path.abspath(run))
    if isinstance(audio, tuple):
        return p.predict_audio(*audio)
    if isinstance(audio, str):
        return p.predict_file(audio)
    return p.predict_files(list(audio), groups)
