import pytest
import yaml

from dec_ray.config import Config, ConfigError, load_config


def test_defaults_are_the_method():
    c = Config()
    assert (c.features.n_fft, c.features.hop_length, c.features.n_mels) == (512, 256, 128)
    assert (c.features.chunk_frames, c.features.num_chunks) == (62, 11)
    assert (c.train.lr, c.train.lr_regressor, c.train.lr_top, c.train.lambda_ce) == (1e-3, 5e-4, 0.05, 1.0)
    assert c.train.batch_sentences == 64 and c.cluster.niter == 20 and c.model.encoder == "compact"


def test_yaml_round_trip_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lambda_ce: 0.5\ncluster:\n  k: 30\n")
    c = load_config(str(p), ["train.lambda_ce=2", "model.attributes=[arousal, valence]", "train.amp=false",
                             "train.weight_decay=1e-5"])           # YAML 1.1 reads 1e-5 as a string
    assert c.train.lambda_ce == 2.0 and isinstance(c.train.lambda_ce, float) and c.train.weight_decay == 1e-5
    assert c.cluster.k == 30 and c.model.attributes == ["arousal", "valence"] and c.train.amp is False
    c.save(str(tmp_path / "saved.yaml"))
    assert load_config(str(tmp_path / "saved.yaml")) == c
    assert yaml.safe_load((tmp_path / "saved.yaml").read_text())["cluster"]["k"] == 30


@pytest.mark.parametrize("override, message", [
    ("train.lamda=1", "unknown key"),
    ("train.epochs=ten", "must be int"),
    ("train.lr=fast", "must be float"),
    ("model.name=resnet", "model.name"),
    ("model.attributes=[joy]", "model.attributes"),
    ("nokeyvalue", "key=value"),
    ("cluster.k=1", "cluster.k"),
    ("cluster.mode=joint,cluster.labeled_sampler=natural", "joint does not apply cluster.labeled_sampler"),
    ("cluster.mode=joint,train.augment_pool=true", "joint does not apply train.augment_pool"),
    ("cluster.mode=joint,train.warmup_epochs=2", "joint does not apply train.warmup_epochs=2"),
    ("model.functionals=egemaps", "needs model.head=sentence"),
    ("model.functionals=egemaps,model.head=sentence,features.functionals=none", "features.functionals=none"),
    ("model.functionals=egemaps,model.head=sentence,train.teacher=ridge", "use one of the two"),
    ("model.functionals=mfcc", "model.functionals"),
])
def test_bad_config_is_a_clear_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override.split(","))


def test_keys_that_never_had_an_effect_are_dropped_with_a_note(tmp_path):
    """Older configs and run folders still name them; they load, with a warning that says why."""
    old = {"ingest": {"files_per_batch": 16}, "cluster": {"max_points_per_centroid": 10_000_000, "k": 7},
           "train": {"log_every": 0}}
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    with pytest.warns(UserWarning) as seen:
        cfg = load_config(str(tmp_path / "old.yaml"))
    assert cfg.cluster.k == 7
    assert sorted(str(w.message).split()[2] for w in seen) == ["cluster.max_points_per_centroid",
                                                               "ingest.files_per_batch", "train.log_every"]
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, ["train.log_everything=1"])


def test_the_recommended_preset_lays_its_options_over_another_config():
    """`--models recommended`: the preset's keys over the demo's size, named by its label; and as a
    config of its own (`--config recommended`). What it holds is what docs/results/pool_recipe chose."""
    from dec_ray.config import model_label, preset_overrides
    demo = load_config("demo")
    c = load_config("demo", preset_overrides("recommended"))
    assert model_label(c) == "recommended" and c.model.name == "deepemocluster" and c.train.unlabeled_limit == 0
    assert (c.model.norm, c.model.head, c.train.recipe, c.train.teacher) == ("speaker", "sentence", "adamw", "none")
    assert (c.cluster.balance, c.cluster.labeled_sampler) == ("sinkhorn", "natural")
    assert c.model.width == demo.model.width and c.train.epochs == demo.train.epochs      # the demo's size stays
    alone = load_config("recommended")
    assert (alone.model.norm, alone.model.head, alone.train.recipe) == ("speaker", "sentence", "adamw")
