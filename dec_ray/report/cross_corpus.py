"""Cross-corpus scoring: a finished run (or a linear reference) scored on another corpus's tables,
as a user would deploy it (the normalisation statistics of its own training corpus) and, beside it,
adapted (the target corpus's own feature statistics, from its audio: its tables' Train statistics,
or the scored split's when it has no Train; never its labels). The label scale stays the training
corpus's. A per-speaker model or reference normalises each target speaker by their own statistics either
way. No Ray here.

Each (run, corpus) gets a run-shaped folder, RUN/cross/NAME/ (result.json, test_predictions.parquet),
so the paper's protocol (``evaluation.evaluate_runs``: random test subsets x runs, t-test) scores
it from the saved predictions, one table per corpus.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from dec_ray.config import chunk_settings, model_label, reference_settings
from dec_ray.data.files import atomic_path, write_json
from dec_ray.data.groups import FUNCTIONALS, POPULATION, GroupMoments, functional_rows
from dec_ray.data.tables import READ_BATCH, split_files, with_sentence_info
from dec_ray.report.evaluation import predictions_table
from dec_ray.report.ridge import features_of, has_input


def parse_corpus(spec: str) -> Tuple[str, str]:
    """NAME=TABLES, or TABLES (named after its folder)."""
    name, _, path = spec.rpartition("=")
    path = os.path.abspath(path)
    return (name or os.path.basename(path.rstrip("/")), path)


def _batches(tables: str, split: str, attributes: Sequence[str], functionals: bool = False):
    """(row ids, ``Features``, gold labels) of a split, batch by batch; ``functionals``: with the
    sentences' eGeMAPS functionals (a model that reads them)."""
    from dec_ray.report.inference import Features
    files = split_files(tables, split)
    if not files:
        raise ValueError(f"{tables}: no {split} split to score on")
    if functionals and not has_input(tables, FUNCTIONALS):
        raise ValueError(f"{tables} has no {FUNCTIONALS} functionals, which the model reads: ingest it with "
                         f"features.functionals={FUNCTIONALS}")
    ds = pads.dataset(files, format="parquet")
    columns = ["row_id", "chunks", *attributes] + ([FUNCTIONALS] if functionals else [])
    for b in ds.to_batches(columns=columns, batch_size=READ_BATCH):
        gold = np.stack([b.column(a).to_numpy(zero_copy_only=False).astype(np.float64) for a in attributes], 1)
        f = functional_rows(b.column(FUNCTIONALS)) if functionals else None
        yield b.column("row_id").to_numpy(), Features(b.column("chunks").to_numpy_ndarray(), f), gold


def _predict_run(run: str, tables: str, split: str, adapted: bool = False):
    """(row ids, predictions, gold, model name, attributes) of a trained run on these tables;
    ``adapted``: its input normalised with the target tables' own Train mel statistics. A
    per-speaker model reads the target's speakers' own statistics (from the scored split's audio)
    either way: as deployed and adapted are the same for it."""
    from dec_ray.data.groups import functional_groups, table_groups
    from dec_ray.data.normalization import Stats
    from dec_ray.report.inference import Predictor
    p = Predictor(run)
    if p.stats.features and chunk_settings(p.stats.features) != chunk_settings(features_of(tables)):
        raise ValueError(f"{tables} was made with other feature settings than {run}'s training tables")
    groups = table_groups(tables, p.cfg.model.input, (split,)) if p.per_speaker else None
    fgroups = functional_groups(tables, True, (split,)) if p.per_speaker and p.functionals else None
    if adapted and not p.per_speaker:
        own = Stats.load(os.path.join(tables, "stats.json"))
        p.normalize = own.feature_normalizer(p.device, p.cfg.model.input)         # the target's audio statistics, not its labels
        if p.functionals:                  # the same for the functionals: the target's Train (else this split)
            own_split = "train" if split_files(tables, "train") else split
            x = functional_rows(pads.dataset(split_files(tables, own_split), format="parquet").to_table(
                columns=[FUNCTIONALS])[FUNCTIONALS])
            p.functional_population = GroupMoments.of_rows(x, [POPULATION] * len(x))
    ids, preds, golds = [], [], []
    for rid, features, gold in _batches(tables, split, p.attributes, bool(p.functionals)):
        out = (p.predict_features(features, groups.keys_of(rid), groups.moments,
                                  functional_moments=fgroups.moments if fgroups else None) if groups
               else p.predict_features(features))
        ids.append(rid)
        preds.append(np.array([[o[a] for a in p.attributes] for o in out]))
        golds.append(gold)
    return np.concatenate(ids), np.concatenate(preds), np.concatenate(golds), model_label(p.cfg), p.attributes


def _predict_ridge(run: str, tables: str, split: str, adapted: bool = False):
    """The same for a linear reference, from its saved weights; ``adapted``: its features z-scored
    with the target corpus's own statistics (its Train split's, else the scored split's)."""
    from dec_ray.report.ridge import load_ridge, moments, normalized, predict_ridge, read_split
    model = load_ridge(run)
    if model["features"] is not None and reference_settings(model["features"]) != reference_settings(features_of(tables)):
        raise ValueError(f"{tables} was made with other feature settings than {run}'s training tables")
    attrs = model["attributes"]
    got = read_split(tables, split, attrs, model["inputs"])
    if got is None:
        raise ValueError(f"{tables}: no {split} split to score on")
    ids, x, gold, speakers = got
    stats = None
    if adapted:
        own = read_split(tables, "train", attrs, model["inputs"]) if split_files(tables, "train") else got
        stats = moments(own[1])
    with open(os.path.join(run, "result.json")) as f:
        name = json.load(f)["model"]
    return ids, predict_ridge(model, normalized(model, x, speakers, stats)), gold, name, attrs


def is_reference(run: str) -> bool:
    """Whether a finished run folder holds a linear reference (ridge.npz) rather than a network."""
    return os.path.exists(os.path.join(run, "ridge.npz"))


def per_speaker(run: str) -> bool:
    """Whether a run (network or reference) normalises each speaker with their own statistics."""
    if is_reference(run):
        from dec_ray.report.ridge import load_ridge
        return load_ridge(run)["norm"] == "speaker"
    from dec_ray.config import load_config
    return load_config(os.path.join(run, "config.yaml")).model.norm == "speaker"


def score_on(run: str, tables: str, name: str, split: str = "test", adapted: bool = False) -> str:
    """RUN/cross/NAME/ (``adapted``: RUN/cross/NAME-adapted/): the run's predictions on the
    ``split`` of another corpus's tables, in a run-shaped folder; returns it. Done once per corpus:
    a folder scored on these same tables is kept, one scored on other tables under the same NAME is
    scored again."""
    out = os.path.join(run, "cross", name + ("-adapted" if adapted else ""))
    if os.path.exists(os.path.join(out, "result.json")):
        with open(os.path.join(out, "result.json")) as f:
            if json.load(f).get("tables") == tables:
                return out
    if adapted and per_speaker(run):      # its target speakers' own statistics either way: the same numbers
        deployed = score_on(run, tables, name, split)
        os.makedirs(out, exist_ok=True)
        shutil.copyfile(os.path.join(deployed, "test_predictions.parquet"), os.path.join(out, "test_predictions.parquet"))
        with open(os.path.join(deployed, "result.json")) as f:
            write_json(os.path.join(out, "result.json"), {**json.load(f), "adapted": True})
        return out
    predict = _predict_ridge if is_reference(run) else _predict_run
    ids, pred, gold, model, attrs = predict(run, tables, split, adapted)
    order = np.argsort(ids)
    keep = order[np.isfinite(gold[order]).all(1)]                 # sentences labeled in that corpus
    table = with_sentence_info(predictions_table(ids[keep], pred[keep], gold[keep], attrs), tables, split)
    os.makedirs(out, exist_ok=True)
    with atomic_path(os.path.join(out, "test_predictions.parquet")) as tmp:
        pq.write_table(table, tmp)
    write_json(os.path.join(out, "result.json"), {"model": model, "attributes": attrs, "trained": run,
                                                  "tables": tables, "split": split, "adapted": adapted,
                                                  "sentences": int(len(keep))})
    return out


def score_runs_on(runs: Sequence[str], corpora: Sequence[str]) -> Dict[str, List[str]]:
    """Every run scored on every corpus (``parse_corpus`` specs), as deployed and adapted: corpus
    name (and NAME-adapted) -> its folders."""
    out: Dict[str, List[str]] = {}
    for spec in corpora:
        name, tables = parse_corpus(spec)
        out[name] = [score_on(r, tables, name) for r in runs]
        out[f"{name}-adapted"] = [score_on(r, tables, name, adapted=True) for r in runs]
    return out
