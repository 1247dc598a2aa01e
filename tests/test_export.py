"""`dec-ray export`: the exported model, fed by a plain reading of contract.json (numpy, librosa and
soundfile only, no dec_ray), gives `dec-ray predict`'s numbers on real audio files; ONNX Runtime
gives TorchScript's."""
import json
import os

import librosa
import numpy as np
import onnxruntime as ort
import pandas as pd
import pyarrow.dataset as pads
import pytest
import soundfile as sf
import torch

from dec_ray.cli import main
from dec_ray.data.tables import split_files
from dec_ray.service.batch_predict import run_predict

pytestmark = pytest.mark.slow


def plain_values(path: str, c: dict) -> np.ndarray:
    """contract.json read by hand: a file -> the values the input z-scores (num_chunks, chunk_frames, n_mels)."""
    a, m, k, i = c["audio"], c["mel"], c["chunks"], c["input"]
    y, sr = sf.read(path, dtype="float32", always_2d=True)
    y = y.mean(1)
    if sr != a["sample_rate"]:
        y = librosa.resample(y, orig_sr=sr, target_sr=a["sample_rate"], res_type="soxr_hq")
    y = (y / np.abs(y).max()).astype(np.float32)
    mel = librosa.feature.melspectrogram(y=y, sr=m["sr"], n_fft=m["n_fft"], hop_length=m["hop_length"],
                                         win_length=m["win_length"], window=m["window"], center=m["center"],
                                         n_mels=m["n_mels"], power=m["power"], pad_mode=m["pad_mode"], fmin=m["fmin"],
                                         fmax=m["fmax"], htk=m["htk"], norm=m["norm"], dtype=np.dtype(m["dtype"])).T
    if len(mel) < k["chunk_frames"]:
        mel = np.concatenate([mel] * -(-k["chunk_frames"] // len(mel)))
    step = (len(mel) - k["chunk_frames"]) // (k["num_chunks"] - 1)
    x = np.stack([mel[j * step:j * step + k["chunk_frames"]] for j in range(k["num_chunks"])])
    x = np.minimum(x, k["storage_cast"]["saturate_at"]).astype(k["storage_cast"]["dtype"]).astype(np.float32)
    if i["kind"] == "logmel":
        x = np.log(x + np.float32(i["log_eps"]))
    return x


def plain_z(x: np.ndarray, mean, std, i: dict) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (x - np.float32(mean)) / np.float32(std)
    return np.clip(np.nan_to_num(z, nan=0.0, posinf=i["clip"], neginf=-i["clip"]), -i["clip"], i["clip"])


def plain_chunks(path: str, c: dict) -> np.ndarray:
    """A file -> the model's input, Train-normalised."""
    return plain_z(plain_values(path, c), c["input"]["mean"], c["input"]["std"], c["input"])


def plain_speaker_inputs(paths, speakers, c: dict) -> np.ndarray:
    """Files -> the model's input, each z-scored with its speaker's moments by the contract's formula
    (speaker None: the population's), then cast to the storage dtype and back."""
    i, cast = c["input"], c["chunks"]["storage_cast"]["dtype"]
    values = [plain_values(p, c).astype(np.float64) for p in paths]
    out = []
    for v, spk in zip(values, speakers):
        if spk is None:
            mean, std = i["population"]["mean"], i["population"]["std"]
        else:
            frames = np.concatenate([w.reshape(-1, w.shape[-1]) for w, s in zip(values, speakers) if s == spk])
            mean = frames.sum(0) / len(frames)
            std = np.sqrt(np.maximum((frames ** 2).sum(0) / len(frames) - mean ** 2, 0))
        out.append(plain_z(v.astype(np.float32), mean.astype(np.float32) if spk else mean,
                           std.astype(np.float32) if spk else std, i).astype(cast).astype(np.float32))
    return np.concatenate(out)


def test_the_exported_model_reads_the_contract_and_gives_predicts_numbers(tables, trained_runs, tmp_path, ray_local):
    run = trained_runs["deepemocluster"]
    out = str(tmp_path / "export")
    assert main(["export", "--run", run, "--out", out]) == 0
    c = json.load(open(os.path.join(out, "contract.json")))
    assert c["output"]["attributes"] == ["arousal"] and c["input"]["norm"] == "train"
    paths = sorted(pads.dataset(split_files(tables[0], "test"), format="parquet").to_table(columns=["path"])
                   ["path"].to_pylist())[:6]
    audio = tmp_path / "audio"
    audio.mkdir()
    for p in paths:
        os.symlink(p, audio / os.path.basename(p))
    run_predict(run, [str(audio)], str(tmp_path / "preds.csv"), actors=1)
    want = pd.read_csv(tmp_path / "preds.csv").set_index("path")["arousal"]

    ts = torch.jit.load(os.path.join(out, "model.ts"))
    onnx = ort.InferenceSession(os.path.join(out, "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.concatenate([plain_chunks(p, c) for p in paths])          # all sentences in one batch
    n = c["chunks"]["num_chunks"]
    a = c["output"]["attributes"][0]
    for name, chunk_pred in (("torchscript", ts(torch.from_numpy(x)).detach().numpy()),
                             ("onnx", onnx.run(None, {"chunks": x})[0])):
        sentence = chunk_pred.reshape(len(paths), n, -1).mean(1)[:, 0]
        got = sentence * c["output"]["label_std"][a] + c["output"]["label_mean"][a]
        expected = want.loc[[str(audio / os.path.basename(p)) for p in paths]].to_numpy()
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4, err_msg=name)


def test_a_per_speaker_export_stands_alone(tables, speaker_run, tmp_path, ray_local):
    """A per-speaker run's contract gives the formula of a speaker's moments and the population's
    as numbers: read by hand, with each file's speaker it gives `dec-ray predict --groups`'s numbers,
    without one `dec-ray predict`'s; it names the ONNX tensors, the opset, every mel setting, the
    package versions and the run."""
    out = str(tmp_path / "export")
    assert main(["export", "--run", speaker_run, "--out", out]) == 0
    c = json.load(open(os.path.join(out, "contract.json")))
    i = c["input"]
    assert i["norm"] == "speaker" and i["mean"] is None and len(i["population"]["mean"]) == 128 and i["per_speaker"]
    assert c["onnx"]["inputs"] == [{"name": "chunks", "dtype": "float32", "shape": ["n", 62, 128]}]
    assert c["onnx"]["outputs"][0]["name"] == "pred" and c["onnx"]["opset"] >= 17
    assert {"window", "win_length", "fmin", "fmax", "htk", "norm"} <= set(c["mel"])
    assert {"torch", "librosa", "numpy"} <= set(c["versions"]) and c["run"]["path"] == os.path.abspath(speaker_run)
    t = pads.dataset(split_files(tables[0], "test"), format="parquet").to_table(columns=["path", "speaker"]).to_pandas()
    t = t.sort_values("path")
    pd.DataFrame({"path": t["path"], "speaker": t["speaker"]}).to_csv(tmp_path / "spk.csv", index=False)
    onnx = ort.InferenceSession(os.path.join(out, "model.onnx"), providers=["CPUExecutionProvider"])
    n, a = c["chunks"]["num_chunks"], c["output"]["attributes"][0]
    for name, groups, speakers in (("speakers", str(tmp_path / "spk.csv"), list(t["speaker"])),
                                   ("population", None, [None] * len(t))):
        run_predict(speaker_run, list(t["path"]), str(tmp_path / f"{name}.csv"), actors=1, groups=groups)
        want = pd.read_csv(tmp_path / f"{name}.csv").set_index("path").loc[list(t["path"]), "arousal"].to_numpy()
        x = plain_speaker_inputs(list(t["path"]), speakers, c)
        sentence = onnx.run(None, {"chunks": x})[0].reshape(len(t), n, -1).mean(1)[:, 0]
        got = sentence * c["output"]["label_std"][a] + c["output"]["label_mean"][a]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4, err_msg=name)


def plain_functionals(path: str, c: dict) -> np.ndarray:
    """contract.json's functionals read by hand: openSMILE's eGeMAPS functionals of the decoded mono
    signal at the contract's rate, before peak normalisation."""
    import opensmile
    f, a = c["functionals"], c["audio"]
    y, sr = sf.read(path, dtype="float32", always_2d=True)
    y = y.mean(1)
    if sr != a["sample_rate"]:
        y = librosa.resample(y, orig_sr=sr, target_sr=a["sample_rate"], res_type="soxr_hq")
    smile = opensmile.Smile(feature_set=opensmile.FeatureSet.eGeMAPSv02, feature_level=opensmile.FeatureLevel.Functionals)
    assert list(smile.feature_names) == f["names"]
    return smile.process_signal(y, a["sample_rate"]).to_numpy()[0].astype(np.float64)


def plain_speaker_functionals(paths, speakers, c: dict) -> np.ndarray:
    """Files -> their normalised functionals by the contract's formula: each speaker's moments, or
    Train's for a file without one; NaN and +-inf -> 0, clipped."""
    f = c["functionals"]
    values = np.stack([plain_functionals(p, c) for p in paths])
    out = []
    for v, spk in zip(values, speakers):
        if spk is None:
            mean, std = np.array(f["mean"]), np.array(f["std"])
        else:
            x = values[[s == spk for s in speakers]]
            n = (~np.isnan(x)).sum(0)
            mean = np.nansum(x, 0) / n
            std = np.sqrt(np.maximum(np.nansum(x * x, 0) / n - mean ** 2, 0))
            mean, std = np.nan_to_num(mean), np.where(np.isfinite(std) & (std > 1e-8), std, 1.0)
        z = np.nan_to_num((v - mean) / std, nan=0.0, posinf=0.0, neginf=0.0)
        out.append(np.clip(z, -f["clip"], f["clip"]).astype(np.float32))
    return np.stack(out)


def test_an_export_with_functionals_stands_alone(tables, fused_run, tmp_path, ray_local):
    """A model that reads the eGeMAPS functionals (model.functionals=egemaps): its contract names
    the openSMILE configuration, the signal it reads, the feature names, the normalisation and
    Train's numbers; the ONNX graph takes chunks and functionals (sentences x num_chunks chunks, a
    row of functionals a sentence). Read by hand, with openSMILE called directly, it gives
    `dec-ray predict --groups`'s numbers, and without speakers `dec-ray predict`'s."""
    out = str(tmp_path / "export")
    assert main(["export", "--run", fused_run, "--out", out]) == 0
    c = json.load(open(os.path.join(out, "contract.json")))
    f = c["functionals"]
    assert f["kind"] == "egemaps" and f["dim"] == 88 and len(f["mean"]) == 88 and f["norm"] == "speaker"
    assert "eGeMAPSv02" in f["extractor"] and f["opensmile"] == c["versions"]["opensmile"]
    assert [i["name"] for i in c["onnx"]["inputs"]] == ["chunks", "functionals"]
    t = pads.dataset(split_files(tables[0], "test"), format="parquet").to_table(columns=["path", "speaker"]).to_pandas()
    t = t.sort_values("path")
    pd.DataFrame({"path": t["path"], "speaker": t["speaker"]}).to_csv(tmp_path / "spk.csv", index=False)
    onnx = ort.InferenceSession(os.path.join(out, "model.onnx"), providers=["CPUExecutionProvider"])
    ts = torch.jit.load(os.path.join(out, "model.ts"))
    n, attrs = c["chunks"]["num_chunks"], c["output"]["attributes"]
    for name, groups, speakers in (("speakers", str(tmp_path / "spk.csv"), list(t["speaker"])),
                                   ("population", None, [None] * len(t))):
        run_predict(fused_run, list(t["path"]), str(tmp_path / f"{name}.csv"), actors=1, groups=groups)
        want = pd.read_csv(tmp_path / f"{name}.csv").set_index("path").loc[list(t["path"]), attrs].to_numpy()
        x = plain_speaker_inputs(list(t["path"]), speakers, c)
        fx = plain_speaker_functionals(list(t["path"]), speakers, c)
        for engine, chunk_pred in (("onnx", onnx.run(None, {"chunks": x, "functionals": fx})[0]),
                                   ("torchscript", ts(torch.from_numpy(x), torch.from_numpy(fx)).detach().numpy())):
            sentence = chunk_pred.reshape(len(t), n, -1).mean(1)
            got = sentence * np.array([c["output"]["label_std"][a] for a in attrs]) + \
                np.array([c["output"]["label_mean"][a] for a in attrs])
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-4, err_msg=f"{name} {engine}")
