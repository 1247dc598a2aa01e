"""`dec-ray predict`: batch inference over any number of files with Ray Data (an actor pool that
holds the model; one GPU per actor when asked). Bad files go to a rejects list, the rest complete.

A per-speaker model (``model.norm: speaker``) with ``--groups`` (each file's speaker: a CSV with
``path`` and ``group`` or ``speaker`` columns, a corpus in the MSP-Podcast layout, or ``folder``)
runs two streaming passes in bounded memory: the groups' statistics (each file's sums, added up
on the driver: two vectors per group), then the normalised forwards in batches of files. Files
without a group, and every file when no groups are given, are normalised with the population
statistics the run saved. A folder is a group only when asked (a warning says why it rarely is one:
MSP-Podcast keeps all audio in one folder, TESS's folders are emotions)."""
from __future__ import annotations

import os
import warnings
from typing import Dict, List, Optional, Sequence

import numpy as np

from dec_ray.data.audio import AudioError
from dec_ray.data.corpus import list_unlabeled
from dec_ray.data.features import ShortClipError
from dec_ray.data.files import atomic_path
from dec_ray.data.groups import POPULATION, GroupMoments, GroupSums, Moments

BATCH_FILES = 16                # files per forward (and per statistics task)


def _reason(e: Exception) -> str:
    if isinstance(e, (AudioError, ShortClipError)):
        return str(e)
    return f"unreadable: {type(e).__name__}: {str(e)[:160]}"      # a decoder failure on one file


class PredictActor:
    """A batch of files -> their predictions; ``moments``: the groups' statistics (a per-speaker
    model with groups; a file whose group is ``POPULATION`` reads the population's), and
    ``functional_moments`` their functionals' (a model that reads functionals)."""

    def __init__(self, run: str, device: str, moments: Optional[GroupMoments] = None,
                 functional_moments: Optional[GroupMoments] = None):
        from dec_ray.report.inference import Predictor
        self.predictor = Predictor(run, device)
        self.moments, self.functional_moments = moments, functional_moments

    def _columns(self, rows: List[Dict]) -> Dict[str, list]:
        out = {"path": [r["path"] for r in rows], "error": [r["error"] for r in rows],
               "group": [r.get("group", "") for r in rows],
               "normalization": [r.get("normalization", "") for r in rows],
               "cluster": np.array([r.get("cluster", -1) for r in rows], dtype=np.int64)}
        for a in self.predictor.attributes:
            out[a] = np.array([r.get(a, np.nan) for r in rows], dtype=np.float64)
        return out

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, list]:
        from dec_ray.report.inference import stacked
        rows, good, features = [], [], []
        groups = batch["group"] if "group" in batch else [""] * len(batch["path"])
        for path, group in zip(batch["path"], groups):
            try:
                features.append(self.predictor.file_features(path))
                good.append({"path": path, "group": group, "error": ""})
            except Exception as e:       # one bad file must not stop the batch
                rows.append({"path": path, "group": group, "error": _reason(e)})
        if good:
            keys = [r["group"] or POPULATION for r in good] if self.moments is not None else None
            preds = self.predictor.predict_features(stacked(features), keys, self.moments,
                                                    functional_moments=self.functional_moments)
            for r, p in zip(good, preds):
                if r["group"] == "" and p["normalization"] == "speaker":
                    p["normalization"] = "population"
                rows.append({**r, **p})
        return self._columns(rows)


class SumsActor:
    """A batch of files -> each group's ``Moments`` over its files here (pass 1): of the mel input
    (n, s, ss) and, for a model that reads functionals, of them (fn, fs, fss; else empty)."""

    def __init__(self, run: str):
        from dec_ray.report.inference import Predictor
        self.predictor = Predictor(run, "cpu")

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, list]:
        sums, fsums, bad = GroupSums(), GroupSums(), []
        p = self.predictor
        none, fnone = np.zeros(p.cfg.features.n_mels), np.zeros(p.functionals)
        for path, group in zip(batch["path"], batch["group"]):
            if not group:
                continue
            try:
                f = p.file_features(path)
            except Exception as e:
                bad.append((path, _reason(e)))
                continue
            for total, m in zip((sums, fsums), p.clip_moments(f)):
                total.add_moments(group, m)
        names = sorted(sums.sums)
        fs = [fsums.sums.get(g, Moments(fnone, fnone, fnone)) for g in names]
        return {"group": names + [""] * len(bad), "path": [""] * len(names) + [p for p, _ in bad],
                "error": [""] * len(names) + [r for _, r in bad],
                "n": [sums.sums[g].n for g in names] + [0] * len(bad),
                "s": [sums.sums[g].s for g in names] + [none] * len(bad),
                "ss": [sums.sums[g].ss for g in names] + [none] * len(bad),
                "fn": [m.n for m in fs] + [fnone] * len(bad), "fs": [m.s for m in fs] + [fnone] * len(bad),
                "fss": [m.ss for m in fs] + [fnone] * len(bad)}


def file_groups(paths: Sequence[str], groups: str) -> List[str]:
    """Each file's group: ``folder`` (its parent folder, with a warning), a corpus folder in the
    MSP-Podcast layout (its speakers), or a CSV with ``path`` and ``group`` (or ``speaker``)
    columns (relative paths are relative to the CSV's folder); a file a CSV does not list is an
    error, one a corpus does not name (or names no speaker for) has none: the population's."""
    if groups == "folder":
        warnings.warn("--groups folder: each folder is taken as one speaker. A folder is rarely a speaker "
                      "(MSP-Podcast keeps all its audio in one; TESS's folders are emotions, and normalising by "
                      "them removes the label); prefer a CSV of path,speaker", stacklevel=2)
        return [os.path.dirname(p) for p in paths]
    if os.path.isdir(groups):
        from dec_ray.data.corpus import read_msp_podcast
        items, _ = read_msp_podcast(groups)
        of = {os.path.abspath(it.path): it.speaker for it in items}
        return [of.get(p, "") for p in paths]
    if not os.path.isfile(groups):
        raise FileNotFoundError(f"--groups {groups}: give a CSV with path and group (or speaker) columns, a corpus "
                                "folder in the MSP-Podcast layout, or 'folder'")
    import pandas as pd
    df = pd.read_csv(groups, dtype=str)
    col = "group" if "group" in df.columns else "speaker"
    if not {"path", col} <= set(df.columns):
        raise ValueError(f"--groups {groups}: needs the columns path and group (or speaker); it has {list(df.columns)}")
    base = os.path.dirname(os.path.abspath(groups))
    of = {os.path.abspath(os.path.join(base, p)): g for p, g in zip(df["path"], df[col].fillna(""))}
    missing = [p for p in paths if p not in of]
    if missing:
        raise ValueError(f"--groups {groups} names no group for {len(missing)} file(s), e.g. {missing[0]}")
    return [of[p] for p in paths]


def group_moments(ds, run: str, actors: int):
    """Pass 1: the groups' statistics, streamed (each task sums its files by group; the driver adds
    two vectors per group): (GroupSums of the named groups, GroupSums of their functionals (empty
    for a model without them), {path: reason} of the files that failed)."""
    total, functionals, bad = GroupSums(), GroupSums(), {}
    sums = ds.map_batches(SumsActor, batch_size=BATCH_FILES, fn_constructor_kwargs={"run": run},
                          concurrency=actors, num_cpus=1, batch_format="numpy")
    for b in sums.iter_batches(batch_format="numpy", batch_size=256):
        for i, (g, path, err) in enumerate(zip(b["group"], b["path"], b["error"])):
            if err:
                bad[path] = err
                continue
            total.add_moments(g, Moments(int(b["n"][i]), np.asarray(b["s"][i], np.float64),
                                         np.asarray(b["ss"][i], np.float64)))
            if len(b["fn"][i]):
                functionals.add_moments(g, Moments(*(np.asarray(b[k][i], np.float64) for k in ("fn", "fs", "fss"))))
    return total, functionals, bad


OUTPUT_FORMATS = (".parquet", ".csv")


def check_output(out: str) -> None:
    """Before any inference: a known format and a folder that exists."""
    if os.path.splitext(out)[1].lower() not in OUTPUT_FORMATS:
        raise ValueError(f"--out {out}: give a .parquet or .csv file")
    if not os.path.isdir(os.path.dirname(out)):
        raise FileNotFoundError(f"--out {out}: the folder {os.path.dirname(out)} does not exist")


def model_norm(run: str) -> str:
    """The run's ``model.norm``, from its config.yaml (before any model is loaded)."""
    from dec_ray.config import load_config
    return load_config(os.path.join(run, "config.yaml")).model.norm


def run_predict(run: str, audio: Sequence[str], out: str, actors: int = 0, use_gpu: bool = False,
                groups: Optional[str] = None) -> Dict:
    import ray
    from dec_ray.report.inference import Predictor, model_file
    from dec_ray.service.cluster import ensure_ray
    run, out = os.path.abspath(run), os.path.abspath(out)       # Ray workers run in other directories
    model_file(run)
    check_output(out)
    per_speaker = model_norm(run) == "speaker"
    if groups and not per_speaker:
        raise ValueError(f"--groups: {run} normalises its input with Train statistics (model.norm train); "
                         "groups apply to a per-speaker model only")
    paths = [it.path for it in list_unlabeled([os.path.abspath(a) for a in audio])]
    if not paths:
        raise ValueError(f"no audio files in {list(audio)}")
    keys = file_groups(paths, groups) if groups else [""] * len(paths)
    population = None
    if per_speaker and not all(keys):
        population = Predictor(run).population_moments()            # refused here, before any work
    ensure_ray()
    actors = actors or max(1, int(ray.cluster_resources().get("GPU" if use_gpu else "CPU", 1)) - (0 if use_gpu else 1))
    ds = ray.data.from_items([{"path": p, "group": g} for p, g in zip(paths, keys)])
    moments, functional_moments, bad = None, None, {}
    if per_speaker and any(keys):
        sums, fsums, bad = group_moments(ds, run, actors)
        moments = GroupMoments.concat([m for m in (sums.moments() if sums.sums else None, population) if m is not None])
        fpopulation = Predictor(run).functional_population      # a model that reads functionals: their groups too
        if fpopulation is not None:
            functional_moments = GroupMoments.concat(([fsums.moments(rows=True)] if fsums.sums else []) + [fpopulation])
        print(f"[dec-ray] predict: {len(sums.sums)} speaker group(s) from {groups}; "
              f"{sum(not k for k in keys)} file(s) without one read the population statistics", flush=True)
        ds = ds.filter(lambda r: r["path"] not in bad) if bad else ds
    elif per_speaker:
        print("[dec-ray] predict: no --groups: every file is normalised with the run's population statistics "
              "(its Train audio); name each file's speaker with --groups for the per-speaker statistics it was "
              "trained with", flush=True)
    kw = dict(fn_constructor_kwargs={"run": run, "device": "cuda" if use_gpu else "cpu", "moments": moments,
                                     "functional_moments": functional_moments},
              concurrency=actors, num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else 1, batch_format="numpy")
    df = ds.map_batches(PredictActor, batch_size=BATCH_FILES, **kw).to_pandas()
    if bad:
        import pandas as pd
        df = pd.concat([df, pd.DataFrame({"path": list(bad), "error": list(bad.values())})], ignore_index=True)
    bad = df[df["error"] != ""]
    good = df[df["error"] == ""].drop(columns=["error"]).sort_values("path")
    if (good["cluster"] < 0).all():
        good = good.drop(columns=["cluster"])
    if not per_speaker:
        good = good.drop(columns=["group", "normalization"])
    with atomic_path(out) as tmp:
        if out.lower().endswith(".csv"):
            good.to_csv(tmp, index=False)
        else:
            good.to_parquet(tmp, index=False)
    rejects = os.path.splitext(out)[0] + ".rejects.csv"
    with atomic_path(rejects) as tmp:
        bad[["path", "error"]].rename(columns={"error": "reason"}).to_csv(tmp, index=False)
    return {"predicted": len(good), "rejected": len(bad), "out": out, "rejects": rejects}
