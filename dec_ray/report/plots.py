"""PNG figures for `dec-ray evaluate` and `dec-ray analyze` (matplotlib, headless)."""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import pandas as pd


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def evaluation_bars(summary: pd.DataFrame, path: str) -> None:
    """Mean test CCC per model and attribute, error bars = one standard deviation."""
    plt = _pyplot()
    attrs = list(dict.fromkeys(summary["attribute"]))
    models = list(dict.fromkeys(summary["model"]))
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(attrs) * len(models) / 2, 3.6))
    for i, m in enumerate(models):
        s = summary[summary["model"] == m].set_index("attribute").reindex(attrs)
        bars = ax.bar(np.arange(len(attrs)) + (i - (len(models) - 1) / 2) * width, s["ccc_mean"], width,
                      yerr=s["ccc_std"], capsize=4, label=m)
        for b, sig in zip(bars, s["significant"].fillna("")):
            if sig == "yes":        # the baseline differs from the reference with p < alpha
                ax.annotate("*", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom")
    ax.set_xticks(np.arange(len(attrs)), attrs)
    ax.set_ylabel("test CCC (mean +- std)")
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    fig.savefig(path, dpi=120)
    plt.close(fig)
