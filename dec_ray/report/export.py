"""`dec-ray export`: a trained run in portable form, for programs that do not import dec_ray.

OUT/model.ts      TorchScript: normalised chunks, float32 (N, chunk_frames, n_mels) -> per-chunk
                  predictions (N, attributes) on the z-scored label scale
OUT/model.onnx    the same graph in ONNX (torch.export-based exporter, batch dimension dynamic),
                  checked with ONNX Runtime against torch at another batch size
OUT/contract.json everything between a file and those inputs, and from the outputs to the 1..7
                  scale: decoding, peak normalisation, every mel setting, chunking, the storage
                  cast, the input statistics (Train's; or, for a per-speaker model, the formula of a
                  speaker's and the population's as numbers), the label de-normalisation, the
                  attributes, the ONNX tensors and opset, the package versions and the run
A sentence's prediction is the mean of its chunks' outputs, de-normalised. The plain-numpy reading
of the contract is tested against `dec-ray predict` (tests/test_export.py). No Ray here.
"""
from __future__ import annotations

import contextlib
import io
import os
from typing import Dict

import numpy as np
import torch
from torch import nn

from dec_ray.data.files import write_json
from dec_ray.config import model_label
from dec_ray.data.features import mel_settings
from dec_ray.data.groups import POPULATION
from dec_ray.data.normalization import CLIP, LOG_EPS
from dec_ray.data.parts import FLOAT16_MAX
from dec_ray.report.inference import Predictor

FORMAT = "dec_ray.export/1"


class ChunkModel(nn.Module):
    """The network's regression output alone: what a deployed model needs."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)["pred"]


class FusedModel(ChunkModel):
    """The same for a model that reads functionals (``model.functionals``): chunks and the
    sentences' normalised functionals."""

    def forward(self, x: torch.Tensor, functionals: torch.Tensor) -> torch.Tensor:
        return self.net(x, functionals)["pred"]


PER_SPEAKER = ("norm 'speaker': per mel bin b, over the n frames of all chunks (after the storage cast, and "
               "the log for kind logmel) of all files of one speaker: mean_b = sum(value_b) / n, std_b = "
               "sqrt(max(sum(value_b^2) / n - mean_b^2, 0)) (ddof 0); a clip whose speaker is unknown uses "
               "'population' (the training run's Train audio as one group), never its own statistics")


def versions() -> Dict[str, str]:
    import importlib.metadata as md
    out = {}
    for pkg in ("dec_ray", "torch", "numpy", "librosa", "soundfile", "soxr", "opensmile", "onnx", "onnxruntime"):
        try:
            out[pkg] = md.version(pkg.replace("_", "-"))
        except md.PackageNotFoundError:
            pass
    return out


PER_SPEAKER_FUNCTIONALS = ("norm 'speaker': per functional j, over the files of one speaker that have a value for it "
                           "(NaN: none): n_j, mean_j = sum(value_j) / n_j, std_j = sqrt(max(sum(value_j^2) / n_j - "
                           "mean_j^2, 0)) (ddof 0); a mean with no value is 0, a std that is not finite or <= 1e-8 "
                           "is 1; a clip whose speaker is unknown uses 'mean' and 'std' (Train's)")


def functionals_contract(p: Predictor) -> Dict:
    """How a sentence's functionals are made and normalised (``model.functionals``)."""
    import opensmile
    from dec_ray.data.functionals import _smile
    m = p.cfg.model
    mean, std = p.functional_population.of_group(POPULATION)
    return {"kind": m.functionals, "dim": p.functionals,
            "extractor": "opensmile.Smile(feature_set=opensmile.FeatureSet.eGeMAPSv02, "
                         "feature_level=opensmile.FeatureLevel.Functionals).process_signal(signal, sample_rate)",
            "opensmile": opensmile.__version__, "names": list(_smile().feature_names),
            "signal": "the decoded mono samples at audio.sample_rate before peak normalisation (as recorded)",
            "norm": m.norm, "mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "per_speaker": PER_SPEAKER_FUNCTIONALS if m.norm == "speaker" else None,
            "z": "(value - mean) / std; NaN and +-inf -> 0; then clipped to [-clip, clip]", "clip": CLIP,
            "dtype": "float32, one row per sentence"}


def contract(p: Predictor, run: str = "", onnx: Dict = None) -> Dict:
    """The whole input contract of a trained model, as data."""
    f, m, s = p.cfg.features, p.cfg.model, p.stats
    mean, std = s.input_moments(m.input) if m.norm == "train" else (None, None)
    population = None
    if m.norm == "speaker":
        pm, ps = p.population_moments().of_group(POPULATION)
        population = {"mean": pm.tolist(), "std": ps.tolist()}
    return {
        "format": FORMAT,
        "audio": {"sample_rate": f.sample_rate, "mono": "the mean of the channels",
                  "resample": "librosa.resample(res_type='soxr_hq') when the file's rate differs",
                  "peak_normalize": "divide by the maximum absolute sample", "silence_peak": f.silence_peak,
                  "min_duration_s": f.min_duration_s},
        "mel": {"function": "librosa.feature.melspectrogram", "sr": f.sample_rate, "n_fft": f.n_fft,
                "hop_length": f.hop_length, "n_mels": f.n_mels, "pad_mode": f.pad_mode,
                **mel_settings(f.sample_rate, f.n_fft), "dtype": "float32",
                "layout": "transposed to (frames, n_mels)"},
        "chunks": {"chunk_frames": f.chunk_frames, "num_chunks": f.num_chunks,
                   "starts": "k * floor((frames - chunk_frames) / (num_chunks - 1)) for k < num_chunks",
                   "short_clip_policy": f.short_clip_policy,
                   "short_clip": "fewer frames than chunk_frames: 'repeat' tiles the frames until they fill "
                                 "one chunk, 'reject' refuses the clip",
                   "storage_cast": {"dtype": f.storage_dtype, "saturate_at": FLOAT16_MAX}},
        "input": {"kind": m.input, "log_eps": LOG_EPS,
                  "value": "the chunk values, or log(value + log_eps) for kind logmel",
                  "norm": m.norm, "mean": mean, "std": std, "population": population,
                  "per_speaker": PER_SPEAKER if m.norm == "speaker" else None,
                  "z": "(value - mean) / std; NaN -> 0, +-inf -> +-clip; then clipped to [-clip, clip]",
                  "clip": CLIP, "dtype": "float32, then cast to the storage dtype and back (as training read it)"
                  if m.norm == "speaker" else "float32"},
        "functionals": functionals_contract(p) if p.functionals else None,
        "model": {"name": m.name, "head": m.head, "inputs": "x: float32 (N, chunk_frames, n_mels), the chunks "
                  "of whole sentences in order (N = sentences x num_chunks)" + (
                      "; functionals: float32 (sentences, functionals.dim), normalised, in the same order"
                      if p.functionals else ""),
                  "outputs": "(N, attributes): per-chunk predictions, z-scored label scale"},
        "output": {"attributes": list(p.attributes),
                   "label_mean": {a: s.label_mean[a] for a in p.attributes},
                   "label_std": {a: s.label_std[a] for a in p.attributes},
                   "sentence": "mean over the sentence's chunks, then * label_std + label_mean (the 1..7 scale)"},
        "onnx": onnx,
        "versions": versions(),
        "run": {"path": os.path.abspath(run) if run else None, "model": model_label(p.cfg), "result": _result(run)},
    }


def _result(run: str):
    import json
    path = os.path.join(run, "result.json")
    if not run or not os.path.exists(path):
        return None
    r = json.load(open(path))
    return {k: r.get(k) for k in ("best_epoch", "epochs_run", "dev_ccc", "test_ccc")}


def export_run(run: str, out: str, onnx: bool = True) -> Dict[str, str]:
    """Write OUT/model.ts, OUT/model.onnx (``onnx``) and OUT/contract.json; returns their paths."""
    p = Predictor(os.path.abspath(run))
    os.makedirs(out, exist_ok=True)
    f = p.cfg.features
    model = (FusedModel if p.functionals else ChunkModel)(p.model).eval()
    example = (torch.zeros((2 * f.num_chunks, f.chunk_frames, f.n_mels)),)
    names, shapes = ["chunks"], {"x": {0: torch.export.Dim("n")}}
    if p.functionals:               # n chunks = sentences x num_chunks, one row of functionals a sentence
        sentences = torch.export.Dim("sentences")
        example += (torch.zeros((2, p.functionals)),)
        names, shapes = ["chunks", "functionals"], {"x": {0: f.num_chunks * sentences}, "functionals": {0: sentences}}
    paths = {"contract": os.path.join(out, "contract.json"), "torchscript": os.path.join(out, "model.ts")}
    tensors = None
    with torch.no_grad():
        torch.jit.trace(model, example, check_trace=False).save(paths["torchscript"])
        if onnx:
            paths["onnx"] = os.path.join(out, "model.onnx")
            with contextlib.redirect_stdout(io.StringIO()):          # the exporter's own progress lines
                torch.onnx.export(model, example, paths["onnx"], input_names=names, output_names=["pred"],
                                  dynamic_shapes=shapes, dynamo=True, verbose=False)
            check_onnx(paths["onnx"], model, example, names)
            tensors = onnx_tensors(paths["onnx"])
    write_json(paths["contract"], contract(p, run, tensors))
    return paths


def onnx_tensors(path: str) -> Dict:
    """The ONNX graph's inputs and outputs (name, dtype, shape; a named dimension is dynamic) and opset."""
    import onnx
    model = onnx.load(path, load_external_data=False)

    def described(values):
        return [{"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values]
    return {"opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
            "inputs": described(model.graph.input), "outputs": described(model.graph.output)}


def check_onnx(path: str, model: nn.Module, example, names=("chunks",)) -> float:
    """ONNX Runtime's output on random inputs of another batch size against torch's; raises when
    they differ by more than 1e-4. Returns the largest difference."""
    import onnxruntime as ort
    example = example if isinstance(example, tuple) else (example,)
    xs = tuple(torch.randn((e.shape[0] * 2, *e.shape[1:])).clamp(-CLIP, CLIP) for e in example)
    want = model(*xs).numpy()
    got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(
        None, {n: x.numpy() for n, x in zip(names, xs)})[0]
    diff = float(np.abs(got - want).max())
    if diff > 1e-4:
        raise RuntimeError(f"{path}: ONNX Runtime differs from torch by {diff:.2e}")
    return diff
