"""`dec-ray demo`: the whole pipeline on the embedded synthetic corpus, resumable step by step.

synth corpus -> Ray Data ingest -> Ray Train: DeepEmoCluster as published, the `recommended` preset
and the CNN-regressor baseline (R runs each, default 1), and the linear references -> the evaluation protocol (4 test subsets x R, t-test) and the cluster
analysis of the first DeepEmoCluster run -> OUT/summary.md.

By default it shows the setting the product is for: only a quarter of Train keeps its labels
(``labels``), the rest joins the unlabeled pool; the CNN and the ridge learn from the same
labeled sentences. ``labels=1`` is the published, fully labeled setting.
"""
from __future__ import annotations

import os
import time

from dec_ray.config import load_config, preset_path

# the networks (DeepEmoCluster as published, the recommended preset, the CNN), then the linear
# references (no Ray): log-mel ridge, eGeMAPS ridge under Train and per-speaker normalisation
NETWORKS = ("deepemocluster", "recommended", "cnn")
MODELS = (*NETWORKS, "ridge", "egemaps", "egemaps-speaker")


def run_demo(out: str, labeled: int = 240, unlabeled: int = 120, seed: int = 0, overrides=(),
             repeats: int = 1, labels: float = 0.25) -> dict:
    from dec_ray.data.synth import synth_corpus
    from dec_ray.data.tables import is_complete
    from dec_ray.report.analysis import analyze_run, dependence_lines
    from dec_ray.report.evaluation import evaluate_runs
    from dec_ray.service.ingest import run_ingest
    from dec_ray.service.train import repeated_runs

    t0 = time.time()
    corpus, tables = os.path.join(out, "corpus"), os.path.join(out, "tables")
    cfg_path = preset_path("demo")
    overrides = [f"train.label_fraction={labels:g}", *overrides]
    if not os.path.exists(os.path.join(corpus, ".done")):
        print(f"[demo] 1/4 writing the synthetic corpus ({labeled} labeled, {unlabeled} unlabeled) to {corpus}")
        synth_corpus(corpus, labeled=labeled, unlabeled=unlabeled, seed=seed)
        open(os.path.join(corpus, ".done"), "w").close()
    if not is_complete(tables):
        print(f"[demo] 2/4 ingest with Ray Data -> {tables}")
        summary = run_ingest(corpus, tables, load_config(cfg_path, list(overrides)),
                             [os.path.join(corpus, "Unlabeled")])
        print(summary.line())
    share = "all of Train's labels" if labels >= 1 else (f"{labels:g} of Train's labels, the rest of Train in "
                                                          "the unlabeled pool")
    print(f"[demo] 3/4 training {', '.join(NETWORKS)} with Ray Train ({repeats} run(s) each) and the linear "
          f"references ({', '.join(MODELS[len(NETWORKS):])}), {share} -> {out}/runs")
    runs = repeated_runs(tables, out, MODELS, repeats, cfg_path, overrides)
    print("[demo] 4/4 evaluation (4 test subsets x runs, the test on run means) and cluster analysis")
    ev = evaluate_runs(runs, os.path.join(out, "evaluation"))
    an = analyze_run(runs[0], os.path.join(out, "analysis"))
    dep = dependence_lines(an["dependence"])
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(f"# dec-ray demo\n\nTest CCC, sentence level, labels on the 1..7 scale "
                f"(`dec-ray evaluate`; details in evaluation/evaluation.md).\n\n{ev['table']}\n\n"
                f"![test CCC](evaluation/evaluation.png)\n\n## Clusters of {runs[0]}\n\n{dep}\n\n"
                f"![clusters](analysis/cluster_attributes.png)\n")
    print(f"\n{ev['table']}\n\nclusters vs emotion ({MODELS[0]}):\n{dep}\n\n[demo] done in {time.time() - t0:.0f}s; "
          f"outputs under {out}/ (summary.md, evaluation/, analysis/*.png, runs/*/*/result.json)")
    return {"runs": runs, "evaluation": ev["summary"], "dependence": an["dependence"]}
