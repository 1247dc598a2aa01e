"""`dec-ray predict`: batch inference over any number of files with Ray Data (an actor pool that
holds the model; one GPU per actor when asked). Bad files go to a rejects list, the rest complete."""
from __future__ import annotations

import os
from typing import Dict, Sequence

import numpy as np

from dec_ray.data.audio import AudioError
from dec_ray.data.corpus import list_unlabeled
from dec_ray.data.features import ShortClipError
from dec_ray.data.files import atomic_path


class PredictActor:
    def __init__(self, run: str, device: str):
        from dec_ray.report.inference import Predictor
        self.predictor = Predictor(run, device)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, list]:
        rows = []
        for path in batch["path"]:
            try:
                rows.append({"path": path, **self.predictor.predict_file(path), "error": ""})
            except (AudioError, ShortClipError) as e:
                rows.append({"path": path, "error": str(e)})
            except Exception as e:       # a decoder failure on one file must not stop the batch
                rows.append({"path": path, "error": f"unreadable: {type(e).__name__}: {str(e)[:160]}"})
        out = {"path": [r["path"] for r in rows], "error": [r["error"] for r in rows],
               "cluster": np.array([r.get("cluster", -1) for r in rows], dtype=np.int64)}
        for a in self.predictor.attributes:
            out[a] = np.array([r.get(a, np.nan) for r in rows], dtype=np.float64)
        return out


OUTPUT_FORMATS = (".parquet", ".csv")


def check_output(out: str) -> None:
    """Before any inference: a known format and a folder that exists."""
    if os.path.splitext(out)[1].lower() not in OUTPUT_FORMATS:
        raise ValueError(f"--out {out}: give a .parquet or .csv file")
    if not os.path.isdir(os.path.dirname(out)):
        raise FileNotFoundError(f"--out {out}: the folder {os.path.dirname(out)} does not exist")


def run_predict(run: str, audio: Sequence[str], out: str, actors: int = 0, use_gpu: bool = False) -> Dict:
    import ray
    from dec_ray.report.inference import model_file
    from dec_ray.service.cluster import ensure_ray
    run, out = os.path.abspath(run), os.path.abspath(out)       # Ray workers run in other directories
    model_file(run)
    check_output(out)
    paths = [it.path for it in list_unlabeled([os.path.abspath(a) for a in audio])]
    if not paths:
        raise ValueError(f"no audio files in {list(audio)}")
    ensure_ray()
    actors = actors or max(1, int(ray.cluster_resources().get("GPU" if use_gpu else "CPU", 1)) - (0 if use_gpu else 1))
    ds = ray.data.from_items([{"path": p} for p in paths])
    ds = ds.map_batches(PredictActor, fn_constructor_kwargs={"run": run, "device": "cuda" if use_gpu else "cpu"},
                        batch_size=16, concurrency=actors, num_gpus=1 if use_gpu else 0,
                        num_cpus=0 if use_gpu else 1, batch_format="numpy")
    df = ds.to_pandas()
    bad = df[df["error"] != ""]
    good = df[df["error"] == ""].drop(columns=["error"]).sort_values("path")
    if (good["cluster"] < 0).all():
        good = good.drop(columns=["cluster"])
    with atomic_path(out) as tmp:
        if out.lower().endswith(".csv"):
            good.to_csv(tmp, index=False)
        else:
            good.to_parquet(tmp, index=False)
    rejects = os.path.splitext(out)[0] + ".rejects.csv"
    with atomic_path(rejects) as tmp:
        bad[["path", "error"]].rename(columns={"error": "reason"}).to_csv(tmp, index=False)
    return {"predicted": len(good), "rejected": len(bad), "out": out, "rejects": rejects}
