"""`dec-ray serve`: real HTTP requests to a Ray Serve deployment on the local Ray give
`dec-ray predict`'s numbers; bad audio gets a 4xx and the replica goes on; the Python handle
composes."""
import io
import json
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pyarrow.dataset as pads
import pytest
import soundfile as sf

from dec_ray.data.tables import split_files
from dec_ray.report.inference import Predictor
from dec_ray.service.cluster import free_port

pytestmark = pytest.mark.slow


def post(url: str, body: bytes, method: str = "POST", headers=None, replica: bool = False):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            out = r.status, json.loads(r.read()), r.headers.get("X-Replica")
    except urllib.error.HTTPError as e:
        out = e.code, json.loads(e.read()), e.headers.get("X-Replica")
    return out if replica else out[:2]


def wav_bytes(y: np.ndarray, sr: int, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, y, sr, format=fmt)
    return buf.getvalue()


def test_serving_over_http_gives_predicts_numbers_and_4xx_on_bad_audio(tables, trained_runs, ray_local):
    from ray import serve
    from dec_ray.service.serve import BadAudio, run_serve
    run = trained_runs["deepemocluster"]
    port = free_port()
    handle = run_serve(run, replicas=1, port=port, route="/emotion", blocking=False)
    url = f"http://127.0.0.1:{port}/emotion"
    try:
        paths = sorted(pads.dataset(split_files(tables[0], "test"), format="parquet").to_table(columns=["path"])
                       ["path"].to_pylist())[:3]
        p = Predictor(run)
        for path in paths:
            status, got = post(url, open(path, "rb").read())
            want = p.predict_file(path)
            assert status == 200 and abs(got["arousal"] - want["arousal"]) < 1e-4 and got["cluster"] == want["cluster"]
        y, sr = sf.read(paths[0])
        stereo_flac = wav_bytes(np.stack([y, y], 1), sr, "FLAC")          # another format, two channels
        status, got = post(url + "?chunks=true", stereo_flac)
        assert status == 200 and len(got["chunks"]) == 11
        assert abs(np.mean([c["arousal"] for c in got["chunks"]]) - got["arousal"]) < 1e-4
        bad = {"empty": (b"", 400), "not audio": (b"RIFF....WAVEjunk" * 10, 415),
               "silent": (wav_bytes(np.zeros(16000), 16000), 422),
               "too short": (wav_bytes(np.random.default_rng(0).normal(size=800) * 0.1, 16000), 422),
               "20 channels": (wav_bytes(np.random.default_rng(0).normal(size=(16000, 20)) * 0.1, 16000), 422)}
        for what, (body, code) in bad.items():
            status, got = post(url, body)
            assert status == code and got["error"], (what, status, got)
        status, got = post(url, open(paths[0], "rb").read())          # the replica is still up
        assert status == 200
        out = handle.predict.remote(open(paths[1], "rb").read()).result()
        assert abs(out["arousal"] - p.predict_file(paths[1])["arousal"]) < 1e-4
        with pytest.raises(BadAudio):
            handle.predict.remote(b"").result()
        status, got = post(url, b"", method="GET")
        assert status == 405 and got["error"]
    finally:
        serve.shutdown()


def test_a_per_speaker_model_serves_each_speaker_with_its_statistics_on_any_replica(tables, speaker_run, tmp_path,
                                                                                    ray_local):
    """The recommended preset's normalisation served: a request names its speaker; once all of a
    speaker's clips are posted, posting them again gives `dec-ray predict --groups`'s numbers,
    whichever of 2 replicas answers (the statistics live in one store both read). Without a
    speaker: the population statistics, as `dec-ray predict` without groups. DELETE forgets."""
    import pandas as pd
    from dec_ray.service.batch_predict import run_predict
    from dec_ray.service.serve import stop, run_serve
    test = pads.dataset(split_files(tables[0], "test"), format="parquet").to_table(
        columns=["path", "speaker"]).to_pandas().sort_values("path")
    pd.DataFrame({"path": test["path"], "speaker": test["speaker"]}).to_csv(tmp_path / "spk.csv", index=False)
    run_predict(speaker_run, list(test["path"]), str(tmp_path / "g.csv"), actors=1, groups=str(tmp_path / "spk.csv"))
    grouped = pd.read_csv(tmp_path / "g.csv").set_index("path")["arousal"]
    run_predict(speaker_run, list(test["path"]), str(tmp_path / "p.csv"), actors=1)
    population = pd.read_csv(tmp_path / "p.csv").set_index("path")["arousal"]
    port = free_port()
    handle = run_serve(speaker_run, replicas=2, port=port, route="/", blocking=False, name="speakers")
    url = f"http://127.0.0.1:{port}/"
    try:
        replicas, answers = set(), {}
        for rnd in range(2):
            for path, spk in zip(test["path"], test["speaker"]):
                q = f"?speaker={urllib.parse.quote(spk)}"
                status, got, replica = post(url + q, open(path, "rb").read(), replica=True)
                assert status == 200 and got["normalization"] == "speaker" and got["speaker"] == spk, got
                replicas.add(replica)
                answers[path] = got
        assert len(replicas) == 2                          # both replicas answered
        for path, spk in zip(test["path"], test["speaker"]):
            assert answers[path]["speaker_clips"] == int((test["speaker"] == spk).sum())   # each clip counted once
            assert abs(answers[path]["arousal"] - grouped[path]) < 1e-3, (path, answers[path], grouped[path])
        path = test["path"].iloc[0]
        status, got = post(url, open(path, "rb").read(), headers={})
        assert status == 200 and got["normalization"] == "population" and "speaker" not in got
        assert abs(got["arousal"] - population[path]) < 1e-4
        spk = test["speaker"].iloc[0]
        status, got = post(url, open(path, "rb").read(), headers={"X-Speaker": spk})
        assert status == 200 and got["speaker_clips"] == int((test["speaker"] == spk).sum())   # the header names it too
        status, got = post(url + f"speakers/{urllib.parse.quote(spk)}", b"", method="DELETE")
        assert status == 200 and got == {"speaker": spk, "forgotten": True}
        status, got = post(url + f"?speaker={urllib.parse.quote(spk)}", open(path, "rb").read())
        assert got["speaker_clips"] == 1                          # forgotten: it starts again
        out = handle.predict.remote(open(path, "rb").read(), speaker=spk).result()
        assert out["speaker_clips"] == 1 and out["normalization"] == "speaker"     # the same clip: counted once
        status, got = post(url + "?speaker=" + "x" * 300, open(path, "rb").read())
        assert status == 400
    finally:
        stop()


def test_the_speaker_store_keeps_at_most_its_cap_least_recently_used_out(ray_local):
    import ray
    from dec_ray.data.groups import Moments
    from dec_ray.service.serve import SpeakerStore
    store = SpeakerStore.remote(2)
    one = [Moments(1, np.ones(4), np.ones(4))]
    for spk in ("a", "b", "a", "c"):                  # "b" is the least recently used when "c" arrives
        ray.get(store.add.remote(spk, spk, one))
    assert ray.get(store.count.remote()) == 2
    assert not ray.get(store.forget.remote("b")) and ray.get(store.forget.remote("a"))
    ray.kill(store)


def test_traffic_population_takes_over_once_enough_clips_were_served(tables, speaker_run, ray_local):
    """--population traffic: requests without a speaker read the run's population until
    min_traffic_clips distinct clips were served, then those clips as one group (a clip posted again
    counted once); with all test clips served, the answers are those of the test clips as one group."""
    from ray import serve
    from dec_ray.report.inference import Predictor
    from dec_ray.service.serve import EmotionModel, stop
    paths = sorted(pads.dataset(split_files(tables[0], "test"), format="parquet").to_table(columns=["path"])
                   ["path"].to_pylist())[:4]
    handle = serve.run(EmotionModel.bind(speaker_run, "cpu", 100, "traffic", 3), name="traffic", route_prefix=None)
    try:
        got = [handle.predict.remote(open(p, "rb").read()).result() for p in paths[:2] + paths[:1]]
        assert [g["normalization"] for g in got] == ["population"] * 3 and got[-1]["traffic_clips"] == 2
        got = [handle.predict.remote(open(p, "rb").read()).result() for p in paths[2:] + paths]
        assert [g["normalization"] for g in got] == ["traffic"] * 6 and got[-1]["traffic_clips"] == 4
        p = Predictor(speaker_run)
        chunks = np.stack([p.file_chunks(x) for x in paths])
        want = p.predict_chunks(chunks, ["all"] * 4)
        assert np.allclose([g["arousal"] for g in got[2:]], [w["arousal"] for w in want], atol=1e-4)
    finally:
        stop()


def test_a_model_with_functionals_serves_what_it_measured(tables, fused_run, tmp_path, ray_local):
    """The recommended model with the eGeMAPS functionals joined (model.functionals=egemaps): once
    all of a test speaker's clips were posted with their speaker, the service answers what
    `dec-ray predict --groups` answers and what the run scored on test (its test_predictions, the
    numbers its results rest on); a clip without a speaker gets `dec-ray predict`'s population answer."""
    import pandas as pd
    from dec_ray.service.batch_predict import run_predict
    from dec_ray.service.serve import run_serve, stop
    test = pads.dataset(split_files(tables[0], "test"), format="parquet").to_table(
        columns=["path", "speaker"]).to_pandas().sort_values("path")
    pd.DataFrame({"path": test["path"], "speaker": test["speaker"]}).to_csv(tmp_path / "spk.csv", index=False)
    run_predict(fused_run, list(test["path"]), str(tmp_path / "g.csv"), actors=1, groups=str(tmp_path / "spk.csv"))
    grouped = pd.read_csv(tmp_path / "g.csv").set_index("path")["arousal"]
    measured = pd.read_parquet(f"{fused_run}/test_predictions.parquet").set_index("path")["pred_arousal"]
    assert np.allclose(grouped.loc[test["path"]], measured.loc[test["path"]], atol=1e-4)
    population = Predictor(fused_run).predict_file(test["path"].iloc[0])
    port = free_port()
    run_serve(fused_run, replicas=1, port=port, route="/", blocking=False, name="fused")
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(2):
            answers = {p: post(url + f"?speaker={urllib.parse.quote(s)}", open(p, "rb").read())
                       for p, s in zip(test["path"], test["speaker"])}
        assert all(status == 200 and got["normalization"] == "speaker" for status, got in answers.values())
        served = np.array([answers[p][1]["arousal"] for p in test["path"]])
        assert np.allclose(served, measured.loc[test["path"]], atol=1e-3), (served, measured)
        status, got = post(url, open(test["path"].iloc[0], "rb").read())
        assert status == 200 and got["normalization"] == "population"
        assert abs(got["arousal"] - population["arousal"]) < 1e-4
    finally:
        stop()
