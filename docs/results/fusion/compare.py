"""Issue 41 item 2: dev (the choice: mean CCC of the three) and test (run means over the 4 subsets)
per cell, Welch's t-test of run means (dev: of the runs' mean dev CCC). python docs/results/fusion/compare.py STUDY (a study folder of `dec-ray experiment` with these cells)"""
import glob, json, os, sys
import numpy as np, pandas as pd
from scipy import stats
A = ["arousal", "valence", "dominance"]
cells = {"CNN as published": "cnn_labels0.25", "CNN + options (previous preset)": "cnn_preset_labels0.25",
         "CNN + options + eGeMAPS": "cnn_preset-egemaps_labels0.25",
         "DEC ssl + options (recommended)": "deepemocluster_pool0_k10_lambda1_ssl-preset_labels0.25",
         "DEC ssl + options + eGeMAPS": "deepemocluster_pool0_k10_lambda1_ssl-preset-egemaps_labels0.25",
         "log-mel ridge": "ridge_labels0.25", "eGeMAPS ridge": "egemaps_labels0.25",
         "eGeMAPS ridge, per speaker": "egemaps-speaker_labels0.25"}

if __name__ == "__main__":
    study = sys.argv[1]
    v = pd.read_csv(os.path.join(study, "ccc_values.csv"))
    run_means = v.groupby(["cell", "run", "attribute"])["ccc"].mean().reset_index()
    rows, means, devs = [], {}, {}
    for name, cell in cells.items():
        runs = sorted(glob.glob(os.path.join(study, "runs", cell, "seed*", "result.json")))
        res = [json.load(open(r)) for r in runs]
        dev = {a: np.mean([r["dev_ccc"][a] for r in res]) for a in A}
        devs[name] = np.array([np.mean([r["dev_ccc"][a] for a in A]) for r in res])
        m = {a: run_means[(run_means.cell == cell) & (run_means.attribute == a)]["ccc"].to_numpy() for a in A}
        means[name] = m
        rows.append((name, len(res), dev, m, [r.get("best_epoch", "-") for r in res]))
    print("| cell | runs | dev A / V / D (mean of 3) | test A | test V | test D | best epochs |")
    print("|---|---|---|---|---|---|---|")
    for name, n, dev, m, be in rows:
        sd = lambda x: f" ± {x.std(ddof=1):.3f}" if len(x) > 1 else ""
        print(f"| {name} | {n} | {dev['arousal']:.3f} / {dev['valence']:.3f} / {dev['dominance']:.3f} ({np.mean(list(dev.values())):.3f}) | "
              + " | ".join(f"{m[a].mean():.3f}{sd(m[a])}" for a in A) + f" | {','.join(map(str, be))} |")
    def p(x, y, a):
        return stats.ttest_ind(means[x][a], means[y][a], equal_var=False).pvalue
    pairs = [("CNN + options + eGeMAPS", "CNN + options (previous preset)"),
             ("DEC ssl + options + eGeMAPS", "DEC ssl + options (recommended)"),
             ("DEC ssl + options + eGeMAPS", "CNN + options + eGeMAPS"),
             ("CNN + options + eGeMAPS", "DEC ssl + options (recommended)")]
    print("\n| difference (Welch, run means) | dev (mean of 3) | test arousal | test valence | test dominance |\n|---|---|---|---|---|")
    for x, y in pairs:
        pd_ = stats.ttest_ind(devs[x], devs[y], equal_var=False).pvalue
        print(f"| {x} - {y} | {devs[x].mean() - devs[y].mean():+.3f} (p {pd_:.2g}) | "
              + " | ".join(f"{means[x][a].mean() - means[y][a].mean():+.3f} (p {p(x, y, a):.2g})" for a in A) + " |")
    ref = "eGeMAPS ridge, per speaker"
    print("\n| against the per-speaker eGeMAPS ridge (one fit; one-sample t of run means) | arousal | valence | dominance |\n|---|---|---|---|")
    for x in ("CNN + options + eGeMAPS", "DEC ssl + options + eGeMAPS", "DEC ssl + options (recommended)"):
        print(f"| {x} | " + " | ".join(f"{means[x][a].mean() - means[ref][a].mean():+.3f} (p {stats.ttest_1samp(means[x][a], means[ref][a].mean()).pvalue:.2g})" for a in A) + " |")
