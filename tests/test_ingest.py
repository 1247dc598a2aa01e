"""Ingest on real files with Ray Data: chunks, stats, rejects, resume."""
import json
import os

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from dec_ray.config import load_config
from dec_ray.data.corpus import read_msp_podcast
from dec_ray.data.features import make_chunks, mel_spectrogram
from dec_ray.data.tables import is_complete, split_files
from dec_ray.service.ingest import run_ingest


def _table(tables, split, columns=None):
    return pads.dataset(split_files(tables, split), format="parquet").to_table(columns=columns)


def test_tables_rows_and_schema(tables, corpus):
    out, summary = tables
    items, _ = read_msp_podcast(corpus)
    for split in ("train", "dev", "test"):
        assert summary.rows[split] == sum(it.split == split for it in items)
    t = _table(out, "train")
    assert t.schema.field("chunks").type.shape == [11, 62, 128]
    chunks = t["chunks"].combine_chunks().to_numpy_ndarray()
    assert chunks.dtype == np.float16 and chunks.shape[1:] == (11, 62, 128)
    u = _table(out, "unlabeled", ["row_id", "arousal", "path"])
    assert u["arousal"].null_count == u.num_rows
    ids = np.concatenate([_table(out, s, ["row_id"])["row_id"].to_numpy()
                          for s in ("train", "dev", "test", "unlabeled")])
    assert len(np.unique(ids)) == len(ids)
    assert is_complete(out)


def test_the_egemaps_column_is_opensmiles_functionals_of_the_decoded_file(tables):
    """The references' input: openSMILE's 88 eGeMAPS v02 functionals of the decoded signal as
    recorded (16 kHz mono, not peak-normalised: the level is part of arousal), one per sentence."""
    import opensmile
    from dec_ray.data.audio import load_audio
    out, _ = tables
    t = _table(out, "dev", ["path", "egemaps"]).slice(0, 2)
    smile = opensmile.Smile(feature_set=opensmile.FeatureSet.eGeMAPSv02,
                            feature_level=opensmile.FeatureLevel.Functionals)
    for path, stored in zip(t["path"].to_pylist(), t["egemaps"].to_pylist()):
        _, recorded = load_audio(path, recorded=True)
        want = smile.process_signal(recorded, 16000).to_numpy()[0]
        assert len(stored) == 88
        np.testing.assert_allclose(np.array(stored, dtype=np.float64), want, rtol=1e-5, atol=1e-6)
    with open(os.path.join(out, "plan.json")) as f:
        assert json.load(f)["features"]["functionals"] == "egemaps"


def test_functionals_only_where_read_the_pool_on_request(tables, tables_with_pool_functionals):
    """eGeMAPS (7x the mel's cost) for the labeled splits, which the references read; the pool's
    are null unless features.functionals_pool=true, and turning it on in the same folder redoes
    the pool's parts alone. A reference asked to read a pool without them says how to get them."""
    from dec_ray.report.ridge import read_features
    out, _ = tables
    for split in ("train", "dev", "test"):
        assert _table(out, split, ["egemaps"])["egemaps"].null_count == 0
    pool = _table(out, "unlabeled", ["egemaps"])
    assert pool.num_rows > 0 and pool["egemaps"].null_count == pool.num_rows
    with pytest.raises(ValueError, match="features.functionals_pool=true"):
        read_features(out, "unlabeled", "egemaps")
    again, before = tables_with_pool_functionals
    pool = _table(again, "unlabeled", ["egemaps"])
    assert pool["egemaps"].null_count == 0 and len(pool["egemaps"][0]) == 88
    assert read_features(again, "unlabeled", "egemaps")[1].shape == (pool.num_rows, 88)
    for path, mtime in before.items():
        redone = os.stat(path).st_mtime_ns != mtime
        assert redone == (os.sep + "unlabeled" + os.sep in path), path


def test_chunk_equals_librosa_and_equations(tables):
    from dec_ray.data.audio import load_audio
    out, _ = tables
    t = _table(out, "dev").slice(0, 2)
    for i in range(2):
        path = t["path"][i].as_py()
        mel = mel_spectrogram(load_audio(path))
        assert t["num_frames"][i].as_py() == mel.shape[0]
        expected = make_chunks(mel).astype(np.float16)
        got = t["chunks"].combine_chunks().to_numpy_ndarray()[i]
        np.testing.assert_array_equal(got, expected)
        step = (mel.shape[0] - 62) // 10
        np.testing.assert_array_equal(got[10], mel[10 * step:10 * step + 62].astype(np.float16))


def test_stats_come_from_train_only(tables, corpus):
    from dec_ray.data.audio import load_audio
    out, _ = tables
    stats = json.load(open(os.path.join(out, "stats.json")))
    items, _ = read_msp_podcast(corpus)
    train = [it for it in items if it.split == "train"]
    frames = np.concatenate([mel_spectrogram(load_audio(it.path)) for it in train]).astype(np.float64)
    np.testing.assert_allclose(stats["feat_mean"], frames.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats["feat_std"], frames.std(0), rtol=1e-5, atol=1e-9)
    assert stats["num_train_frames"] == len(frames) and stats["num_train_sentences"] == len(train)
    # the log-mel input's statistics: the log of the stored (float16) power, as training reads it
    logs = np.log(frames.astype(np.float16).astype(np.float32) + np.float32(1e-10)).astype(np.float64)
    np.testing.assert_allclose(stats["log_mean"], logs.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stats["log_std"], logs.std(0), rtol=1e-5, atol=1e-6)
    assert np.isclose(stats["label_mean"]["arousal"], np.mean([it.arousal for it in train]), atol=1e-5)
    assert np.isclose(stats["label_std"]["valence"], np.std([it.valence for it in train]), atol=1e-5)


def test_bad_files_are_rejected_and_the_rest_completes(tables):
    out, summary = tables
    rej = pq.read_table(os.path.join(out, "rejects.parquet")).to_pylist()
    by_name = {os.path.basename(r["path"]): r["reason"] for r in rej}
    assert by_name["corrupt.wav"].startswith("unreadable")
    assert by_name["empty.wav"].startswith(("unreadable", "empty"))
    assert by_name["silent.wav"].startswith("silent")
    assert by_name["tiny_0p1s.wav"].startswith("too short")
    assert summary.rejects == 4
    names = set(_table(out, "unlabeled", ["path"])["path"].to_pylist())
    for ok in ("stereo44k_24bit.wav", "rate8k.flac", "short_0p5s.wav"):
        assert any(n.endswith(ok) for n in names)


def test_cli_exit_status_reports_rejects(tables, tmp_path, corpus, odd_files, ray_local):
    from dec_ray.cli import main
    out = str(tmp_path / "t")
    assert main(["ingest", "--corpus", corpus, "--unlabeled", odd_files, "--out", out]) == 1
    assert main(["ingest", "--corpus", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2


def _same_command(corpus, odd_files):
    return corpus, [os.path.join(corpus, "Unlabeled"), odd_files]


def test_rerun_verifies_what_it_finds(tables, copy_tree, capsys, corpus, odd_files, ray_local):
    src, _ = tables
    out = copy_tree(src)
    corpus_arg, unlabeled = _same_command(corpus, odd_files)
    cfg = load_config(None, ["ingest.min_parts_per_split=3"])
    # a kill: one finished part and its sidecar gone, a temp file lingers; a dev part truncated
    victim = split_files(out, "train")[0]
    name = os.path.basename(victim)
    os.remove(victim)
    os.remove(os.path.join(out, "_meta", "train", name.replace(".parquet", ".json")))
    open(os.path.join(out, "train", "." + name + ".tmp"), "w").write("partial")
    truncated = split_files(out, "dev")[0]
    data = open(truncated, "rb").read()
    open(truncated, "wb").write(data[: len(data) // 2])
    keep = {p: os.path.getmtime(p) for p in split_files(out, "test")}
    summary = run_ingest(corpus_arg, out, cfg, unlabeled)
    assert "2 to write" in capsys.readouterr().out
    assert is_complete(out) and os.path.exists(victim) and os.path.getsize(truncated) == len(data)
    assert all(os.path.getmtime(p) == t for p, t in keep.items())
    assert summary.rows == json.load(open(os.path.join(src, "_SUCCESS")))["rows"]
    # another corpus, other unlabeled folders or other features into the same output: refused,
    # and the finished output keeps its marker
    with pytest.raises(ValueError, match="other feature settings"):
        run_ingest(corpus_arg, out, load_config(None, ["features.n_mels=64"]), unlabeled)
    with pytest.raises(ValueError, match="other inputs"):
        run_ingest(corpus_arg, out, cfg, unlabeled[:1])
    assert is_complete(out)


def test_a_truncated_train_part_loses_the_marker_until_repaired(tables, copy_tree, corpus, odd_files, ray_local):
    src, _ = tables
    out = copy_tree(src)
    part = split_files(out, "train")[-1]
    open(part, "r+b").truncate(100)
    from dec_ray.service.ingest import part_is_valid
    plan = json.load(open(os.path.join(out, "plan.json")))
    bad = [p for p in plan["parts"] if not part_is_valid(out, p, plan["features"])]
    assert [os.path.join(out, p["split"], p["name"]) for p in bad] == [part]
    corpus_arg, unlabeled = _same_command(corpus, odd_files)
    run_ingest(corpus_arg, out, load_config(None, ["ingest.min_parts_per_split=3"]), unlabeled)
    assert is_complete(out) and pq.ParquetFile(part).metadata.num_rows > 0


def test_an_added_file_is_ingested_on_rerun(corpus, tmp_path, ray_local):
    import shutil
    unl = tmp_path / "unl[1]"                     # brackets: a folder name, not a glob pattern
    unl.mkdir()
    files = sorted(os.listdir(os.path.join(corpus, "Unlabeled")))
    for f in files[:2]:
        shutil.copy(os.path.join(corpus, "Unlabeled", f), unl / f)
    out = str(tmp_path / "tables")
    cfg = load_config(None, ["ingest.min_parts_per_split=2"])
    assert run_ingest(None, out, cfg, [str(unl)]).rows["unlabeled"] == 2
    shutil.copy(os.path.join(corpus, "Unlabeled", files[2]), unl / "ADDED.WAV")   # upper-case extension
    assert run_ingest(None, out, cfg, [str(unl)]).rows["unlabeled"] == 3
    assert len(split_files(out, "unlabeled")) == 2      # re-planned: no stale part left behind


def test_plan_sizes_each_split_on_its_own():
    """An empty or small split must not shrink the parts of the next one (a part per file)."""
    from dec_ray.data.corpus import Item
    from dec_ray.service.ingest import make_plan
    items = [Item(f"/a/u{i:04d}.wav", "unlabeled", f"u{i}") for i in range(1000)]
    items += [Item(f"/a/d{i}.wav", "dev", f"d{i}", arousal=4.0) for i in range(3)]
    plan = make_plan(items, per_part=300, min_parts=8)
    sizes = {s: [len(p["items"]) for p in plan["parts"] if p["split"] == s] for s in ("dev", "unlabeled")}
    assert sizes["dev"] == [1, 1, 1]
    assert sizes["unlabeled"] == [125] * 8
    ids = [it["row_id"] for p in plan["parts"] for it in p["items"]]
    assert sorted(ids) == list(range(1003))
