"""`dec-ray predict`: batch inference over any number of files with Ray Data (an actor pool that
holds the model; one GPU per actor when asked). Bad files go to a rejects list, the rest complete.
A per-speaker model (``model.norm: speaker``) is fed whole groups (Ray Data's ``map_groups``): the
files of one speaker are normalised with that speaker's statistics. Groups come from each file's
folder (``--groups folder``, the default for such a model) or a CSV with ``path`` and ``group``."""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from dec_ray.data.audio import AudioError
from dec_ray.data.corpus import list_unlabeled
from dec_ray.data.features import ShortClipError
from dec_ray.data.files import atomic_path


def _reason(e: Exception) -> str:
    if isinstance(e, (AudioError, ShortClipError)):
        return str(e)
    return f"unreadable: {type(e).__name__}: {str(e)[:160]}"      # a decoder failure on one file


class PredictActor:
    def __init__(self, run: str, device: str):
        from dec_ray.report.inference import Predictor
        self.predictor = Predictor(run, device)

    def _columns(self, rows: List[Dict]) -> Dict[str, list]:
        out = {"path": [r["path"] for r in rows], "error": [r["error"] for r in rows],
               "group": [r.get("group", "") for r in rows],
               "cluster": np.array([r.get("cluster", -1) for r in rows], dtype=np.int64)}
        for a in self.predictor.attributes:
            out[a] = np.array([r.get(a, np.nan) for r in rows], dtype=np.float64)
        return out

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, list]:
        rows = []
        for path in batch["path"]:
            try:
                rows.append({"path": path, **self.predictor.predict_file(path), "error": ""})
            except Exception as e:       # one bad file must not stop the batch
                rows.append({"path": path, "error": _reason(e)})
        return self._columns(rows)


class GroupPredictActor(PredictActor):
    """One group's files at a time: the good ones are normalised with their group's statistics."""

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, list]:
        rows, good, chunks = [], [], []
        for path, group in zip(batch["path"], batch["group"]):
            try:
                chunks.append(self.predictor.file_chunks(path))
                good.append({"path": path, "group": group, "error": ""})
            except Exception as e:
                rows.append({"path": path, "group": group, "error": _reason(e)})
        if good:
            preds = self.predictor.predict_chunks(np.stack(chunks), [r["group"] for r in good])
            rows += [{**r, **p} for r, p in zip(good, preds)]
        return self._columns(rows)


def file_groups(paths: Sequence[str], groups: str) -> List[str]:
    """Each file's group: ``folder`` (its parent folder) or a CSV with ``path`` and ``group`` columns
    (relative paths are relative to the CSV's folder); a file the CSV does not list is an error."""
    if groups == "folder":
        return [os.path.dirname(p) for p in paths]
    if not os.path.isfile(groups):
        raise FileNotFoundError(f"--groups {groups}: give 'folder' or a CSV file with path and group columns")
    import pandas as pd
    df = pd.read_csv(groups, dtype=str)
    if not {"path", "group"} <= set(df.columns):
        raise ValueError(f"--groups {groups}: needs the columns path and group; it has {list(df.columns)}")
    base = os.path.dirname(os.path.abspath(groups))
    of = {os.path.abspath(os.path.join(base, p)): g for p, g in zip(df["path"], df["group"].fillna(""))}
    missing = [p for p in paths if p not in of]
    if missing:
        raise ValueError(f"--groups {groups} names no group for {len(missing)} file(s), e.g. {missing[0]}")
    return [of[p] for p in paths]


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
    from dec_ray.report.inference import model_file
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
    items = [{"path": p} for p in paths]
    if per_speaker:
        items = [{"path": p, "group": g} for p, g in zip(paths, file_groups(paths, groups or "folder"))]
    ensure_ray()
    actors = actors or max(1, int(ray.cluster_resources().get("GPU" if use_gpu else "CPU", 1)) - (0 if use_gpu else 1))
    ds = ray.data.from_items(items)
    kw = dict(fn_constructor_kwargs={"run": run, "device": "cuda" if use_gpu else "cpu"}, concurrency=actors,
              num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else 1, batch_format="numpy")
    if per_speaker:
        ds = ds.groupby("group").map_groups(GroupPredictActor, **kw)
    else:
        ds = ds.map_batches(PredictActor, batch_size=16, **kw)
    df = ds.to_pandas()
    bad = df[df["error"] != ""]
    good = df[df["error"] == ""].drop(columns=["error"]).sort_values("path")
    if (good["cluster"] < 0).all():
        good = good.drop(columns=["cluster"])
    if not per_speaker:
        good = good.drop(columns=["group"])
    with atomic_path(out) as tmp:
        if out.lower().endswith(".csv"):
            good.to_csv(tmp, index=False)
        else:
            good.to_parquet(tmp, index=False)
    rejects = os.path.splitext(out)[0] + ".rejects.csv"
    with atomic_path(rejects) as tmp:
        bad[["path", "error"]].rename(columns={"error": "reason"}).to_csv(tmp, index=False)
    return {"predicted": len(good), "rejected": len(bad), "out": out, "rejects": rejects}
