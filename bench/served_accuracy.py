"""Served accuracy of a per-speaker model on held-out speakers, over HTTP, beside the batch's.

For each finished run given (the `recommended` preset: per-speaker input statistics), the test
split's clips are POSTed to `dec-ray serve` (one replica, this machine's Ray):
  - speaker, enrolling: each clip with ``?speaker=ID``, in order, the first time (its statistics rest
    on the speaker's clips posted so far);
  - speaker, enrolled: every clip again, once all of the speaker's clips were posted;
  - population: each clip without a speaker (the run's Train audio as one group);
  - traffic: `--population traffic`, every clip without a speaker once, then again (the answers of
    the second round: all the test clips served, as one group);
and, for the record, each clip normalised by itself (a group of one: how the service answered
before issue 39), computed offline with the same Predictor. Batch: the trainer's own test
predictions (each test speaker's statistics). CCC per attribute on the 1..7 scale, mean over runs.

    .venv/bin/python bench/served_accuracy.py --runs OUT/runs/recommended/seed* --tables TABLES --out FILE.md
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pandas as pd
import pyarrow.dataset as pads

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from dec_ray.data.tables import split_files  # noqa: E402
from dec_ray.method.losses import ccc  # noqa: E402

WAYS = ("batch (trainer, per speaker)", "served, speaker enrolled", "served, speaker enrolling",
        "served, population (no speaker)", "served, --population traffic (no speaker, all clips served once)",
        "each clip by itself (before issue 39)")


def post(url: str, body: bytes) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=120) as r:
        return json.loads(r.read())


def traffic(run: str, test: pd.DataFrame, attrs, port: int) -> np.ndarray:
    """--population traffic: every clip without a speaker once, then the answers of a second round."""
    from dec_ray.service.serve import run_serve, stop
    run_serve(run, replicas=1, port=port, route="/", blocking=False, name="traffic", population="traffic")
    url = f"http://127.0.0.1:{port}/"
    try:
        answers = [[post(url, open(path, "rb").read()) for path in test["path"]] for _ in range(2)][1]
        assert all(a["normalization"] == "traffic" for a in answers)
        return np.array([[a[x] for x in attrs] for a in answers])
    finally:
        stop()


def served(run: str, test: pd.DataFrame, attrs, port: int) -> dict:
    from dec_ray.service.serve import run_serve, stop
    run_serve(run, replicas=1, port=port, route="/", blocking=False, name="accuracy")
    url = f"http://127.0.0.1:{port}/"
    out = {w: [] for w in WAYS[1:4]}
    try:
        for rnd, way in ((0, WAYS[2]), (1, WAYS[1])):
            for path, spk in zip(test["path"], test["speaker"]):
                got = post(url + "?speaker=" + urllib.parse.quote(spk), open(path, "rb").read())
                assert got["normalization"] == "speaker"
                out[way].append([got[a] for a in attrs])
        for path in test["path"]:
            got = post(url, open(path, "rb").read())
            assert got["normalization"] == "population"
            out[WAYS[3]].append([got[a] for a in attrs])
    finally:
        stop()
    return {k: np.array(v) for k, v in out.items()}


def by_itself(run: str, test: pd.DataFrame, attrs) -> np.ndarray:
    from dec_ray.report.inference import Predictor, stacked
    p = Predictor(run)
    return np.array([[r[a] for a in attrs] for path in test["path"]
                     for r in p.predict_features(stacked([p.file_features(path)]), groups=["self"])])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--tables", required=True)
    ap.add_argument("--out", required=True, help="a Markdown file for the table")
    ap.add_argument("--port", type=int, default=8123)
    args = ap.parse_args()
    from dec_ray.service.cluster import ensure_ray
    ensure_ray()
    t0 = time.time()
    attrs = json.load(open(os.path.join(args.runs[0], "result.json")))["attributes"]
    test = pads.dataset(split_files(args.tables, "test"), format="parquet").to_table(
        columns=["row_id", "path", "speaker", *attrs]).to_pandas().sort_values("row_id").reset_index(drop=True)
    gold = test[attrs].to_numpy()
    scores = {w: [] for w in WAYS}
    for run in args.runs:
        trained = pd.read_parquet(os.path.join(run, "test_predictions.parquet")).set_index("row_id")
        preds = {WAYS[0]: trained.loc[test["row_id"], [f"pred_{a}" for a in attrs]].to_numpy(),
                 **served(run, test, attrs, args.port), WAYS[4]: traffic(run, test, attrs, args.port),
                 WAYS[5]: by_itself(run, test, attrs)}
        for w, p in preds.items():
            scores[w].append([ccc(p[:, j], gold[:, j]) for j in range(len(attrs))])
        print(f"{run}: " + "; ".join(f"{w} {np.round(scores[w][-1], 3).tolist()}" for w in WAYS), flush=True)
    lines = [f"Test split of `{args.tables}`: {len(test)} sentences, {test['speaker'].nunique()} speakers; "
             f"{len(args.runs)} run(s); CCC on the 1..7 scale over all test sentences, mean ± std over runs; "
             f"{time.time() - t0:.0f} s on {os.cpu_count()} cores.", "",
             "| how the test clips are normalised | " + " | ".join(attrs) + " |",
             "|---|" + "---|" * len(attrs)]
    for w in WAYS:
        v = np.array(scores[w])
        lines.append(f"| {w} | " + " | ".join(f"{v[:, j].mean():.3f} ± {v[:, j].std():.3f}" for j in range(len(attrs)))
                     + " |")
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
