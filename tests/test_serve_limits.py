"""`dec-ray serve` under hostile requests, over real HTTP to a real Serve deployment: bounded
requests answered before any decoding, back-pressure instead of a pile-up, batches larger than
Serve's default of 5, multipart uploads, and the Serve config the repository ships, deployed as
`serve run` deploys it and reconfigured on the running replica."""
import io
import os
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.dataset as pads
import pytest
import requests
import soundfile as sf
import yaml

from dec_ray.config import ServeConfig
from dec_ray.data.tables import split_files
from dec_ray.report.inference import Predictor
from dec_ray.service.cluster import free_port

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVE_CONFIG = os.path.join(ROOT, "jobs", "serve", "config.yaml")


def audio(y: np.ndarray, sr: int, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, y, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def noise(seconds: float, sr: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    y = np.random.default_rng(seed).normal(size=(int(seconds * sr), channels)) * 0.1
    return y[:, 0] if channels == 1 else y


def post(url, body, headers=None, timeout=60):
    """(status, JSON answer, seconds)."""
    t = time.perf_counter()
    r = requests.post(url, data=body, headers=headers or {}, timeout=timeout)
    answer = r.json() if r.headers.get("content-type") == "application/json" else r.text     # Serve's own 503 is text
    return r.status_code, answer, time.perf_counter() - t


@pytest.fixture
def test_clips(tables):
    return sorted(pads.dataset(split_files(tables[0], "test"), format="parquet").to_table(columns=["path"])
                  ["path"].to_pylist())


def test_hostile_requests_are_refused_before_decoding_and_the_replica_goes_on(speaker_run, test_clips, ray_local):
    """Hostile requests: a 1 Hz header (x16,000 when resampled: 8.4 s before), a body over the
    cap (with and without Content-Length), a header longer than the cap, a header that claims more
    data than there is, 16 channels at 192 kHz, a truncated FLAC, a two-file form; then a flood of
    such requests beside good ones, which all get predict's numbers."""
    from dec_ray.service.serve import run_serve, stop
    limits = ServeConfig(max_body_mb=4.0, max_duration_s=20.0)
    port = free_port()
    run_serve(speaker_run, port=port, blocking=False, name="hostile", settings=limits)
    url = f"http://127.0.0.1:{port}/"
    good = [open(p, "rb").read() for p in test_clips[:6]]
    want = {i: Predictor(speaker_run).predict_file(p)["arousal"] for i, p in enumerate(test_clips[:6])}
    y, sr = sf.read(test_clips[0])
    flac = audio(y, sr, "FLAC")
    one_hz = audio(noise(1.0, 16000)[:4000], 1)
    lying = bytearray(audio(noise(0.5, 16000), 16000))
    at = lying.find(b"data")
    lying[at + 4:at + 8] = struct.pack("<I", 0x7FFFFF00)          # a data chunk of 2 GB, 16 KB sent
    hostile = {                                                   # name: (body, status)
        "1 Hz header": (one_hz, 422),
        "body over the cap": (b"\0" * (5 * 2 ** 20), 413),
        "25 s at 8 kHz (cap 20 s)": (audio(noise(25, 8000), 8000), 422),
        "truncated flac": (flac[: len(flac) // 2], 422),
        "192 kHz": (audio(noise(0.5, 192000), 192000), 200),
        "4 kHz": (audio(noise(1.0, 4000), 4000), 422),
        "not audio": (os.urandom(4096), 415),
    }
    try:
        for name, (body, status) in hostile.items():
            code, got, seconds = post(url, body)
            assert code == status and (code == 200 or got["error"]), (name, code, got)
            if code != 200:
                assert seconds < 3, (name, seconds)               # refused from the header, not after decoding
        code, got, _ = post(url, bytes(lying))                    # libsndfile reads the data that is there
        assert code == 200 and np.isfinite(got["arousal"])
        code, got, _ = post(url, audio(noise(0.5, 192000, 16), 192000))     # 16 channels at 192 kHz: 3 MB
        assert code == 200 and np.isfinite(got["arousal"]), got
        code, got, _ = post(url, iter([b"\0" * 2 ** 20] * 5))     # chunked: no Content-Length
        assert code == 413, got
        files = {"a": ("a.wav", good[0]), "b": ("b.wav", good[1])}
        assert requests.post(url, files=files, timeout=60).status_code == 400      # which file to score?
        # a flood of bad requests beside good ones: every good one answers with predict's numbers
        bodies = [(None, b) for b, status in hostile.values() if status != 200] * 6 + [(i, good[i]) for i in range(6)] * 2
        order = np.random.default_rng(0).permutation(len(bodies))
        with ThreadPoolExecutor(16) as ex:
            answers = list(ex.map(lambda j: (bodies[j][0], post(url, bodies[j][1])), order))
        for i, (code, got, _) in answers:
            if i is None:
                assert 400 <= code < 500 and got["error"], (code, got)
            else:
                assert code == 200 and abs(got["arousal"] - want[i]) < 1e-4, (code, got)
    finally:
        stop()


def test_uploads_as_multipart_form_or_raw_body_get_the_same_answer(speaker_run, test_clips, ray_local):
    from dec_ray.service.serve import run_serve, stop
    port = free_port()
    run_serve(speaker_run, port=port, blocking=False, name="forms")
    url = f"http://127.0.0.1:{port}/"
    try:
        body = open(test_clips[0], "rb").read()
        raw = requests.post(url, data=body, timeout=60)
        form = requests.post(url, files={"file": ("clip.flac", body)}, timeout=60)       # curl -F file=@clip.flac
        assert raw.status_code == form.status_code == 200
        assert abs(raw.json()["arousal"] - form.json()["arousal"]) < 1e-6
        assert requests.get(url, timeout=60).status_code == 405
    finally:
        stop()


def test_back_pressure_answers_503_instead_of_piling_up(speaker_run, test_clips, ray_local):
    """A replica holding one request with one more queued: of 12 at once, the rest get 503 at once,
    and every request answers."""
    from dec_ray.service.serve import run_serve, stop
    port = free_port()
    tight = ServeConfig(max_batch_size=1, ongoing_batches=1, queue_batches=1)
    run_serve(speaker_run, port=port, blocking=False, name="pressure", settings=tight)
    url = f"http://127.0.0.1:{port}/"
    body = open(test_clips[0], "rb").read()
    try:
        assert post(url, body)[0] == 200
        start = threading.Barrier(12)

        def one(_):
            start.wait()
            return post(url, body)

        with ThreadPoolExecutor(12) as ex:
            codes = [c for c, _, _ in ex.map(one, range(12))]
        assert set(codes) == {200, 503} and codes.count(200) >= 2, codes
    finally:
        stop()


def shipped_config(run: str, port: int, **user_config) -> dict:
    cfg = yaml.safe_load(open(SERVE_CONFIG))
    cfg["http_options"] = {**cfg.get("http_options", {}), "host": "127.0.0.1", "port": port}
    (application,) = cfg["applications"]
    application["args"]["run"] = run
    (deployment,) = application["deployments"]
    deployment["user_config"] = {**deployment["user_config"], **user_config}
    return cfg


def batch_sizes(handle) -> dict:
    return handle.batch_sizes.remote().result()


def test_the_shipped_serve_config_deploys_batches_beyond_5_and_reconfigures_a_running_replica(
        speaker_run, test_clips, ray_local, tmp_path):
    """jobs/serve/config.yaml, run as `serve run CONFIG --non-blocking` runs it (Serve's own CLI),
    with the run and the port replaced: 16 requests at once make batches larger than Serve's
    default of 5 ongoing requests allowed; a new user_config (batches of 2) reaches the same replica
    without a restart."""
    from click.testing import CliRunner
    from ray import serve
    from ray.serve.scripts import cli
    from dec_ray.service.serve import stop
    port = free_port()
    path = tmp_path / "serve.yaml"
    bodies = [open(p, "rb").read() for p in test_clips[:16]]
    url = f"http://127.0.0.1:{port}/"

    def deploy(**user_config):
        path.write_text(yaml.safe_dump(shipped_config(speaker_run, port, **user_config)))
        result = CliRunner().invoke(cli, ["run", str(path), "--non-blocking"])
        assert result.exit_code == 0, result.output
        deadline = time.time() + 180
        while time.time() < deadline:
            status = serve.status().applications.get("dec_ray")
            if status is not None and status.status == "RUNNING":
                return serve.get_app_handle("dec_ray")
            time.sleep(0.5)
        raise AssertionError(f"not running: {serve.status()}")

    def at_once(n):
        start = threading.Barrier(n)

        def one(i):
            start.wait()
            r = requests.post(url, data=bodies[i % len(bodies)], timeout=120)
            return r.status_code, r.headers.get("X-Replica")

        with ThreadPoolExecutor(n) as ex:
            return list(ex.map(one, range(n)))

    try:
        handle = deploy(batch_wait_timeout_s=2.0)          # a batch closes when full or after 2 s
        answers = at_once(16)
        assert all(code == 200 for code, _ in answers), answers
        sizes = batch_sizes(handle)
        assert max(sizes) > 5, sizes
        handle = deploy(batch_wait_timeout_s=0.5, max_batch_size=2)
        answers2 = at_once(8)
        assert all(code == 200 for code, _ in answers2)
        assert {r for _, r in answers2} == {r for _, r in answers}              # reconfigured, not restarted
        after = batch_sizes(handle)
        assert {k: after.get(k, 0) - sizes.get(k, 0) for k in after if k > 2 and after[k] != sizes.get(k, 0)} == {}
        assert sum(after.values()) > sum(sizes.values())
    finally:
        stop()


def test_the_rayservice_serves_the_shipped_config():
    """jobs/kuberay/rayservice.yaml's Serve application is jobs/serve/config.yaml's (the run's path and
    the GPU aside), and its deployment options are those the batch size implies."""
    from ray.serve.schema import ServeDeploySchema
    shipped = yaml.safe_load(open(SERVE_CONFIG))
    ServeDeploySchema.model_validate(shipped)
    svc = next(d for d in yaml.safe_load_all(open(os.path.join(ROOT, "jobs", "kuberay", "rayservice.yaml")))
               if d["kind"] == "RayService")
    kube = yaml.safe_load(svc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(kube)
    for cfg in (shipped, kube):
        (application,) = cfg["applications"]
        (d,) = application["deployments"]
        s = ServeConfig(**d["user_config"])
        assert d["max_ongoing_requests"] == s.max_ongoing_requests and d["max_queued_requests"] == s.max_queued_requests
        assert "num_replicas" not in d and d["autoscaling_config"]["max_replicas"] > d["autoscaling_config"]["min_replicas"]
    a, b = (c["applications"][0] for c in (shipped, kube))
    strip = lambda app: {**app, "args": {k: v for k, v in app["args"].items() if k not in ("run", "gpu")}}  # noqa: E731
    assert strip(a) == strip(b)
