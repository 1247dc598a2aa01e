"""The paper's evaluation protocol, on finished runs (no Ray here).

The test set is split into ``n_subsets`` random equal subsets (one seeded split shared by every
run); each model is trained R times, so each (model, attribute) gets n_subsets x R CCC values.
Reported: mean and standard deviation, and a two-tailed t-test of the reference model
(DeepEmoCluster) against each baseline; p < alpha is marked.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence

import numpy as np
import pandas as pd

from dec_ray.method.losses import ccc

REFERENCE = "deepemocluster"


def split_test_set(row_ids: np.ndarray, n_subsets: int = 4, seed: int = 0) -> List[np.ndarray]:
    """A seeded random partition of the test sentences into equal subsets (sizes differ by <= 1)."""
    ids = np.sort(np.asarray(row_ids))
    return [np.sort(s) for s in np.array_split(np.random.default_rng(seed).permutation(ids), n_subsets)]


def predictions_table(row_ids: np.ndarray, pred: np.ndarray, gold: np.ndarray, attributes: Sequence[str]):
    """RUN/{dev,test}_predictions.parquet: row_id, pred_A and gold_A per attribute (1..7 scale)."""
    import pyarrow as pa
    cols = {"row_id": pa.array(row_ids)}
    for j, a in enumerate(attributes):
        cols[f"pred_{a}"] = pa.array(pred[:, j].astype(np.float32))
        cols[f"gold_{a}"] = pa.array(gold[:, j].astype(np.float32))
    return pa.table(cols)


def read_run(run: str) -> Dict:
    """A finished run's model name, attributes and test predictions (de-normalised)."""
    path = os.path.join(run, "test_predictions.parquet")
    if not os.path.exists(os.path.join(run, "result.json")) or not os.path.exists(path):
        raise ValueError(f"{run}: not a finished run with test predictions (result.json, test_predictions.parquet)")
    with open(os.path.join(run, "result.json")) as f:
        result = json.load(f)
    return {"run": run, "model": result["model"], "attributes": result["attributes"],
            "predictions": pd.read_parquet(path)}


def subset_cccs(runs: Sequence[str], n_subsets: int = 4, seed: int = 0) -> pd.DataFrame:
    """One row per (run, subset, attribute): the sentence-level CCC on that test subset."""
    loaded = [read_run(r) for r in runs]
    ids = {tuple(np.sort(r["predictions"]["row_id"].to_numpy())) for r in loaded}
    if len(ids) != 1:
        raise ValueError("the runs were not scored on the same test sentences (different tables?): "
                         + ", ".join(f"{r['run']} ({len(r['predictions'])} sentences)" for r in loaded))
    subsets = split_test_set(np.array(next(iter(ids))), n_subsets, seed)
    rows = []
    for r in loaded:
        pred = r["predictions"].set_index("row_id")
        for i, sub in enumerate(subsets):
            part = pred.loc[sub]
            for a in r["attributes"]:
                rows.append({"model": r["model"], "run": r["run"], "subset": i, "attribute": a,
                             "ccc": ccc(part[f"pred_{a}"].to_numpy(), part[f"gold_{a}"].to_numpy())})
    return pd.DataFrame(rows)


T_TEST_ASSUMPTION = (
    "The t-test treats the subsets x runs values as independent samples, as the paper does. They are "
    "not: the subsets of one run share its weights and the runs share the test sentences, so the "
    "p-values are optimistic; read them as a screen, and the differences of means as the result.")


def t_test(a: Sequence[float], b: Sequence[float]) -> tuple:
    """Two-tailed two-sample t-test (Student's, pooled variance, as in the paper): (t, p)."""
    from scipy import stats as sps     # here: every training worker imports this module (predictions_table)
    res = sps.ttest_ind(np.asarray(a, float), np.asarray(b, float), equal_var=True, alternative="two-sided")
    return float(res.statistic), float(res.pvalue)


def summarize(values: pd.DataFrame, reference: str = REFERENCE, alpha: float = 0.05) -> pd.DataFrame:
    """Mean/std/n per (model, attribute); each baseline's t-test against the reference model."""
    rows = []
    for (model, attr), g in values.groupby(["model", "attribute"], sort=False):
        row = {"model": model, "attribute": attr, "n": len(g), "runs": g["run"].nunique(),
               "ccc_mean": g["ccc"].mean(), "ccc_std": g["ccc"].std(ddof=1) if len(g) > 1 else 0.0,
               "t": np.nan, "p": np.nan, "significant": ""}
        ref = values[(values["model"] == reference) & (values["attribute"] == attr)]["ccc"]
        if model != reference and len(ref) > 1 and len(g) > 1:
            row["t"], row["p"] = t_test(ref, g["ccc"])
            row["significant"] = "yes" if row["p"] < alpha else "no"
        rows.append(row)
    order = {m: i for i, m in enumerate([reference] + sorted(set(values["model"]) - {reference}))}
    out = pd.DataFrame(rows)
    return out.sort_values(["attribute", "model"], key=lambda s: s.map(order) if s.name == "model" else s,
                           ignore_index=True)


def markdown_table(summary: pd.DataFrame, reference: str = REFERENCE, alpha: float = 0.05) -> str:
    lines = [f"| model | attribute | CCC mean +- std | n (subsets x runs) | t vs {reference} | p | p < {alpha} |",
             "|---|---|---|---|---|---|---|"]
    for r in summary.itertuples():
        t = "" if np.isnan(r.t) else f"{r.t:.2f}"
        p = "" if np.isnan(r.p) else f"{r.p:.3g}"
        lines.append(f"| {r.model} | {r.attribute} | {r.ccc_mean:.3f} +- {r.ccc_std:.3f} | "
                     f"{r.n} ({r.n // max(r.runs, 1)} x {r.runs}) | {t} | {p} | {r.significant} |")
    return "\n".join(lines)


def evaluate_runs(runs: Sequence[str], out: str, n_subsets: int = 4, seed: int = 0,
                  reference: str = REFERENCE, alpha: float = 0.05) -> Dict:
    """Write OUT/evaluation.md, evaluation.csv (summary), ccc_values.csv (all values), evaluation.png."""
    from dec_ray.report.plots import evaluation_bars
    values = subset_cccs(runs, n_subsets, seed)
    summary = summarize(values, reference, alpha)
    os.makedirs(out, exist_ok=True)
    values.to_csv(os.path.join(out, "ccc_values.csv"), index=False)
    summary.to_csv(os.path.join(out, "evaluation.csv"), index=False)
    table = markdown_table(summary, reference, alpha)
    with open(os.path.join(out, "evaluation.md"), "w") as f:
        f.write(f"# Evaluation\n\nTest set in {n_subsets} random equal subsets (seed {seed}) x the runs of each "
                f"model; sentence-level CCC on the 1..7 scale; two-tailed Student t-test of {reference} "
                f"against each baseline.\n\n{table}\n\n{T_TEST_ASSUMPTION}\n\nRuns:\n" + "".join(f"- {r}\n" for r in runs))
    evaluation_bars(summary, os.path.join(out, "evaluation.png"))
    return {"summary": summary, "values": values, "table": table,
            "files": [os.path.join(out, n) for n in ("evaluation.md", "evaluation.csv", "ccc_values.csv",
                                                      "evaluation.png")]}
