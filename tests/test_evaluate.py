"""The evaluation protocol (subsets, CCC, t-test) and the cluster analysis, on real tiny runs."""
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from scipy import stats as sps

from dec_ray.cli import main
from dec_ray.config import config_from_dict
from dec_ray.data.normalization import Stats
from dec_ray.data.tables import read_pool, split_files
from dec_ray.method.kmeans import kmeans
from dec_ray.method.learner import Learner
from dec_ray.method.losses import ccc
from dec_ray.report.analysis import dependence, eta_squared, mutual_information, sentence_permutation
from dec_ray.report.evaluation import compare, evaluate_runs, paper_t_test, split_test_set, subset_cccs, summarize


def test_the_papers_t_test_matches_the_pooled_formula_and_scipy():
    a = np.array([0.61, 0.65, 0.58, 0.66, 0.63, 0.60, 0.64, 0.62])
    b = np.array([0.55, 0.59, 0.57, 0.52, 0.60, 0.56, 0.54, 0.58])
    na, nb = len(a), len(b)
    pooled = ((na - 1) * a.var(ddof=1) + (nb - 1) * b.var(ddof=1)) / (na + nb - 2)
    t = (a.mean() - b.mean()) / np.sqrt(pooled * (1 / na + 1 / nb))
    p = 2 * sps.t.sf(abs(t), na + nb - 2)                  # two-tailed
    got_t, got_p = paper_t_test(a, b)
    assert np.isclose(got_t, t) and np.isclose(got_p, p)
    assert np.isclose(got_t, 4.4956, atol=1e-3) and 1e-4 < got_p < 1e-3   # worked by hand: 0.06 / 0.013346
    assert np.isclose(paper_t_test(b, a)[0], -t)                  # sign: reference minus baseline


def _cells(effects, runs, subsets=(0.75, 0.55, 0.40, 0.62), seed_sd=0.01, seed=0):
    """Subset CCCs of cells sharing the same test subsets: subset effect + model effect + seed."""
    rng = np.random.default_rng(seed)
    return {m: pd.DataFrame([{"model": m, "run": f"{m}{r}", "subset": i, "ccc": s + e + run_effect}
                             for r, run_effect in enumerate(rng.normal(0, seed_sd, runs[m]))
                             for i, s in enumerate(subsets)])
            for m, e in effects.items()}


def test_the_design_test_sees_a_difference_the_shared_subsets_hide_from_the_papers():
    """Every model is scored on the same subsets (sd of subset means 0.15 here) and the seeds
    differ by 0.01: a 0.04 lead over 3 runs each is clear on run means, lost in the paper's test."""
    c = _cells({"a": 0.04, "b": 0.0, "ridge": 0.03}, {"a": 3, "b": 3, "ridge": 1})
    t, p, test = compare(c["a"], c["b"])
    assert t > 0 and p < 0.01 and test == "Welch, run means"
    runs_a, runs_b = c["a"].groupby("run").ccc.mean(), c["b"].groupby("run").ccc.mean()
    assert np.isclose(p, sps.ttest_ind(runs_a, runs_b, equal_var=False).pvalue)
    assert paper_t_test(c["a"]["ccc"], c["b"]["ccc"])[1] > 0.3
    # the deterministic ridge is a fixed value: the run means against it
    t, p, test = compare(c["ridge"], c["b"])
    assert test == "run means vs the fit" and t > 0
    assert np.isclose(p, sps.ttest_1samp(runs_b, c["ridge"]["ccc"].mean()).pvalue)
    # one seed of a network is a draw: tested as a new observation, with the other cell's seed spread
    one = c["a"][c["a"]["run"] == "a0"]
    t1, p1, test = compare(one, c["b"])
    assert test == "one run vs run means" and p1 > sps.ttest_1samp(runs_b, one["ccc"].mean()).pvalue
    # one run each: paired by subset
    t, p, test = compare(one, c["b"][c["b"]["run"] == "b0"])
    assert test == "paired by subset" and t > 0


def test_test_subsets_are_a_seeded_equal_partition():
    ids = np.arange(103) * 7
    subs = split_test_set(ids, 4, seed=1)
    assert sorted(len(s) for s in subs) == [25, 26, 26, 26]
    assert np.array_equal(np.sort(np.concatenate(subs)), ids)
    assert all(np.array_equal(x, y) for x, y in zip(subs, split_test_set(ids[::-1], 4, seed=1)))
    assert not all(np.array_equal(x, y) for x, y in zip(subs, split_test_set(ids, 4, seed=2)))


def test_summary_marks_significance_against_the_reference():
    rng = np.random.default_rng(0)
    rows = [{"model": m, "run": f"{m}{r}", "subset": s, "attribute": "arousal", "ccc": mu + 0.01 * rng.normal()}
            for m, mu in (("deepemocluster", 0.65), ("cnn", 0.60), ("ae", 0.65)) for r in range(5) for s in range(4)]
    summary = summarize(pd.DataFrame(rows)).set_index("model")
    assert list(summary.index) == ["deepemocluster", "ae", "cnn"]
    assert summary.loc["cnn", "significant"] == "yes" and summary.loc["cnn", "n"] == 20
    assert summary.loc["ae", "significant"] == "no" and np.isnan(summary.loc["deepemocluster", "p"])


def test_dependence_measures_on_known_cases():
    y = np.repeat([1.0, 4.0, 7.0], 50)
    exact = np.repeat([0, 1, 2], 50)
    assert np.isclose(eta_squared(exact, y), 1.0)
    assert np.isclose(mutual_information(exact, exact), np.log2(3))
    assert np.isclose(mutual_information(np.tile([0, 1], 75), exact), 0.0)
    dep = dependence(exact, {"arousal": y + np.random.default_rng(0).normal(scale=0.1, size=150)}, n_bins=3)
    assert dep.loc[0, "eta2"] > 0.95 and dep.loc[0, "eta2_random_p95"] < 0.1


@pytest.mark.slow
def test_ccc_refuses_arrays_that_would_broadcast():
    y = np.linspace(1, 7, 50)
    assert ccc(y, y) == pytest.approx(1.0)
    for pred, gold in ((y[:, None], y), (y, y[:, None]), (y[:-1], y), (np.float64(3.0), y)):
        with pytest.raises(ValueError, match="1-d arrays of equal length"):
            ccc(pred, gold)


def test_ridge_chooses_its_alpha_by_the_dev_ccc_of_a_real_fit():
    from dec_ray.report.ridge import ALPHAS, choose_alpha
    rng = np.random.default_rng(0)
    w = rng.normal(size=40)
    x = rng.normal(size=(300, 40))
    y = x @ w + rng.normal(scale=0.5, size=300)
    alpha, wf, b, dev = choose_alpha(x[:200], y[:200], x[200:], y[200:])
    scores = [dev[a] for a in ALPHAS]
    assert alpha == max(dev, key=dev.get) and dev[alpha] > 0.95          # a good fit is found and kept
    assert scores[-1] < 0.5 * scores[0]       # the alphas differ for real (broadcast, all were ~1e-18)
    assert ccc(x[200:] @ wf + b, y[200:]) == pytest.approx(dev[alpha])


def test_the_chance_level_keeps_sentences_and_speakers_together():
    # 30 speakers x 4 sentences x 11 chunks; emotion-blind clusters: one per speaker group, whose
    # mean arousal differs by speaker. Permuting chunks calls that structure emotional; whole
    # sentences within speaker do not.
    rng = np.random.default_rng(1)
    speakers = np.repeat(np.arange(30), 4)
    y = np.repeat(rng.normal(4, 1, 30)[speakers] + rng.normal(0, 0.3, 120), 11)
    clusters = np.repeat(speakers % 5, 11)
    chunk_level = dependence(clusters, {"arousal": y}, n_random=50).iloc[0]
    sentence_level = dependence(clusters, {"arousal": y}, n_random=50, chunks=11, groups=speakers).iloc[0]
    assert chunk_level.eta2 > chunk_level.eta2_random_p95
    assert sentence_level.eta2 <= sentence_level.eta2_random_p95 + 1e-12
    perm = sentence_permutation(clusters, 11, speakers, rng).reshape(120, 11)
    assert (perm == perm[:, :1]).all() and np.array_equal(perm[:, 0], clusters[::11])


def test_evaluate_runs_end_to_end(trained_runs, tmp_path):
    out = str(tmp_path / "eval")
    runs = [trained_runs["deepemocluster"], trained_runs["cnn"]]
    assert main(["evaluate", "--runs", *runs, "--out", out]) == 0
    for name in ("evaluation.md", "evaluation.csv", "ccc_values.csv", "evaluation.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    values = pd.read_csv(os.path.join(out, "ccc_values.csv"))
    assert len(values) == 2 * 4                              # 2 runs x 4 subsets x 1 attribute
    # one value recomputed from the run's own test predictions
    preds = pd.read_parquet(os.path.join(runs[1], "test_predictions.parquet")).set_index("row_id")
    sub = split_test_set(preds.index.to_numpy(), 4, seed=0)[2]
    row = values[(values["model"] == "cnn") & (values["subset"] == 2)].iloc[0]
    assert np.isclose(row["ccc"], ccc(preds.loc[sub, "pred_arousal"], preds.loc[sub, "gold_arousal"]))
    summary = pd.read_csv(os.path.join(out, "evaluation.csv")).set_index("model")
    ref = values[values["model"] == "deepemocluster"]["ccc"]
    assert np.isclose(summary.loc["cnn", "p_paper"], paper_t_test(ref, values[values["model"] == "cnn"]["ccc"])[1])
    assert summary.loc["cnn", "test"] == "paired by subset"        # one run each
    assert subset_cccs(runs, 4, 0)["ccc"].tolist() == pytest.approx(values["ccc"].tolist())


@pytest.mark.slow
def test_analyze_shows_clusters_that_follow_the_emotion(trained_runs, tables, tmp_path):
    out = str(tmp_path / "analysis")
    assert main(["analyze", "--run", trained_runs["deepemocluster"], "--out", out]) == 0
    clusters = pd.read_csv(os.path.join(out, "clusters.csv"))
    dep = pd.read_csv(os.path.join(out, "dependence.csv")).set_index("attribute")
    assert clusters["chunks"].sum() % 11 == 0 and len(clusters) == 4
    # the clusters are those of the run's trained weights (an untrained network clusters too):
    # recomputed from model.pt, the same sizes
    run = trained_runs["deepemocluster"]
    state = torch.load(os.path.join(run, "model.pt"), weights_only=True)
    cfg, stats = config_from_dict(state["config"]), Stats(**state["stats"])
    learner = Learner(cfg, stats, torch.device("cpu"))
    untrained = learner.embed(read_pool(split_files(tables[0], "train"), cfg, stats))
    learner.net.load_state_dict(state["model"])
    emb = learner.embed(read_pool(split_files(tables[0], "train"), cfg, stats))
    assert not np.allclose(emb, untrained, atol=1e-3)
    sizes = np.sort(kmeans(emb, 4, niter=cfg.cluster.niter, seed=0).sizes)[::-1]
    assert clusters["chunks"].tolist() == sizes.tolist()
    assert dep.loc["arousal", "eta2"] > dep.loc["arousal", "eta2_random_p95"]
    # MI on 5 quantile bins is the noisier of the two on this 2-epoch model (dev CCC ~0.003): above
    # its chance mean; eta^2 above must clear the 95th percentile
    assert dep.loc["arousal", "mi_bits"] > dep.loc["arousal", "mi_random_mean"]
    for name in ("analysis.md", "cluster_attributes.png", "embedding_2d.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0


@pytest.mark.slow
def test_the_linear_reference_is_scored_with_the_protocol(trained_runs, tables, tmp_path):
    from dec_ray.report.ridge import run_ridge, utterance_features
    run = str(tmp_path / "ridge")
    result = run_ridge(tables[0], run)
    preds = pd.read_parquet(os.path.join(run, "test_predictions.parquet"))
    assert result["test_ccc"]["arousal"] == pytest.approx(ccc(preds["pred_arousal"], preds["gold_arousal"]))
    assert 0 < result["dev_ccc"]["arousal"] and preds["gold_arousal"].between(1, 7).all()
    x = utterance_features(np.exp(np.zeros((2, 11, 62, 128))) * np.array([1.0, np.e])[:, None, None, None])
    assert np.allclose(x[:, :128], [[0.0], [1.0]]) and np.allclose(x[:, 128:], 0.0)     # log-mel mean, std
    ev = evaluate_runs([trained_runs["deepemocluster"], run], str(tmp_path / "eval"))
    assert set(ev["values"]["model"]) == {"deepemocluster", "ridge"} and len(ev["values"]) == 8


@pytest.mark.slow
def test_cross_corpus_scoring_from_the_saved_predictions(trained_runs, tables, tmp_path):
    """A run scored on another corpus's tables: here the same tables under another name, so its
    cross predictions must equal the run's own saved test predictions, and the protocol scores them
    as it scores the run; the ridge is scored from its saved weights the same way."""
    from dec_ray.report.cross_corpus import score_runs_on
    from dec_ray.report.ridge import run_ridge
    ridge = str(tmp_path / "ridge")
    run_ridge(tables[0], ridge)
    runs = [trained_runs["deepemocluster"], ridge]
    out = str(tmp_path / "eval")
    assert main(["evaluate", "--runs", *runs, "--out", out, "--cross", f"again={tables[0]}"]) == 0
    folders = score_runs_on(runs, [f"again={tables[0]}"])["again"]
    for run, cross in zip(runs, folders):
        own = pd.read_parquet(os.path.join(run, "test_predictions.parquet")).sort_values("row_id")
        got = pd.read_parquet(os.path.join(cross, "test_predictions.parquet")).sort_values("row_id")
        assert got["row_id"].tolist() == own["row_id"].tolist() and "speaker" in got
        np.testing.assert_allclose(got["pred_arousal"], own["pred_arousal"], atol=2e-3)
        np.testing.assert_allclose(got["gold_arousal"], own["gold_arousal"], atol=1e-5)
    own_values = pd.read_csv(os.path.join(out, "ccc_values.csv"))
    cross_values = pd.read_csv(os.path.join(out, "cross", "again", "ccc_values.csv"))
    np.testing.assert_allclose(cross_values["ccc"], own_values["ccc"], atol=5e-3)
    # tables made with other feature settings are refused by the ridge as by the network
    import json
    import shutil
    from dec_ray.report.cross_corpus import score_on
    other = str(tmp_path / "other_tables")
    shutil.copytree(tables[0], other)
    with open(os.path.join(other, "plan.json")) as f:
        plan = json.load(f)
    plan["features"]["hop_length"] = 160
    with open(os.path.join(other, "plan.json"), "w") as f:
        json.dump(plan, f)
    for run in runs:
        with pytest.raises(ValueError, match="other feature settings"):
            score_on(run, other, "other")


@pytest.mark.slow
def test_the_egemaps_references_and_per_speaker_normalisation(tables, tmp_path):
    """eGeMAPS under Train and per-speaker normalisation fit from the tables' column. A speaker's
    statistics come from features alone: the test split's labels shuffled, the fit's test
    predictions do not move (no test label reaches them), while its test CCC does."""
    import shutil
    import pyarrow.parquet as pq
    from dec_ray.data.tables import split_files
    from dec_ray.report.ridge import read_split, run_ridge, speaker_normalize
    src = tables[0]
    shuffled = str(tmp_path / "shuffled")
    shutil.copytree(src, shuffled)
    for f in split_files(shuffled, "test"):
        t = pq.read_table(f)
        perm = np.random.default_rng(0).permutation(t.num_rows)
        t = t.set_column(t.schema.get_field_index("arousal"), "arousal", t["arousal"].take(perm))
        pq.write_table(t, f)
    got = {}
    for name, where in (("own", src), ("shuffled", shuffled)):
        for ref, norm in (("egemaps", "train"), ("egemaps-speaker", "speaker")):
            run = str(tmp_path / f"{name}_{ref}")
            got[name, ref] = run_ridge(where, run, inputs="egemaps", norm=norm, name=ref)
            got[name, ref, "pred"] = pd.read_parquet(os.path.join(run, "test_predictions.parquet"))
    for ref in ("egemaps", "egemaps-speaker"):
        np.testing.assert_allclose(got["own", ref, "pred"]["pred_arousal"], got["shuffled", ref, "pred"]["pred_arousal"])
        assert got["own", ref]["test_ccc"] != got["shuffled", ref]["test_ccc"]
        assert got["own", ref]["model"] == ref and got["own", ref]["inputs"] == "egemaps"
    assert got["own", "egemaps"]["dev_ccc"]["arousal"] > 0.3          # the reference learns arousal
    ids, x, y, speakers = read_split(src, "test", ["arousal"], "egemaps")
    z = speaker_normalize(x, speakers)
    for s in np.unique(speakers):                                      # each speaker: mean 0, std 1 or 0
        part = z[speakers == s]
        assert np.allclose(part.mean(0), 0, atol=1e-6)
        assert np.all(np.isclose(part.std(0), 1, atol=1e-6) | np.isclose(part.std(0), 0, atol=1e-6))


def test_the_teacher_reads_only_the_labeled_sentences_labels(tables_with_pool_functionals, copy_tree):
    """train.teacher's targets on the pool: the reference fitted on the labeled rows, as the table's
    reference is (its dev predictions equal run_ridge's); the set-aside rows' labels, shuffled,
    change nothing."""
    import pyarrow.parquet as pq
    from dec_ray.data.tables import row_ids, split_files
    from dec_ray.report.ridge import teacher_predictions
    src = tables_with_pool_functionals[0]
    train = row_ids(split_files(src, "train"))
    labeled, rest = train[::2], train[1::2]
    pool = np.union1d(rest, row_ids(split_files(src, "unlabeled")))
    ids, pred = teacher_predictions(src, ["arousal"], labeled, pool)
    assert sorted(ids) == sorted(pool) and np.isfinite(pred).all() and pred.std() > 0
    other = copy_tree(src)
    for f in split_files(other, "train"):
        t = pq.read_table(f)
        a = t["arousal"].to_numpy(zero_copy_only=False).copy()
        aside = np.isin(t["row_id"].to_numpy(), rest)
        a[aside] = np.random.default_rng(0).permutation(a[aside])[::-1]
        pq.write_table(t.set_column(t.schema.get_field_index("arousal"), "arousal", pa.array(a)), f)
    ids2, pred2 = teacher_predictions(other, ["arousal"], labeled, pool)
    np.testing.assert_array_equal(ids, ids2)
    np.testing.assert_allclose(pred, pred2)


@pytest.mark.slow
def test_adapted_scoring_on_the_training_corpus_itself_is_the_deployed_score(trained_runs, tables, tmp_path):
    """Adapted: the target corpus's own feature statistics. On the corpus the model was trained on
    (its Train statistics are the model's), adapted and as deployed are one score."""
    from dec_ray.report.cross_corpus import score_on
    from dec_ray.report.ridge import run_ridge
    ridge = str(tmp_path / "egemaps")
    run_ridge(tables[0], ridge, inputs="egemaps", name="egemaps")
    for run in (trained_runs["cnn"], ridge):
        deployed = pd.read_parquet(os.path.join(score_on(run, tables[0], "same"), "test_predictions.parquet"))
        adapted_dir = score_on(run, tables[0], "same", adapted=True)
        assert adapted_dir.endswith("same-adapted")
        adapted = pd.read_parquet(os.path.join(adapted_dir, "test_predictions.parquet"))
        np.testing.assert_allclose(adapted["pred_arousal"], deployed["pred_arousal"], atol=1e-5)
