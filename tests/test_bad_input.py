"""Hostile input without Ray: label rows that leak or repeat, file names, arrays given to the
Python API, paths and exit statuses at the command line."""
import csv
import os

import numpy as np
import pytest
import soundfile as sf

from dec_ray.cli import EXIT_CRASH, EXIT_USAGE, absolute_paths, build_parser, main
from dec_ray.config import ConfigError, load_config
from dec_ray.data.audio import AudioError, prepare_signal
from dec_ray.data.corpus import CorpusError, list_unlabeled, read_manifest


def _manifest(tmp_path, rows):
    wav = tmp_path / "a.wav"
    sf.write(wav, 0.3 * np.sin(np.arange(32000) / 10.0), 16000)
    for name in ("b.wav", "c.wav"):
        (tmp_path / name).write_bytes(wav.read_bytes())
    path = tmp_path / "m.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "arousal", "valence", "dominance", "split"])
        w.writerows(rows)
    return str(path)


def test_a_file_in_two_splits_stops_the_ingest(tmp_path):
    m = _manifest(tmp_path, [["a.wav", 4, 4, 4, "train"], ["a.wav", 4, 4, 4, "test1"], ["b.wav", 3, 3, 3, "dev"]])
    with pytest.raises(CorpusError, match="more than one split.*a.wav in test/train"):
        read_manifest(m)


def test_duplicate_and_contradictory_rows_are_rejected_with_their_split(tmp_path):
    m = _manifest(tmp_path, [["a.wav", 4, 4, 4, "train"], ["a.wav", 4, 4, 4, "train"],
                             ["b.wav", 3, 3, 3, "dev"], ["b.wav", 5, 3, 3, "dev"], ["c.wav", 2, 2, 2, "train"]])
    items, rejects = read_manifest(m)
    assert [os.path.basename(it.path) for it in items] == ["a.wav", "c.wav"]
    got = sorted((os.path.basename(r.path), r.split, r.reason.split(":")[0]) for r in rejects)
    assert got == [("a.wav", "train", "duplicate row"), ("b.wav", "dev", "contradictory labels"),
                   ("b.wav", "dev", "contradictory labels")]


def test_upper_case_extensions_and_literal_folder_names(tmp_path):
    d = tmp_path / "unl[1]"
    (d / "sub").mkdir(parents=True)
    for name in ("UPPER.WAV", "sub/lower.flac"):
        sf.write(d / name, np.ones(1600) * 0.1, 16000, format="WAV")
    (d / "notes.txt").write_text("x")
    names = sorted(os.path.basename(it.path) for it in list_unlabeled([str(d)]))
    assert names == ["UPPER.WAV", "lower.flac"]
    assert [os.path.basename(it.path) for it in list_unlabeled([str(d / "notes.txt")])] == ["notes.txt"]
    with pytest.raises(CorpusError, match="no folder or file of that name"):
        list_unlabeled([str(tmp_path / "nothing*")])


@pytest.mark.parametrize("samples, rate, reason", [
    (np.zeros(32000), 16000, "silent"), (np.ones(1), 16000, "too short"), (np.array([]), 16000, "empty"),
    (np.full(32000, np.nan), 16000, "non-finite"), (np.ones(32000), 0, "sample rate"),
    (np.ones((2, 2, 100)), 16000, "layout")])
def test_arrays_get_the_checks_files_get(samples, rate, reason):
    with pytest.raises(AudioError, match=reason):
        prepare_signal(samples, rate, min_duration_s=0.25)


def test_channels_first_arrays_are_mixed_down_not_truncated():
    t = np.arange(32000) / 16000
    stereo = np.stack([np.sin(2 * np.pi * 200 * t), 0.5 * np.sin(2 * np.pi * 200 * t)])
    y = prepare_signal(stereo, 16000)
    np.testing.assert_allclose(y, prepare_signal(stereo.T, 16000))
    assert y.shape == (32000,)


def test_paths_are_made_absolute_at_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["ingest", "--corpus", "../kr", "--out", "t", "--unlabeled", "u1", "u2"])
    absolute_paths(args)
    assert args.corpus == os.path.abspath(str(tmp_path / "../kr")) and args.out == str(tmp_path / "t")
    assert args.unlabeled == [str(tmp_path / "u1"), str(tmp_path / "u2")]
    args = build_parser().parse_args(["train", "--tables", "t", "--out", "r", "--config", "deepcluster_sgd"])
    absolute_paths(args)
    assert args.config == "deepcluster_sgd"                 # a preset name stays a name


def test_no_worker_is_not_a_run():
    with pytest.raises(ConfigError, match="at least 1 worker"):
        load_config(None, ["scale.workers=0"])


def test_prediction_checks_before_it_works(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    audio = tmp_path / "a.wav"
    sf.write(audio, np.ones(16000) * 0.1, 16000)
    args = ["predict", "--run", str(run), "--audio", str(audio), "--out", str(tmp_path / "p.parquet")]
    assert main(args) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "no model.pt" in err and len(err.splitlines()) == 1
    (run / "model.pt").write_bytes(b"not a model")
    for out, why in ((tmp_path / "missing" / "p.parquet", "does not exist"), (tmp_path / "p.json", ".parquet or .csv")):
        assert main(["predict", "--run", str(run), "--audio", str(audio), "--out", str(out)]) == EXIT_USAGE
        assert why in capsys.readouterr().err


def test_a_crash_has_its_own_exit_status(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.pt").write_bytes(b"not a model")
    assert main(["analyze", "--run", str(run), "--out", str(tmp_path / "a")]) == EXIT_CRASH
    assert "crashed" in capsys.readouterr().err


def test_a_finished_run_trained_otherwise_is_not_reused(tmp_path):
    """`dec-ray evaluate --tables` and the demo keep finished runs; one trained with another
    method config (here: another share of labels) is an error naming the difference, not reused."""
    from dec_ray.config import load_config
    from dec_ray.service.train import differences, repeated_runs
    run = tmp_path / "runs" / "cnn" / "seed0"
    cfg = load_config("demo", ["model.name=cnn", "train.seed=0", "train.label_fraction=0.25"])
    cfg.train.batch_sentences = 6                   # as a run saves it: resolved for its Train split
    cfg.save(str(run / "config.yaml"))
    (run / "result.json").write_text("{}")
    assert differences(str(run), load_config("demo", ["model.name=cnn", "train.label_fraction=0.25"])) == []
    with pytest.raises(ValueError, match=r"train.label_fraction: 0.25 there, 1.0 asked.*another --out"):
        repeated_runs("/nowhere", str(tmp_path), ["cnn"], 1, "demo")
    assert repeated_runs("/nowhere", str(tmp_path), ["cnn"], 1, "demo", ["train.label_fraction=0.25"]) == [str(run)]
    ridge = tmp_path / "runs" / "ridge"                # the ridge: fitted on a quarter of the labels
    ridge.mkdir()
    (ridge / "result.json").write_text('{"train_sentences": 36, "labels": {"label_fraction": 0.25, "label_seed": 0}}')
    with pytest.raises(ValueError, match=r"fitted on other Train labels.*'label_fraction': 1.0.*another --out"):
        repeated_runs("/nowhere", str(tmp_path), ["ridge"], 1, "demo")
