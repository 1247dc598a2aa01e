"""Issue 41: the network cells scored on nEMO's dev split (2 other speakers, Polish), as deployed:
a second dev criterion beside RAVDESS's 2 dev speakers. Mean CCC of the three per run, Welch."""
import glob, json, sys
import numpy as np
from scipy import stats
sys.path.insert(0, ".")
from dec_ray.report.cross_corpus import score_on
from dec_ray.method.losses import ccc
import pyarrow.parquet as pq
study, tables = sys.argv[1], sys.argv[2]
A = ["arousal", "valence", "dominance"]
cells = {"CNN + options": "cnn_preset_labels0.25", "CNN + options + eGeMAPS": "cnn_preset-egemaps_labels0.25",
         "recommended (DEC ssl + options)": "deepemocluster_pool0_k10_lambda1_ssl-preset_labels0.25",
         "DEC ssl + options + eGeMAPS": "deepemocluster_pool0_k10_lambda1_ssl-preset-egemaps_labels0.25"}
rav, nemo = {}, {}
for name, cell in cells.items():
    rows = []
    for run in sorted(glob.glob(f"{study}/runs/{cell}/seed*")):
        out = score_on(run, tables, "nemo-dev", split="dev")
        t = pq.read_table(f"{out}/test_predictions.parquet").to_pandas()
        rows.append([ccc(t[f"pred_{a}"].to_numpy(), t[f"gold_{a}"].to_numpy()) for a in A])
    nemo[name] = np.array(rows)
    rav[name] = np.array([[json.load(open(f"{r}/result.json"))["dev_ccc"][a] for a in A]
                          for r in sorted(glob.glob(f"{study}/runs/{cell}/seed*"))])
print("| cell | RAVDESS dev A / V / D (mean) | nEMO dev A / V / D (mean) | both dev sets (mean of the two means) |\n|---|---|---|---|")
for n in cells:
    r, m = rav[n].mean(0), nemo[n].mean(0)
    print(f"| {n} | {r[0]:.3f} / {r[1]:.3f} / {r[2]:.3f} ({r.mean():.3f}) | {m[0]:.3f} / {m[1]:.3f} / {m[2]:.3f} ({m.mean():.3f}) | {(r.mean() + m.mean()) / 2:.3f} |")
both = {n: (rav[n].mean(1) + nemo[n].mean(1)) / 2 for n in cells}
for x, y in [("CNN + options + eGeMAPS", "recommended (DEC ssl + options)"), ("DEC ssl + options + eGeMAPS", "recommended (DEC ssl + options)"),
             ("CNN + options + eGeMAPS", "DEC ssl + options + eGeMAPS")]:
    print(f"{x} - {y}: nEMO dev {nemo[x].mean(1).mean() - nemo[y].mean(1).mean():+.3f} (p {stats.ttest_ind(nemo[x].mean(1), nemo[y].mean(1), equal_var=False).pvalue:.2g}); "
          f"both {both[x].mean() - both[y].mean():+.3f} (p {stats.ttest_ind(both[x], both[y], equal_var=False).pvalue:.2g})")
