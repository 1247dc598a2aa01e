"""`dec-ray serve`: a trained run as a Ray Serve deployment.

HTTP: POST an audio file (wav, flac, ogg; 8-192 kHz, up to 16 channels) to the route, as the raw
body or as a multipart upload (``curl -F file=@clip.wav``); the answer is JSON with the run's
attributes on the 1..7 scale (and the cluster, for DeepEmoCluster) and ``normalization``: how the
input was normalised. ``?chunks=true`` adds each chunk's values. Requests are bounded before any
decoding (``ServeConfig``: 413 a body over the cap; 422 a rate, channel count or duration out of
bounds, read from the header); bad audio gets a 4xx with the reason (400 empty, 415 not audio, 422
audio that cannot become features); anything else a 500 with a JSON reason, and the replica goes
on; 405 for other methods. Decoding and the forward pass run off the replica's event loop, so
requests decode while a batch is scored; ``@serve.batch`` scores the waiting requests in one
forward pass, and each replica holds ``ongoing_batches`` x ``max_batch_size`` requests, each caller
queues ``queue_batches`` x that many more, beyond which Serve answers 503 (back-pressure). Batch
size, wait and limits are the deployment's ``user_config`` (a Serve config file can change them on
a running application); ``check_health`` runs the model. The same deployment is a Python handle
for composition: ``handle.predict.remote(audio_bytes, speaker="spk1")``. Decoding, features and
normalisation are the Predictor's, so the numbers are `dec-ray predict`'s.

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

import asyncio
import dataclasses
import hashlib
import logging
import os
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

import numpy as np
import ray
from ray import serve

from dec_ray.config import ServeConfig, serve_config
from dec_ray.data.audio import AudioError, prepare_signal
from dec_ray.data.features import ShortClipError
from dec_ray.data.groups import GroupMoments, Moments, row_mean_std
from dec_ray.report.inference import Features, ModelInput, stacked
from dec_ray.service.audio_request import BadAudio, decode_bounded, read_body, uploaded_file

logger = logging.getLogger("ray.serve")
MAX_SPEAKERS = 10_000
POPULATIONS = ("train", "traffic")    # what a request without a speaker is normalised with
MIN_TRAFFIC_CLIPS = 30                # --population traffic: the run's population until this many clips
MAX_SPEAKER_ID = 256                  # characters
STORE_NAMESPACE = "dec_ray_serve"


def decode(body: bytes, predictor, limits: ServeConfig):
    """Request bytes -> the sentence's raw ``Features``, or BadAudio (bounded: ``decode_bounded``)."""
    data, sr = decode_bounded(body, limits)
    f = predictor.cfg.features
    try:
        y, recorded = prepare_signal(data, sr, f.sample_rate, f.silence_peak, f.min_duration_s, recorded=True)
        return predictor.signal_features(y, recorded)
    except (AudioError, ShortClipError) as e:
        raise BadAudio(422, str(e))


@ray.remote(num_cpus=0)
class SpeakerStore:
    """Each named speaker's running statistics (``Moments``: of the mel input, and of the
    functionals for a model that reads them) and the digests of the clips they rest on, for every
    replica of one application; at most ``max_speakers``, least recently used out."""

    def __init__(self, max_speakers: int = MAX_SPEAKERS):
        self.max_speakers = max_speakers
        self.speakers: "OrderedDict[str, Tuple[List[Moments], set]]" = OrderedDict()
        self.traffic: Tuple[Optional[List[Moments]], set] = (None, set())     # --population traffic

    @staticmethod
    def _added(entry, digest: str, clip: List[Moments], max_digests: int = 100_000):
        moments, digests = entry
        if digest not in digests:
            moments = clip if moments is None else [a + b for a, b in zip(moments, clip)]
            if len(digests) < max_digests:
                digests.add(digest)
        return moments, digests

    def add(self, speaker: str, digest: str, clip: List[Moments]):
        """Count this clip's ``Moments`` (once: a clip posted again is not counted twice); returns
        the speaker's (``Moments`` summed, clips)."""
        moments, digests = self._added(self.speakers.pop(speaker, (None, set())), digest, clip)
        self.speakers[speaker] = (moments, digests)
        while len(self.speakers) > self.max_speakers:
            self.speakers.popitem(last=False)
        return moments, len(digests)

    def add_traffic(self, digest: str, clip: List[Moments]):
        """The same for the clips served without a speaker, as one group (a clip posted again is
        counted once, up to 100,000 clips remembered)."""
        self.traffic = self._added(self.traffic, digest, clip)
        return self.traffic[0], len(self.traffic[1])

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


def group_of(name: str, summed: List[Moments]) -> Tuple[GroupMoments, Optional[GroupMoments]]:
    """A group's summed ``clip_moments`` -> (its mel moments, its functionals' moments or None)."""
    mel = GroupMoments.one(name, *summed[0].mean_std())
    functionals = GroupMoments.one(name, *row_mean_std(summed[1])) if len(summed) > 1 else None
    return mel, functionals


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
        self.limits = ServeConfig()
        self.batches: Counter = Counter()                  # batch size -> forward passes of that size
        # decoding in as many threads as the replica has CPUs, the forward pass in one of its own:
        # more decoding threads than CPUs only contend (GIL, caches) and slow every request
        cpus = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
        self._decoders = ThreadPoolExecutor(cpus, thread_name_prefix="decode")
        self._forward_thread = ThreadPoolExecutor(1, thread_name_prefix="forward")
        f = self.predictor.cfg.features
        self._probe = ModelInput(np.zeros((1, f.num_chunks, f.chunk_frames, f.n_mels), np.float32),
                                 np.zeros((1, self.predictor.functionals), np.float32) if self.predictor.functionals
                                 else None)
        self._warm_up()

    def _warm_up(self) -> None:
        """One request's work before the replica takes traffic: the first decode, resampling and
        mel of a process load librosa's compiled functions (9 s on 2 cores, else the first caller
        waits for it)."""
        noise = np.random.default_rng(0).normal(size=(44100, 1)).astype(np.float32)
        f = self.predictor.cfg.features
        y, recorded = prepare_signal(noise, 44100, f.sample_rate, f.silence_peak, f.min_duration_s, recorded=True)
        self.predictor.forward(self.predictor.model_input(stacked([self.predictor.signal_features(y, recorded)]))[0])

    def reconfigure(self, user_config: Dict) -> None:
        """The Serve config's ``user_config``: limits, batch size and wait (``ServeConfig``), on a
        running replica too."""
        self.limits = serve_config(user_config)
        self._scored.set_max_batch_size(self.limits.max_batch_size)
        self._scored.set_batch_wait_timeout_s(self.limits.batch_wait_timeout_s)

    def check_health(self) -> None:
        """Serve's periodic check: the model still runs on its device (a dead CUDA context raises)."""
        out = self.predictor.forward(self._probe)
        if not all(np.isfinite(v) for k, v in out[0].items() if k in self.predictor.cfg.model.attributes):
            raise RuntimeError("the model's output is not finite")

    def batch_sizes(self) -> Dict[int, int]:
        """How many forward passes this replica made of each batch size (benchmarks read it)."""
        return dict(self.batches)

    @serve.batch(max_batch_size=ServeConfig.max_batch_size, batch_wait_timeout_s=ServeConfig.batch_wait_timeout_s)
    async def _scored(self, inputs: List[ModelInput]) -> List[Dict]:
        """The waiting requests' sentences, normalised each as its own request says, in one forward
        pass, in a thread: the event loop goes on taking and decoding requests."""
        self.batches[len(inputs)] += 1
        return await asyncio.get_running_loop().run_in_executor(self._forward_thread, self.predictor.forward,
                                                                ModelInput.stack(inputs), True)

    def _features(self, body: bytes, speaker: Optional[str]):
        """CPU work of one request (in a thread): its features (one sentence's, stacked), and their
        moments when the request joins a group (a named speaker, or --population traffic)."""
        p = self.predictor
        features = stacked([decode(body, p, self.limits)])
        grouped = p.per_speaker and (speaker is not None or self.population == "traffic")
        return features, (p.clip_moments(features) if grouped else None)

    async def _model_input(self, body: bytes, features: Features, moments: Optional[List[Moments]],
                           speaker: Optional[str]):
        """(the network's input, what the answer says of its normalisation)."""
        p = self.predictor
        if moments is None:
            x, how = p.model_input(features)
            return x, {"normalization": how}
        digest = hashlib.sha256(body).hexdigest()
        if speaker is None:                  # --population traffic: what was served without a speaker
            summed, clips = await self.store.add_traffic.remote(digest, moments)
            if clips < self.min_traffic_clips:
                x, how = p.model_input(features)
                return x, {"normalization": how, "traffic_clips": clips}
            x, _ = p.model_input(features, ["traffic"], *group_of("traffic", summed))
            return x, {"normalization": "traffic", "traffic_clips": clips}
        summed, clips = await self.store.add.remote(speaker, digest, moments)
        x, how = p.model_input(features, [speaker], *group_of(speaker, summed))
        return x, {"normalization": how, "speaker": speaker, "speaker_clips": clips}

    async def predict(self, body: bytes, per_chunk: bool = False, speaker: Optional[str] = None) -> Dict:
        """The handle's API: audio file bytes (and the speaker, if known) -> the prediction
        (raises BadAudio)."""
        speaker = speaker_of(speaker)
        features, moments = await asyncio.get_running_loop().run_in_executor(self._decoders, self._features, body,
                                                                              speaker)
        x, info = await self._model_input(body, features, moments, speaker)
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
            body = await read_body(request.stream(), self.limits, request.headers.get("content-length"))
            body = uploaded_file(body, request.headers.get("content-type", ""))
            return JSONResponse(await self.predict(body, per_chunk, speaker), headers=headers)
        except BadAudio as e:
            return JSONResponse({"error": str(e)}, status_code=e.status, headers=headers)
        except Exception as e:               # the replica answers and goes on; the trace goes to its log
            logger.exception("dec_ray: request failed")
            return JSONResponse({"error": f"internal error: {type(e).__name__}: {str(e)[:200]}"}, status_code=500,
                                headers=headers)


def app(run: str, replicas: Optional[int] = 1, gpu: bool = False, max_speakers: int = MAX_SPEAKERS,
        population: str = "train", settings: Optional[ServeConfig] = None):
    """The bound application (``serve.run(app(...))``). Every replica reserves a CPU for decoding
    (and a GPU with ``gpu``); ``max_ongoing_requests`` and ``max_queued_requests`` follow the batch
    size (``ServeConfig``). ``replicas=None`` leaves the count to a Serve config (its
    ``num_replicas`` or ``autoscaling_config``)."""
    s = settings or ServeConfig()
    opts = dict(max_ongoing_requests=s.max_ongoing_requests, max_queued_requests=s.max_queued_requests,
                user_config=dataclasses.asdict(s), ray_actor_options={"num_cpus": 1, "num_gpus": 1 if gpu else 0})
    if replicas is not None:
        opts["num_replicas"] = replicas
    return EmotionModel.options(**opts).bind(os.path.abspath(run), "cuda" if gpu else "cpu", max_speakers, population)


APP_ARGS = ("run", "gpu", "max_speakers", "population", "replicas")


def build_app(args: Dict) -> "serve.Application":
    """The application builder a Serve config names (``import_path: dec_ray.service.serve:build_app``;
    jobs/serve/config.yaml, jobs/kuberay/rayservice.yaml, ``serve run dec_ray.service.serve:build_app
    run=RUN``): args ``run``, ``gpu`` (false), ``max_speakers``, ``population`` (train), ``replicas``
    (left to the config's deployment options when absent). Limits and batching are the
    deployment's ``user_config``."""
    unknown = set(args) - set(APP_ARGS)
    if unknown or "run" not in args:
        raise ValueError(f"application args {sorted(args)}: give run, and any of {APP_ARGS[1:]}; limits and batching "
                         "go in the deployment's user_config")
    gpu = str(args.get("gpu", False)).lower() in ("1", "true", "yes")
    replicas = int(args["replicas"]) if "replicas" in args else None
    return app(args["run"], replicas, gpu, int(args.get("max_speakers", MAX_SPEAKERS)),
               str(args.get("population", "train")))


def run_serve(run: str, replicas: int = 1, gpu: bool = False, port: int = 8000, route: str = "/",
              host: str = "127.0.0.1", blocking: bool = True, name: str = "dec_ray", max_speakers: int = MAX_SPEAKERS,
              population: str = "train", settings: Optional[ServeConfig] = None):
    """Start Serve on this Ray (joined or private) and deploy; returns the handle (``blocking``:
    serve until interrupted). Serve's own log lines go to Ray's log files, not this console."""
    from dec_ray.report.inference import model_file
    from dec_ray.service.cluster import ensure_ray, verbose
    model_file(os.path.abspath(run))
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")    # read by the Serve actors a private Ray starts
    if not verbose():
        logging.getLogger("ray.serve").setLevel(logging.WARNING)     # this driver's own Serve lines
    ensure_ray()
    serve.start(http_options={"host": host, "port": port})
    forget_store(name)                      # a new deployment starts with no speakers
    if population not in POPULATIONS:
        raise ValueError(f"--population {population}: choose one of {POPULATIONS}")
    s = settings or ServeConfig()
    handle = serve.run(app(run, replicas, gpu, max_speakers, population, s), name=name, route_prefix=route,
                       blocking=False)
    url = f"http://{host}:{port}{route}"
    print(f"[dec-ray] serving {run} at {url} ({replicas} replica(s), batches of up to {s.max_batch_size}, clips up "
          f"to {s.max_duration_s:g} s / {s.max_body_mb:g} MB); try: curl -X POST --data-binary @clip.wav '{url}'",
          flush=True)
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
