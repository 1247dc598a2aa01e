"""Ingest on real files with Ray Data: chunks, stats, rejects, resume."""
import json
import os

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from dec_ray.config import load_config
from dec_ray.corpus import read_msp_podcast
from dec_ray.features import make_chunks, mel_spectrogram
from dec_ray.ingest import is_complete, run_ingest, split_files


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


def test_chunk_equals_librosa_and_equations(tables):
    from dec_ray.audio import load_audio
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
    from dec_ray.audio import load_audio
    out, _ = tables
    stats = json.load(open(os.path.join(out, "stats.json")))
    items, _ = read_msp_podcast(corpus)
    train = [it for it in items if it.split == "train"]
    frames = np.concatenate([mel_spectrogram(load_audio(it.path)) for it in train]).astype(np.float64)
    np.testing.assert_allclose(stats["feat_mean"], frames.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats["feat_std"], frames.std(0), rtol=1e-5, atol=1e-9)
    assert stats["num_train_frames"] == len(frames) and stats["num_train_sentences"] == len(train)
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


def test_resume_after_interruption(tables, copy_tree, capsys, ray_local):
    src, _ = tables
    out = copy_tree(src)
    # simulate a kill: the success marker, one finished part and its sidecar are gone, a temp file lingers
    os.remove(os.path.join(out, "_SUCCESS"))
    victim = split_files(out, "train")[0]
    name = os.path.basename(victim)
    os.remove(victim)
    os.remove(os.path.join(out, "_meta", "train", name.replace(".parquet", ".json")))
    open(os.path.join(out, "train", "." + name + ".tmp"), "w").write("partial")
    assert not is_complete(out)
    keep = {p: os.path.getmtime(p) for p in split_files(out, "dev")}
    summary = run_ingest(None, out, load_config(None, ["ingest.min_parts_per_split=3"]))
    assert "1 to write" in capsys.readouterr().out
    assert is_complete(out) and os.path.exists(victim)
    assert all(os.path.getmtime(p) == t for p, t in keep.items())
    assert summary.rows == json.load(open(os.path.join(src, "_SUCCESS")))["rows"]
    with pytest.raises(ValueError, match="other feature settings"):
        run_ingest(None, out, load_config(None, ["features.n_mels=64"]))


def test_plan_sizes_each_split_on_its_own():
    """An empty or small split must not shrink the parts of the next one (a part per file)."""
    from dec_ray.corpus import Item
    from dec_ray.ingest import make_plan
    items = [Item(f"/a/u{i:04d}.wav", "unlabeled", f"u{i}") for i in range(1000)]
    items += [Item(f"/a/d{i}.wav", "dev", f"d{i}", arousal=4.0) for i in range(3)]
    plan = make_plan(items, per_part=300, min_parts=8)
    sizes = {s: [len(p["items"]) for p in plan["parts"] if p["split"] == s] for s in ("dev", "unlabeled")}
    assert sizes["dev"] == [1, 1, 1]
    assert sizes["unlabeled"] == [125] * 8
    ids = [it["row_id"] for p in plan["parts"] for it in p["items"]]
    assert sorted(ids) == list(range(1003))
