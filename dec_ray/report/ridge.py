"""The linear reference: ridge regression on utterance statistics of the same mel features.

Per sentence, the log of its mel power frames (all frames of its C chunks) summarised as the
per-bin mean and standard deviation (2 x 128 values), z-scored with Train statistics; a closed-form
ridge per attribute, its strength chosen by dev CCC. It is the first question a reviewer asks of a
deep model: is it worth it? A run folder in the trainer's format (result.json, dev/test
predictions), so `dec-ray evaluate` scores it with the paper's protocol. No Ray here.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from dec_ray.data.files import write_json
from dec_ray.data.tables import split_files, with_sentence_info
from dec_ray.method.losses import ccc
from dec_ray.report.evaluation import predictions_table

ALPHAS = tuple(10.0 ** np.arange(-2, 5))


def utterance_features(chunks: np.ndarray) -> np.ndarray:
    """(n, C, m, F) raw mel power -> (n, 2F): per-bin mean and std of log-mel over the frames."""
    logmel = np.log(chunks.astype(np.float32) + 1e-10).reshape(len(chunks), -1, chunks.shape[-1])
    return np.concatenate([logmel.mean(1), logmel.std(1)], axis=1)


def read_split(tables: str, split: str, attributes: Sequence[str]):
    files = split_files(tables, split)
    if not files:
        return None
    t = pads.dataset(files, format="parquet").to_table(columns=["row_id", "chunks", *attributes]).sort_by("row_id")
    x = utterance_features(t["chunks"].combine_chunks().to_numpy_ndarray())
    y = np.stack([t[a].to_numpy(zero_copy_only=False).astype(np.float64) for a in attributes], axis=1)
    return t["row_id"].to_numpy(), x, y


def fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float):
    """Closed-form ridge on centred data: (weights, intercept)."""
    xm, ym = x.mean(0), y.mean(0)
    xc = x - xm
    w = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ (y - ym))
    return w, ym - xm @ w


def choose_alpha(xtr: np.ndarray, ytr: np.ndarray, xdev: np.ndarray, ydev: np.ndarray,
                 alphas: Sequence[float] = ALPHAS):
    """Fit one attribute (1-d labels) for each alpha and keep the best by dev CCC:
    (alpha, weights, intercept, {alpha: dev CCC})."""
    fits = {al: fit_ridge(xtr, ytr, al) for al in alphas}
    dev_ccc = {al: ccc(xdev @ w + b, ydev) for al, (w, b) in fits.items()}
    best = max(dev_ccc, key=dev_ccc.get)
    return float(best), *fits[best], dev_ccc


def features_of(tables: str) -> dict:
    """The feature settings a corpus's tables were made with (TABLES/plan.json)."""
    with open(os.path.join(tables, "plan.json")) as f:
        return json.load(f)["features"]


def load_ridge(run: str) -> Dict:
    """The fitted reference of a ridge run (RUN/ridge.npz): feature mean/std, weights, intercepts,
    and the feature settings of the tables it was fitted on (None in fits made before they were
    recorded)."""
    z = np.load(os.path.join(run, "ridge.npz"))
    attrs = [str(a) for a in z["attributes"]]
    return {"attributes": attrs, "mean": z["mean"], "std": z["std"], "w": {a: z[f"w_{a}"] for a in attrs},
            "b": {a: float(z[f"b_{a}"]) for a in attrs},
            "features": json.loads(str(z["features"])) if "features" in z else None}


def run_ridge(tables: str, out: str, attributes: Sequence[str] = ("arousal",),
              train_rows: Optional[np.ndarray] = None, labels: Optional[Dict] = None) -> Dict:
    """Fit on Train (``train_rows`` of it: the labeled sentences of a label-scarce run), choose
    alpha on dev (per attribute), score dev and test; write a run folder. ``labels`` (the label
    share and its seed) is recorded, so a later command can tell whether this fit is its own."""
    attributes: List[str] = list(attributes)
    data = {s: read_split(tables, s, attributes) for s in ("train", "dev", "test")}
    if data["train"] is None or data["dev"] is None:
        raise ValueError(f"{tables}: ridge needs the train and dev splits")
    if train_rows is not None:
        keep = np.isin(data["train"][0], train_rows)
        data["train"] = tuple(d[keep] for d in data["train"])
    _, xtr, ytr = data["train"]
    mean, std = xtr.mean(0), xtr.std(0) + 1e-8
    norm = {s: (d[0], (d[1] - mean) / std, d[2]) for s, d in data.items() if d is not None}
    preds = {s: np.zeros_like(d[2]) for s, d in norm.items()}
    alphas, dev_cccs, weights, biases = {}, {}, {}, {}
    for j, a in enumerate(attributes):
        alphas[a], w, b, dev_cccs[a] = choose_alpha(norm["train"][1], norm["train"][2][:, j],
                                                    norm["dev"][1], norm["dev"][2][:, j])
        weights[a], biases[a] = w, float(b)
        for s, (_, x, _) in norm.items():
            preds[s][:, j] = x @ w + b
    os.makedirs(out, exist_ok=True)
    result = {"model": "ridge", "attributes": attributes, "alpha": alphas, "train_sentences": int(len(xtr)),
              "labels": labels,
              "dev_ccc_per_alpha": {a: {str(al): float(v) for al, v in c.items()} for a, c in dev_cccs.items()},
              "dev_ccc": {a: ccc(preds["dev"][:, j], norm["dev"][2][:, j]) for j, a in enumerate(attributes)}}
    for s in ("dev", "test"):
        if s in norm:
            pq.write_table(with_sentence_info(predictions_table(norm[s][0], preds[s], norm[s][2], attributes),
                                              tables, s), os.path.join(out, f"{s}_predictions.parquet"))
    if "test" in norm:
        result["test_ccc"] = {a: ccc(preds["test"][:, j], norm["test"][2][:, j]) for j, a in enumerate(attributes)}
    np.savez(os.path.join(out, "ridge.npz"), mean=mean, std=std, attributes=np.array(attributes),
             features=np.array(json.dumps(features_of(tables), sort_keys=True)),
             **{f"w_{a}": weights[a] for a in attributes}, **{f"b_{a}": np.array(biases[a]) for a in attributes})
    write_json(os.path.join(out, "result.json"), result)          # last: marks the run finished
    return result
