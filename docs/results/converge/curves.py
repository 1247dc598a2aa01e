"""Issue 41 item 3: dev and test curves (mean CCC of the three attributes, and arousal) of the
30-epoch runs, their best epochs and times; the 10-epoch cells' scores beside them.
python docs/results/converge/curves.py RUNS_30 STUDY_10 OUT_PNG"""
import glob, json, os, sys
import numpy as np
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
runs30, study10, png = sys.argv[1:4]
A = ["arousal", "valence", "dominance"]
names = {"deepemocluster_pool0_k10_lambda1_ssl-preset_labels0.25": "recommended (DEC ssl + options)",
         "cnn_preset-egemaps_labels0.25": "CNN + options + eGeMAPS"}
fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
print("| model | epochs | runs | best epochs | dev (mean of 3) at the best epoch | test A / V / D at the best epoch (whole test set) | same, 10-epoch runs (seeds 0-2) | s per epoch, fastest / median | min per run at the fastest |")
print("|---|---|---|---|---|---|---|---|---|")
for ax, (cell, name) in zip(axes, names.items()):
    rows, best, tests, devs, secs = [], [], [], [], []
    for d in sorted(glob.glob(os.path.join(runs30, cell, "seed*"))):
        if not os.path.exists(os.path.join(d, "result.json")):
            continue
        m = [json.loads(l) for l in open(os.path.join(d, "metrics.jsonl"))]
        m = [x for x in m if "curve_test_ccc" in x]
        r = json.load(open(os.path.join(d, "result.json")))
        e = [x["epoch"] for x in m]
        dev = [np.mean([x[f"dev_ccc_{a}"] for a in A]) for x in m]
        test = [np.mean([x[f"curve_test_ccc_{a}"] for a in A]) for x in m]
        ax.plot(e, dev, color="C0", alpha=0.6, label="dev" if not rows else None)
        ax.plot(e, test, color="C3", alpha=0.6, label="test" if not rows else None)
        ax.axvline(r["best_epoch"], color="gray", lw=0.5)
        rows.append(d); best.append(r["best_epoch"])
        tests.append([r["test_ccc"][a] for a in A]); devs.append(np.mean([r["dev_ccc"][a] for a in A]))
        secs.extend([x["epoch_time_s"] for x in m])
    ten = [json.load(open(os.path.join(study10, "runs", cell, f"seed{s}", "result.json")))["test_ccc"] for s in range(len(rows))]
    t10 = np.mean([[t[a] for a in A] for t in ten], 0)
    t30 = np.mean(tests, 0)
    print(f"| {name} | 30 | {len(rows)} | {','.join(map(str, best))} | {np.mean(devs):.3f} | "
          f"{t30[0]:.3f} / {t30[1]:.3f} / {t30[2]:.3f} | {t10[0]:.3f} / {t10[1]:.3f} / {t10[2]:.3f} | "
          f"{np.min(secs):.1f} / {np.median(secs):.1f} | {np.min(secs) * 30 / 60:.1f} |")
    ax.set_title(name); ax.set_xlabel("epoch"); ax.grid(alpha=0.3)
axes[0].set_ylabel("CCC, mean of arousal, valence, dominance"); axes[0].legend()
fig.suptitle("30 epochs at 1/4 of the labels: dev and test after every epoch (grey: each run's best epoch by dev loss)")
fig.tight_layout(); fig.savefig(png, dpi=110)
