"""Figures for `dec-ray evaluate`, `experiment` and `analyze` (matplotlib, headless): each one a
PNG at 200 dpi and an SVG beside it (vector, for papers), cropped to what is drawn (titles and
legends are never cut), legends outside the axes (never over an error bar), and each seed shown
as a point beside the mean where the figure shows runs."""
from __future__ import annotations

import os
import textwrap
from typing import Dict, List, Optional

import numpy as np
import pandas as pd

DPI = 200


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    matplotlib.rcParams["svg.fonttype"] = "none"          # text stays text in the SVG
    import matplotlib.pyplot as plt
    return plt


def save(fig, path: str) -> None:
    """PATH.png (200 dpi) and PATH.svg, cropped to the drawing (bbox tight); closes the figure."""
    plt = _pyplot()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    fig.savefig(os.path.splitext(path)[0] + ".svg", bbox_inches="tight")
    plt.close(fig)


def legend_outside(ax) -> None:
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def wrapped(title: str, width: int = 70) -> str:
    return "\n".join(textwrap.wrap(title, width))


def run_means(values: Optional[pd.DataFrame], key: str) -> Dict[tuple, np.ndarray]:
    """(``key`` value, attribute) -> each run's mean CCC over the test subsets: the seeds' points."""
    if values is None or values.empty:
        return {}
    means = values.groupby([key, "attribute", "run"], sort=False)["ccc"].mean()
    return {k: g.to_numpy() for k, g in means.groupby(level=[0, 1], sort=False)}


def seed_points(ax, x: float, ys: Optional[np.ndarray], color, spread: float = 0.06) -> None:
    """The runs' values as small points around x (deterministic jitter), beside the mean."""
    if ys is None or len(ys) < 2:
        return
    xs = [x] * len(ys) if isinstance(x, str) else x + np.linspace(-spread, spread, len(ys))   # a category: no jitter
    ax.scatter(xs, ys, s=9, color=color, edgecolor="black", linewidths=0.3, zorder=3, alpha=0.9)


def evaluation_bars(summary: pd.DataFrame, path: str, values: Optional[pd.DataFrame] = None,
                    key: str = "model") -> None:
    """Mean test CCC per model and attribute, error bars = one standard deviation, each run's mean
    over the subsets as a point (``values``: the runs' CCCs, their ``key`` column naming the
    summary's models)."""
    plt = _pyplot()
    points = run_means(values, key)
    attrs = list(dict.fromkeys(summary["attribute"]))
    models = list(dict.fromkeys(summary["model"]))
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(attrs) * len(models) / 2, 3.6))
    for i, m in enumerate(models):
        s = summary[summary["model"] == m].set_index("attribute").reindex(attrs)
        xs = np.arange(len(attrs)) + (i - (len(models) - 1) / 2) * width
        bars = ax.bar(xs, s["ccc_mean"], width, yerr=s["ccc_std"], capsize=4, label=m)
        for x, a in zip(xs, attrs):
            seed_points(ax, x, points.get((m, a)), bars.patches[0].get_facecolor(), width * 0.3)
        for b, sig in zip(bars, s["significant"].fillna("")):
            if sig == "yes":        # the baseline differs from the reference with p < alpha
                ax.annotate("*", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom")
    ax.set_xticks(np.arange(len(attrs)), attrs)
    ax.set_ylabel("test CCC (mean +- std)")
    ax.axhline(0, color="k", lw=0.5)
    legend_outside(ax)
    save(fig, path)


def cluster_boxplots(clusters: np.ndarray, labels: Dict[str, np.ndarray], path: str) -> None:
    """One panel per attribute: the attribute's distribution in each cluster, clusters by size."""
    plt = _pyplot()
    ids, sizes = np.unique(clusters, return_counts=True)
    order = ids[np.argsort(-sizes)]
    fig, axes = plt.subplots(len(labels), 1, figsize=(max(5.0, 0.35 * len(order) + 2), 2.4 * len(labels)),
                             squeeze=False)
    for ax, (attr, y) in zip(axes[:, 0], labels.items()):
        ax.boxplot([y[clusters == c] for c in order], showfliers=False)
        ax.set_xticks(np.arange(1, len(order) + 1), [str(c) for c in order], fontsize=7)
        ax.axhline(np.mean(y), color="grey", lw=0.8, ls="--")
        ax.set_ylabel(attr)
    axes[-1, 0].set_xlabel("cluster (largest first)")
    fig.tight_layout()
    save(fig, path)


def embedding_scatter(xy: np.ndarray, clusters: np.ndarray, labels: Dict[str, np.ndarray], path: str) -> None:
    """A 2-D projection of the embeddings, coloured by cluster and by each attribute."""
    plt = _pyplot()
    panels: List = [("cluster", clusters)] + list(labels.items())
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    for ax, (name, c) in zip(axes[0], panels):
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=c, s=4, cmap="tab20" if name == "cluster" else "coolwarm",
                        rasterized=True)
        ax.set_title(f"coloured by {name}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        if name != "cluster":
            fig.colorbar(sc, ax=ax, fraction=0.046)
    fig.tight_layout()
    save(fig, path)
