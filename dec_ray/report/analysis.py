"""Cluster analysis of a trained run (no Ray here): do the clusters follow the emotions?

The run's best weights embed the chunks of a labeled split (Train by default) in eval mode, and
K-means clusters them with the run's own settings (K, iterations, PCA/L2) - the clustering that
stage (b) of an epoch makes. Per cluster: size and each attribute's mean and spread over its
chunks (chunks inherit their sentence's label). Dependence between cluster and emotion:
eta-squared (share of the attribute's variance explained by the cluster) and the mutual
information between cluster and the attribute binned into quantiles, each set against its chance
level: the same number for the run's own cluster patterns dealt out at random between sentences of
the same speaker. A sentence's chunks share its label and mostly its cluster, so permuting single
chunks would set the bar far too low: emotion-blind clusters that keep sentences (or speakers)
together would look emotional.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import numpy as np
import pandas as pd
import torch

from dec_ray.config import config_from_dict
from dec_ray.data.groups import run_groups
from dec_ray.data.normalization import Stats
from dec_ray.data.tables import files_rows, read_pool, run_tables, split_files
from dec_ray.method.kmeans import kmeans


def eta_squared(clusters: np.ndarray, y: np.ndarray) -> float:
    """Between-cluster sum of squares / total sum of squares of y."""
    total = float(((y - y.mean()) ** 2).sum())
    if total == 0:
        return 0.0
    ids, inv, counts = np.unique(clusters, return_inverse=True, return_counts=True)
    means = np.bincount(inv, weights=y) / counts
    return float((counts * (means - y.mean()) ** 2).sum() / total)


def mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """I(a; b) in bits for two discrete labelings."""
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    joint = np.zeros((ia.max() + 1, ib.max() + 1))
    np.add.at(joint, (ia, ib), 1)
    p = joint / joint.sum()
    outer = p.sum(1, keepdims=True) @ p.sum(0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log2(p[nz] / outer[nz])).sum())


def quantile_bins(y: np.ndarray, n_bins: int) -> np.ndarray:
    edges = np.quantile(y, np.linspace(0, 1, n_bins + 1)[1:-1])
    return np.searchsorted(edges, y, side="right")


def sentence_permutation(clusters: np.ndarray, chunks: int, groups: Optional[np.ndarray],
                         rng: np.random.Generator) -> np.ndarray:
    """The clusters of n sentences (n * chunks, a sentence's chunks consecutive) with whole
    sentences' cluster patterns dealt out again at random, within each group (speaker) when
    ``groups`` (one per sentence) is given."""
    patterns = clusters.reshape(-1, chunks)
    groups = np.zeros(len(patterns)) if groups is None else np.asarray(groups)
    out = patterns.copy()
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        out[idx] = patterns[rng.permutation(idx)]
    return out.reshape(-1)


def dependence(clusters: np.ndarray, labels: Dict[str, np.ndarray], n_bins: int = 5, n_random: int = 20,
               seed: int = 0, chunks: int = 1, groups: Optional[np.ndarray] = None) -> pd.DataFrame:
    """eta^2 and MI per attribute, with the mean and 95th percentile of their chance level:
    ``sentence_permutation`` of the clusters (``chunks`` per sentence, within ``groups``)."""
    rng = np.random.default_rng(seed)
    rows = []
    for attr, y in labels.items():
        binned = quantile_bins(y, n_bins)
        rand = [sentence_permutation(clusters, chunks, groups, rng) for _ in range(n_random)]
        eta_r = [eta_squared(r, y) for r in rand]
        mi_r = [mutual_information(r, binned) for r in rand]
        rows.append({"attribute": attr, "eta2": eta_squared(clusters, y), "eta2_random_mean": np.mean(eta_r),
                     "eta2_random_p95": np.percentile(eta_r, 95), "mi_bits": mutual_information(clusters, binned),
                     "mi_random_mean": np.mean(mi_r), "mi_random_p95": np.percentile(mi_r, 95)})
    return pd.DataFrame(rows)


def dependence_lines(dep: pd.DataFrame) -> str:
    """One console line per attribute: eta^2 and MI against the random assignments."""
    return "\n".join(f"- {r.attribute}: eta^2 {r.eta2:.3f} (chance {r.eta2_random_mean:.3f}, p95 "
                     f"{r.eta2_random_p95:.3f}), MI {r.mi_bits:.3f} bits (chance {r.mi_random_mean:.3f})"
                     for r in dep.itertuples())


def cluster_table(clusters: np.ndarray, labels: Dict[str, np.ndarray]) -> pd.DataFrame:
    df = pd.DataFrame({"cluster": clusters, **labels})
    g = df.groupby("cluster")
    out = g.size().rename("chunks").to_frame()
    for attr in labels:
        out[f"{attr}_mean"] = g[attr].mean()
        out[f"{attr}_std"] = g[attr].std(ddof=0)
    return out.sort_values("chunks", ascending=False).reset_index()


def _markdown(df: pd.DataFrame) -> str:
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in df.itertuples(index=False)]
    return "\n".join(["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
                     + ["| " + " | ".join(r) + " |" for r in cells])


def pca_2d(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:2].T


def _speakers(files, row_ids: np.ndarray) -> np.ndarray:
    """The speaker of each of these sentences (empty strings where the corpus names none)."""
    import pyarrow.dataset as pads
    t = pads.dataset(files, format="parquet").to_table(columns=["row_id", "speaker"]).to_pandas()
    return t.set_index("row_id").loc[row_ids, "speaker"].fillna("").to_numpy()


def analyze_run(run: str, out: str, split: str = "train", max_sentences: int = 5000, seed: int = 0,
                n_bins: int = 5) -> Dict:
    """Write OUT/clusters.csv, dependence.csv, analysis.md, cluster_attributes.png, embedding_2d.png."""
    from dec_ray.method.learner import Learner
    from dec_ray.report.plots import cluster_boxplots, embedding_scatter

    state = torch.load(os.path.join(run, "model.pt"), map_location="cpu", weights_only=True)
    cfg, stats = config_from_dict(state["config"]), Stats(**state["stats"])
    tables = run_tables(run)
    files = split_files(tables, split)
    if not files:
        raise ValueError(f"{tables}: no {split} split to analyze")
    stride = max(1, -(-files_rows(files) // max_sentences))      # an even subsample when the split is large
    groups = run_groups(run, tables, cfg.model.input) if cfg.model.norm == "speaker" else None
    pool = read_pool(files, cfg, stats, 0, stride, groups=groups)
    learner = Learner(cfg, stats, torch.device("cpu"))
    learner.net.load_state_dict(state["model"])
    emb = learner.embed(pool).numpy()
    c = cfg.cluster
    k = min(c.k, len(emb))
    res = kmeans(emb, k, niter=c.niter, seed=seed, pca_dim=c.pca_dim, l2=c.l2_normalize, threads=c.faiss_threads)
    attrs = cfg.model.attributes
    gold = stats.denormalize_labels(pool.labels.numpy(), attrs)
    labels = {a: np.repeat(gold[:, j], cfg.features.num_chunks).astype(np.float64) for j, a in enumerate(attrs)}

    os.makedirs(out, exist_ok=True)
    table = cluster_table(res.assignment, labels)
    speakers = _speakers(files, pool.row_ids)
    dep = dependence(res.assignment, labels, n_bins=n_bins, seed=seed, chunks=cfg.features.num_chunks,
                     groups=speakers)
    table.to_csv(os.path.join(out, "clusters.csv"), index=False)
    dep.to_csv(os.path.join(out, "dependence.csv"), index=False)
    cluster_boxplots(res.assignment, labels, os.path.join(out, "cluster_attributes.png"))
    pick = np.random.default_rng(seed).permutation(len(emb))[:5000]
    embedding_scatter(pca_2d(emb[pick]), res.assignment[pick], {a: v[pick] for a, v in labels.items()},
                      os.path.join(out, "embedding_2d.png"))
    dep_lines = ["| attribute | eta^2 | eta^2 random (mean / p95) | MI bits | MI random (mean / p95) |",
                 "|---|---|---|---|---|"]
    for r in dep.itertuples():
        dep_lines.append(f"| {r.attribute} | {r.eta2:.3f} | {r.eta2_random_mean:.3f} / {r.eta2_random_p95:.3f} | "
                         f"{r.mi_bits:.3f} | {r.mi_random_mean:.3f} / {r.mi_random_p95:.3f} |")
    with open(os.path.join(out, "analysis.md"), "w") as f:
        f.write(f"# Cluster analysis of {os.path.relpath(run, out)}\n\n{len(pool.row_ids)} {split} sentences "
                f"({len(emb)} chunks), K = {k}, best weights of the run.\n\n"
                "## How much the clusters depend on the emotion\n\n" + "\n".join(dep_lines) +
                f"\n\nMI: cluster vs the attribute in {n_bins} quantile bins. Chance (\"random\"): 20 "
                "permutations of whole sentences' cluster patterns between sentences of the same speaker "
                f"({len(np.unique(speakers))} speakers): a clustering that keeps each sentence together "
                "but knows nothing of emotion.\n\n## Clusters\n\n" + _markdown(table)
                + "\n\n![per-cluster attributes](cluster_attributes.png)\n\n![embeddings](embedding_2d.png)\n")
    return {"clusters": table, "dependence": dep, "out": out, "k": k, "chunks": len(emb)}
