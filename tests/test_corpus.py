import csv
import os
import shutil

import numpy as np
import pytest
import soundfile as sf

from dec_ray.data.corpus import CorpusError, list_unlabeled, read_corpus, read_manifest, read_msp_podcast


def test_synth_loads_with_the_msp_reader(corpus):
    items, rejects = read_msp_podcast(corpus)
    assert rejects == []
    assert {it.split for it in items} == {"train", "dev", "test"}
    assert len(items) == 40
    assert all(1 <= it.arousal <= 7 and 1 <= it.valence <= 7 and 1 <= it.dominance <= 7 for it in items)
    assert len(list_unlabeled([os.path.join(corpus, "Unlabeled")])) == 12


def test_splits_share_no_speaker(corpus):
    items, _ = read_msp_podcast(corpus)
    speakers = {s: {it.speaker for it in items if it.split == s} for s in ("train", "dev", "test")}
    assert not speakers["train"] & speakers["dev"]
    assert not speakers["train"] & speakers["test"]
    assert not speakers["dev"] & speakers["test"]


def test_synth_is_deterministic(tmp_path):
    from dec_ray.data.synth import synth_corpus
    for name in ("a", "b"):
        synth_corpus(str(tmp_path / name), labeled=6, unlabeled=1, seed=7, max_duration=3.0)
    a = sorted(os.listdir(tmp_path / "a" / "Audios"))
    assert a == sorted(os.listdir(tmp_path / "b" / "Audios"))
    for f in a:
        assert (tmp_path / "a" / "Audios" / f).read_bytes() == (tmp_path / "b" / "Audios" / f).read_bytes()


def test_attributes_drive_the_audio(corpus):
    """Simple acoustic features track arousal: frame energy rises with it (fewer pauses, more
    effort) and the median spectral centroid falls (less pause noise). A model that learns
    nothing scores CCC ~ 0; these correlations are far from 0 even on 40 clips."""
    import librosa
    items, _ = read_msp_podcast(corpus)
    energy, cent, ar = [], [], []
    for it in items:
        y, sr = sf.read(it.path)
        energy.append(np.mean(librosa.feature.rms(y=y)))
        cent.append(np.median(librosa.feature.spectral_centroid(y=y, sr=sr)))
        ar.append(it.arousal)
    assert np.corrcoef(energy, ar)[0, 1] > 0.25
    assert np.corrcoef(cent, ar)[0, 1] < -0.4


def _copy_as_old_release(corpus, dst):
    shutil.copytree(os.path.join(corpus, "Audios"), os.path.join(dst, "Audio"))
    os.makedirs(os.path.join(dst, "Labels"))
    with open(os.path.join(corpus, "Labels", "labels_consensus.csv")) as f:
        rows = list(csv.DictReader(f))
    names = {"Development": "Validation", "Test1": "Test", "Train": "Train"}
    for r in rows:
        r["Split_Set"] = names[r["Split_Set"]]
    return rows


def _write(rows, path):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_older_release_layout_and_bad_rows(corpus, tmp_path):
    dst = str(tmp_path / "old")
    rows = _copy_as_old_release(corpus, dst)
    rows[0]["EmoAct"] = "nan"
    rows[1]["EmoVal"] = "9.5"
    rows[2]["Split_Set"] = "Holdout"
    rows[3]["FileName"] = "does_not_exist.wav"
    _write(rows, os.path.join(dst, "Labels", "labels_concensus.csv"))
    items, rejects = read_corpus(dst)
    reasons = sorted(r.reason for r in rejects)
    assert len(items) == len(rows) - 4
    assert {it.split for it in items} == {"train", "dev", "test"}
    assert any("NaN" in r for r in reasons) and any("outside" in r for r in reasons)
    assert any("unknown split name 'Holdout'" in r for r in reasons) and "missing file" in reasons


def test_missing_column_and_layout_are_clear_errors(corpus, tmp_path):
    with pytest.raises(CorpusError, match="no Audios/ or Audio/"):
        read_corpus(str(tmp_path))
    dst = str(tmp_path / "c")
    rows = _copy_as_old_release(corpus, dst)
    for r in rows:
        del r["EmoDom"]
    _write(rows, os.path.join(dst, "Labels", "labels_consensus.csv"))
    with pytest.raises(CorpusError, match="missing column.*EmoDom"):
        read_corpus(dst)


def test_manifest_reader(corpus, tmp_path):
    items, _ = read_msp_podcast(corpus)
    rows = [{"path": os.path.relpath(it.path, tmp_path), "arousal": it.arousal, "valence": it.valence,
             "dominance": it.dominance, "split": {"train": "train", "dev": "dev", "test": "test"}[it.split],
             "speaker": it.speaker} for it in items]
    rows.append(dict(rows[0], path="gone.wav"))
    _write(rows, str(tmp_path / "m.csv"))
    got, rejects = read_manifest(str(tmp_path / "m.csv"))
    assert len(got) == len(items) and [r.reason for r in rejects] == ["missing file"]
    assert got[0].speaker == items[0].speaker
    _write([{k: v for k, v in r.items() if k != "split"} for r in rows], str(tmp_path / "bad.csv"))
    with pytest.raises(CorpusError, match="split"):
        read_manifest(str(tmp_path / "bad.csv"))


def test_unlabeled_glob_and_missing(corpus):
    got = list_unlabeled([os.path.join(corpus, "Unlabeled", "UNL_*.wav")])
    assert len(got) == 12 and all(it.split == "unlabeled" for it in got)
    with pytest.raises(CorpusError, match="no folder or file of that name"):
        list_unlabeled([os.path.join(corpus, "nothing_*.wav")])
