"""Cross-corpus scoring: a finished run (or the ridge reference) scored on another corpus's tables,
with the normalisation of its own training corpus, as a user would deploy it. No Ray here.

Each (run, corpus) gets a run-shaped folder, RUN/cross/NAME/ (result.json, test_predictions.parquet),
so the paper's protocol (``evaluation.evaluate_runs``: random test subsets x runs, t-test) scores
it from the saved predictions, one table per corpus.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from dec_ray.data.files import atomic_path, write_json
from dec_ray.data.tables import READ_BATCH, split_files, with_sentence_info
from dec_ray.report.evaluation import predictions_table


def parse_corpus(spec: str) -> Tuple[str, str]:
    """NAME=TABLES, or TABLES (named after its folder)."""
    name, _, path = spec.rpartition("=")
    path = os.path.abspath(path)
    return (name or os.path.basename(path.rstrip("/")), path)


def _batches(tables: str, split: str, attributes: Sequence[str]):
    files = split_files(tables, split)
    if not files:
        raise ValueError(f"{tables}: no {split} split to score on")
    ds = pads.dataset(files, format="parquet")
    for b in ds.to_batches(columns=["row_id", "chunks", *attributes], batch_size=READ_BATCH):
        gold = np.stack([b.column(a).to_numpy(zero_copy_only=False).astype(np.float64) for a in attributes], 1)
        yield b.column("row_id").to_numpy(), b.column("chunks").to_numpy_ndarray(), gold


def _features_of(tables: str) -> dict:
    with open(os.path.join(tables, "plan.json")) as f:
        return json.load(f)["features"]


def _predict_run(run: str, tables: str, split: str):
    """(row ids, predictions, gold, model name, attributes) of a trained run on these tables."""
    from dec_ray.report.inference import Predictor
    p = Predictor(run)
    if p.stats.features and p.stats.features != _features_of(tables):
        raise ValueError(f"{tables} was made with other feature settings than {run}'s training tables")
    ids, preds, golds = [], [], []
    for rid, chunks, gold in _batches(tables, split, p.attributes):
        out = p.predict_chunks(chunks)
        ids.append(rid)
        preds.append(np.array([[o[a] for a in p.attributes] for o in out]))
        golds.append(gold)
    return np.concatenate(ids), np.concatenate(preds), np.concatenate(golds), p.cfg.model.name, p.attributes


def _predict_ridge(run: str, tables: str, split: str):
    from dec_ray.report.ridge import load_ridge, utterance_features
    model = load_ridge(run)
    if model["features"] is not None and model["features"] != _features_of(tables):
        raise ValueError(f"{tables} was made with other feature settings than {run}'s training tables")
    attrs = model["attributes"]
    ids, preds, golds = [], [], []
    for rid, chunks, gold in _batches(tables, split, attrs):
        x = (utterance_features(chunks) - model["mean"]) / model["std"]
        ids.append(rid)
        preds.append(np.stack([x @ model["w"][a] + model["b"][a] for a in attrs], 1))
        golds.append(gold)
    return np.concatenate(ids), np.concatenate(preds), np.concatenate(golds), "ridge", attrs


def score_on(run: str, tables: str, name: str, split: str = "test") -> str:
    """RUN/cross/NAME/: the run's predictions on the ``split`` of another corpus's tables, in a
    run-shaped folder; returns it. Done once per corpus: a folder scored on these same tables is
    kept, one scored on other tables under the same NAME is scored again."""
    out = os.path.join(run, "cross", name)
    if os.path.exists(os.path.join(out, "result.json")):
        with open(os.path.join(out, "result.json")) as f:
            if json.load(f).get("tables") == tables:
                return out
    with open(os.path.join(run, "result.json")) as f:
        model = json.load(f)["model"]
    predict = _predict_ridge if model == "ridge" else _predict_run
    ids, pred, gold, model, attrs = predict(run, tables, split)
    order = np.argsort(ids)
    keep = order[np.isfinite(gold[order]).all(1)]                 # sentences labeled in that corpus
    table = with_sentence_info(predictions_table(ids[keep], pred[keep], gold[keep], attrs), tables, split)
    os.makedirs(out, exist_ok=True)
    with atomic_path(os.path.join(out, "test_predictions.parquet")) as tmp:
        pq.write_table(table, tmp)
    write_json(os.path.join(out, "result.json"), {"model": model, "attributes": attrs, "trained": run,
                                                  "tables": tables, "split": split, "sentences": int(len(keep))})
    return out


def score_runs_on(runs: Sequence[str], corpora: Sequence[str]) -> Dict[str, List[str]]:
    """Every run scored on every corpus (``parse_corpus`` specs): corpus name -> its folders."""
    out: Dict[str, List[str]] = {}
    for spec in corpora:
        name, tables = parse_corpus(spec)
        out[name] = [score_on(r, tables, name) for r in runs]
    return out
