import numpy as np
import pytest
import soundfile as sf
import torch

from dec_ray.data.audio import AudioError, load_audio
from dec_ray.data.features import ShortClipError, chunk_starts, make_chunks, mel_spectrogram
from dec_ray.data.normalization import Stats


@pytest.mark.parametrize("T", [62, 63, 72, 100, 343, 688, 1000])
def test_chunk_positions_follow_the_equations(T):
    mel = np.arange(T * 128, dtype=np.float32).reshape(T, 128)
    chunks = make_chunks(mel)
    step = (T - 62) // 10
    assert chunks.shape == (11, 62, 128)
    for k in range(11):
        assert np.array_equal(chunks[k], mel[k * step:k * step + 62])
    assert list(chunk_starts(T)) == [k * step for k in range(11)]


def test_short_clip_policies():
    mel = np.random.rand(20, 128).astype(np.float32)
    rep = make_chunks(mel, short_clip_policy="repeat")
    assert rep.shape == (11, 62, 128)
    assert np.array_equal(rep[0][:20], mel) and np.array_equal(rep[0][20:40], mel)
    with pytest.raises(ShortClipError):
        make_chunks(mel, short_clip_policy="reject")


def test_mel_matches_librosa_directly(corpus):
    import glob
    import librosa
    path = sorted(glob.glob(f"{corpus}/Audios/*.wav"))[0]
    y = load_audio(path)
    ref, _ = librosa.load(path, sr=16000)
    ref = ref / np.abs(ref).max()
    for pad in ("reflect", "constant"):         # the official code's librosa 0.7, and librosa 0.11's default
        direct = librosa.feature.melspectrogram(y=ref, sr=16000, n_fft=512, hop_length=256, n_mels=128,
                                                pad_mode=pad).T
        ours = mel_spectrogram(y, pad_mode=pad)
        assert ours.shape == direct.shape and ours.shape[1] == 128
        np.testing.assert_allclose(ours, direct, rtol=1e-4, atol=1e-6)
    # the padding changes only the first and last frames (n_fft / 2 = 256 samples = one hop)
    diff = np.abs(mel_spectrogram(y) - mel_spectrogram(y, pad_mode="constant")).max(1)
    assert diff[0] > 0 and diff[-1] > 0 and not diff[2:-2].any()


def test_audio_loader_rates_channels_and_errors(tmp_path):
    t = np.arange(44100 * 2) / 44100
    tone = 0.3 * np.sin(2 * np.pi * 220 * t)
    sf.write(tmp_path / "st.wav", np.stack([tone, tone], 1), 44100, subtype="PCM_24")
    y = load_audio(str(tmp_path / "st.wav"))
    assert abs(len(y) - 32000) <= 2 and np.isclose(np.abs(y).max(), 1.0)
    sf.write(tmp_path / "silent.wav", np.zeros(16000), 16000)
    (tmp_path / "bad.wav").write_bytes(b"not audio at all")
    for name, reason in (("silent.wav", "silent"), ("bad.wav", "unreadable"), ("missing.wav", "missing")):
        with pytest.raises(AudioError, match=reason):
            load_audio(str(tmp_path / name))


def test_normalisation_zscore_nan_and_clip():
    s = Stats([1.0, 0.0], [2.0, 0.0], {"arousal": 4.0}, {"arousal": 1.0})
    z = s.normalize_features(np.array([[3.0, 5.0], [100.0, np.nan]], dtype=np.float32))
    assert np.allclose(z, [[1.0, 3.0], [3.0, 0.0]])
    y = np.array([[5.0], [3.0]], np.float32)
    assert np.allclose(s.denormalize_labels(s.normalize_labels(y, ["arousal"]), ["arousal"]), y)


@pytest.mark.parametrize("input", ["power", "logmel"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_device_normalisation_equals_the_numpy_reference(device, input):
    """The training loop normalises float16 chunks on the device: the same values as
    Stats.normalize_features, bit for bit, including NaN, +-inf, zero std and clipping."""
    rng = np.random.default_rng(0)
    mean, std = rng.uniform(0, 5, 128), rng.uniform(0.5, 3, 128)
    std[3] = 0.0                                              # a constant mel bin in Train
    s = Stats(mean.tolist(), std.tolist(), {"arousal": 4.0}, {"arousal": 1.0},
              log_mean=(mean - 3).tolist(), log_std=std.tolist())
    x = (rng.normal(2, 6, size=(40, 62, 128))).astype(np.float16)
    if input == "logmel":                                     # power is >= 0; 0 and tiny values too
        x = np.abs(x)
        x[1, 0, :3] = [0.0, 6e-8, 1e-3]
    x[0, 0, :4] = [np.nan, np.inf, -np.inf, 7.0]
    got = s.feature_normalizer(torch.device(device), input)(torch.from_numpy(x).to(device))
    assert got.dtype == torch.float32 and got.device.type == device
    if input == "power":
        np.testing.assert_array_equal(got.cpu().numpy(), s.normalize_features(x, input))
    else:                                   # torch's and numpy's log differ in the last bit
        np.testing.assert_allclose(got.cpu().numpy(), s.normalize_features(x, input), rtol=1e-6, atol=1e-6)
        z = (np.log(np.float32(7.0) + np.float32(1e-10)) - np.float32(mean[3] - 3)) / np.float32(std[3])
        assert np.isclose(got.cpu().numpy()[0, 0, 3], np.clip(z, -3, 3), atol=1e-6)


def test_the_log_mel_input_refuses_statistics_without_it():
    s = Stats([1.0], [2.0], {"arousal": 4.0}, {"arousal": 1.0})
    with pytest.raises(ValueError, match="ingest them again"):
        s.feature_normalizer(torch.device("cpu"), "logmel")


def test_per_speaker_statistics_read_audio_not_labels(tables, copy_tree):
    """model.norm=speaker: each group's inputs are z-scored with its own statistics, and those come
    from the chunks alone: the test speakers' labels, shuffled or removed, change nothing."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from dec_ray.data.groups import table_groups
    from dec_ray.data.tables import split_files
    out = tables[0]
    groups = table_groups(out, "logmel")
    assert any(n.startswith("<") for n in groups.moments.names) and len(groups.moments.names) >= 4
    t = pq.read_table(split_files(out, "test")[0], columns=["row_id", "chunks"])
    rows, chunks = t["row_id"].to_numpy(), t["chunks"].combine_chunks().to_numpy_ndarray()
    z = groups.normalize_rows(chunks, rows)
    keys = groups.keys_of(rows)
    own = z[keys == keys[0]].reshape(-1, z.shape[-1])
    whole = groups.moments.normalize(chunks, keys, "logmel")
    np.testing.assert_array_equal(z, whole)
    assert np.abs(own.mean(0)).max() < 0.2 and np.all(np.abs(z) <= 3)

    copy = copy_tree(out)
    rng = np.random.default_rng(0)
    for f in split_files(copy, "test"):
        tab = pq.read_table(f)
        for a in ("arousal", "valence", "dominance"):
            v = tab[a].to_numpy(zero_copy_only=False)
            tab = tab.set_column(tab.column_names.index(a), a, pa.array(rng.permutation(v) if a == "arousal"
                                                                       else np.full(len(v), np.nan)))
        pq.write_table(tab, f)
    again = table_groups(copy, "logmel")
    assert again.moments.names == groups.moments.names
    np.testing.assert_array_equal(again.moments.mean, groups.moments.mean)
    np.testing.assert_array_equal(again.moments.std, groups.moments.std)


def test_a_speaker_id_two_splits_share_is_two_groups(tables, copy_tree):
    """Per-speaker statistics within one split: a Test1 speaker given a Train speaker's ID (a
    speaker-dependent manifest, or a placeholder such as "Unknown") is its own group, and the
    statistics Train is normalised with do not move when that test audio is added. The population
    group is every Train sentence, and the moments add up exactly batch by batch."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from dec_ray.data.groups import POPULATION, Moments, table_groups
    from dec_ray.data.tables import split_files
    copy = copy_tree(tables[0])
    train = pq.read_table(split_files(copy, "train")[0], columns=["speaker"])
    shared = train["speaker"][0].as_py()
    for f in split_files(copy, "test"):
        tab = pq.read_table(f)
        tab = tab.set_column(tab.column_names.index("speaker"), "speaker", pa.array([shared] * tab.num_rows))
        pq.write_table(tab, f)
    alone = table_groups(copy, "power", ("train",))
    every = table_groups(copy, "power")
    assert f"train/{shared}" in every.moments.names and f"test/{shared}" in every.moments.names
    for name in (f"train/{shared}", POPULATION):
        for a, b in zip(alone.moments.of_group(name), every.moments.of_group(name)):
            np.testing.assert_array_equal(a, b)
    chunks = np.concatenate([pq.read_table(f, columns=["chunks"])["chunks"].combine_chunks().to_numpy_ndarray()
                             for f in split_files(copy, "train")])
    halves = Moments.of(chunks[:5], "power") + Moments.of(chunks[5:], "power")
    for a, b in zip(halves.mean_std(), Moments.of(chunks, "power").mean_std()):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    for a, b in zip(Moments.of(chunks, "power").mean_std(), every.moments.of_group(POPULATION)):
        np.testing.assert_allclose(a, b, rtol=1e-5)
