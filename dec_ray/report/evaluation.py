"""The paper's evaluation protocol, on finished runs (no Ray here).

The test set is split into ``n_subsets`` random equal subsets (one seeded split shared by every
run); each model is trained R times, so each (model, attribute) gets n_subsets x R CCC values.
Reported: mean and standard deviation, and two two-tailed tests of the reference model
(DeepEmoCluster) against each baseline: the paper's pooled t-test, kept for comparison, and the
test that fits the design (``compare``: on run means), which marks p < alpha.
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


TESTS = (
    "Two tests, both two-tailed. The paper's (\"p, paper\"): Student's pooled t-test of the subsets x runs "
    "values as independent samples. Every model is scored on the same test subsets, and most of that spread "
    "is the subsets' (a hard subset is hard for every model): the paper's test counts that shared part as "
    "noise, so its p-values are too large here. The test that marks ▲ / ▼ (\"p\") compares run means "
    "instead (each run's mean over the same subsets, so the subsets cancel): Welch's t-test of the two "
    "cells' run means; against a linear reference (one deterministic fit), a one-sample t-test of the run means; "
    "a network cell with one run against one with several, the t-test of a new observation (that run "
    "against the others' run means, their seed spread taken for both); a t-test paired by subset when "
    "both cells have one run.")


def deterministic(model: str) -> bool:
    """A model whose fit has no seed (the linear references): one run is the fit, not a draw."""
    from dec_ray.report.ridge import REFERENCES     # ridge imports this module
    return model in REFERENCES


def paper_t_test(a: Sequence[float], b: Sequence[float]) -> tuple:
    """Two-tailed two-sample t-test (Student's, pooled variance, as in the paper): (t, p)."""
    from scipy import stats as sps     # here: every training worker imports this module (predictions_table)
    res = sps.ttest_ind(np.asarray(a, float), np.asarray(b, float), equal_var=True, alternative="two-sided")
    return float(res.statistic), float(res.pvalue)


def compare(a: pd.DataFrame, b: pd.DataFrame) -> tuple:
    """The test that fits the design, of ``a`` against ``b`` (rows: run, subset, ccc of one
    attribute, both cells scored on the same subsets): (t, p, which test); t > 0 when a is higher.
    On run means: the subset effect every model shares cancels in each run's mean."""
    from scipy import stats as sps
    ra, rb = a.groupby("run")["ccc"].mean().to_numpy(), b.groupby("run")["ccc"].mean().to_numpy()
    if len(ra) > 1 and len(rb) > 1:
        res = sps.ttest_ind(ra, rb, equal_var=False)
        return float(res.statistic), float(res.pvalue), "Welch, run means"
    if len(ra) > 1 or len(rb) > 1:
        (many, one, single), sign = ((ra, rb, b), 1.0) if len(ra) > 1 else ((rb, ra, a), -1.0)
        if "model" in single and deterministic(single["model"].iloc[0]):
            res = sps.ttest_1samp(many, float(one[0]))
            return sign * float(res.statistic), float(res.pvalue), "run means vs the fit"
        t = (many.mean() - one[0]) / (many.std(ddof=1) * np.sqrt(1 + 1 / len(many)) + 1e-12)
        return sign * float(t), float(2 * sps.t.sf(abs(t), len(many) - 1)), "one run vs run means"
    sa, sb = a.groupby("subset")["ccc"].mean(), b.groupby("subset")["ccc"].mean()
    common = sa.index.intersection(sb.index)
    if len(common) < 2:
        return np.nan, np.nan, ""
    res = sps.ttest_rel(sa[common].to_numpy(), sb[common].to_numpy())
    return float(res.statistic), float(res.pvalue), "paired by subset"


def summarize(values: pd.DataFrame, reference: str = REFERENCE, alpha: float = 0.05) -> pd.DataFrame:
    """Mean/std/n per (model, attribute); each baseline against the reference model: ``compare``
    (t, p, test; marks ``significant``) and the paper's pooled t-test (t_paper, p_paper)."""
    rows = []
    for (model, attr), g in values.groupby(["model", "attribute"], sort=False):
        row = {"model": model, "attribute": attr, "n": len(g), "runs": g["run"].nunique(),
               "ccc_mean": g["ccc"].mean(), "ccc_std": g["ccc"].std(ddof=1) if len(g) > 1 else 0.0,
               "t": np.nan, "p": np.nan, "test": "", "t_paper": np.nan, "p_paper": np.nan, "significant": ""}
        ref = values[(values["model"] == reference) & (values["attribute"] == attr)]
        if model != reference and len(ref) > 1 and len(g) > 1:
            row["t"], row["p"], row["test"] = compare(ref, g)
            row["t_paper"], row["p_paper"] = paper_t_test(ref["ccc"], g["ccc"])
            row["significant"] = "yes" if row["p"] < alpha else "no"
        rows.append(row)
    order = {m: i for i, m in enumerate([reference] + sorted(set(values["model"]) - {reference}))}
    out = pd.DataFrame(rows)
    return out.sort_values(["attribute", "model"], key=lambda s: s.map(order) if s.name == "model" else s,
                           ignore_index=True)


def markdown_table(summary: pd.DataFrame, reference: str = REFERENCE, alpha: float = 0.05) -> str:
    lines = [f"| model | attribute | CCC mean +- std | n (subsets x runs) | t vs {reference} | p | test | "
             f"p < {alpha} | p, paper |", "|---|---|---|---|---|---|---|---|---|"]
    for r in summary.itertuples():
        t = "" if np.isnan(r.t) else f"{r.t:.2f}"
        p = "" if np.isnan(r.p) else f"{r.p:.3g}"
        pp = "" if np.isnan(r.p_paper) else f"{r.p_paper:.3g}"
        lines.append(f"| {r.model} | {r.attribute} | {r.ccc_mean:.3f} +- {r.ccc_std:.3f} | "
                     f"{r.n} ({r.n // max(r.runs, 1)} x {r.runs}) | {t} | {p} | {r.test} | {r.significant} | {pp} |")
    return "\n".join(lines)


def relative_runs(values: pd.DataFrame, out: str) -> pd.DataFrame:
    """The values with each run named relative to the folder they are written to: a report that
    reads the same on another machine, or after the folder moved."""
    return values.assign(run=[os.path.relpath(r, out) if os.path.isabs(r) else r for r in values["run"]])


def evaluate_runs(runs: Sequence[str], out: str, n_subsets: int = 4, seed: int = 0,
                  reference: str = REFERENCE, alpha: float = 0.05) -> Dict:
    """Write OUT/evaluation.md, evaluation.csv (summary), ccc_values.csv (all values), evaluation.png."""
    from dec_ray.report.plots import evaluation_bars
    values = subset_cccs(runs, n_subsets, seed)
    summary = summarize(values, reference, alpha)
    os.makedirs(out, exist_ok=True)
    relative_runs(values, out).to_csv(os.path.join(out, "ccc_values.csv"), index=False)
    summary.to_csv(os.path.join(out, "evaluation.csv"), index=False)
    table = markdown_table(summary, reference, alpha)
    with open(os.path.join(out, "evaluation.md"), "w") as f:
        f.write(f"# Evaluation\n\nTest set in {n_subsets} random equal subsets (seed {seed}) x the runs of each "
                f"model; sentence-level CCC on the 1..7 scale; {reference} against each baseline.\n\n{table}"
                f"\n\n{TESTS}\n\nRuns (relative to this folder):\n"
                + "".join(f"- {os.path.relpath(r, out)}\n" for r in runs))
    evaluation_bars(summary, os.path.join(out, "evaluation.png"), values)
    return {"summary": summary, "values": values, "table": table,
            "files": [os.path.join(out, n) for n in ("evaluation.md", "evaluation.csv", "ccc_values.csv",
                                                      "evaluation.png")]}
