"""Typed configuration: the one place where defaults live.

Every section is a dataclass whose defaults are the method's (DeepEmoCluster, official code).
A config loads from YAML, takes ``--set section.key=value`` overrides, and is saved as YAML next
to every run's output so that a run can be reproduced from its own folder.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, List, Optional

import yaml

ATTRIBUTES = ("arousal", "valence", "dominance")
# presets that are a model of their own (`--models recommended`): laid over the config, named by model.label
MODEL_PRESETS = ("recommended",)


@dataclass
class FeatureConfig:
    """Audio -> mel -> chunks, exactly as the official feat_extract.py / utils.py."""
    sample_rate: int = 16000
    n_fft: int = 512
    hop_length: int = 256
    n_mels: int = 128
    pad_mode: str = "reflect"       # ends of the signal: reflect (official code, librosa 0.7) | constant (librosa 0.11)
    chunk_frames: int = 62          # m: ~1 s at hop 256
    num_chunks: int = 11            # C = ceil(Tmax / wc)
    # Clips shorter than one chunk: "repeat" tiles the clip up to 62 frames, "reject" drops it.
    short_clip_policy: str = "repeat"
    min_duration_s: float = 0.25    # below this (after trimming nothing) a clip is rejected as too short
    silence_peak: float = 1e-4      # peak amplitude below which a clip counts as silent
    storage_dtype: str = "float16"  # dtype of the chunk tensor in Parquet (see README "Schema")
    # per-sentence functionals stored beside the chunks (the linear references' input): "egemaps"
    # (the 88 eGeMAPS v02 functionals, openSMILE) | "none"
    functionals: str = "egemaps"
    # the functionals of the unlabeled pool too: only an eGeMAPS teacher (train.teacher=egemaps |
    # egemaps-speaker) reads them, and openSMILE costs ~7x the mel of a clip; off, the pool's are null
    functionals_pool: bool = False


FUNCTIONAL_SETTINGS = ("functionals", "functionals_pool")     # what only the references read


def reference_settings(features: dict) -> dict:
    """The feature settings a reference's input depends on: all but whether the pool has its
    functionals (``functionals_pool``), which no fit on the labeled splits reads."""
    return {k: v for k, v in (features or {}).items() if k != "functionals_pool"}


def chunk_settings(features: dict) -> dict:
    """The feature settings that make the chunks (a network's input): all but the functionals,
    which only the references read. Two tables agree for a network when these agree."""
    return {k: v for k, v in (features or {}).items() if k not in FUNCTIONAL_SETTINGS}



@dataclass
class IngestConfig:
    target_shard_mb: int = 256      # target size of one Parquet file (before compression)
    min_parts_per_split: int = 8    # small splits are still cut into this many parts (parallelism)
    num_cpus_per_task: float = 1.0
    max_label: float = 7.0          # labels outside [min_label, max_label] are rejected
    min_label: float = 1.0


@dataclass
class ModelConfig:
    name: str = "deepemocluster"    # deepemocluster | cnn | ae | vae
    encoder: str = "compact"        # compact (official code's "vgg16") | vgg16 (paper: VGG-16 with BN)
    width: float = 1.0              # channel multiplier; tests and the CPU demo use less
    embed_dim: int = 256
    hidden_dim: int = 256
    dropout: float = 0.5
    attributes: List[str] = field(default_factory=lambda: ["arousal"])
    latent_beta: float = 1.0        # weight of the KL term (vae)
    # official: the official code's _initialize_weights (conv N(0, sqrt(2/(9*out))), linear
    # N(0, 0.01), biases 0) | torch: PyTorch's default (Kaiming-uniform) initialisation
    init: str = "official"
    # the network's input: "power" (official: mel power, z-scored per bin, clipped to +-3) |
    # "logmel" (log(power + 1e-10), z-scored per bin with its own Train statistics, clipped)
    input: str = "power"
    # the input's z-score: "train" (official: Train's per-bin mean/std) | "speaker" (each speaker's
    # own, from their audio; at prediction, groups of files: see dec_ray/data/groups.py)
    norm: str = "train"
    # the regressor: "chunk" (official: one prediction per chunk, a sentence's is their mean) |
    # "sentence" (a GRU + attention over the sentence's chunks in order; batches of whole sentences)
    head: str = "chunk"
    # functionals joined to the sentence encoding before the sentence head's MLP: "none" | "egemaps"
    # (the 88 eGeMAPS v02 functionals stored at ingest, z-scored as the references z-score them:
    # with Train's statistics, or per speaker under model.norm=speaker; clipped to +-3)
    functionals: str = "none"
    # the name results give this model (result.json, reports); "" = model.name. A preset that
    # changes the method names it (the `recommended` preset: "recommended")
    label: str = ""


@dataclass
class ClusterConfig:
    k: int = 10
    niter: int = 20
    mode: str = "separate"          # separate: unlabeled and labeled clustered apart (paper) | joint
    pca_dim: int = 0                # 0: no PCA (as the official code)
    l2_normalize: bool = False
    assign: str = "faiss"           # E-step: faiss flat index (fed torch tensors) | torch (matmul + argmin)
    faiss_threads: int = 0          # 0: one per CPU this worker owns
    # stage (b)'s draw of labeled chunks: "uniform" over the clusters (the method as published) or
    # "natural" (every chunk once, in random order: the regressor sees the data's own distribution)
    labeled_sampler: str = "uniform"
    # the pseudo-labels: "none" = nearest centroid (K-means, as published) or "sinkhorn" = a balanced
    # equipartition around the centroids (SeLa, SwAV); sinkhorn_eps: its temperature
    balance: str = "none"
    sinkhorn_eps: float = 0.05


@dataclass
class TrainConfig:
    epochs: int = 50
    batch_sentences: int = 64       # global batch (x num_chunks chunks), shared by the workers
    # the batch shrinks when an epoch over Train would make fewer optimiser steps (0: never)
    min_steps_per_epoch: int = 20
    lr: float = 1e-3                # SGD, encoder + classifier
    momentum: float = 0.0           # official code: plain SGD. DeepCluster's: 0.9 (preset deepcluster_sgd)
    weight_decay: float = 0.0       # official code: none. DeepCluster's: 1e-5 (preset deepcluster_sgd)
    lr_regressor: float = 5e-4      # Adam, regressor
    lr_top: float = 0.05            # fresh SGD for each new top layer
    # the optimisers (method/recipe.py): official (SGD + Adam, constant) | adamw (AdamW on both,
    # warm-up over train.warmup_fraction of the epochs, then cosine to 0)
    recipe: str = "official"
    warmup_fraction: float = 0.1
    # a regression signal on the pool: the predictions of a linear reference (report/ridge.py's
    # REFERENCES: ridge | egemaps | egemaps-speaker), fitted on the run's labeled sentences, as
    # targets of 1 - CCC on the pool's chunks, weighted by train.teacher_weight; "none": off
    teacher: str = "none"
    teacher_weight: float = 1.0
    # the attributes the teacher is distilled on (of model.attributes); empty: all of them. The
    # per-speaker eGeMAPS teacher's valence on the pool pulled the network's below zero
    # (docs/results/recommended)
    teacher_attributes: List[str] = field(default_factory=list)
    lambda_ce: float = 1.0          # CCC-loss + lambda * CE in stage (b)
    patience: int = 0               # early stopping on dev loss; 0: every epoch (official), best kept
    # score test after every epoch too (``curve_test_*`` in metrics.jsonl: the test curve beside dev's,
    # for convergence studies); selection never reads it, and it costs one test pass an epoch
    test_curve: bool = False
    seed: int = 0
    unlabeled_limit: int = -1       # a random subset (seeded by train.seed) of this many; -1: all, 0: none
    unlabeled_per_epoch: int = 0    # > 0: each epoch a fresh seeded draw of this many pool sentences
    # the label-scarce setting: a seeded random fraction of Train keeps its labels (train.label_seed
    # picks which: the same sentences for every model, run seed and number of workers); the rest of
    # Train joins the unlabeled pool without its labels ("pool") or is left out ("drop")
    label_fraction: float = 1.0
    label_seed: int = 0
    label_rest: str = "pool"
    augment_pool: bool = False      # SpecAugment views in the pseudo-label stage (method/augment.py)
    warmup_epochs: int = 0          # the first N epochs train the pseudo-label stage on the pool only
    amp: bool = True                # bf16 autocast, on GPU only
    channels_last: bool = True      # channels-last convolutions, on GPU only
    cudnn_benchmark: bool = True    # cuDNN picks the fastest kernels for the fixed chunk shape, on GPU only


@dataclass
class ScaleConfig:
    workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 2
    num_to_keep: int = 2            # checkpoints kept on storage
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_SPREAD (one worker per node)
    # a GPU worker keeps its pools on the GPU when they fit in this share of its free memory,
    # else in pinned host memory (see dec_ray/data/pools.py)
    pool_device_fraction: float = 0.5
    # how long a run may wait for its workers' resources before it stops and says what holds them
    # (a private local Ray: before it starts; any cluster: Ray Train's start-up tries, 60 s each)
    resource_wait_s: float = 300.0


@dataclass
class TuneConfig:
    samples: int = 8
    scheduler: str = "asha"         # asha | none
    search: str = "random"          # random | optuna
    metric: str = "dev_loss"
    mode: str = "min"
    max_concurrent: int = 0         # 0: as many as resources allow
    grace_period: int = 1


@dataclass
class TrackingConfig:
    mlflow_uri: str = ""            # e.g. sqlite:///path/mlflow.db or http://server:5000; "" = off
    wandb_project: str = ""         # "" = off (needs `pip install wandb` and a login)
    experiment: str = "dec_ray"     # the MLflow experiment
    run_name: str = ""              # "" = the run folder's name


@dataclass
class Config:
    features: FeatureConfig = field(default_factory=FeatureConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)


class ConfigError(ValueError):
    """A config file or override that does not match the schema."""


@dataclass
class ServeConfig:
    """What one `dec-ray serve` replica accepts and how it batches: the deployment's
    ``user_config`` (a Serve config file can change it on a running application). Every limit is
    checked before the audio is decoded or resampled."""
    max_body_mb: float = 16.0           # a larger request body: 413 (60 s of 48 kHz stereo 16-bit WAV is 11 MB)
    max_duration_s: float = 60.0        # decoded audio longer than this: 422, read no further
    min_sample_rate: int = 8000         # a rate outside [min, max]: 422 (a 1 Hz header would resample x16,000)
    max_sample_rate: int = 192000
    max_batch_size: int = 16            # requests in one forward pass
    batch_wait_timeout_s: float = 0.01  # how long the first request of a batch waits for more
    # requests a replica holds = this x max_batch_size; requests waiting in each caller's queue
    # beyond that = queue_batches x max_batch_size, then 503. A replica that holds its callers'
    # requests itself decodes them back to back; with half as many (2 batches), 64 clients queued at
    # Serve's router, which backs off while the replica is full: 12 instead of 34 requests/s
    # (bench/serve.py, bench/RESULTS.md "Serving"). These two are deployment options, fixed when
    # the deployment is made (`dec-ray serve`, app()); a Serve config sets max_ongoing_requests and
    # max_queued_requests beside its user_config (jobs/serve/config.yaml, checked to agree).
    ongoing_batches: int = 4
    queue_batches: int = 4

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2 ** 20)

    @property
    def max_ongoing_requests(self) -> int:
        return self.ongoing_batches * self.max_batch_size

    @property
    def max_queued_requests(self) -> int:
        return self.queue_batches * self.max_batch_size


def serve_config(data: Optional[dict] = None, overrides: Optional[List[str]] = None) -> ServeConfig:
    """Defaults <- a mapping (a Serve config's user_config) <- ``key=value`` overrides; unknown keys,
    wrong types and impossible limits are errors."""
    cfg = _build(ServeConfig, apply_overrides(dict(data or {}), overrides), "serve.")
    bad = [k for k in ("max_body_mb", "max_duration_s", "min_sample_rate", "max_batch_size", "ongoing_batches",
                       "queue_batches") if not getattr(cfg, k) > 0]
    if bad or cfg.max_sample_rate < cfg.min_sample_rate or cfg.batch_wait_timeout_s < 0:
        raise ConfigError(f"serve settings out of range: {bad or 'sample rates / batch wait'} ({cfg})")
    return cfg


# Keys that older runs' config.yaml may hold, and why they went.
REMOVED = {
    "cluster.reuse_embeddings": "the memory bank refreshed only the rows the sampler drew (not DeepCluster-v2's); "
                                "every epoch now embeds each pool in a fresh eval-mode pass",
    "train.freeze_regressor_in_unlabeled": "the regressor has no loss in the unlabeled stage and is never "
                                           "stepped there; frozen and not frozen were the same model",
}


# Keys that never had an effect: older configs may still set them; they are dropped with a note.
IGNORED = {
    "ingest.files_per_batch": "Ray Data sizes the featurisation batches itself",
    "cluster.max_points_per_centroid": "the K-means never subsamples",
    "train.log_every": "the workers print one line per epoch",
}


def _build(cls, data: dict, where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in [k for k in data if f"{where}{k}" in IGNORED and k not in fields]:
        warnings.warn(f"config key {where}{k} is ignored: it never had an effect ({IGNORED[where + k]})")
        data = {kk: v for kk, v in data.items() if kk != k}
    unknown = set(data) - set(fields)
    gone = [f"{where}{k}" for k in sorted(unknown) if f"{where}{k}" in REMOVED]
    if gone:
        raise ConfigError("; ".join(f"{k} was removed: {REMOVED[k]}" for k in gone))
    if unknown:
        raise ConfigError(f"unknown key(s) in {where.rstrip('.') or 'config'}: {sorted(unknown)}; "
                          f"known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        sub = fields[name].default_factory if fields[name].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{name} must be a mapping")
            kwargs[name] = _build(sub, value, f"{where}{name}.")
        else:
            kwargs[name] = _coerce(value, fields[name], f"{where}{name}")
    return cls(**kwargs)


def _coerce(value: Any, f: dataclasses.Field, where: str) -> Any:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true/false, got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:                        # YAML 1.1 reads 1e-5 (no dot) as a string
            return float(value)
        except ValueError:
            raise ConfigError(f"{where} must be float, got {value!r}") from None
    if isinstance(default, list):
        return list(value) if isinstance(value, (list, tuple)) else [value]
    if default is not None and not isinstance(value, type(default)):
        raise ConfigError(f"{where} must be {type(default).__name__}, got {value!r}")
    return value


def apply_overrides(data: dict, overrides: Optional[List[str]]) -> dict:
    """Apply ``section.key=value`` strings; values are parsed as YAML (0.5, true, [a, b])."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> Config:
    """Defaults <- YAML file <- overrides. Unknown keys and wrong types are errors."""
    data: dict = {}
    if path and not os.path.exists(path) and os.path.exists(preset_path(path)):
        path = preset_path(path)
    if path:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    data = apply_overrides(data, overrides)
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def preset_path(name: str) -> str:
    """A config shipped with the package (dec_ray/presets/NAME.yaml): ``--config NAME``."""
    from importlib import resources
    return str(resources.files("dec_ray") / "presets" / f"{name}.yaml")


def preset_overrides(name: str) -> List[str]:
    """A preset's keys as ``section.key=value`` overrides, to lay over another config (the demo's
    size, a study's budget)."""
    with open(preset_path(name)) as f:
        data = yaml.safe_load(f) or {}
    return [f"{section}.{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for section, keys in data.items() for k, v in keys.items()]


def model_label(cfg: Config) -> str:
    return cfg.model.label or cfg.model.name


def config_from_dict(data: dict) -> Config:
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    choices = {
        "features.short_clip_policy": (cfg.features.short_clip_policy, ("repeat", "reject")),
        "features.storage_dtype": (cfg.features.storage_dtype, ("float16", "float32")),
        "features.pad_mode": (cfg.features.pad_mode, ("reflect", "constant")),
        "features.functionals": (cfg.features.functionals, ("egemaps", "none")),
        "model.name": (cfg.model.name, ("deepemocluster", "cnn", "ae", "vae")),
        "model.encoder": (cfg.model.encoder, ("compact", "vgg16")),
        "model.init": (cfg.model.init, ("official", "torch")),
        "model.input": (cfg.model.input, ("power", "logmel")),
        "model.norm": (cfg.model.norm, ("train", "speaker")),
        "train.recipe": (cfg.train.recipe, ("official", "adamw")),
        "model.head": (cfg.model.head, ("chunk", "sentence")),
        "model.functionals": (cfg.model.functionals, ("none", "egemaps")),
        "cluster.mode": (cfg.cluster.mode, ("separate", "joint")),
        "cluster.assign": (cfg.cluster.assign, ("faiss", "torch")),
        "tune.scheduler": (cfg.tune.scheduler, ("asha", "none")),
        "train.label_rest": (cfg.train.label_rest, ("pool", "drop")),
        "cluster.labeled_sampler": (cfg.cluster.labeled_sampler, ("uniform", "natural")),
        "cluster.balance": (cfg.cluster.balance, ("none", "sinkhorn")),
        "tune.search": (cfg.tune.search, ("random", "optuna")),
        "scale.placement_strategy": (cfg.scale.placement_strategy,
                                     ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}; choose one of {allowed}")
    bad = [a for a in cfg.model.attributes if a not in ATTRIBUTES]
    if bad or not cfg.model.attributes:
        raise ConfigError(f"model.attributes={cfg.model.attributes}; choose from {ATTRIBUTES}")
    if not 0 < cfg.train.label_fraction <= 1:
        raise ConfigError(f"train.label_fraction={cfg.train.label_fraction}; a share of Train in (0, 1]")
    if cfg.cluster.mode == "joint":     # one clustering and two passes: these stages have no place there
        unserved = [k for k, on in (("cluster.labeled_sampler=natural", cfg.cluster.labeled_sampler != "uniform"),
                                     ("train.augment_pool=true", cfg.train.augment_pool),
                                     (f"train.warmup_epochs={cfg.train.warmup_epochs}", cfg.train.warmup_epochs > 0))
                    if on]
        if unserved:
            raise ConfigError(f"cluster.mode=joint does not apply {', '.join(unserved)} (separate mode's stages); "
                              "use cluster.mode=separate or drop them")
    if cfg.model.head == "sentence" and (cfg.model.name not in ("deepemocluster", "cnn") or cfg.cluster.mode == "joint"):
        raise ConfigError("model.head=sentence is offered for the CNN and DeepEmoCluster in cluster.mode=separate "
                          "(its samplers keep sentences whole); not for "
                          f"model.name={cfg.model.name}, cluster.mode={cfg.cluster.mode}")
    if cfg.model.functionals != "none":
        if cfg.model.head != "sentence":
            raise ConfigError("model.functionals joins the functionals to the sentence encoding: it needs "
                              "model.head=sentence (a chunk has no functionals of its own)")
        if cfg.features.functionals != cfg.model.functionals:
            raise ConfigError(f"model.functionals={cfg.model.functionals} reads the tables' "
                              f"{cfg.model.functionals} column: features.functionals={cfg.features.functionals}")
        if cfg.train.teacher != "none":
            raise ConfigError("model.functionals with train.teacher: the teacher's pass on the pool would read "
                              "the pool's functionals, which ingest leaves out; use one of the two")
    if cfg.train.teacher not in ("none", "ridge", "egemaps", "egemaps-speaker"):
        raise ConfigError(f"train.teacher={cfg.train.teacher!r}; choose none or a reference: ridge, egemaps, "
                          "egemaps-speaker")
    if cfg.train.teacher_attributes and (cfg.train.teacher == "none" or any(
            a not in cfg.model.attributes for a in cfg.train.teacher_attributes)):
        raise ConfigError(f"train.teacher_attributes={cfg.train.teacher_attributes}: some of model.attributes "
                          f"({', '.join(cfg.model.attributes)}), with a train.teacher")
    if cfg.train.teacher != "none" and (cfg.model.name not in ("deepemocluster", "cnn") or cfg.cluster.mode == "joint"):
        raise ConfigError("train.teacher is a stage on the pool of the CNN or of DeepEmoCluster in "
                          f"cluster.mode=separate; not of model.name={cfg.model.name}, cluster.mode={cfg.cluster.mode}")
    if cfg.cluster.k < 2:
        raise ConfigError("cluster.k must be >= 2")
    if cfg.scale.workers < 1:
        raise ConfigError(f"scale.workers={cfg.scale.workers}; training needs at least 1 worker")
