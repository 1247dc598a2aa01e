"""`dec-ray experiment`: the paper's studies as one resumable job (a Ray Tune grid of training runs).

A spec (YAML, dataclasses below) names the studies: Table 2 (the models, supervised), Table 3
(unlabeled pool sizes), Table 4 (K x pool size), and any grid over model, pool, K, lambda and the
share of Train that keeps its labels (``labels``: the label-scarce study; each share has its own
CNN and ridge references, trained on the same labeled sentences).
Every cell of every study is trained ``seeds`` times; a cell shared by two studies (DeepEmoCluster
without a pool is in Tables 2, 3 and 4) is trained once. Each run is an ordinary run folder,
OUT/runs/CELL/seedR, so a restarted experiment skips finished runs and resumes interrupted ones
from their last checkpoint. The CNN-regressor (the test reference) and the linear references are
always in. The report (dec_ray/report/experiment.py) is computed from the runs' saved predictions.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import yaml

from dec_ray.config import Config, ConfigError, load_config, preset_path
from dec_ray.data.files import write_json
from dec_ray.report.experiment import labels_suffix
from dec_ray.service.progress import ProgressLine

MODELS = ("deepemocluster", "cnn", "ae", "vae")
REFERENCE = "cnn"          # the paper's tests are against the CNN-regressor
# which Train sentences keep their labels: the same for a cell and its references, so not an option
LABEL_KEYS = ("train.label_fraction", "train.label_seed", "train.label_rest")
PUBLISHED = "published"    # the option set of the method as published: no overrides
Size = Union[int, float, str]


@dataclass
class Study:
    """A grid of cells: every combination of its axes. An axis left out keeps the base config's
    value (pool: none). ``pool`` entries are sentence counts (int), fractions of the unlabeled
    split (float <= 1.0) or "all"."""
    name: str
    title: str = ""
    models: List[str] = field(default_factory=lambda: ["deepemocluster"])
    pool: List[Size] = field(default_factory=lambda: [0])
    k: List[int] = field(default_factory=list)
    lambda_ce: List[float] = field(default_factory=list)
    labels: List[float] = field(default_factory=list)       # train.label_fraction values; none: 1.0
    options: List[str] = field(default_factory=list)        # names of the spec's option sets; none: published
    seeds: Optional[int] = None         # runs per cell of this study; none: the spec's seeds
    # one of ``options`` every other cell of the study is also tested against (an ablation: the
    # preset, and the preset without each of its options); none: the CNN only
    against: Optional[str] = None


@dataclass
class ExperimentSpec:
    config: str = "demo"                  # training config: a preset name or a YAML path
    set: List[str] = field(default_factory=list)       # overrides of that config (KEY=VALUE)
    seeds: int = 2                        # runs per cell (train.seed 0..seeds-1)
    subsets: int = 4                      # random test subsets (the paper: 4)
    alpha: float = 0.05                   # two-tailed t-test against the CNN-regressor
    parallel_runs: int = 0                # runs at once; 0: as many as the cluster's CPUs/GPUs allow
    # named sets of method options (KEY=VALUE overrides) a study's ``options`` axis picks from;
    # "published" (no overrides) is always there
    options: Dict[str, List[str]] = field(default_factory=dict)
    # other corpora's tables (NAME=TABLES) every finished run is also scored on: a table each
    cross: List[str] = field(default_factory=list)
    studies: List[Study] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _fields(cls, data: dict, where: str) -> dict:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return data


def spec_from_dict(data: dict) -> ExperimentSpec:
    data = dict(_fields(ExperimentSpec, data or {}, "experiment spec"))
    studies = []
    for i, s in enumerate(data.pop("studies", None) or []):
        s = dict(_fields(Study, s, f"experiment spec, study {i + 1}"))
        study = Study(**s)
        bad = [m for m in study.models if m not in MODELS]
        if bad or not study.models:
            raise ConfigError(f"study {study.name}: models must be among {', '.join(MODELS)} (got {study.models})")
        if any(not (isinstance(f, (int, float)) and 0 < f <= 1) for f in study.labels):
            raise ConfigError(f"study {study.name}: labels are shares of Train in (0, 1] (got {study.labels})")
        unknown = [o for o in study.options if o != PUBLISHED and o not in (data.get("options") or {})]
        if unknown:
            raise ConfigError(f"study {study.name}: option set(s) {', '.join(unknown)} not in the spec's options "
                              f"(known: {', '.join([PUBLISHED, *(data.get('options') or {})])})")
        if study.against is not None and study.against not in (study.options or [PUBLISHED]):
            raise ConfigError(f"study {study.name}: against {study.against!r} is not one of its options "
                              f"({', '.join(study.options or [PUBLISHED])})")
        studies.append(study)
    if not studies:
        raise ConfigError("experiment spec: no studies")
    if len({s.name for s in studies}) != len(studies):
        raise ConfigError("experiment spec: study names must be unique")
    for name, sets in (data.get("options") or {}).items():
        if name == PUBLISHED or not isinstance(sets, list) or any("=" not in str(o) for o in sets):
            raise ConfigError(f"experiment spec: option set {name!r} must be a list of KEY=VALUE overrides "
                              f"(and not named {PUBLISHED!r}, the published method)")
        label_keys = [str(o).split("=", 1)[0].strip() for o in sets if str(o).split("=", 1)[0].strip() in LABEL_KEYS]
        if label_keys:
            raise ConfigError(f"experiment spec: option set {name!r} sets {', '.join(label_keys)}: its cells would "
                              "train on other labeled sentences than their CNN and ridge references; a study's "
                              "labels axis sets the share, the spec's set the rest")
        if not re.fullmatch(r"[A-Za-z0-9-]+", str(name)):      # the name is part of cell and folder names
            raise ConfigError(f"experiment spec: option set {name!r}: letters, digits and - only")
    spec = ExperimentSpec(**data, studies=studies)
    if spec.seeds < 1 or spec.subsets < 2 or any(s.seeds is not None and s.seeds < 1 for s in studies):
        raise ConfigError("experiment spec: seeds >= 1 and subsets >= 2")
    return spec


def load_spec(path: str) -> ExperimentSpec:
    """A spec file, or the name of a preset in dec_ray/presets (experiment_laptop, ...). Its
    ``config`` is a preset name or a path, relative to the working directory or to the spec."""
    if not os.path.exists(path):
        path = preset_path(path)
        if not os.path.exists(path):
            raise ConfigError(f"{os.path.basename(path)[:-5]}: neither an experiment spec file nor a preset")
    with open(path) as f:
        spec = spec_from_dict(yaml.safe_load(f))
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), spec.config)
    if not os.path.exists(spec.config) and os.path.exists(beside):
        spec.config = beside
    return spec


def config_path(spec: ExperimentSpec) -> str:
    if os.path.exists(spec.config):
        return os.path.abspath(spec.config)
    path = preset_path(spec.config)
    if not os.path.exists(path):
        raise ConfigError(f"experiment spec: config {spec.config!r} is neither a file nor a preset")
    return path


def pool_count(size: Size, n_unlabeled: int) -> int:
    """A pool entry as a number of unlabeled sentences."""
    if size == "all":
        return n_unlabeled
    if isinstance(size, float):
        if not 0.0 <= size <= 1.0:
            raise ConfigError(f"pool size {size}: a float is a fraction of the unlabeled split (0..1)")
        return int(round(size * n_unlabeled))
    if isinstance(size, int) and size >= 0:
        return min(size, n_unlabeled)
    raise ConfigError(f"pool size {size!r}: a count (int), a fraction (float <= 1.0) or 'all'")


@dataclass(frozen=True)
class Cell:
    """One trained configuration; fields that do not apply to the model are None."""
    model: str
    pool: Optional[int] = None
    k: Optional[int] = None
    lambda_ce: Optional[float] = None
    labels: float = 1.0                 # the share of Train that keeps its labels
    options: str = PUBLISHED            # the name of its option set
    option_overrides: tuple = ()        # that set's KEY=VALUE overrides

    @property
    def name(self) -> str:
        parts = [self.model]
        if self.pool is not None:
            parts.append(f"pool{self.pool}")
        if self.k is not None:
            parts.append(f"k{self.k}")
        if self.lambda_ce is not None:
            parts.append(f"lambda{self.lambda_ce:g}")
        if self.options != PUBLISHED:
            parts.append(self.options)
        return "_".join(parts) + labels_suffix(self.labels)

    def overrides(self) -> List[str]:
        out = [f"model.name={self.model}", f"train.unlabeled_limit={self.pool if self.pool is not None else 0}"]
        if self.k is not None:
            out.append(f"cluster.k={self.k}")
        if self.lambda_ce is not None:
            out.append(f"train.lambda_ce={self.lambda_ce}")
        if self.labels < 1:
            out.append(f"train.label_fraction={self.labels}")
        return out + list(self.option_overrides)


def reference_cells(cells: Sequence[Cell]) -> List[Cell]:
    """The CNN-regressor at every share of labels the cells use: each cell's test reference."""
    return [Cell(REFERENCE, labels=f) for f in sorted({c.labels for c in cells} | {1.0}, reverse=True)]


def make_cell(model: str, pool: int, k: int, lambda_ce: float, labels: float = 1.0,
              options: str = PUBLISHED, option_overrides: Sequence[str] = ()) -> Cell:
    labels = float(labels)
    opts = dict(options=options, option_overrides=tuple(option_overrides))
    if model == "cnn":                  # supervised only: no pool, no clusters, no second loss
        return Cell("cnn", labels=labels, **opts)
    if model in ("ae", "vae"):          # lambda weighs the reconstruction loss in the labeled stage
        return Cell(model, pool, None, float(lambda_ce), labels, **opts)
    return Cell(model, pool, int(k), float(lambda_ce), labels, **opts)


def study_cells(study: Study, base: Config, n_unlabeled: int, options: Optional[Dict[str, List[str]]] = None
                ) -> List[Cell]:
    cells, options = [], {PUBLISHED: [], **(options or {})}
    for model in study.models:
        for size in study.pool:
            for k in study.k or [base.cluster.k]:
                for lam in study.lambda_ce or [base.train.lambda_ce]:
                    for opt in study.options or [PUBLISHED]:
                        for labels in study.labels or [base.train.label_fraction]:
                            cell = make_cell(model, pool_count(size, n_unlabeled), k, lam, labels, opt, options[opt])
                            if cell not in cells:
                                cells.append(cell)
    return cells


def plan(spec: ExperimentSpec, base: Config, n_unlabeled: int) -> Dict[str, List[Cell]]:
    """Cells per study, plus the reference cells (the CNN at each share of labels) the tables are
    tested against."""
    cells = {s.name: study_cells(s, base, n_unlabeled, spec.options) for s in spec.studies}
    cells["_reference"] = reference_cells([c for group in cells.values() for c in group])
    return cells


def all_runs(cells: Dict[str, List[Cell]], seeds: int, out: str,
             study_seeds: Optional[Dict[str, Optional[int]]] = None) -> Dict[str, tuple]:
    """Run folder -> (cell, seed) for every distinct cell of the plan: ``seeds`` runs per cell, or
    the study's own number (``study_seeds``; a cell in several studies gets the most of them)."""
    runs = {}
    for name, group in cells.items():
        n = (study_seeds or {}).get(name) or seeds
        for cell in group:
            for seed in range(n):
                runs[os.path.join(out, "runs", cell.name, f"seed{seed}")] = (cell, seed)
    return runs


def is_finished(run: str) -> bool:
    return os.path.exists(os.path.join(run, "result.json"))


# --- running (Ray) ---

def train_one(config: dict, runs: List[str], tables: str, cfg_path: str, overrides: List[List[str]]) -> None:
    """A Tune trial: one run folder (``config["i"]``; the constants come through
    ``tune.with_parameters``), trained, resumed, or (finished already) left alone."""
    from ray import tune
    from dec_ray.service.train import run_training
    i = config["i"]
    run, t0 = runs[i], time.time()
    if not is_finished(run):
        if os.path.exists(os.path.join(run, "config.yaml")):
            run_training(None, run, resume=True)
        else:
            if os.path.exists(run):          # killed before its config was saved: nothing to keep
                shutil.rmtree(run)
            run_training(tables, run, load_config(cfg_path, overrides[i]))
    with open(os.path.join(run, "result.json")) as f:
        result = json.load(f)
    tune.report({"test_ccc": result["test_ccc"], "dev_ccc": result["dev_ccc"], "train_s": time.time() - t0,
                 "best_epoch": result["best_epoch"]})


def progress_callback(out: str, runs: List[str], total: int, done: int):
    """A Tune callback that prints one line per finished or failed run, with the time so far and
    an estimate of the time left (runs left x mean time of the runs finished here)."""
    from ray import tune

    class Progress(tune.Callback):
        def __init__(self):
            self.done, self.t0 = done, time.time()

        def _line(self, trial, what: str) -> None:
            self.done += 1
            here = self.done - done
            run = os.path.relpath(runs[trial.config["i"]], out)
            spent = (time.time() - self.t0) / 60
            eta = f", about {spent / here * (total - self.done):.0f} min left" if self.done < total else ""
            print(f"[experiment] {self.done}/{total} {run}: {what} ({spent:.1f} min{eta})", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            ccc = ", ".join(f"{a} {v:.3f}" for a, v in (r.get("test_ccc") or {}).items() if v is not None)
            self._line(trial, f"test CCC {ccc}")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trial, "FAILED (its folder and the Tune log under tune/ say why)")

    return Progress()


def train_pending(tables: str, out: str, cfg_path: str, pending: Dict[str, List[str]], spec: ExperimentSpec,
                  base: Config, total: int) -> List[str]:
    """Train the pending runs (run folder -> config overrides) as one Tune grid; returns the failed runs."""
    from ray import tune
    from dec_ray.service.cluster import ensure_ray, runs_that_fit
    per_run = base.scale.workers * base.scale.cpus_per_worker + 1
    ensure_ray(per_run * max(1, spec.parallel_runs))    # a private local Ray gets room for parallel_runs
    runs = sorted(pending)
    trainable = tune.with_parameters(train_one, runs=runs, tables=tables, cfg_path=cfg_path,
                                     overrides=[pending[r] for r in runs])
    tuner = tune.Tuner(
        trainable,
        param_space={"i": tune.grid_search(list(range(len(runs))))},
        tune_config=tune.TuneConfig(max_concurrent_trials=runs_that_fit(
            base.scale.workers, base.scale.cpus_per_worker, base.scale.use_gpu, spec.parallel_runs)),
        run_config=tune.RunConfig(name=time.strftime("grid-%Y%m%d-%H%M%S"), storage_path=os.path.join(out, "tune"),
                                  callbacks=[progress_callback(out, runs, total, total - len(runs))], verbose=0))
    grid = tuner.fit()
    return sorted(runs[r.config["i"]] for r in grid if r.error is not None)


def score_across_corpora(runs: List[str], corpora: Sequence[str]) -> Dict[str, Dict[str, str]]:
    """Every finished run scored on each other corpus (NAME=TABLES): name -> (run -> its folder
    there). Each (run, corpus) is scored once and kept (RUN/cross/NAME), so a restart only adds."""
    from dec_ray.report.cross_corpus import parse_corpus, score_on
    named = [parse_corpus(spec) for spec in corpora]
    names = [n for n, _ in named]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:          # their scores would share RUN/cross/NAME
        raise ConfigError(f"cross corpora named alike: {', '.join(twice)} (a folder's name unless NAME=TABLES)")
    out = {}
    for name, tables in named:
        print(f"[experiment] scoring {len(runs)} runs on {name} ({tables}), as deployed and adapted", flush=True)
        bar = ProgressLine(f"[experiment]   {name}: runs scored", len(runs), every_s=30.0)
        out[name], out[f"{name}-adapted"] = {}, {}
        for r in runs:
            out[name][r] = score_on(r, tables, name)
            out[f"{name}-adapted"][r] = score_on(r, tables, name, adapted=True)
            bar.step()
    return out


def check_same_training(out: str, cfg_path: str, overrides: List[str]) -> None:
    """A restarted experiment may add studies or seeds, but its finished runs must have been
    trained with the same base config; mixing two configs in one report would be silent. The same
    config from another path (a preset of another checkout of dec_ray) is the same config."""
    path = os.path.join(out, "spec.yaml")
    if not os.path.exists(path):
        return
    with open(path) as f:
        before = yaml.safe_load(f)
    old = (before.get("config"), list(before.get("set") or []))
    if old == (cfg_path, list(overrides)):
        return
    try:
        same = load_config(*old).to_dict() == load_config(cfg_path, list(overrides)).to_dict()
    except (OSError, ConfigError):               # that config file is gone or no longer valid
        same = False
    if not same:
        raise ConfigError(f"{out} holds an experiment trained with config {before.get('config')} and "
                          f"set {before.get('set')}; this one has {cfg_path} and {overrides}. Use a new --out "
                          "(studies and seeds may change between restarts; the training config may not)")


def machine() -> str:
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return f"{os.cpu_count()} CPUs ({cpu}, {platform.system()}), {gpu}"


def references_for(tables: str) -> List[str]:
    """The linear references these tables can serve: the log-mel ridge always; the eGeMAPS ridges
    where ingest stored the functionals (the per-speaker one where Train names its speakers)."""
    import pyarrow.dataset as pads
    from dec_ray.data.tables import split_files
    from dec_ray.report.ridge import REFERENCES, has_input
    speakers = pads.dataset(split_files(tables, "train"), format="parquet").to_table(columns=["speaker"])["speaker"]
    named = any(speakers.to_pylist())
    return [n for n, (inputs, norm) in REFERENCES.items() if has_input(tables, inputs) and (norm != "speaker" or named)]


def run_experiment(tables: str, out: str, spec: ExperimentSpec, overrides: Sequence[str] = (),
                   command: str = "") -> Dict:
    """Train what is missing, then write the report. Returns {"report", "failed", "runs"}."""
    from dec_ray.data.tables import is_complete, split_rows
    from dec_ray.report.experiment import write_report
    from dec_ray.service.train import differences, fit_reference
    t0 = time.time()
    tables, out = os.path.abspath(tables), os.path.abspath(out)
    if not is_complete(tables):
        raise ValueError(f"{tables}: not a finished ingest (no _SUCCESS); run `dec-ray ingest` first")
    cfg_path = config_path(spec)
    base = load_config(cfg_path, [*spec.set, *overrides])
    n_unlabeled = split_rows(tables, "unlabeled")
    cells = plan(spec, base, n_unlabeled)
    runs = all_runs(cells, spec.seeds, out, {s.name: s.seeds for s in spec.studies})
    check_same_training(out, cfg_path, [*spec.set, *overrides])
    wanted = {r: [*spec.set, *overrides, *cell.overrides(), f"train.seed={seed}"] for r, (cell, seed) in runs.items()}
    for r in filter(is_finished, wanted):        # an option set edited between restarts: not the same runs
        changed = differences(r, load_config(cfg_path, wanted[r]))
        if changed:
            raise ConfigError(f"{r} was trained otherwise than this spec asks ({'; '.join(changed)}): use a new "
                              "--out, or give the changed option set a new name")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "spec.yaml"), "w") as f:
        yaml.safe_dump({**spec.to_dict(), "config": cfg_path, "set": [*spec.set, *overrides]}, f, sort_keys=False)

    ridges = {}
    for ref in cells["_reference"]:              # the linear references at each share, on the same sentences
        share = load_config(cfg_path, [*spec.set, *overrides, f"train.label_fraction={ref.labels}"])
        for name in references_for(tables):
            ridges[(name, ref.labels)] = ridge = os.path.join(out, "runs", name + labels_suffix(ref.labels))
            fit_reference(tables, ridge, name, share)
    pending = {r: o for r, o in wanted.items() if not is_finished(r)}
    print(f"[experiment] {len(spec.studies)} studies, {len({c for g in cells.values() for c in g})} cells x "
          f"{spec.seeds} seeds (or the study's own) = {len(runs)} runs ({len(runs) - len(pending)} finished already), "
          f"{n_unlabeled} unlabeled sentences in the tables", flush=True)
    failed = train_pending(tables, out, cfg_path, pending, spec, base, len(runs)) if pending else []
    info = {"invocations": []}
    if os.path.exists(os.path.join(out, "experiment.json")):
        with open(os.path.join(out, "experiment.json")) as f:
            info = json.load(f)
    info["invocations"].append({"command": command or " ".join(sys.argv), "started": time.strftime(
        "%Y-%m-%d %H:%M:%S", time.localtime(t0)), "trained": len(pending), "elapsed_s": round(time.time() - t0, 1)})
    info.update(tables=tables, failed=failed, total_s=round(sum(i["elapsed_s"] for i in info["invocations"]), 1),
                machine=machine())
    write_json(os.path.join(out, "experiment.json"), info)
    cross = score_across_corpora([r for r in runs if is_finished(r)] + list(ridges.values()), spec.cross)
    report = write_report(out, spec, cells, runs, ridges, info, REFERENCE, cross)
    return {"report": report, "failed": failed, "runs": sorted(runs)}


def rerender(out: str) -> str:
    """OUT/report.md written again from the experiment's saved values (ccc_values*.csv, spec.yaml,
    experiment.json) with today's tests and tables: no runs, tables or training needed (an
    experiment folder copied elsewhere, or one reported before the tests changed)."""
    import glob
    import pandas as pd
    from dec_ray.report.experiment import CLUSTERS_SECTION, render_report
    from dec_ray.report.ridge import REFERENCES
    own = os.path.join(out, "ccc_values.csv")
    if not os.path.exists(own) or not os.path.exists(os.path.join(out, "experiment.json")):
        raise ValueError(f"{out}: not a reported experiment (no ccc_values.csv or experiment.json)")
    spec = load_spec(os.path.join(out, "spec.yaml"))
    base = load_config(config_path(spec), spec.set)
    values = {"": pd.read_csv(own)}
    for path in sorted(glob.glob(os.path.join(out, "ccc_values_*.csv"))):
        values[os.path.basename(path)[len("ccc_values_"):-4]] = pd.read_csv(path)
    pools = [int(m) for m in values[""]["cell"].str.extract(r"_pool(\d+)_")[0].dropna()]
    cells = plan(spec, base, max(pools, default=0))
    names = {c.name for group in cells.values() for c in group}
    missing = sorted(names - set(values[""]["cell"]))
    if missing:
        raise ValueError(f"{out}: the saved values have no cell(s) {', '.join(missing)} of its spec")
    with open(os.path.join(out, "experiment.json")) as f:
        info = json.load(f)
    section = os.path.join(out, CLUSTERS_SECTION)
    clusters = open(section).read() if os.path.exists(section) else ""
    runs = values[""].loc[~values[""]["model"].isin(list(REFERENCES)), "run"].nunique()
    return render_report(out, spec, cells, values, info, REFERENCE, runs, runs, clusters)
