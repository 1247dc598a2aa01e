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


def test_a_per_speaker_model_predicts_as_it_was_trained(tables, speaker_run, tmp_path, ray_local):
    """model.norm=speaker: the trainer's test predictions are reproduced by `dec-ray predict` with the
    speakers as groups, and by cross-corpus scoring. Without groups every file reads the population
    statistics the run saved (and says so), never its own; a folder as a group only when asked."""
    from dec_ray.report.cross_corpus import score_on
    from dec_ray.report.inference import Predictor
    out, _ = tables
    run = speaker_run
    trained = pq.read_table(os.path.join(run, "test_predictions.parquet")).to_pandas().set_index("path")
    assert trained["speaker"].nunique() >= 2
    audio = tmp_path / "audio"
    audio.mkdir()
    for p in trained.index:
        os.symlink(p, audio / os.path.basename(p))
    pd.DataFrame({"path": [f"audio/{os.path.basename(p)}" for p in trained.index],
                  "speaker": trained["speaker"].to_numpy()}).to_csv(tmp_path / "speakers.csv", index=False)

    def predicted(name, groups):
        info = run_predict(run, [str(audio)], str(tmp_path / name), actors=1, groups=groups)
        assert info["predicted"] == len(trained) and info["rejected"] == 0
        got = pd.read_parquet(tmp_path / name)
        return got.set_index(got["path"].map(lambda p: str(audio / os.path.basename(p))))

    by_speaker = predicted("speakers.parquet", str(tmp_path / "speakers.csv"))
    expected = trained["pred_arousal"].rename(lambda p: str(audio / os.path.basename(p)))
    np.testing.assert_allclose(by_speaker.loc[expected.index, "arousal"], expected, rtol=1e-4, atol=1e-4)
    assert set(by_speaker["group"]) == set(trained["speaker"]) and set(by_speaker["normalization"]) == {"speaker"}
    population = predicted("population.parquet", None)
    assert set(population["normalization"]) == {"population"}
    p = Predictor(run)
    one = p.predict_file(str(audio / os.path.basename(trained.index[0])))
    assert one["normalization"] == "population"
    assert np.isclose(population.loc[str(audio / os.path.basename(trained.index[0])), "arousal"], one["arousal"],
                      atol=1e-5)
    assert np.abs(population.loc[expected.index, "arousal"].to_numpy() - expected.to_numpy()).max() > 1e-3
    with pytest.warns(UserWarning, match="rarely a speaker"):
        predicted("folder.parquet", "folder")

    cross = pq.read_table(os.path.join(score_on(run, out, "self"), "test_predictions.parquet")).to_pandas()
    np.testing.assert_allclose(cross.set_index("path").loc[trained.index, "pred_arousal"], trained["pred_arousal"],
                               rtol=1e-4, atol=1e-4)
    adapted = pq.read_table(os.path.join(score_on(run, out, "self", adapted=True), "test_predictions.parquet"))
    assert adapted.to_pandas().equals(cross)           # its speakers' own statistics either way


def test_a_group_far_larger_than_a_batch_predicts_in_batches_with_the_same_numbers(tables, speaker_run, tmp_path,
                                                                                   ray_local):
    """Every labeled file of the corpus as one speaker (40 files, 3 batches of 16) and 4 files with
    no speaker: statistics in one streaming pass, then normalised forwards batch by batch, give the
    numbers of all 40 stacked and normalised at once (which is what bounded memory must not change)."""
    from dec_ray.report.inference import Predictor
    from dec_ray.service.batch_predict import BATCH_FILES
    out, _ = tables
    paths = sorted(p for s in ("train", "dev", "test")
                   for p in pads.dataset(split_files(out, s), format="parquet").to_table(columns=["path"])["path"]
                   .to_pylist())
    assert len(paths) > 2 * BATCH_FILES + 4
    named, unnamed = paths[:-4], paths[-4:]
    corrupt = tmp_path / "corrupt.wav"                      # rejected in the statistics pass, the rest go on
    corrupt.write_bytes(b"RIFF....WAVEjunk")
    pd.DataFrame({"path": paths + [str(corrupt)], "group": ["everyone"] * len(named) + [""] * 4 + ["everyone"]}
                 ).to_csv(tmp_path / "g.csv", index=False)
    info = run_predict(speaker_run, paths + [str(corrupt)], str(tmp_path / "p.parquet"), actors=1,
                       groups=str(tmp_path / "g.csv"))
    assert info["predicted"] == len(paths) and info["rejected"] == 1
    assert list(pd.read_csv(info["rejects"])["path"]) == [str(corrupt)]
    got = pd.read_parquet(tmp_path / "p.parquet").set_index("path")
    p = Predictor(speaker_run)
    at_once = p.predict_files(named, ["everyone"] * len(named))
    np.testing.assert_allclose(got.loc[named, "arousal"], [r["arousal"] for r in at_once], rtol=1e-5, atol=1e-5)
    alone = [p.predict_file(x)["arousal"] for x in unnamed]
    np.testing.assert_allclose(got.loc[unnamed, "arousal"], alone, rtol=1e-5, atol=1e-5)
    assert list(got.loc[unnamed, "normalization"]) == ["population"] * 4
    assert set(got.loc[named, "normalization"]) == {"speaker"}


def test_groups_are_refused_for_a_train_normalised_model(trained_runs, tmp_path):
    with pytest.raises(ValueError, match="groups apply to a per-speaker model only"):
        run_predict(trained_runs["cnn"], [str(tmp_path)], str(tmp_path / "p.csv"), groups="folder")


def test_the_new_options_train_through_ray_and_predict_as_trained(tables_with_pool_functionals, tmp_path, ray_local,
                                                                   tiny_cfg):
    """The sentence head, the AdamW recipe and a teacher on the pool, composed, on 2 workers: the
    teacher's loss is logged, cross-corpus scoring of the run on its own test split gives the
    trainer's predictions, and the sentence head exports (ONNX Runtime checked against torch)."""
    import json
    from dec_ray.report.cross_corpus import score_on
    from dec_ray.service.train import run_training
    out, _ = tables_with_pool_functionals
    run = str(tmp_path / "new")
    cfg = tiny_cfg("model.name=cnn", "model.head=sentence", "train.recipe=adamw", "train.teacher=egemaps-speaker",
                   "train.label_fraction=0.5")
    result = run_training(out, run, cfg)
    assert result["test_ccc"]["arousal"] == result["test_ccc"]["arousal"]          # not NaN
    logs = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert all(r["unlabeled_teacher"] > 0 and r["unlabeled_chunks"] > 0 for r in logs if "unlabeled_teacher" in r)
    assert any("unlabeled_teacher" in r for r in logs)
    trained = pq.read_table(os.path.join(run, "test_predictions.parquet")).to_pandas().set_index("row_id")
    cross = pq.read_table(os.path.join(score_on(run, out, "self"), "test_predictions.parquet")).to_pandas()
    np.testing.assert_allclose(cross.set_index("row_id").loc[trained.index, "pred_arousal"], trained["pred_arousal"],
                               rtol=1e-4, atol=1e-4)
    from dec_ray.report.export import export_run
    assert set(export_run(run, str(tmp_path / "export"))) == {"contract", "torchscript", "onnx"}
