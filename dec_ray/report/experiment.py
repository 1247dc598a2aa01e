"""The experiment's report, computed from the runs' saved test predictions (no Ray, no training).

Every cell gets the paper's protocol: the test set in ``subsets`` random equal subsets (one seeded
split for every run) x its runs -> mean and std of the CCCs, and a two-tailed test against the
CNN-regressor trained on the same labels (``evaluation.compare``, on run means; marked ▲ / ▼ when
p < alpha, above / below it), beside the paper's pooled t-test. Each study is a table in the
paper's layout: one varying axis -> rows, attributes as columns (Tables 2 and 3); two axes -> one
grid per attribute (Table 4). The CNN and the linear references close every table.
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from dec_ray.report.evaluation import TESTS, compare, paper_t_test, relative_runs, subset_cccs
from dec_ray.report.ridge import REFERENCES

AXES = (("model", "model"), ("pool", "unlabeled pool"), ("k", "K"), ("lambda_ce", "lambda"),
        ("labels", "labelled share of Train"), ("options", "method options"))
COLUMN_AXES = ("pool", "labels")       # in a two-axis grid, these are the columns
LABELS = {"deepemocluster": "DeepEmoCluster", "cnn": "CNN-regressor", "ae": "CNN-AE", "vae": "CNN-VAE",
          "recommended": "recommended",
          "ridge": "ridge (log-mel statistics)", "egemaps": "ridge (eGeMAPS, Train norm.)",
          "egemaps-speaker": "ridge (eGeMAPS, per-speaker norm.)"}
LINEAR = tuple(REFERENCES)      # the linear references: ridge, egemaps, egemaps-speaker
STYLES = {"ridge": ":", "egemaps": "-.", "egemaps-speaker": (0, (5, 1, 1, 1, 1, 1))}   # dash-dot-dot


def labels_suffix(labels: float) -> str:
    """How a cell's (and its references') name says its share of labels: nothing for all of Train."""
    return "" if labels >= 1 else f"_labels{labels:g}"


def labels_of(cell_name: str) -> str:
    """The labels suffix of a cell name ("" for all of Train)."""
    m = re.search(r"_labels\d[0-9.e+-]*$", cell_name)     # a share: "{:g}" of a number
    return m.group(0) if m else ""


def cell_values(runs: Dict[str, tuple], ridges: Dict[tuple, str], subsets: int,
                scored: Optional[Dict[str, str]] = None) -> pd.DataFrame:
    """One row per (run, subset, attribute) of every finished run, with the run's cell name; the
    linear references ((name, share of labels) -> folder) are cells "ridge", "egemaps_labels0.25",
    ... ``scored``: run folder -> the folder of its predictions on another corpus (cross_corpus.score_on)."""
    finished = [r for r in runs if os.path.exists(os.path.join(r, "result.json"))]
    names = {r: runs[r][0].name for r in finished}
    names.update({path: name + labels_suffix(f) for (name, f), path in ridges.items()})
    scored = scored or {r: r for r in names}
    folders = {scored[r]: r for r in names if r in scored}
    values = subset_cccs(list(folders), subsets, seed=0)
    values["run"] = values["run"].map(folders)
    values["cell"] = values["run"].map(names)
    return values


def cell_summary(values: pd.DataFrame, reference: str, alpha: float) -> pd.DataFrame:
    """Mean, std, n and the test against the reference cell with the same labels (the CNN trained
    on the same labeled sentences), per (cell, attribute): ``compare`` (t, p, test; the mark) and
    the paper's pooled t-test (p_paper)."""
    rows = []
    for (cell, attr), g in values.groupby(["cell", "attribute"], sort=False):
        ref_cell = reference + labels_of(cell)
        ref = values[(values["cell"] == ref_cell) & (values["attribute"] == attr)]
        t = p = p_paper = np.nan
        test = ""
        if cell != ref_cell and len(ref) > 1 and len(g) > 1:
            t, p, test = compare(g, ref)
            p_paper = paper_t_test(g["ccc"], ref["ccc"])[1]
        rows.append({"cell": cell, "attribute": attr, "ccc_mean": g["ccc"].mean(),
                     "ccc_std": g["ccc"].std(ddof=1) if len(g) > 1 else 0.0, "n": len(g), "runs": g["run"].nunique(),
                     "t_vs_cnn": t, "p_vs_cnn": p, "test": test, "p_paper": p_paper,
                     "mark": "" if not p < alpha else ("▲" if t > 0 else "▼")})
    return pd.DataFrame(rows)


def fmt(summary: pd.DataFrame, cell: str, attr: str) -> str:
    """mean ± std, the mark, and the p of the test against the CNN (where there is one)."""
    row = summary[(summary["cell"] == cell) & (summary["attribute"] == attr)]
    if row.empty:
        return "not run"
    r = row.iloc[0]
    p = getattr(r, "p_vs_cnn", np.nan)
    return (f"{r.ccc_mean:.3f} ± {r.ccc_std:.3f}{' ' + r.mark if r.mark else ''}"
            + ("" if pd.isna(p) else f" (p {p:.2g})"))


def varying(study) -> List[str]:
    """The axes the study sets more than one value for (model, pool, k, lambda_ce)."""
    values = {"model": study.models, "pool": study.pool, "k": study.k, "lambda_ce": study.lambda_ce,
              "labels": getattr(study, "labels", []), "options": getattr(study, "options", [])}
    return [a for a, _ in AXES if len(values[a]) > 1]


def axis_value(cell, axis: str) -> str:
    return format_value(axis, getattr(cell, axis))


def format_value(axis: str, v) -> str:
    if axis in ("model", "options"):
        return LABELS.get(v, v)
    return "-" if v is None else f"{v:g}"


def linear_present(summary: pd.DataFrame) -> List[str]:
    """The linear references this report has values of (older experiments have the ridge only)."""
    cells = set(summary["cell"])
    return [r for r in LINEAR if any(c == r or c.startswith(r + "_labels") for c in cells)]


def references(cells, reference: str, linear: Sequence[str] = ("ridge",)) -> List[tuple]:
    """(label, cell name) of the CNN and each linear reference at each share of labels the cells use."""
    shares = sorted({c.labels for c in cells}, reverse=True)
    out = []
    for f in shares:
        at = "" if len(shares) == 1 and f >= 1 else f", labels {f:g}"
        out.append((LABELS[reference] + f" (test reference{at})", reference + labels_suffix(f)))
        out += [(LABELS[r] + (f" ({at[2:]})" if at else ""), r + labels_suffix(f)) for r in linear]
    return out


def study_tables(study, cells, summary: pd.DataFrame, attrs: List[str], reference: str) -> str:
    axes = varying(study) or ["model"]
    title = study.title or study.name
    linear = linear_present(summary)
    refs = references(cells, reference, linear)
    head = f"### {title}\n\n" + (f"{study.seeds} training run(s) per cell.\n\n" if getattr(study, "seeds", None)
                                   else "")
    if len(axes) >= 2 and (len(axes) == 2 or any(a in COLUMN_AXES for a in axes)):
        cols_axis = next((a for a in ("labels", "pool") if a in axes), axes[-1])    # shares / pool sizes as columns
        rows_axes = [a for a in axes if a != cols_axis]
        row_vals = list(dict.fromkeys(tuple(getattr(c, r) for r in rows_axes) for c in cells))
        col_vals = list(dict.fromkeys(getattr(c, cols_axis) for c in cells))
        names = dict(AXES)
        row_name = ", ".join(names[r] for r in rows_axes)
        out = [head]
        for a in attrs:
            lines = [f"{a}: rows {row_name}, columns {names[cols_axis]}\n",
                     f"| {row_name} | " + " | ".join(format_value(cols_axis, v) for v in col_vals) + " |",
                     "|---" * (len(col_vals) + 1) + "|"]
            for rv in row_vals:
                line = [", ".join(format_value(r, v) for r, v in zip(rows_axes, rv))]
                for cv in col_vals:
                    match = [c for c in cells if tuple(getattr(c, r) for r in rows_axes) == rv
                             and getattr(c, cols_axis) == cv]
                    line.append(fmt(summary, match[0].name, a) if match else "")
                lines.append("| " + " | ".join(line) + " |")
            if cols_axis == "labels":           # the references of each share in its column
                for base, label in [(reference, LABELS[reference] + " (test reference)")] + [(r, LABELS[r]) for r in linear]:
                    lines.append(f"| {label} | " + " | ".join(fmt(summary, base + labels_suffix(v), a)
                                                           for v in col_vals) + " |")
                lines.append("")
            else:
                lines.append("\n" + "; ".join(f"{label}: {fmt(summary, c, a)}" for label, c in refs) + "\n")
            out.append("\n".join(lines) + "\n")
        return "\n".join(out)
    label = " / ".join(dict(AXES)[a] for a in axes)
    lines = [head + f"| {label} | " + " | ".join(attrs) + " |", "|---" * (len(attrs) + 1) + "|"]
    for c in cells:
        name = ", ".join(axis_value(c, a) for a in axes)
        lines.append(f"| {name} | " + " | ".join(fmt(summary, c.name, a) for a in attrs) + " |")
    for label, c in refs:
        if c not in {x.name for x in cells}:
            lines.append(f"| {label} | " + " | ".join(fmt(summary, c, a) for a in attrs) + " |")
    return "\n".join(lines) + "\n"


def against_table(study, cells, values: pd.DataFrame, attrs: List[str], alpha: float) -> str:
    """A study's cells against its own ``against`` cell with the same other axes (an ablation: each
    option set against the preset): the difference of the means and the test on run means
    (``compare``), per attribute; "" for a study without one."""
    if not study.against:
        return ""
    key = lambda c: (c.model, c.pool, c.k, c.lambda_ce, c.labels)      # everything but the options
    refs = {key(c): c for c in cells if c.options == study.against}
    axes = varying(study) or ["model"]
    lines = [f"Against {format_value('options', study.against)} (the difference of the means; the test on run "
             f"means, ▲ / ▼: p < {alpha}):\n",
             f"| {' / '.join(dict(AXES)[a] for a in axes)} | " + " | ".join(attrs) + " |", "|---" * (len(attrs) + 1) + "|"]
    for c in cells:
        ref = refs.get(key(c))
        if ref is None or ref.name == c.name:
            continue
        row = [", ".join(axis_value(c, a) for a in axes)]
        for a in attrs:
            g = values[(values["cell"] == c.name) & (values["attribute"] == a)]
            r = values[(values["cell"] == ref.name) & (values["attribute"] == a)]
            if g.empty or r.empty:
                row.append("not run")
                continue
            t, p, _ = compare(g, r)
            mark = "" if not p < alpha else (" ▲" if t > 0 else " ▼")
            row.append(f"{g['ccc'].mean() - r['ccc'].mean():+.3f}{mark}" + ("" if np.isnan(p) else f" (p {p:.2g})"))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def study_plot(study, cells, summary: pd.DataFrame, attrs: List[str], reference: str, path: str,
               values: Optional[pd.DataFrame] = None) -> bool:
    """CCC against the study's numeric axis (pool size, K or lambda; the labelled share on a log
    axis), one line per value of the other axis, each seed a point, the CNN and the linear
    references as lines; bars when only the model varies."""
    from dec_ray.report.plots import _pyplot, evaluation_bars, legend_outside, run_means, save, seed_points, wrapped
    axes = [a for a in varying(study) if a != "model"]
    if not axes:                    # models only (Table 2): bars, with the ridge reference beside them
        linear = linear_present(summary)
        names = [c.name for c in cells] + [r + labels_suffix(cells[0].labels) for r in linear]
        label = {c.name: LABELS.get(c.model, c.model) for c in cells} | {r + labels_suffix(cells[0].labels): r
                                                                          for r in linear}
        s = summary[summary["cell"].isin(names)].copy()
        s["model"] = s["cell"].map(label)
        s["significant"] = np.where(s["mark"] != "", "yes", "")
        s = s.sort_values("cell", key=lambda col: col.map(names.index))
        v = None if values is None else values[values["cell"].isin(names)].assign(
            model=lambda d: d["cell"].map(label))
        evaluation_bars(s, path, v)
        return True
    points = run_means(values, "cell")
    x_axis = "labels" if "labels" in axes else "pool" if "pool" in axes else axes[0]
    other = [a for a in varying(study) if a != x_axis]
    plt = _pyplot()
    fig, axs = plt.subplots(1, len(attrs), figsize=(max(6.0, 4.5 * len(attrs)), 3.8), squeeze=False)
    for ax, a in zip(axs[0], attrs):
        groups: Dict[tuple, list] = {}
        for c in cells:
            groups.setdefault(tuple(getattr(c, o) for o in other), []).append(c)
        for key, group in groups.items():
            categorical = isinstance(getattr(group[0], x_axis), str)       # option sets: the spec's order, no line
            if not categorical:
                group = sorted(group, key=lambda c: getattr(c, x_axis))
            s = summary[summary["attribute"] == a].set_index("cell").reindex([c.name for c in group])
            line = ax.errorbar([getattr(c, x_axis) for c in group], s["ccc_mean"], yerr=s["ccc_std"], marker="o",
                               capsize=3, ls="none" if categorical else "-", label=", ".join(f"{dict(AXES)[o]} {axis_value(group[0], o)}"
                                                          for o in other) or LABELS.get(group[0].model, group[0].model))
            for c in group:
                seed_points(ax, getattr(c, x_axis), points.get((c.name, a)), line[0].get_color(), 0.0)
        shares = sorted({c.labels for c in cells})
        for base, style in [(reference, "--")] + [(r, STYLES[r]) for r in linear_present(summary)]:
            names = [base + labels_suffix(f) for f in shares]
            r = summary[summary["attribute"] == a].set_index("cell").reindex(names)
            if x_axis == "labels":              # the references at each share, as lines of their own
                ax.errorbar(shares, r["ccc_mean"], yerr=r["ccc_std"], ls=style, marker="s", color="gray",
                            capsize=3, label=LABELS[base])
            elif r["ccc_mean"].notna().any():
                ax.axhline(r["ccc_mean"].dropna().iloc[0], ls=style, color="gray", label=LABELS[base])
        if isinstance(getattr(cells[0], x_axis), str):
            ax.tick_params(axis="x", labelrotation=30)
            for t in ax.get_xticklabels():
                t.set_horizontalalignment("right")
        if x_axis == "labels":
            ax.set_xscale("log", base=2)
            ax.set_xticks(shares, [f"{f:g}" for f in shares])
        ax.set_xlabel(dict(AXES)[x_axis] + (" (sentences)" if x_axis == "pool" else ""))
        ax.set_ylabel(f"test CCC, {a}")
        legend_outside(ax)
    fig.suptitle(wrapped(study.title or study.name), fontsize=10)
    fig.tight_layout()
    save(fig, path)
    return True


def line_label(cell) -> str:
    """A cell's line in the plot across label shares: its model and what else sets it apart."""
    parts = [LABELS.get(cell.model, cell.model)]
    if cell.pool is not None and cell.model != "cnn":
        parts.append(f"pool {cell.pool}")
    if getattr(cell, "options", "published") != "published":
        parts.append(cell.options)
    return ", ".join(parts)


def labels_plot(cells, summary: pd.DataFrame, attrs: List[str], reference: str, path: str,
                values: Optional[pd.DataFrame] = None) -> bool:
    """Test CCC against the labelled share (log axis), one line per model (cells of every study,
    joined by everything but their share), each seed a point, the CNN and the linear references at
    each share: the label-scarce study's figure."""
    from dec_ray.report.plots import _pyplot, legend_outside, run_means, save, seed_points
    points = run_means(values, "cell")
    shares = sorted({c.labels for c in cells})
    if len(shares) < 2:
        return False
    lines: Dict[str, list] = {}
    for c in cells:
        if c.name != reference + labels_suffix(c.labels):
            lines.setdefault(line_label(c), []).append(c)
    plt = _pyplot()
    fig, axs = plt.subplots(1, len(attrs), figsize=(max(6.5, 5 * len(attrs)), 4.2), squeeze=False)
    for ax, a in zip(axs[0], attrs):
        s = summary[summary["attribute"] == a].set_index("cell")
        for label, group in lines.items():
            group = sorted(group, key=lambda c: c.labels)
            r = s.reindex([c.name for c in group])
            line = ax.errorbar([c.labels for c in group], r["ccc_mean"], yerr=r["ccc_std"], marker="o", capsize=3,
                               label=label, alpha=0.85)
            for c in group:
                seed_points(ax, c.labels, points.get((c.name, a)), line[0].get_color(), 0.0)
        for base, style in [(reference, "--")] + [(r, STYLES[r]) for r in linear_present(summary)]:
            r = s.reindex([base + labels_suffix(f) for f in shares])
            ax.errorbar(shares, r["ccc_mean"], yerr=r["ccc_std"], ls=style, marker="s", color="gray" if base !=
                        reference else "black", capsize=3, label=LABELS[base])
        ax.set_xscale("log", base=2)
        ax.set_xticks(shares, [f"{f:g}" for f in shares])
        ax.set_xlabel("labelled share of Train")
        ax.set_ylabel(f"test CCC, {a}")
        legend_outside(ax)
    fig.tight_layout()
    save(fig, path)
    return True


def best_clustering_run(runs: Dict[str, tuple]) -> Optional[str]:
    """The DeepEmoCluster run with the highest dev CCC (the test set plays no part in the choice)."""
    best, best_ccc = None, -np.inf
    for run, (cell, _) in sorted(runs.items()):
        path = os.path.join(run, "result.json")
        if cell.model != "deepemocluster" or not os.path.exists(path):
            continue
        with open(path) as f:
            dev = [v for v in json.load(f)["dev_ccc"].values() if v is not None]
        if dev and np.mean(dev) > best_ccc:
            best, best_ccc = run, float(np.mean(dev))
    return best


def corpus_sections(out: str, spec, cells: Dict[str, list], values: pd.DataFrame, reference: str,
                    corpus: str = "") -> List[str]:
    """Every study's tables and plot on one corpus (its own test set, or another corpus's), from
    that corpus's values (``cell_values``), with cells{_corpus}.csv and ccc_values{_corpus}.csv
    beside the report."""
    tag = f"_{corpus}" if corpus else ""
    summary = cell_summary(values, reference, spec.alpha)
    relative_runs(values, out).to_csv(os.path.join(out, f"ccc_values{tag}.csv"), index=False)
    summary.to_csv(os.path.join(out, f"cells{tag}.csv"), index=False)
    attrs = list(dict.fromkeys(values["attribute"]))
    parts = []
    for study in spec.studies:
        group = cells[study.name]
        parts.append(study_tables(study, group, summary, attrs, reference))
        if study.against:
            parts.append(against_table(study, group, values, attrs, spec.alpha))
        png = f"{study.name}{tag}.png"
        if study_plot(study, group, summary, attrs, reference, os.path.join(out, png), values):
            parts.append(f"![{study.name}{tag}]({png})\n")
    # the studies with a labels axis (a K or lambda study would join their lines) and the references
    plotted = {s.name for s in spec.studies if s.labels} | {"_reference"}
    every = list(dict.fromkeys(c for name, group in cells.items() if name in plotted for c in group))
    png = f"labels_across{tag}.png"                  # not a study's name + .png
    if sum(len(study.labels) > 1 for study in spec.studies) > 1 and labels_plot(
            every, summary, attrs, reference, os.path.join(out, png), values):
        parts.append(f"The cells of the studies with a labels axis against the labelled share:\n\n"
                     f"![labels{tag}]({png})\n")
    return parts


CLUSTERS_SECTION = "analysis/section.md"     # the cluster analysis' part of the report, kept for re-rendering


def write_report(out: str, spec, cells: Dict[str, list], runs: Dict[str, tuple], ridges: Dict[float, str],
                 info: dict, reference: str = "cnn", cross: Optional[Dict[str, Dict[str, str]]] = None) -> str:
    """OUT/report.md (+ cells.csv, ccc_values.csv, one PNG per study, analysis/); returns its path.
    ``ridges``: (linear reference, share of labels) -> its fit's folder. ``cross``: corpus name ->
    (run folder -> its predictions on that corpus): a section per corpus."""
    from dec_ray.report.analysis import analyze_run, dependence_lines
    values = {"": cell_values(runs, ridges, spec.subsets)}
    for corpus, scored in (cross or {}).items():
        values[corpus] = cell_values(runs, ridges, spec.subsets, scored)
    best = best_clustering_run(runs)
    clusters = ""
    if best:
        an = analyze_run(best, os.path.join(out, "analysis"))
        clusters = (f"### Clusters of the best DeepEmoCluster run (by dev CCC): {os.path.relpath(best, out)}\n\n"
                    "K-means on its Train embeddings; how much of each attribute's variance the clusters "
                    "explain (eta²) and their mutual information with it, against their chance level "
                    "(whole sentences' cluster patterns dealt out again within speaker):"
                    f"\n\n{dependence_lines(an['dependence'])}\n\n"
                    "![clusters](analysis/cluster_attributes.png)\n")
        with open(os.path.join(out, CLUSTERS_SECTION), "w") as f:
            f.write(clusters)
    finished = sum(os.path.exists(os.path.join(r, "result.json")) for r in runs)
    return render_report(out, spec, cells, values, info, reference, finished, len(runs), clusters)


def render_report(out: str, spec, cells: Dict[str, list], values: Dict[str, pd.DataFrame], info: dict,
                  reference: str, finished: int, total: int, clusters: str = "") -> str:
    """OUT/report.md from the values of every corpus ("": the experiment's own test set)."""
    parts = [
        "# DeepEmoCluster studies\n",
        f"Test CCC (sentence level, 1..7 scale): the test set in {spec.subsets} random equal subsets x "
        f"{spec.seeds} training run(s) per cell (unless a study says otherwise) = {spec.subsets * spec.seeds} "
        "values; mean ± std. ▲ / ▼: above / "
        f"below the CNN-regressor trained on the same labels with p < {spec.alpha}; (p ...) is that test's p. "
        "The ridge reference is one deterministic fit, so its std is over the test subsets only. "
        f"{TESTS} cells.csv has both tests' p-values (p_vs_cnn, p_paper).\n",
        f"- command: `{info['invocations'][0]['command']}`" + "".join(
            f"\n- resumed: `{i['command']}` ({i['trained']} runs trained)" for i in info["invocations"][1:]),
        f"- tables: `{info['tables']}`",
        f"- machine: {info['machine']}",
        f"- time: {info['total_s'] / 60:.1f} min in all ({finished}/{total} runs finished"
        + (f"; failed: {', '.join(os.path.relpath(r, out) for r in info['failed'])}" if info["failed"] else "")
        + ")\n",
        "<details><summary>spec</summary>\n\n```yaml\n" + open(os.path.join(out, "spec.yaml")).read()
        + "```\n</details>\n",
    ]
    parts += corpus_sections(out, spec, cells, values[""], reference)
    if clusters:
        parts.append(clusters)
    for corpus, vals in values.items():
        if not corpus:
            continue
        target, adapted = (corpus[:-len("-adapted")], True) if corpus.endswith("-adapted") else (corpus, False)
        how = ("adapted: each input normalised with the target corpus's own feature statistics (its Train "
               "split's, from its audio; never its labels), the label scale still the training corpus's"
               if adapted else "as a user would deploy it: with the normalisation statistics of its own "
               "training corpus")
        parts.append(f"## Across corpora: trained on this corpus, tested on {target}"
                     + (" (adapted)" if adapted else "") + f"\n\nEvery run (and each linear reference at each "
                     f"share) scored on the test split of {target} {how}. A per-speaker model or reference normalises each "
                     "target speaker with their own statistics either way. Same protocol, tested against the "
                     "CNN trained on the same labels.\n")
        parts += corpus_sections(out, spec, cells, vals, reference, corpus)
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path
