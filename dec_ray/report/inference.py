"""Inference with a trained run: same decoding, features, float16 storage cast and normalisation as
training; sentence prediction = mean over its chunks, on the 1..7 scale; the sentence's cluster
is the cluster head's arg-max of the mean chunk logits (DeepEmoCluster only). A per-speaker model
(``model.norm: speaker``) normalises each sentence with its speaker's statistics when they are
given (files predicted together by groups, or a speaker's ``GroupMoments``), else with the
population statistics its run saved (the Train audio as one group): never a clip by itself.
Every answer says which (``normalization``: train | speaker | population). A model that reads
functionals (``model.functionals``) gets them computed from the decoded signal as ingest computes
them (``Features``), normalised with the same group's statistics (or Train's).

    import dec_ray
    dec_ray.predict("runs/r1", "clip.wav")            # or a (samples, sample_rate) tuple, or a list of paths
"""
from __future__ import annotations

import os
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from dec_ray.config import config_from_dict
from dec_ray.data.audio import load_audio, prepare_signal
from dec_ray.data.functionals import egemaps
from dec_ray.data.groups import FUNCTIONALS, POPULATION, GroupMoments, Moments
from dec_ray.data.normalization import Stats
from dec_ray.data.parts import as_stored, featurize_signal
from dec_ray.method.models import functionals_dim, model_from_config


class Features(NamedTuple):
    """What sentences yield before any normalisation: their raw chunks (n, C, m, F), as stored,
    and, for a model that reads them (``model.functionals``), their functionals (n, D) of the
    signal as recorded; else None."""
    chunks: np.ndarray
    functionals: Optional[np.ndarray] = None


class ModelInput(NamedTuple):
    """What the network reads for n sentences: the chunks before the normaliser (n, C, m, F) and
    the normalised functionals (n, D) or None."""
    chunks: np.ndarray
    functionals: Optional[np.ndarray] = None

    @staticmethod
    def stack(inputs: Sequence["ModelInput"]) -> "ModelInput":
        f = [i.functionals for i in inputs]
        return ModelInput(np.concatenate([i.chunks for i in inputs]),
                          None if f[0] is None else np.concatenate(f))


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
        self.functionals = functionals_dim(self.cfg)          # functionals per sentence (0: none)
        fs = state.get("functionals")            # their Train statistics (model.functionals)
        self.functional_population = GroupMoments.one(POPULATION, fs["mean"], fs["std"]) if fs else None

    def population_moments(self) -> GroupMoments:
        if self.population is None:
            raise ValueError("this per-speaker run predates population statistics (model.pt without them): "
                             "name each file's speaker (groups), or train it again")
        return self.population

    def model_input(self, features: Features, groups: Optional[Sequence[str]] = None,
                    moments: Optional[GroupMoments] = None,
                    functional_moments: Optional[GroupMoments] = None) -> Tuple[ModelInput, str]:
        """Raw features of n sentences -> (what the network reads, as training read it; the
        normalisation used). A per-speaker model z-scores each sentence with its group's moments:
        ``moments`` (and ``functional_moments``, keyed by ``groups``), else those of the sentences
        given here grouped by ``groups``, else the population's; then the storage cast, as the
        training pools hold them. Functionals of a Train-normalised model: Train's statistics."""
        chunks, n = features.chunks, len(features.chunks)
        functionals = self._functional_input(features, groups, functional_moments)
        if not self.per_speaker:
            return ModelInput(chunks, functionals), "train"
        inp = self.cfg.model.input
        if groups is None:
            moments, groups, how = self.population_moments(), [POPULATION] * n, "population"
        else:
            moments, how = moments or GroupMoments.of(chunks, list(groups), inp), "speaker"
        z = moments.normalize(chunks, list(groups), inp)
        return ModelInput(as_stored(z, self.cfg.features)[0], functionals), how

    def _functional_input(self, features: Features, groups: Optional[Sequence[str]],
                          moments: Optional[GroupMoments]) -> Optional[np.ndarray]:
        """The normalised functionals (``groups.functional_input``): with the groups' statistics for
        a per-speaker model given groups, else with Train's (the population's)."""
        if not self.functionals:
            return None
        if features.functionals is None:
            raise ValueError(f"this model reads {self.cfg.model.functionals} functionals beside the chunks")
        x = features.functionals
        if not self.per_speaker or groups is None:
            if self.functional_population is None:
                raise ValueError("model.pt lacks the functionals' Train statistics: train the run again")
            moments, groups = self.functional_population, [POPULATION] * len(x)
        else:
            moments = moments or GroupMoments.of_rows(x, list(groups))
        return moments.normalize(x, list(groups), FUNCTIONALS)

    def signal_features(self, y: np.ndarray, recorded: Optional[np.ndarray] = None) -> Features:
        """The features of decoded samples (16 kHz mono, peak-normalised; ``recorded``: the same
        before the peak normalisation, ``prepare_signal(recorded=True)``) exactly as training read
        them from the tables: the chunks of ``y`` and the functionals of ``recorded``
        (``parts.featurize_file``)."""
        chunks = self.chunks_of(y)
        if not self.functionals:
            return Features(chunks)
        if recorded is None:
            raise ValueError("this model reads functionals of the signal as recorded: give it (recorded=)")
        return Features(chunks, egemaps(recorded, self.cfg.features.sample_rate).astype(np.float64))

    def clip_moments(self, features: Features) -> List[Moments]:
        """One clip's statistics for its group (a speaker's running statistics add these up): the
        ``Moments`` of its mel input, and of its functionals when the model reads them."""
        out = [Moments.of(features.chunks, self.cfg.model.input)]
        if features.functionals is not None:
            out.append(Moments.of_rows(np.asarray(features.functionals).reshape(-1, self.functionals)))
        return out

    def chunks_of(self, y: np.ndarray) -> np.ndarray:
        """The chunks of decoded samples exactly as training read them from the tables."""
        return as_stored(featurize_signal(y, self.cfg.features)["chunks"], self.cfg.features)[0]

    def predict_features(self, features: Features, groups: Optional[Sequence[str]] = None,
                         moments: Optional[GroupMoments] = None, per_chunk: bool = False,
                         functional_moments: Optional[GroupMoments] = None) -> List[Dict]:
        """Raw features of n sentences -> one dict per sentence (``per_chunk``: with each chunk's
        values under "chunks"); normalised as ``model_input`` says."""
        x, how = self.model_input(features, groups, moments, functional_moments)
        return [{**r, "normalization": how} for r in self.forward(x, per_chunk)]

    def predict_chunks(self, chunks: np.ndarray, groups: Optional[Sequence[str]] = None,
                       moments: Optional[GroupMoments] = None, per_chunk: bool = False) -> List[Dict]:
        """``predict_features`` of chunks alone (a model without functionals)."""
        return self.predict_features(Features(chunks), groups, moments, per_chunk)

    @torch.no_grad()
    def forward(self, inputs: Union[ModelInput, np.ndarray], per_chunk: bool = False) -> List[Dict]:
        """``model_input``'s output for n sentences -> one dict per sentence."""
        if not isinstance(inputs, ModelInput):
            inputs = ModelInput(inputs)
        chunks = inputs.chunks
        n, c = chunks.shape[:2]
        x = self.normalize(torch.tensor(chunks.reshape(n * c, *chunks.shape[2:])))     # as in training
        if self.functionals:
            if inputs.functionals is None:
                raise ValueError(f"this model reads {self.cfg.model.functionals} functionals beside the chunks")
            out = self.model(x, torch.tensor(inputs.functionals, dtype=torch.float32, device=self.device))
        else:
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
        y, recorded = prepare_signal(y, sample_rate, f.sample_rate, f.silence_peak, f.min_duration_s, recorded=True)
        return self.predict_features(stacked([self.signal_features(y, recorded)]))[0]

    def file_features(self, path: str) -> Features:
        f = self.cfg.features
        return self.signal_features(*load_audio(path, f.sample_rate, f.silence_peak, f.min_duration_s,
                                                recorded=True))

    def file_chunks(self, path: str) -> np.ndarray:
        f = self.cfg.features
        return self.chunks_of(load_audio(path, f.sample_rate, f.silence_peak, f.min_duration_s))

    def predict_file(self, path: str) -> Dict:
        """One file; a per-speaker model normalises it with the population statistics."""
        return self.predict_features(stacked([self.file_features(path)]))[0]

    def predict_files(self, paths: Sequence[str], groups: Optional[Sequence[str]] = None) -> List[Dict]:
        """Files predicted together: a per-speaker model normalises each ``groups`` group (each
        file's speaker) with the group's own statistics, or without groups each file with the
        population's; other models predict each file alone. (Holds the files' chunks in memory:
        `dec-ray predict` streams any number of files.)"""
        if not self.per_speaker or groups is None:
            return [self.predict_file(p) for p in paths]
        return self.predict_features(stacked([self.file_features(p) for p in paths]), groups)


def stacked(features: Sequence[Features]) -> Features:
    """One sentence's features each -> the features of them all, in order."""
    f = [x.functionals for x in features]
    return Features(np.stack([x.chunks for x in features]), None if f[0] is None else np.stack(f))


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
