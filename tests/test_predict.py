"""Batch prediction equals the trainer's own test predictions; bad files are rejected."""
import os

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import soundfile as sf

import dec_ray
from dec_ray.data.tables import split_files
from dec_ray.service.batch_predict import run_predict

pytestmark = pytest.mark.slow


def test_predict_matches_the_trainers_test_predictions(tables, trained_runs, tmp_path, ray_local):
    out, _ = tables
    run = trained_runs["deepemocluster"]
    trainer_preds = pq.read_table(os.path.join(run, "test_predictions.parquet")).to_pandas()
    test = pads.dataset(split_files(out, "test"), format="parquet").to_table(columns=["row_id", "path"]).to_pandas()
    assert trainer_preds[["row_id", "path"]].sort_values("row_id").to_numpy().tolist() == \
        test.sort_values("row_id").to_numpy().tolist()            # the run's predictions name their files
    expected = trainer_preds.set_index("path")["pred_arousal"]

    audio = str(tmp_path / "audio")
    os.makedirs(audio)
    for p in test["path"]:
        os.symlink(p, os.path.join(audio, os.path.basename(p)))
    (tmp_path / "audio" / "corrupt.wav").write_bytes(b"RIFF....WAVEjunk")
    sf.write(str(tmp_path / "audio" / "silent.wav"), np.zeros(32000), 16000)
    info = run_predict(run, [audio], str(tmp_path / "preds.parquet"), actors=2)
    assert info["predicted"] == len(test) and info["rejected"] == 2
    got = pd.read_parquet(tmp_path / "preds.parquet")
    got["path"] = [os.path.realpath(p) for p in got["path"]]
    got = got.set_index("path")["arousal"]
    np.testing.assert_allclose(got.loc[expected.index].to_numpy(), expected.to_numpy(), rtol=1e-4, atol=1e-4)
    rejects = pd.read_csv(info["rejects"])
    assert sorted(os.path.basename(p) for p in rejects["path"]) == ["corrupt.wav", "silent.wav"]
    one = dec_ray.predict(run, test["path"][0])
    assert np.isclose(one["arousal"], expected.loc[test["path"][0]], atol=1e-4) and one["cluster"] >= 0
    y, sr = sf.read(test["path"][0])
    assert np.isclose(dec_ray.predict(run, (y, sr))["arousal"], one["arousal"], atol=1e-3)
