"""The epoch logic without Ray: frozen regressor, aligned pseudo-labels, modes."""
import numpy as np
import pytest
import torch

from dec_ray.ingest import split_files
from dec_ray.normalization import Stats
from dec_ray.trainer import load_eval_pool
from dec_ray.training import Learner, run_epoch


@pytest.fixture(scope="module")
def pools(tables):
    from dec_ray.config import load_config
    out, _ = tables
    cfg = load_config(None)
    stats = Stats.load(f"{out}/stats.json")
    return stats, {s: load_eval_pool(split_files(out, s), cfg, stats, 0, 1) for s in ("train", "dev", "unlabeled")}


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_regressor_frozen_in_unlabeled_stage_and_trained_in_labeled_stage(pools, tiny_cfg):
    stats, p = pools
    learner = Learner(tiny_cfg(), stats, torch.device("cpu"))
    res = learner.pseudo_labels("unlabeled", p["unlabeled"], seed=0)
    learner.reset_top(0)
    reg, enc = _params(learner.net.regressor), _params(learner.net.encoder)
    idx = np.arange(p["unlabeled"].n_chunks)
    learner.train_stage(p["unlabeled"], idx, res.assignment, supervised=False)
    assert _same(reg, _params(learner.net.regressor)), "stage (a) must not move the regressor"
    assert not _same(enc, _params(learner.net.encoder))
    res = learner.pseudo_labels("train", p["train"], seed=1)
    learner.reset_top(1)
    learner.train_stage(p["train"], np.arange(p["train"].n_chunks), res.assignment, supervised=True)
    assert not _same(reg, _params(learner.net.regressor)), "stage (b) must train the regressor"


def test_pseudo_labels_stay_aligned_after_the_shuffle(pools):
    stats, p = pools
    pool = p["train"]
    c = pool.chunks.shape[1]
    rng = np.random.default_rng(0)
    assignment = rng.integers(0, 5, pool.n_chunks)
    from dec_ray.sampler import uniform_cluster_indices
    idx = uniform_cluster_indices(assignment, seed=4)
    x = pool.chunk_inputs(idx, stats)
    for j in rng.choice(len(idx), 20, replace=False):
        i = idx[j]
        np.testing.assert_array_equal(x[j], stats.normalize_features(pool.chunks[i // c, i % c]))
        assert np.array_equal(pool.chunk_labels(idx)[j], pool.labels[i // c])
    assert np.array_equal(assignment[idx], np.asarray(assignment)[idx])


@pytest.mark.parametrize("extra", [["cluster.mode=joint"], ["cluster.reuse_embeddings=true"],
                                   ["model.encoder=vgg16", "model.width=0.0625"],
                                   ["model.attributes=[arousal, valence, dominance]"]])
def test_epoch_modes_run(tables, tiny_cfg, extra):
    out, _ = tables
    cfg = tiny_cfg(*extra)
    stats = Stats.load(f"{out}/stats.json")
    p = {s: load_eval_pool(split_files(out, s), cfg, stats, 0, 1) for s in ("train", "dev", "unlabeled")}
    learner = Learner(cfg, stats, torch.device("cpu"))
    for epoch in range(2):
        logs = run_epoch(learner, epoch, p["train"], p["unlabeled"])
        assert np.isfinite(list(logs.values())).all() and any(k.endswith("ccc") for k in logs)
    ev = learner.evaluate(p["dev"], "dev")["metrics"]
    assert np.isfinite(ev["dev_loss"])
    assert {f"dev_ccc_{a}" for a in cfg.model.attributes} <= set(ev)
