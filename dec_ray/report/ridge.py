"""The linear references: closed-form ridge regression on per-sentence features. No Ray here.

Two inputs (``INPUTS``):
- ``logmel``: the log of the sentence's mel power frames (all frames of its C chunks) summarised
  as the per-bin mean and standard deviation (2 x 128 values), from the chunk tables;
- ``egemaps``: the 88 eGeMAPS v02 functionals (openSMILE) stored at ingest (the field's reference).
Two normalisations (``NORMS``):
- ``train``: z-scored with Train statistics (the networks' normalisation);
- ``speaker``: each speaker's features z-scored with that speaker's own mean and std, in every
  split: statistics of features only, never of labels (a test speaker's too: it needs their audio,
  not their labels). Sentences without a speaker share one group per split.
NaN (a functional a clip lacks) becomes 0 after the z-score. One ridge per attribute, its strength
chosen by dev CCC. The fit is a run folder in the trainer's format (result.json, dev/test
predictions), so `dec-ray evaluate` scores it with the paper's protocol.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from dec_ray.data.files import write_json
from dec_ray.data.groups import Moments, row_mean_std, zscore_rows as zscore
from dec_ray.data.normalization import LOG_EPS
from dec_ray.data.tables import split_files, with_sentence_info
from dec_ray.method.losses import ccc
from dec_ray.report.evaluation import predictions_table

ALPHAS = tuple(10.0 ** np.arange(-2, 5))
INPUTS = ("logmel", "egemaps")
NORMS = ("train", "speaker")
# the references every table carries: cell name -> (input, normalisation); "ridge" is the first one
REFERENCES = {"ridge": ("logmel", "train"), "egemaps": ("egemaps", "train"),
              "egemaps-speaker": ("egemaps", "speaker")}


def utterance_features(chunks: np.ndarray) -> np.ndarray:
    """(n, C, m, F) raw mel power -> (n, 2F): per-bin mean and std of log-mel over the frames."""
    logmel = np.log(chunks.astype(np.float32) + LOG_EPS).reshape(len(chunks), -1, chunks.shape[-1])
    return np.concatenate([logmel.mean(1), logmel.std(1)], axis=1)


def features_of(tables: str) -> dict:
    """The feature settings a corpus's tables were made with (TABLES/plan.json)."""
    with open(os.path.join(tables, "plan.json")) as f:
        return json.load(f)["features"]


def has_input(tables: str, inputs: str) -> bool:
    """Whether these tables carry what the reference reads (eGeMAPS: ingested with it)."""
    return inputs == "logmel" or features_of(tables).get("functionals") == inputs


def read_features(tables: str, split: str, inputs: str, columns: Sequence[str] = ()):
    """(table of row_id, speaker and ``columns``, (n, D) features) of a split, in row_id order;
    None when the split is empty."""
    if inputs not in INPUTS:
        raise ValueError(f"ridge input {inputs!r}; choose one of {INPUTS}")
    files = split_files(tables, split)
    if not files:
        return None
    if not has_input(tables, inputs):
        raise ValueError(f"{tables} has no {inputs} column: ingest it with features.functionals={inputs}")
    col = "chunks" if inputs == "logmel" else inputs
    t = pads.dataset(files, format="parquet").to_table(columns=["row_id", "speaker", col, *columns]).sort_by("row_id")
    if inputs == "logmel":
        x = utterance_features(t["chunks"].combine_chunks().to_numpy_ndarray())
    else:
        if t[col].null_count:
            raise ValueError(f"{tables}: {t[col].null_count} of the {split} split's {len(t)} sentences have no "
                             f"{inputs} functionals (the pool's are computed only with "
                             f"features.functionals_pool=true); run the same `dec-ray ingest` again with --set "
                             "features.functionals_pool=true (it redoes the pool's parts alone)")
        x = np.stack(t[col].to_numpy(zero_copy_only=False)).astype(np.float64)
    return t.drop_columns([col]), x


def read_split(tables: str, split: str, attributes: Sequence[str], inputs: str = "logmel"):
    """(row ids, features, labels, speakers) of a split, or None."""
    got = read_features(tables, split, inputs, attributes)
    if got is None:
        return None
    t, x = got
    y = np.stack([t[a].to_numpy(zero_copy_only=False).astype(np.float64) for a in attributes], axis=1)
    speakers = np.array([s or "" for s in t["speaker"].to_pylist()], dtype=object)
    return t["row_id"].to_numpy(), x, y, speakers


def moments(x: np.ndarray):
    """Per-column mean and std over the rows, ignoring NaN (``groups.row_mean_std``, the one
    definition of a group's feature statistics)."""
    return row_mean_std(Moments.of_rows(x))


def speaker_normalize(x: np.ndarray, speakers: np.ndarray) -> np.ndarray:
    """Each speaker's rows z-scored with that speaker's own feature statistics (no labels read).
    The rows are one split's: a speaker is a group within a split, as the networks' groups are."""
    out = np.empty_like(x, dtype=np.float64)
    for s in np.unique(speakers):
        rows = speakers == s
        out[rows] = zscore(x[rows], *moments(x[rows]))
    return out


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


def fit_attributes(train, dev, attributes: Sequence[str]):
    """One ridge per attribute on (features, labels) of Train, alpha chosen by dev CCC:
    ({attribute: alpha}, {attribute: weights}, {attribute: intercept}, {attribute: {alpha: dev CCC}})."""
    alphas, weights, biases, dev_cccs = {}, {}, {}, {}
    for j, a in enumerate(attributes):
        alphas[a], weights[a], b, dev_cccs[a] = choose_alpha(train[0], train[1][:, j], dev[0], dev[1][:, j])
        biases[a] = float(b)
    return alphas, weights, biases, dev_cccs


def teacher_predictions(tables: str, attributes: Sequence[str], train_rows: np.ndarray, pool_rows: np.ndarray,
                        inputs: str = "egemaps", norm: str = "speaker"):
    """A reference fitted as ``run_ridge`` fits it, on the labeled ``train_rows``, and its predictions
    (label scale) on ``pool_rows`` (of the unlabeled and Train splits): the targets a network
    distils on the pool (``train.teacher``). Only the labeled rows' labels are read."""
    attributes = list(attributes)
    train, dev = (read_split(tables, s, attributes, inputs) for s in ("train", "dev"))
    if norm == "speaker" and not any(train[3]):
        raise ValueError(f"{tables}: a per-speaker teacher needs speakers, and its Train names none")
    keep = np.isin(train[0], train_rows)
    mean, std = moments(train[1][keep])
    model = {"norm": norm, "mean": mean, "std": std, "attributes": attributes}
    _, model["w"], model["b"], _ = fit_attributes((normalized(model, train[1][keep], train[3][keep]), train[2][keep]),
                                                  (normalized(model, dev[1], dev[3]), dev[2]), attributes)
    ids, preds = [], []
    for split in ("train", "unlabeled"):          # each split's pool rows normalised among themselves
        d = read_split(tables, split, attributes, inputs)
        if d is None:
            continue
        rows = np.isin(d[0], pool_rows)
        ids.append(d[0][rows])
        preds.append(predict_ridge(model, normalized(model, d[1][rows], d[3][rows])))
    return np.concatenate(ids), np.concatenate(preds)


def load_ridge(run: str) -> Dict:
    """The fitted reference of a ridge run (RUN/ridge.npz): its input and normalisation, the Train
    feature mean/std, weights, intercepts, and the feature settings of the tables it was fitted on
    (None in fits made before they were recorded)."""
    z = np.load(os.path.join(run, "ridge.npz"))
    attrs = [str(a) for a in z["attributes"]]
    return {"attributes": attrs, "mean": z["mean"], "std": z["std"], "w": {a: z[f"w_{a}"] for a in attrs},
            "b": {a: float(z[f"b_{a}"]) for a in attrs},
            "inputs": str(z["inputs"]) if "inputs" in z else "logmel",
            "norm": str(z["norm"]) if "norm" in z else "train",
            "features": json.loads(str(z["features"])) if "features" in z else None}


def normalized(model: Dict, x: np.ndarray, speakers: np.ndarray, stats: Optional[tuple] = None) -> np.ndarray:
    """Features as the fit reads them: per speaker, or z-scored with the fit's Train statistics
    (``stats``: other (mean, std), the adapted score's target-corpus statistics)."""
    if model["norm"] == "speaker":
        return speaker_normalize(x, speakers)
    return zscore(x, *(stats or (model["mean"], model["std"])))


def predict_ridge(model: Dict, x: np.ndarray) -> np.ndarray:
    return np.stack([x @ model["w"][a] + model["b"][a] for a in model["attributes"]], 1)


def run_ridge(tables: str, out: str, attributes: Sequence[str] = ("arousal",),
              train_rows: Optional[np.ndarray] = None, labels: Optional[Dict] = None,
              inputs: str = "logmel", norm: str = "train", name: str = "ridge") -> Dict:
    """Fit on Train (``train_rows`` of it: the labeled sentences of a label-scarce run), choose
    alpha on dev (per attribute), score dev and test; write a run folder whose model is ``name``.
    ``labels`` (the label share and its seed) is recorded, so a later command can tell whether
    this fit is its own."""
    if norm not in NORMS:
        raise ValueError(f"ridge normalisation {norm!r}; choose one of {NORMS}")
    attributes: List[str] = list(attributes)
    data = {s: read_split(tables, s, attributes, inputs) for s in ("train", "dev", "test")}
    if data["train"] is None or data["dev"] is None:
        raise ValueError(f"{tables}: ridge needs the train and dev splits")
    if norm == "speaker" and not any(data["train"][3]):
        raise ValueError(f"{tables}: per-speaker normalisation needs speakers, and its Train names none")
    if train_rows is not None:
        keep = np.isin(data["train"][0], train_rows)
        data["train"] = tuple(d[keep] for d in data["train"])
    mean, std = moments(data["train"][1])
    model = {"norm": norm, "mean": mean, "std": std}
    norm_x = {s: (d[0], normalized(model, d[1], d[3]), d[2]) for s, d in data.items() if d is not None}
    alphas, weights, biases, dev_cccs = fit_attributes(norm_x["train"][1:], norm_x["dev"][1:], attributes)
    fitted = {"attributes": attributes, "w": weights, "b": biases}
    preds = {s: predict_ridge(fitted, x) for s, (_, x, _) in norm_x.items()}
    os.makedirs(out, exist_ok=True)
    result = {"model": name, "attributes": attributes, "inputs": inputs, "norm": norm, "alpha": alphas,
              "train_sentences": int(len(norm_x["train"][1])), "labels": labels,
              "dev_ccc_per_alpha": {a: {str(al): float(v) for al, v in c.items()} for a, c in dev_cccs.items()},
              "dev_ccc": {a: ccc(preds["dev"][:, j], norm_x["dev"][2][:, j]) for j, a in enumerate(attributes)}}
    for s in ("dev", "test"):
        if s in norm_x:
            pq.write_table(with_sentence_info(predictions_table(norm_x[s][0], preds[s], norm_x[s][2], attributes),
                                              tables, s), os.path.join(out, f"{s}_predictions.parquet"))
    if "test" in norm_x:
        result["test_ccc"] = {a: ccc(preds["test"][:, j], norm_x["test"][2][:, j]) for j, a in enumerate(attributes)}
    np.savez(os.path.join(out, "ridge.npz"), mean=mean, std=std, attributes=np.array(attributes),
             inputs=np.array(inputs), norm=np.array(norm),
             features=np.array(json.dumps(features_of(tables), sort_keys=True)),
             **{f"w_{a}": weights[a] for a in attributes}, **{f"b_{a}": np.array(biases[a]) for a in attributes})
    write_json(os.path.join(out, "result.json"), result)          # last: marks the run finished
    return result
