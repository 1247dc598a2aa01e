"""`dec-ray serve`: a trained run as a Ray Serve deployment.

HTTP: POST the bytes of an audio file (wav, flac, ogg; any rate, any channel count up to 16) to
the route; the answer is JSON with the run's attributes on the 1..7 scale (and the cluster, for
DeepEmoCluster) and ``normalization``: how the input was normalised. ``?chunks=true`` adds each
chunk's values. Bad audio gets a 4xx with the reason and the replica goes on: 400 empty body, 415
not audio, 422 audio that cannot become features (silent, too short, too many channels); 405 for
other methods. Requests are batched with Serve's ``@serve.batch``: one forward pass for the
waiting requests. The same deployment is a Python handle for composition:
``handle.predict.remote(audio_bytes, speaker="spk1")``. Decoding, features and normalisation are
the Predictor's, so the numbers are `dec-ray predict`'s.

Speakers: a per-speaker model (``model.norm: speaker``, the recommended preset) scores a request
that names its speaker (``?speaker=ID`` or the ``X-Speaker`` header) with that speaker's running
input statistics: every clip of the speaker posted so far, each counted once (by its bytes), this
one included (``speaker_clips`` says how many). Once all of a speaker's clips have been posted,
posting them again gives `dec-ray predict --groups`'s numbers for that speaker. The statistics live
in one ``SpeakerStore`` actor per application, which every replica reads, so the numbers do not
depend on the replica that answers; it keeps ``max_speakers`` speakers, least recently used out,
and ``DELETE /speakers/ID`` forgets one (voices are personal data). A request without a speaker
is normalised with the population statistics the run saved (its Train audio as one group), never
by itself; with ``population="traffic"``, once ``MIN_TRAFFIC_CLIPS`` clips were served without a
speaker, with those clips as one group (the deployment's own population: on held-out speakers it
scored above the Train population, README "What the service answers"; it follows whatever the
traffic is, so an answer depends on what was served before it). A Train-normalised model reads no
speaker (``normalization: train``).
"""
from __future__ import annotations

import hashlib
import io
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import numpy as np
import ray
import soundfile as sf
from ray import serve

from dec_ray.data.audio import MAX_CHANNELS, AudioError, prepare_signal
from dec_ray.data.features import ShortClipError
from dec_ray.data.groups import GroupMoments, Moments

MAX_BATCH = 16
BATCH_WAIT_S = 0.01
MAX_SPEAKERS = 10_000
POPULATIONS = ("train", "traffic")    # what a request without a speaker is normalised with
MIN_TRAFFIC_CLIPS = 30                # --population traffic: the run's population until this many clips
MAX_SPEAKER_ID = 256                  # characters
STORE_NAMESPACE = "dec_ray_serve"


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


@ray.remote(num_cpus=0)
class SpeakerStore:
    """Each named speaker's running input statistics (``Moments``) and the digests of the clips
    they rest on, for every replica of one application; at most ``max_speakers``, least recently
    used out."""

    def __init__(self, max_speakers: int = MAX_SPEAKERS):
        self.max_speakers = max_speakers
        self.speakers: "OrderedDict[str, Tuple[Moments, set]]" = OrderedDict()
        self.traffic: Tuple[Optional[Moments], set] = (None, set())     # --population traffic

    @staticmethod
    def _added(entry, digest: str, n: int, s: np.ndarray, ss: np.ndarray, max_digests: int = 100_000):
        moments, digests = entry
        if digest not in digests:
            clip = Moments(n, s, ss)
            moments = clip if moments is None else moments + clip
            if len(digests) < max_digests:
                digests.add(digest)
        return moments, digests

    def add(self, speaker: str, digest: str, n: int, s: np.ndarray, ss: np.ndarray):
        """Count this clip (once: a clip posted again is not counted twice); returns the speaker's
        (mean, std, clips)."""
        moments, digests = self._added(self.speakers.pop(speaker, (None, set())), digest, n, s, ss)
        self.speakers[speaker] = (moments, digests)
        while len(self.speakers) > self.max_speakers:
            self.speakers.popitem(last=False)
        return (*moments.mean_std(), len(digests))

    def add_traffic(self, digest: str, n: int, s: np.ndarray, ss: np.ndarray):
        """The same for the clips served without a speaker, as one group (a clip posted again is
        counted once, up to 100,000 clips remembered)."""
        self.traffic = self._added(self.traffic, digest, n, s, ss)
        return (*self.traffic[0].mean_std(), len(self.traffic[1]))

    def forget(self, speaker: str) -> bool:
        return self.speakers.pop(speaker, None) is not None

    def count(self) -> int:
        return len(self.speakers)


def store_name(app_name: str) -> str:
    return f"speakers:{app_name}"


def speaker_store(app_name: str, max_speakers: int = MAX_SPEAKERS):
    """The application's store: created by the first replica that asks, found by the others;
    detached, so it outlives any one replica (``stop`` ends it)."""
    return SpeakerStore.options(name=store_name(app_name), namespace=STORE_NAMESPACE, lifetime="detached",
                                get_if_exists=True).remote(max_speakers)


def speaker_of(value: Optional[str]) -> Optional[str]:
    """A request's speaker ID (None: none named), or BadAudio(400)."""
    if value is None or value == "":
        return None
    if len(value) > MAX_SPEAKER_ID or not value.isprintable():
        raise BadAudio(400, f"speaker: at most {MAX_SPEAKER_ID} printable characters")
    return value


@serve.deployment(ray_actor_options={"num_cpus": 1})
class EmotionModel:
    """One replica: the run's model on this replica's device."""

    def __init__(self, run: str, device: str = "cpu", max_speakers: int = MAX_SPEAKERS, population: str = "train",
                 min_traffic_clips: int = MIN_TRAFFIC_CLIPS):
        from dec_ray.report.inference import Predictor
        if population not in POPULATIONS:
            raise ValueError(f"population={population!r}; choose one of {POPULATIONS}")
        self.population, self.min_traffic_clips = population, min_traffic_clips
        self.predictor = Predictor(run, device)
        ctx = serve.get_replica_context()
        self.replica = ctx.replica_tag
        self.store = speaker_store(ctx.app_name, max_speakers) if self.predictor.per_speaker else None
        if self.predictor.per_speaker:
            self.predictor.population_moments()            # a run without them cannot serve unnamed requests

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _scored(self, inputs: List[np.ndarray]) -> List[Dict]:
        """The waiting requests' sentences, normalised each as its own request says, in one forward pass."""
        return self.predictor.forward(np.stack(inputs), per_chunk=True)

    async def _model_input(self, body: bytes, chunks: np.ndarray, speaker: Optional[str]):
        """(the network's input, what the answer says of its normalisation)."""
        p = self.predictor
        if not p.per_speaker or (speaker is None and self.population == "train"):
            x, how = p.model_input(chunks[None])
            return x[0], {"normalization": how}
        m = Moments.of(chunks, p.cfg.model.input)
        digest = hashlib.sha256(body).hexdigest()
        if speaker is None:                  # --population traffic: what was served without a speaker
            mean, std, clips = await self.store.add_traffic.remote(digest, m.n, m.s, m.ss)
            if clips < self.min_traffic_clips:
                x, how = p.model_input(chunks[None])
                return x[0], {"normalization": how, "traffic_clips": clips}
            x, _ = p.model_input(chunks[None], ["traffic"], GroupMoments.one("traffic", mean, std))
            return x[0], {"normalization": "traffic", "traffic_clips": clips}
        mean, std, clips = await self.store.add.remote(speaker, digest, m.n, m.s, m.ss)
        x, how = p.model_input(chunks[None], [speaker], GroupMoments.one(speaker, mean, std))
        return x[0], {"normalization": how, "speaker": speaker, "speaker_clips": clips}

    async def predict(self, body: bytes, per_chunk: bool = False, speaker: Optional[str] = None) -> Dict:
        """The handle's API: audio file bytes (and the speaker, if known) -> the prediction
        (raises BadAudio)."""
        speaker = speaker_of(speaker)
        x, info = await self._model_input(body, decode(body, self.predictor), speaker)
        out = dict(await self._scored(x))
        if not per_chunk:
            out.pop("chunks")
        if out.get("cluster", -1) < 0:
            out.pop("cluster", None)
        return {**out, **info}

    async def forget(self, speaker: str) -> bool:
        """Drop a speaker's statistics (True when there were any)."""
        return bool(self.store is not None and await self.store.forget.remote(speaker))

    async def __call__(self, request):
        from starlette.responses import JSONResponse
        headers = {"X-Replica": self.replica}
        path = request.url.path[len(request.scope.get("root_path", "")):].strip("/")
        try:
            if request.method == "DELETE" and path.startswith("speakers/"):
                speaker = speaker_of(path[len("speakers/"):])
                return JSONResponse({"speaker": speaker, "forgotten": await self.forget(speaker)}, headers=headers)
            if request.method != "POST" or path:
                return JSONResponse({"error": f"{request.method} /{path}: POST audio to the route, or DELETE "
                                              "/speakers/ID"}, status_code=405 if not path else 404,
                                    headers={**headers, "Allow": "POST, DELETE"})
            per_chunk = request.query_params.get("chunks", "").lower() in ("1", "true", "yes")
            speaker = request.query_params.get("speaker") or request.headers.get("x-speaker")
            return JSONResponse(await self.predict(await request.body(), per_chunk, speaker), headers=headers)
        except BadAudio as e:
            return JSONResponse({"error": str(e)}, status_code=e.status, headers=headers)


def app(run: str, replicas: int = 1, gpu: bool = False, max_speakers: int = MAX_SPEAKERS, population: str = "train"):
    """The bound application (``serve.run(app(...))``; also what a RayService's import path names)."""
    return EmotionModel.options(num_replicas=replicas,
                                ray_actor_options={"num_cpus": 0 if gpu else 1, "num_gpus": 1 if gpu else 0}
                                ).bind(os.path.abspath(run), "cuda" if gpu else "cpu", max_speakers, population)


def build_app(args: Dict) -> "serve.Application":
    """The application builder a Serve config names (``import_path: dec_ray.service.serve:build_app``,
    jobs/kuberay/rayservice.yaml): args ``run``, ``replicas`` (1), ``gpu`` (false), ``max_speakers``,
    ``population`` (train)."""
    gpu = str(args.get("gpu", False)).lower() in ("1", "true", "yes")
    return app(args["run"], int(args.get("replicas", 1)), gpu, int(args.get("max_speakers", MAX_SPEAKERS)),
               str(args.get("population", "train")))


def run_serve(run: str, replicas: int = 1, gpu: bool = False, port: int = 8000, route: str = "/",
              host: str = "127.0.0.1", blocking: bool = True, name: str = "dec_ray", max_speakers: int = MAX_SPEAKERS,
              population: str = "train"):
    """Start Serve on this Ray (joined or private) and deploy; returns the handle (``blocking``:
    serve until interrupted)."""
    from dec_ray.report.inference import model_file
    from dec_ray.service.cluster import ensure_ray
    model_file(os.path.abspath(run))
    ensure_ray()
    serve.start(http_options={"host": host, "port": port})
    forget_store(name)                      # a new deployment starts with no speakers
    if population not in POPULATIONS:
        raise ValueError(f"--population {population}: choose one of {POPULATIONS}")
    handle = serve.run(app(run, replicas, gpu, max_speakers, population), name=name, route_prefix=route,
                       blocking=False)
    url = f"http://{host}:{port}{route}"
    print(f"[dec-ray] serving {run} at {url} ({replicas} replica(s)); try: curl -X POST --data-binary "
          f"@clip.wav '{url}'", flush=True)
    if blocking:
        import time
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            stop()
    return handle


def forget_store(app_name: str) -> None:
    """End an application's speaker store (its statistics are gone with it)."""
    try:
        ray.kill(ray.get_actor(store_name(app_name), namespace=STORE_NAMESPACE))
    except ValueError:
        pass                                 # none


def stop(name: Optional[str] = None) -> None:
    """End an application (or all of Serve) and its speaker store(s)."""
    names = [name] if name else list(serve.status().applications)
    serve.delete(name) if name else serve.shutdown()
    for n in names:
        forget_store(n)
