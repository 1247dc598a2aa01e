"""`dec-ray serve`: a trained run as a Ray Serve deployment.

HTTP: POST the bytes of an audio file (wav, flac, ogg; any rate, any channel count up to 16) to
the route; the answer is JSON with the run's attributes on the 1..7 scale (and the cluster, for
DeepEmoCluster); ``?chunks=true`` adds each chunk's values. Bad audio gets a 4xx with the reason
and the replica goes on: 400 empty body, 415 not audio, 422 audio that cannot become features
(silent, too short, too many channels). Requests are batched with Serve's ``@serve.batch``: one
forward pass for the waiting requests. The same deployment is a Python handle for composition:
``handle.predict.remote(audio_bytes)``. Decoding, features and normalisation are the Predictor's,
so the numbers are `dec-ray predict`'s. A per-speaker model (``model.norm: speaker``) normalises
each request with its own statistics: a request is one file, a group of one.
"""
from __future__ import annotations

import io
import os
from typing import Dict, List, Optional

import numpy as np
import soundfile as sf
from ray import serve

from dec_ray.data.audio import MAX_CHANNELS, AudioError, prepare_signal
from dec_ray.data.features import ShortClipError

MAX_BATCH = 16
BATCH_WAIT_S = 0.01


class BadAudio(Exception):
    """A request the model cannot score: ``status`` is the HTTP status, str(e) the reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(status, reason)          # both in args: the handle's caller unpickles it
        self.status, self.reason = status, reason

    def __str__(self) -> str:
        return self.reason


def decode(body: bytes, predictor) -> np.ndarray:
    """Request bytes -> the sentence's raw chunks, or BadAudio."""
    if not body:
        raise BadAudio(400, "empty request: POST the bytes of an audio file (wav, flac, ogg)")
    try:
        data, sr = sf.read(io.BytesIO(body), dtype="float32", always_2d=True)
    except Exception as e:                       # soundfile's errors for bytes that are no audio
        raise BadAudio(415, f"not audio soundfile can read: {str(e).splitlines()[0][:160]}")
    if data.shape[1] > MAX_CHANNELS:
        raise BadAudio(422, f"{data.shape[1]} channels: at most {MAX_CHANNELS}")
    f = predictor.cfg.features
    try:
        y = prepare_signal(data, sr, f.sample_rate, f.silence_peak, f.min_duration_s)
        return predictor.chunks_of(y)
    except (AudioError, ShortClipError) as e:
        raise BadAudio(422, str(e))


@serve.deployment(ray_actor_options={"num_cpus": 1})
class EmotionModel:
    """One replica: the run's model on this replica's device."""

    def __init__(self, run: str, device: str = "cpu"):
        from dec_ray.report.inference import Predictor
        self.predictor = Predictor(run, device)

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _scored(self, chunks: List[np.ndarray]) -> List[Dict]:
        """The waiting requests' sentences in one forward pass (each its own group)."""
        return self.predictor.predict_chunks(np.stack(chunks), groups=[str(i) for i in range(len(chunks))],
                                             per_chunk=True)

    async def predict(self, body: bytes, per_chunk: bool = False) -> Dict:
        """The handle's API: audio file bytes -> the prediction (raises BadAudio)."""
        out = dict(await self._scored(decode(body, self.predictor)))
        if not per_chunk:
            out.pop("chunks")
        if out.get("cluster", -1) < 0:
            out.pop("cluster", None)
        return out

    async def __call__(self, request):
        from starlette.responses import JSONResponse
        per_chunk = request.query_params.get("chunks", "").lower() in ("1", "true", "yes")
        try:
            return JSONResponse(await self.predict(await request.body(), per_chunk))
        except BadAudio as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)


def app(run: str, replicas: int = 1, gpu: bool = False):
    """The bound application (``serve.run(app(...))``; also what a RayService's import path names)."""
    return EmotionModel.options(num_replicas=replicas,
                                ray_actor_options={"num_cpus": 0 if gpu else 1, "num_gpus": 1 if gpu else 0}
                                ).bind(os.path.abspath(run), "cuda" if gpu else "cpu")


def build_app(args: Dict) -> "serve.Application":
    """The application builder a Serve config names (``import_path: dec_ray.service.serve:build_app``,
    jobs/kuberay/rayservice.yaml): args ``run``, ``replicas`` (1), ``gpu`` (false)."""
    gpu = str(args.get("gpu", False)).lower() in ("1", "true", "yes")
    return app(args["run"], int(args.get("replicas", 1)), gpu)


def run_serve(run: str, replicas: int = 1, gpu: bool = False, port: int = 8000, route: str = "/",
              host: str = "127.0.0.1", blocking: bool = True, name: str = "dec_ray"):
    """Start Serve on this Ray (joined or private) and deploy; returns the handle (``blocking``:
    serve until interrupted)."""
    from dec_ray.report.inference import model_file
    from dec_ray.service.cluster import ensure_ray
    model_file(os.path.abspath(run))
    ensure_ray()
    serve.start(http_options={"host": host, "port": port})
    handle = serve.run(app(run, replicas, gpu), name=name, route_prefix=route, blocking=False)
    url = f"http://{host}:{port}{route}"
    print(f"[dec-ray] serving {run} at {url} ({replicas} replica(s)); try: curl -X POST --data-binary "
          f"@clip.wav '{url}'", flush=True)
    if blocking:
        import time
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return handle


def stop(name: Optional[str] = None) -> None:
    serve.delete(name) if name else serve.shutdown()
