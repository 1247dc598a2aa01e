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


def plain_chunks(path: str, c: dict) -> np.ndarray:
    """contract.json read by hand: a file -> the model's input (num_chunks, chunk_frames, n_mels)."""
    a, m, k, i = c["audio"], c["mel"], c["chunks"], c["input"]
    y, sr = sf.read(path, dtype="float32", always_2d=True)
    y = y.mean(1)
    if sr != a["sample_rate"]:
        y = librosa.resample(y, orig_sr=sr, target_sr=a["sample_rate"], res_type="soxr_hq")
    y = (y / np.abs(y).max()).astype(np.float32)
    mel = librosa.feature.melspectrogram(y=y, sr=a["sample_rate"], n_fft=m["n_fft"], hop_length=m["hop_length"],
                                         n_mels=m["n_mels"], power=m["power"], pad_mode=m["pad_mode"]).T
    if len(mel) < k["chunk_frames"]:
        mel = np.concatenate([mel] * -(-k["chunk_frames"] // len(mel)))
    step = (len(mel) - k["chunk_frames"]) // (k["num_chunks"] - 1)
    x = np.stack([mel[j * step:j * step + k["chunk_frames"]] for j in range(k["num_chunks"])])
    x = np.minimum(x, k["storage_cast"]["saturate_at"]).astype(k["storage_cast"]["dtype"]).astype(np.float32)
    if i["kind"] == "logmel":
        x = np.log(x + np.float32(i["log_eps"]))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (x - np.float32(i["mean"])) / np.float32(i["std"])
    return np.clip(np.nan_to_num(z, nan=0.0, posinf=i["clip"], neginf=-i["clip"]), -i["clip"], i["clip"])


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
