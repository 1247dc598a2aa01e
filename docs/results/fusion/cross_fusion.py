"""Issue 41 item 2 across corpora: run means (over the 4 test subsets) per cell on each corpus, the
functionals' effect (Welch) and each network against each linear reference (one-sample t).
python cross_fusion.py STUDY"""
import os, sys
import pandas as pd
from scipy import stats
study = sys.argv[1]
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import A, cells  # noqa: E402  (the cells and attributes of the studio table)
for corpus in ("nemo", "tess", "nemo-adapted", "tess-adapted"):
    v = pd.read_csv(f"{study}/ccc_values_{corpus}.csv")
    rm = v.groupby(["cell", "run", "attribute"])["ccc"].mean().reset_index()
    print(f"\n### {corpus}\n\n| cell | arousal | valence | dominance |\n|---|---|---|---|")
    M = {}
    for name, cell in cells.items():
        M[name] = {a: rm[(rm.cell == cell) & (rm.attribute == a)]["ccc"].to_numpy() for a in A}
        print(f"| {name} | " + " | ".join(f"{M[name][a].mean():.3f}" + (f" ± {M[name][a].std(ddof=1):.3f}" if len(M[name][a]) > 1 else "") for a in A) + " |")
    print("\n| difference | arousal | valence | dominance |\n|---|---|---|---|")
    for x, y in [("CNN + options + eGeMAPS", "CNN + options (previous preset)"), ("DEC ssl + options + eGeMAPS", "DEC ssl + options (recommended)")]:
        print(f"| {x} - {y} | " + " | ".join(f"{M[x][a].mean() - M[y][a].mean():+.3f} (p {stats.ttest_ind(M[x][a], M[y][a], equal_var=False).pvalue:.2g})" for a in A) + " |")
    for x in ("CNN + options + eGeMAPS", "DEC ssl + options + eGeMAPS", "DEC ssl + options (recommended)"):
        for r in ("log-mel ridge", "eGeMAPS ridge, per speaker"):
            print(f"| {x} - {r} | " + " | ".join(f"{M[x][a].mean() - M[r][a].mean():+.3f} (p {stats.ttest_1samp(M[x][a], M[r][a].mean()).pvalue:.2g})" for a in A) + " |")
