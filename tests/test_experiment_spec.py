"""The experiment spec and its plan of cells (no Ray, no training)."""
import os

import numpy as np
import pytest

from dec_ray.config import ConfigError, load_config
from dec_ray.service.experiment import (all_runs, check_same_training, config_path, load_spec, plan, pool_count,
                                spec_from_dict)


def test_laptop_preset_plans_each_shared_cell_once():
    spec = load_spec("experiment_laptop")
    cells = plan(spec, load_config(config_path(spec), spec.set), n_unlabeled=351)
    names = {s: [c.name for c in group] for s, group in cells.items()}
    # DeepEmoCluster without a pool (K 10, lambda 1) is in Tables 2, 3, 4 and the lambda study
    shared = "deepemocluster_pool0_k10_lambda1"
    assert all(shared in names[s] for s in ("models", "pool", "k", "lambda"))
    assert names["pool"][:3] == [shared, "deepemocluster_pool176_k10_lambda1", "deepemocluster_pool351_k10_lambda1"]
    # the paper's semi-supervised baselines get the pool where DeepEmoCluster has it (Table 3)
    assert names["pool"][3:] == [f"{m}_pool{n}_lambda1" for m in ("ae", "vae") for n in (0, 176, 351)]
    assert names["models"][1:] == ["cnn", "ae_pool0_lambda1", "vae_pool0_lambda1"]
    distinct = {c for group in cells.values() for c in group}
    assert len(distinct) == 15
    runs = all_runs(cells, spec.seeds, "/exp")
    assert len(runs) == 15 * spec.seeds
    assert runs["/exp/runs/cnn/seed1"][1] == 1
    cnn = next(c for c in distinct if c.model == "cnn")
    assert cnn.overrides() == ["model.name=cnn", "train.unlabeled_limit=0"]


@pytest.mark.parametrize("size, expected", [(0, 0), (100, 100), (1000, 351), (0.5, 176), (1.0, 351), ("all", 351)])
def test_pool_sizes_are_counts_fractions_or_all(size, expected):
    assert pool_count(size, 351) == expected


@pytest.mark.parametrize("data, message", [
    ({"studies": [{"name": "a", "models": ["resnet"]}]}, "models must be among"),
    ({"studies": [{"name": "a", "kk": [3]}]}, "unknown key"),
    ({"seeds": 0, "studies": [{"name": "a"}]}, "seeds >= 1"),
    ({"studies": []}, "no studies"),
    ({"studies": [{"name": "a"}, {"name": "a"}]}, "unique"),
])
def test_bad_spec_is_a_clear_error(data, message):
    with pytest.raises(ConfigError, match=message):
        spec_from_dict(data)


def test_bad_pool_size_is_a_clear_error():
    with pytest.raises(ConfigError, match="fraction"):
        pool_count(1.5, 351)


def test_restart_with_another_training_config_is_refused(tmp_path):
    (tmp_path / "spec.yaml").write_text("config: /a/demo.yaml\nset: [train.epochs=8]\n")
    check_same_training(str(tmp_path), "/a/demo.yaml", ["train.epochs=8"])       # the same: fine
    with pytest.raises(ConfigError, match="new --out"):
        check_same_training(str(tmp_path), "/a/demo.yaml", ["train.epochs=12"])
    demo = config_path(spec_from_dict({"config": "demo", "studies": [{"name": "a"}]}))
    other = tmp_path / "checkout" / "demo.yaml"             # the same preset in another checkout
    other.parent.mkdir()
    other.write_text(open(demo).read())
    (tmp_path / "spec.yaml").write_text(f"config: {demo}\nset: [train.epochs=8]\n")
    check_same_training(str(tmp_path), str(other), ["train.epochs=8"])
    with pytest.raises(ConfigError, match="new --out"):
        check_same_training(str(tmp_path), str(other), ["train.epochs=9"])


def test_a_two_axis_study_is_a_grid_with_pool_sizes_as_columns():
    """Table 4's layout: K as rows, pool sizes as columns, each cell's own numbers in its place."""
    import pandas as pd

    from dec_ray.report.experiment import study_tables
    from dec_ray.service.experiment import Study
    spec = spec_from_dict({"config": "demo", "studies": [{"name": "k", "pool": [0, 100], "k": [5, 10]}]})
    cells = plan(spec, load_config(config_path(spec), spec.set), n_unlabeled=351)["k"]
    means = {c.name: 0.1 * i for i, c in enumerate(cells, 1)}
    summary = pd.DataFrame([{"cell": n, "attribute": "arousal", "ccc_mean": m, "ccc_std": 0.01, "mark": ""}
                            for n, m in {**means, "cnn": 0.5, "ridge": 0.6}.items()])
    table = study_tables(Study(**vars(spec.studies[0])), cells, summary, ["arousal"], "cnn")
    assert "| K | 0 | 100 |" in table
    for k in (5, 10):
        row = [c for c in cells if c.k == k]
        by_pool = {c.pool: f"{means[c.name]:.3f} ± 0.010" for c in row}
        assert f"| {k} | {by_pool[0]} | {by_pool[100]} |" in table
    assert "CNN-regressor (test reference): 0.500 ± 0.010; ridge (log-mel statistics): 0.600 ± 0.010" in table


def test_a_one_axis_study_is_a_row_per_value_with_the_references_below():
    """Table 4 with one K: a row per pool size (a fraction resolved to its count), then the CNN
    and ridge rows; each cell's own numbers in its row."""
    import pandas as pd

    from dec_ray.report.experiment import study_tables
    from dec_ray.service.experiment import Study
    spec = spec_from_dict({"config": "demo", "studies": [{"name": "k", "pool": [0, 1.0], "k": [10]}]})
    cells = plan(spec, load_config(config_path(spec), spec.set), n_unlabeled=351)["k"]
    assert [c.pool for c in cells] == [0, 351]
    means = {c.name: 0.1 * i for i, c in enumerate(cells, 1)}
    summary = pd.DataFrame([{"cell": n, "attribute": "arousal", "ccc_mean": m, "ccc_std": 0.01, "mark": ""}
                            for n, m in {**means, "cnn": 0.5, "ridge": 0.6}.items()])
    table = study_tables(Study(**vars(spec.studies[0])), cells, summary, ["arousal"], "cnn")
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["| unlabeled pool | arousal |", "| 0 | 0.100 ± 0.010 |", "| 351 | 0.200 ± 0.010 |",
                    "| CNN-regressor (test reference) | 0.500 ± 0.010 |",
                    "| ridge (log-mel statistics) | 0.600 ± 0.010 |"]


def test_a_label_scarce_study_is_tested_against_the_cnn_with_the_same_labels(tmp_path):
    """A `labels` axis: each share of labels gets its own CNN reference (and ridge), each cell is
    tested against the CNN trained on the same labeled sentences, and the table has the shares as
    columns with the references of each share below."""
    import pandas as pd

    from dec_ray.report.experiment import cell_summary, study_plot, study_tables
    from dec_ray.service.experiment import Study
    spec = spec_from_dict({"config": "demo", "studies": [
        {"name": "scarce", "models": ["deepemocluster", "cnn"], "pool": [1.0], "labels": [0.125, 0.25, 1.0]}]})
    cells = plan(spec, load_config(config_path(spec), spec.set), n_unlabeled=351)
    scarce = cells["scarce"]
    assert [c.name for c in cells["_reference"]] == ["cnn", "cnn_labels0.25", "cnn_labels0.125"]
    dec = [c for c in scarce if c.model == "deepemocluster"]
    assert [c.name for c in dec] == [f"deepemocluster_pool351_k10_lambda1{s}" for s in ("_labels0.125", "_labels0.25", "")]
    assert "train.label_fraction=0.125" in dec[0].overrides() and not any("label_fraction" in o for o in dec[2].overrides())
    # the t-test of each cell is against the CNN at its own share
    rng = np.random.default_rng(0)
    values = pd.DataFrame([{"cell": c, "attribute": "arousal", "run": f"{c}/{r}", "ccc": mu + 0.01 * rng.normal()}
                           for c, mu in (("cnn_labels0.25", 0.3), ("deepemocluster_pool351_k10_lambda1_labels0.25", 0.5),
                                         ("cnn", 0.7), ("deepemocluster_pool351_k10_lambda1", 0.5))
                           for r in range(8)])
    summary = cell_summary(values, "cnn", 0.05).set_index("cell")
    assert summary.loc["deepemocluster_pool351_k10_lambda1_labels0.25", "mark"] == "▲"
    assert summary.loc["deepemocluster_pool351_k10_lambda1", "mark"] == "▼"
    means = {c.name: 0.1 * i for i, c in enumerate(scarce, 1)}
    table_summary = pd.DataFrame([{"cell": n, "attribute": "arousal", "ccc_mean": m, "ccc_std": 0.01, "mark": ""}
                                  for n, m in {**means, "ridge_labels0.125": 0.45, "ridge_labels0.25": 0.55,
                                               "ridge": 0.65}.items()])
    study = Study(**vars(spec.studies[0]))
    table = study_tables(study, scarce, table_summary, ["arousal"], "cnn")
    assert "| model | 0.125 | 0.25 | 1 |" in table
    assert "| ridge (log-mel statistics) | 0.450 ± 0.010 | 0.550 ± 0.010 | 0.650 ± 0.010 |" in table
    assert study_plot(study, scarce, table_summary, ["arousal"], "cnn", str(tmp_path / "scarce.png"))
    from dec_ray.report.experiment import labels_plot, line_label
    assert labels_plot([*scarce, *cells["_reference"]], table_summary, ["arousal"], "cnn", str(tmp_path / "l.png"))
    assert os.path.getsize(tmp_path / "l.png") > 0
    assert line_label(dec[0]) == "DeepEmoCluster, pool 351"


def test_option_sets_are_an_axis_of_their_own_cells():
    """A study's ``options`` axis: one cell per named set, its overrides in the cell's training
    config and its name in the run folder; the published method has none; the CNN reference
    takes no options; an unknown set or a malformed one is a clear error."""
    from dec_ray.service.experiment import Study
    spec = spec_from_dict({"config": "demo", "options": {"sinkhorn": ["cluster.balance=sinkhorn"],
                                                         "ssl": ["cluster.balance=sinkhorn", "train.augment_pool=true"],
                                                         "long": ["train.epochs=30"]},
                           "studies": [{"name": "opt", "models": ["deepemocluster", "cnn"], "pool": [1.0],
                                        "labels": [0.25], "options": ["published", "sinkhorn", "ssl"]}]})
    cells = plan(spec, load_config(config_path(spec), spec.set), n_unlabeled=351)
    dec = [c for c in cells["opt"] if c.model == "deepemocluster"]
    assert [c.name for c in dec] == [f"deepemocluster_pool351_k10_lambda1{o}_labels0.25"
                                     for o in ("", "_sinkhorn", "_ssl")]
    assert not any("balance" in o for o in dec[0].overrides())
    assert dec[2].overrides()[-2:] == ["cluster.balance=sinkhorn", "train.augment_pool=true"]
    cnn = [c for c in cells["opt"] if c.model == "cnn"]
    assert [c.name for c in cnn] == ["cnn_labels0.25", "cnn_sinkhorn_labels0.25", "cnn_ssl_labels0.25"]
    assert [c.name for c in cells["_reference"]] == ["cnn", "cnn_labels0.25"]      # the published CNN
    long = spec_from_dict({"config": "demo", "seeds": 3, "options": {"long": ["train.epochs=30"]}, "studies": [
        {"name": "a", "models": ["cnn"], "labels": [0.25], "options": ["long"], "seeds": 1}]})
    long_cells = plan(long, load_config(config_path(long), long.set), n_unlabeled=351)
    cnn_long = long_cells["a"][0]
    assert cnn_long.name == "cnn_long_labels0.25" and cnn_long.overrides()[-1] == "train.epochs=30"
    runs = all_runs(long_cells, long.seeds, "/x", {"a": 1})      # the study's own seeds; the references the spec's
    assert sorted(os.path.relpath(r, "/x/runs") for r in runs) == [
        "cnn/seed0", "cnn/seed1", "cnn/seed2", "cnn_labels0.25/seed0", "cnn_labels0.25/seed1",
        "cnn_labels0.25/seed2", "cnn_long_labels0.25/seed0"]
    base = load_config(config_path(spec), dec[2].overrides())
    assert base.cluster.balance == "sinkhorn" and base.train.augment_pool
    from dec_ray.report.experiment import varying
    assert varying(Study(**vars(spec.studies[0]))) == ["model", "options"]
    with pytest.raises(ConfigError, match="not in the spec's options"):
        spec_from_dict({"studies": [{"name": "a", "options": ["ssl"]}]})
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        spec_from_dict({"options": {"ssl": "cluster.balance=sinkhorn"}, "studies": [{"name": "a"}]})
    for key in ("train.label_seed=3", "train.label_fraction=0.5", " train.label_rest = drop"):
        with pytest.raises(ConfigError, match="other labeled sentences than their CNN and ridge"):
            spec_from_dict({"options": {"relabel": ["cluster.k=5", key]}, "studies": [{"name": "a"}]})
    with pytest.raises(ConfigError, match="letters, digits and - only"):      # part of folder names
        spec_from_dict({"options": {"ssl_v2": ["cluster.balance=sinkhorn"]}, "studies": [{"name": "a"}]})
    from dec_ray.report.experiment import labels_of
    assert labels_of("deepemocluster_pool0_k10_lambda1_labels-2_labels0.25") == "_labels0.25"  # an option so named
    assert labels_of("cnn_labels-2") == ""


def test_an_ablation_study_tests_each_option_set_against_its_own_cell():
    """``against``: every other cell of the study is tested against that option set's cell with the
    same labels (run means), as the difference of the means; an option set the study lacks is refused."""
    import pandas as pd

    from dec_ray.report.experiment import against_table
    from dec_ray.service.experiment import Study
    spec = spec_from_dict({"config": "demo", "options": {"full": ["train.recipe=adamw", "model.head=sentence"],
                                                         "no-head": ["train.recipe=adamw"]},
                           "studies": [{"name": "abl", "models": ["cnn"], "labels": [0.25, 1.0],
                                        "options": ["published", "no-head", "full"], "against": "full"}]})
    cells = plan(spec, load_config(config_path(spec), spec.set), n_unlabeled=351)["abl"]
    rng = np.random.default_rng(0)
    means = {"cnn_labels0.25": 0.3, "cnn_no-head_labels0.25": 0.5, "cnn_full_labels0.25": 0.52,
             "cnn": 0.6, "cnn_no-head": 0.55, "cnn_full": 0.7}
    values = pd.DataFrame([{"cell": c, "attribute": "arousal", "run": f"{c}/{r}", "subset": s,
                            "ccc": mu + 0.01 * rng.normal() + 0.1 * s} for c, mu in means.items()
                           for r in range(5) for s in range(4)])
    table = against_table(Study(**vars(spec.studies[0])), cells, values, ["arousal"], 0.05)
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1].rstrip(" |") for line in table.splitlines()[4:]}
    assert set(rows) == {"0.25, published", "0.25, no-head", "1, published", "1, no-head"}   # not full against itself
    delta = {k: float(v.split()[0]) for k, v in rows.items()}
    assert delta == pytest.approx({"0.25, published": -0.22, "0.25, no-head": -0.02,    # each share against
                                   "1, published": -0.1, "1, no-head": -0.15}, abs=0.01)  # the full set at that share
    assert "▼" in rows["0.25, published"] and "▼" in rows["1, no-head"]
    # the subsets' shared spread (0.1 a subset) cancels in the run means: p is small however large it is
    assert float(rows["1, published"].split("(p ")[1][:-1]) < 1e-3
    assert against_table(Study(name="x"), cells, values, ["arousal"], 0.05) == ""
    with pytest.raises(ConfigError, match="against 'none' is not one of its options"):
        spec_from_dict({"options": {"full": ["train.recipe=adamw"]},
                        "studies": [{"name": "a", "models": ["cnn"], "options": ["full"], "against": "none"}]})


def test_cross_corpora_named_alike_are_refused_before_any_scoring():
    """Two corpora given without NAME= whose folders are both called tables would share
    RUN/cross/tables: the second would silently reuse the first's scores."""
    from dec_ray.service.experiment import score_across_corpora
    with pytest.raises(ConfigError, match="named alike: tables"):
        score_across_corpora(["/nowhere/run"], ["/d/msp/tables", "/d/iemocap/tables"])
