"""`dec-ray demo`: the whole pipeline on the embedded synthetic corpus, resumable step by step.

synth corpus -> Ray Data ingest -> Ray Train: DeepEmoCluster and the CNN-regressor baseline ->
test CCC side by side (OUT/summary.md).
"""
from __future__ import annotations

import json
import os
import time
from importlib import resources

from dec_ray.config import load_config

MODELS = ("deepemocluster", "cnn")


def preset_path(name: str) -> str:
    return str(resources.files("dec_ray") / "presets" / f"{name}.yaml")


def run_demo(out: str, labeled: int = 240, unlabeled: int = 120, seed: int = 0, overrides=()) -> dict:
    from dec_ray.ingest import is_complete, run_ingest
    from dec_ray.synth import synth_corpus
    from dec_ray.trainer import run_training

    t0 = time.time()
    corpus, tables = os.path.join(out, "corpus"), os.path.join(out, "tables")
    cfg_path = preset_path("demo")
    if not os.path.exists(os.path.join(corpus, ".done")):
        print(f"[demo] 1/3 writing the synthetic corpus ({labeled} labeled, {unlabeled} unlabeled) to {corpus}")
        synth_corpus(corpus, labeled=labeled, unlabeled=unlabeled, seed=seed)
        open(os.path.join(corpus, ".done"), "w").close()
    if not is_complete(tables):
        print(f"[demo] 2/3 ingest with Ray Data -> {tables}")
        summary = run_ingest(corpus, tables, load_config(cfg_path, list(overrides)),
                             [os.path.join(corpus, "Unlabeled")])
        print(summary.line())
    results = {}
    for model in MODELS:
        run = os.path.join(out, "runs", model)
        if os.path.exists(os.path.join(run, "result.json")):
            with open(os.path.join(run, "result.json")) as f:
                results[model] = json.load(f)
            continue
        print(f"[demo] 3/3 training {model} with Ray Train -> {run}")
        cfg = load_config(cfg_path, [f"model.name={model}", *overrides])
        results[model] = run_training(tables, run, cfg)
    lines = ["| model | best epoch | dev CCC | test CCC |", "|---|---|---|---|"]
    for model, r in results.items():
        for a in r["attributes"]:
            lines.append(f"| {model} | {r['best_epoch']} | {r['dev_ccc'][a]:.3f} | {r['test_ccc'][a]:.3f} |")
    table = "\n".join(lines)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(f"# dec-ray demo\n\nTest CCC ({results[MODELS[0]]['attributes'][0]}), sentence level, "
                f"labels on the 1..7 scale.\n\n{table}\n")
    print(f"\n{table}\n\n[demo] done in {time.time() - t0:.0f}s; outputs under {out}/ (summary.md, runs/*/result.json)")
    return results
