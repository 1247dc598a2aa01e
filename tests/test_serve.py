"""`dec-ray serve`: real HTTP requests to a Ray Serve deployment on the local Ray give
`dec-ray predict`'s numbers; bad audio gets a 4xx and the replica goes on; the Python handle
composes."""
import io
import json
import urllib.error
import urllib.request

import numpy as np
import pyarrow.dataset as pads
import pytest
import soundfile as sf

from dec_ray.data.tables import split_files
from dec_ray.report.inference import Predictor
from dec_ray.service.cluster import free_port

pytestmark = pytest.mark.slow


def post(url: str, body: bytes):
    req = urllib.request.Request(url, data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


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
    finally:
        serve.shutdown()
