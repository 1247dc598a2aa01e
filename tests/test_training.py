"""The epoch logic without Ray: the regressor in each stage, aligned pseudo-labels, modes, the
label normalisation, the batch rule and the epoch loop (best weights, early stopping, resume)."""
import copy
import dataclasses

import numpy as np
import pytest
import torch

from dec_ray.config import ConfigError, load_config
from dec_ray.data.pools import Pool, PoolBuilder
from dec_ray.data.tables import pool_batches
from dec_ray.method.epoch import Epoch, pseudo_labels_stage, run_epoch, supervised_stage
from dec_ray.method.learner import Learner, batch_sentences
from dec_ray.method.loop import LoopState, fit
from dec_ray.method.sampler import uniform_cluster_indices
from plain_pools import synth_pools


@pytest.fixture(scope="module")
def pools():
    return synth_pools()


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _adam_state(learner):
    return {i: {k: v.clone() for k, v in st.items()} for i, st in enumerate(learner.adam.state.values())}


def test_unlabeled_stage_leaves_the_regressor_and_its_optimiser_alone(pools, tiny_cfg):
    stats, p = pools
    learner = Learner(tiny_cfg(), stats, torch.device("cpu"))
    # stage (b) first, so that Adam has momentum that a zero-gradient step would spend
    res = learner.pseudo_labels(p["train"], seed=1)
    learner.reset_top(1)
    reg = _params(learner.net.regressor)
    learner.train(p["train"], np.arange(p["train"].n_chunks), supervised_stage(1.0, res.assignment))
    assert not _same(reg, _params(learner.net.regressor)), "stage (b) must train the regressor"
    reg, enc, adam = _params(learner.net.regressor), _params(learner.net.encoder), _adam_state(learner)
    res = learner.pseudo_labels(p["unlabeled"], seed=0)
    learner.reset_top(0)
    learner.train(p["unlabeled"], np.arange(p["unlabeled"].n_chunks), pseudo_labels_stage(res.assignment))
    assert _same(reg, _params(learner.net.regressor)), "stage (a) moved the regressor"
    after = _adam_state(learner)
    assert all(torch.equal(adam[i][k], after[i][k]) for i in adam for k in adam[i]), "Adam stepped in stage (a)"
    assert not _same(enc, _params(learner.net.encoder))


def test_the_removed_switches_say_why(tiny_cfg):
    for key in ("cluster.reuse_embeddings=true", "train.freeze_regressor_in_unlabeled=false"):
        with pytest.raises(ConfigError, match="was removed"):
            tiny_cfg(key)


def test_official_defaults():
    t = load_config(None).train
    assert (t.lr, t.momentum, t.weight_decay, t.lr_regressor, t.lr_top) == (1e-3, 0.0, 0.0, 5e-4, 0.05)
    assert t.epochs == 50 and t.patience == 0 and t.batch_sentences == 64
    dc = load_config("deepcluster_sgd").train                 # the named DeepCluster choice
    assert (dc.momentum, dc.weight_decay) == (0.9, 1e-5)
    c = load_config(None).cluster                             # published: K-means, uniform over clusters
    assert (c.balance, c.labeled_sampler) == ("none", "uniform")
    ssl = load_config("ssl").cluster                          # the label-scarce study's option set
    assert (ssl.balance, ssl.labeled_sampler) == ("sinkhorn", "natural")


def test_official_initialisation(tiny_cfg):
    net = Learner(tiny_cfg("model.width=1.0"), synth_pools(sizes=(("train", 2),))[0], torch.device("cpu")).net
    conv = net.encoder.conv[3]                                  # 32 -> 32 channels
    assert abs(conv.weight.std().item() - (2 / (9 * 32)) ** 0.5) < 0.005 and not conv.bias.any()
    lin = net.encoder.fc[0]
    assert abs(lin.weight.std().item() - 0.01) < 0.001 and not lin.bias.any()


def test_pseudo_labels_stay_aligned_after_the_shuffle(pools):
    stats, p = pools
    pool = p["train"]
    c = pool.chunks.shape[1]
    rng = np.random.default_rng(0)
    assignment = torch.from_numpy(rng.integers(0, 5, pool.n_chunks))
    idx = uniform_cluster_indices(assignment, seed=4)
    x = pool.chunk_inputs(idx, stats.feature_normalizer(torch.device("cpu")))
    labels = pool.chunk_labels(idx)
    for j in rng.choice(len(idx), 20, replace=False):
        i = int(idx[j])
        np.testing.assert_array_equal(x[j].numpy(), stats.normalize_features(pool.chunks[i // c, i % c].numpy()))
        assert labels[j] == pool.labels[i // c]


def test_labels_are_normalised_row_by_row_with_a_nan_in_the_batch(pools, tiny_cfg):
    stats, _ = pools
    cfg = tiny_cfg()
    batch = {"row_id": np.arange(3), "chunks": np.zeros((3, 11, 62, 128), np.float16),
             "arousal": np.array([stats.label_mean["arousal"] + stats.label_std["arousal"], np.nan, 1.0])}
    labels = next(pool_batches([batch], cfg, stats))[1][:, 0]
    assert labels[0] == pytest.approx(1.0) and np.isnan(labels[1])
    assert labels[2] == pytest.approx((1.0 - stats.label_mean["arousal"]) / stats.label_std["arousal"])


@pytest.mark.parametrize("extra", [["cluster.mode=joint"], ["model.encoder=vgg16", "model.width=0.0625"],
                                   ["model.attributes=[arousal, valence, dominance]"], ["model.input=logmel"],
                                   ["model.head=sentence"], ["train.recipe=adamw", "train.weight_decay=0.01"]])
def test_epoch_modes_train_every_part_they_claim(pools, tiny_cfg, extra):
    stats, p = pools
    cfg = tiny_cfg(*extra)
    if len(cfg.model.attributes) == 3:            # the plain pools label arousal only: repeat it
        p = {k: type(v)(v.chunks, np.repeat(v.labels, 3, axis=1), v.row_ids) for k, v in p.items()}
        stats = dataclasses.replace(stats, **{f: {a: getattr(stats, f)["arousal"] for a in cfg.model.attributes}
                                              for f in ("label_mean", "label_std")})
    learner = Learner(cfg, stats, torch.device("cpu"))
    before = {n: _params(getattr(learner.net, n)) for n in ("encoder", "cls_hidden", "regressor")}
    logs = run_epoch(learner, 0, p["train"], p["unlabeled"])
    stage = "joint" if "joint" in extra[0] else "train"
    assert logs[f"{stage}_ccc"] > 0 and logs[f"{stage}_ce"] > 0 and logs[f"{stage}_nonempty"] >= 2
    if stage == "joint":
        assert logs["joint_unl_ce"] > 0
    else:
        assert logs["unlabeled_ce"] > 0 and "unlabeled_ccc" not in logs
    for name, params in before.items():
        assert not _same(params, _params(getattr(learner.net, name))), f"{name} did not train"
    ev = learner.evaluate(p["dev"], "dev")["metrics"]
    assert {f"dev_ccc_{a}" for a in cfg.model.attributes} <= set(ev) and ev["dev_loss"] > 0


def test_batch_rule_keeps_the_paper_batch_at_scale_and_shrinks_it_on_small_corpora():
    assert batch_sentences(34_000, 2, 64, 20) == 64                 # MSP-Podcast's Train: unchanged
    assert batch_sentences(228, 2, 64, 20) == 10                    # 228 // 20 = 11, a multiple of 2
    assert 228 // batch_sentences(228, 2, 64, 20) >= 20
    assert batch_sentences(10, 4, 64, 20) == 8                      # never below 2 per worker
    assert batch_sentences(228, 2, 64, 0) == 64                     # 0: never shrink


def test_fit_keeps_the_best_epoch_and_stops_early(pools, tiny_cfg):
    stats, p = pools
    # learning rates of zero: only BatchNorm's running statistics move, so the dev loss wanders and
    # stalls within a few epochs; the loop must stop at the first stalled epoch
    cfg = tiny_cfg("train.epochs=8", "train.patience=1", "train.lr=0.0", "train.lr_regressor=0.0",
                   "train.lr_top=0.0", "model.dropout=0.0")
    learner = Learner(cfg, stats, torch.device("cpu"))
    losses = []
    out = fit(learner, p, report=lambda m, st: losses.append(m["dev_loss"]))
    first_stall = next(e for e in range(1, 8) if losses[e] >= min(losses[:e]))
    assert len(losses) == first_stall + 1 < 8, losses
    best = int(np.argmin(losses))
    assert out["metrics"]["best_epoch"] == best and out["metrics"]["early_stopped"] == 1
    assert out["metrics"]["dev_loss"] == pytest.approx(losses[best])     # the kept weights are the best


def test_fit_resumed_from_a_state_equals_the_uninterrupted_loop(pools, tiny_cfg):
    stats, p = pools
    cfg = tiny_cfg("train.epochs=3", "model.dropout=0.0")
    full = fit(Learner(cfg, stats, torch.device("cpu")), p)["metrics"]
    first = Learner(cfg, stats, torch.device("cpu"))
    saved = {}

    def checkpoint(metrics, st):          # what the Ray worker's checkpoint holds, after epoch 1
        if metrics["epoch"] == 1:
            saved.update(learner=copy.deepcopy(first.state()), loop=copy.deepcopy(st.to_dict()))
    fit(first, p, report=checkpoint)
    second = Learner(cfg, stats, torch.device("cpu"))
    second.load_state(saved["learner"])
    loop = LoopState(**saved["loop"])
    resumed = fit(second, p, loop)["metrics"]
    assert resumed["best_epoch"] == full["best_epoch"]
    assert resumed["test_loss"] == pytest.approx(full["test_loss"], rel=1e-5)


@pytest.mark.parametrize("capacity", [30, 7])
def test_a_pool_is_filled_in_place_and_grows_only_past_its_estimate(capacity):
    """Loading never holds a shard twice: the Pool is a view of the one buffer the builder filled
    (when the estimate held); a shard larger than its estimate grows the buffer and loses nothing."""
    rng = np.random.default_rng(0)
    batches = [(rng.normal(size=(k, 11, 62, 128)).astype(np.float16), rng.normal(size=(k, 1)).astype(np.float32),
                np.arange(i * 10, i * 10 + k)) for i, k in enumerate((10, 10, 5))]
    builder = PoolBuilder(capacity, (11, 62, 128), 1, torch.device("cpu"), False, torch.device("cpu"))
    first = builder.chunks.data_ptr()
    for b in batches:
        builder.add(*b)
    pool = builder.build()
    assert (builder.grown == 0) == (capacity >= 25)
    assert (pool.chunks.data_ptr() == first) == (capacity >= 25)
    assert pool.chunks.dtype == torch.float16 and pool.n_chunks == 25 * 11
    np.testing.assert_array_equal(pool.chunks.numpy(), np.concatenate([b[0] for b in batches]))
    np.testing.assert_array_equal(pool.labels.numpy(), np.concatenate([b[1] for b in batches]))
    np.testing.assert_array_equal(pool.row_ids, np.concatenate([b[2] for b in batches]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("on_device", [True, False])
def test_an_epoch_on_the_gpu_with_the_pool_on_the_device_or_pinned(pools, tiny_cfg, on_device):
    stats, p = pools
    dev = torch.device("cuda")
    storage = dev if on_device else torch.device("cpu")
    moved = {k: Pool(v.chunks.to(storage), v.labels.to(dev), v.row_ids) for k, v in p.items()}
    if not on_device:
        for v in moved.values():
            v.chunks = v.chunks.pin_memory()
    learner = Learner(tiny_cfg(), stats, dev)
    res = learner.pseudo_labels(moved["train"], seed=0)
    assert res.assignment.is_cuda
    logs = run_epoch(learner, 0, moved["train"], moved["unlabeled"])
    assert np.isfinite(logs["train_ccc"]) and logs["unlabeled_nonempty"] >= 2
    cpu = learner.embed(p["train"]).numpy()
    np.testing.assert_allclose(learner.embed(moved["train"]).cpu().numpy(), cpu, atol=2e-2)


def test_the_vae_weighs_its_kl_as_a_standard_vae_does():
    """Per input element: (sum of squared errors + beta * KL summed over latents) / elements."""
    from dec_ray.method.epoch import reconstruction
    from dec_ray.method.learner import Batch
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 62, 128, generator=g)
    out = {"recon": torch.randn(6, 1, 62, 128, generator=g), "mu": torch.randn(6, 256, generator=g),
           "logvar": 0.1 * torch.randn(6, 256, generator=g)}
    batch = Batch(x, torch.arange(6), None)
    kl = -0.5 * (1 + out["logvar"] - out["mu"] ** 2 - out["logvar"].exp()).sum()
    for beta in (1.0, 4.0):
        expected = (((out["recon"] - x) ** 2).sum() + beta * kl) / x.numel()
        assert float(reconstruction(beta)(out, batch)) == pytest.approx(float(expected), rel=1e-5)


def test_spec_augment_masks_one_band_in_time_and_one_in_frequency_after_a_circular_shift():
    from dec_ray.method.augment import MAX_FREQ_MASK, MAX_SHIFT, MAX_TIME_MASK, spec_augment
    ones = torch.ones(64, 62, 128)
    out = spec_augment(ones, torch.Generator().manual_seed(0))
    zero_t = (out == 0).all(2)                                 # whole masked frames (N, 62)
    zero_f = (out == 0).all(1)                                 # whole masked bins (N, 128)
    assert int(zero_t.sum(1).max()) <= MAX_TIME_MASK and int(zero_f.sum(1).max()) <= MAX_FREQ_MASK
    assert zero_t.sum(1).float().mean() > 2 and zero_f.sum(1).float().mean() > 4
    for i in range(64):                                        # each mask one contiguous band
        for band in (zero_t[i].nonzero().flatten(), zero_f[i].nonzero().flatten()):
            assert len(band) == 0 or int(band[-1] - band[0]) == len(band) - 1
    assert ((out == 0) == (zero_t[:, :, None] | zero_f[:, None, :])).all()    # nothing else
    ramp = torch.arange(62.0)[None, :, None].expand(8, 62, 128) + 1
    shifted = spec_augment(ramp, torch.Generator().manual_seed(1))
    for i in range(8):                                         # unmasked frames: a circular shift
        col = shifted[i, :, int((shifted[i] != 0).sum(0).argmax())]      # a bin outside the mask
        kept = col != 0
        s = int(((torch.arange(62.0) + 1 - col) % 62)[kept][0])
        s = s - 62 if s > 31 else s
        assert abs(s) <= MAX_SHIFT and torch.equal(col[kept], ((torch.arange(62.0) - s) % 62 + 1)[kept])
    assert torch.equal(spec_augment(ones, torch.Generator().manual_seed(0)), out)
    assert not torch.equal(spec_augment(ones, torch.Generator().manual_seed(2)), out)


def test_the_method_options_change_what_they_claim(pools, tiny_cfg):
    """cluster.labeled_sampler=natural draws every labeled chunk once; train.warmup_epochs trains
    the pool alone (the regressor untouched); train.unlabeled_per_epoch trains on a draw of the pool;
    train.augment_pool feeds the pseudo-label stage views."""
    from dec_ray.method.epoch import Epoch
    stats, p = pools
    learner = Learner(tiny_cfg(), stats, torch.device("cpu"))
    _, natural = Epoch(learner, 0).cluster_pool("train", p["train"], sampler="natural")
    assert sorted(natural.tolist()) == list(range(p["train"].n_chunks))
    _, uniform = Epoch(learner, 0).cluster_pool("train", p["train"])
    assert sorted(uniform.tolist()) != list(range(p["train"].n_chunks))

    warm = Learner(tiny_cfg("train.warmup_epochs=1"), stats, torch.device("cpu"))
    reg = _params(warm.net.regressor)
    logs = run_epoch(warm, 0, p["train"], p["unlabeled"])
    assert logs["unlabeled_ce"] > 0 and "train_ccc" not in logs and _same(reg, _params(warm.net.regressor))
    assert "train_ccc" in run_epoch(warm, 1, p["train"], p["unlabeled"])

    drawn = Learner(tiny_cfg("train.unlabeled_per_epoch=3"), stats, torch.device("cpu"))
    logs = run_epoch(drawn, 0, p["train"], p["unlabeled"])                # 3 of the 12 sentences
    assert logs["unlabeled_chunks"] <= 3 * 11 and logs["unlabeled_embed_s"] > 0

    seen = []
    for augment in (False, True):
        lrn = Learner(tiny_cfg(), stats, torch.device("cpu"))
        lrn.model.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach().clone()))
        res = lrn.pseudo_labels(p["unlabeled"], seed=0)
        lrn.reset_top(0)
        seen.clear()
        lrn.train(p["unlabeled"], torch.arange(p["unlabeled"].n_chunks), pseudo_labels_stage(res.assignment, augment))
        batch = seen[0]
        plain = p["unlabeled"].chunk_inputs(torch.arange(len(batch)), lrn.normalize)
        assert torch.equal(batch, plain) != augment


def test_the_sentence_head_predicts_one_value_per_sentence_from_whole_sentences(pools, tiny_cfg):
    stats, p = pools
    learner = Learner(tiny_cfg("model.head=sentence"), stats, torch.device("cpu"))
    c = p["dev"].chunks.shape[1]
    pred = learner.predict(p["dev"]).reshape(-1, c)
    assert np.all(pred == pred[:, :1])                     # each sentence's chunks carry its prediction
    learner.net.eval()
    order = torch.randperm(c)                              # the head reads the chunks in order
    x = learner.normalize(p["dev"].chunks[0])
    assert not torch.allclose(learner.net(x)["pred"], learner.net(x[order])["pred"])
    with pytest.raises(ValueError, match="whole sentences"):
        learner.net(x[:c - 1])
    idx = Epoch(learner, 0).shuffled(p["train"])
    assert torch.equal(idx.view(-1, c) % c, torch.arange(c).expand(len(idx) // c, c))
    with pytest.raises(ConfigError, match="model.head=sentence"):
        tiny_cfg("model.head=sentence", "model.name=ae")


def test_the_teacher_stage_trains_the_regressor_on_the_pool(pools, tiny_cfg):
    """train.teacher: stage (a) adds 1 - CCC against the targets the pool holds as labels (the CNN:
    a pass of its own); without it the regressor stays as it was (the test above)."""
    stats, p = pools
    targets = torch.linspace(-1, 1, p["unlabeled"].labels.shape[0])[:, None]
    unl = Pool(p["unlabeled"].chunks, targets, p["unlabeled"].row_ids)
    for model in ("deepemocluster", "cnn"):
        learner = Learner(tiny_cfg(f"model.name={model}", "train.teacher=egemaps-speaker"), stats, torch.device("cpu"))
        logs = run_epoch(learner, 0, p["train"], unl)
        assert logs["unlabeled_teacher"] > 0 and logs["unlabeled_chunks"] == unl.n_chunks
    with pytest.raises(ConfigError, match="train.teacher"):
        tiny_cfg("train.teacher=egemaps-speaker", "model.name=vae")


def test_the_teacher_is_distilled_on_the_attributes_it_is_given(tiny_cfg):
    """train.teacher_attributes: 1 - CCC on those columns only (an attribute left out may hold any
    target); empty: every attribute, as before; an attribute the model lacks is refused."""
    from types import SimpleNamespace

    from dec_ray.method.epoch import teacher_of
    from dec_ray.method.losses import ccc_loss
    attrs = "model.attributes=[arousal, valence, dominance]"
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(40, 3, generator=g), torch.randn(40, 3, generator=g)
    out, batch = {"pred": pred}, SimpleNamespace(labels=target)
    both = teacher_of(tiny_cfg(attrs, "train.teacher=egemaps-speaker", "train.teacher_attributes=[arousal, dominance]",
                               "train.teacher_weight=2"))
    assert float(both(out, batch)) == pytest.approx(2 * float(ccc_loss(pred[:, [0, 2]], target[:, [0, 2]])), rel=1e-6)
    scrambled = target.clone()
    scrambled[:, 1] = torch.randn(40, generator=g) * 100
    assert float(both(out, SimpleNamespace(labels=scrambled))) == pytest.approx(float(both(out, batch)), rel=1e-6)
    every = teacher_of(tiny_cfg(attrs, "train.teacher=egemaps-speaker"))
    assert float(every(out, batch)) == pytest.approx(float(ccc_loss(pred, target)), rel=1e-6)
    assert teacher_of(tiny_cfg(attrs)) is None
    with pytest.raises(ConfigError, match="train.teacher_attributes"):
        tiny_cfg("model.attributes=[arousal]", "train.teacher=egemaps-speaker", "train.teacher_attributes=[valence]")
    with pytest.raises(ConfigError, match="train.teacher_attributes"):
        tiny_cfg(attrs, "train.teacher_attributes=[arousal]")          # no teacher to restrict


def test_the_adamw_recipe_warms_up_then_decays_to_zero(tiny_cfg):
    from dec_ray.method.recipe import rate_factor
    t = tiny_cfg("train.recipe=adamw", "train.epochs=10", "train.warmup_fraction=0.1").train
    assert rate_factor(t, 0.5) == pytest.approx(0.5) and rate_factor(t, 1.0) == pytest.approx(1.0)
    assert rate_factor(t, 5.5) == pytest.approx(0.5) and rate_factor(t, 10) == pytest.approx(0.0)
    assert rate_factor(tiny_cfg().train, 7.3) == 1.0                   # official: constant


@pytest.mark.parametrize("model", ["deepemocluster", "cnn"])
def test_one_rate_schedule_per_run_across_both_passes_of_every_epoch(pools, tiny_cfg, model):
    """train.recipe=adamw: the rate read at every optimiser step of a DeepEmoCluster run (two
    passes an epoch: the pool's, then Train's) rises once, over the warm-up, then never rises
    again; each step advances the clock by the same part of an epoch. Before: each pass ran the
    epoch's curve of its own (a sawtooth, and the warm-up twice in epoch 0)."""
    stats, p = pools
    extra = ["train.teacher=ridge"] if model == "cnn" else []     # the CNN's second pass: the teacher's
    cfg = tiny_cfg(f"model.name={model}", "train.recipe=adamw", "train.epochs=4", "train.warmup_fraction=0.25",
                   "train.batch_sentences=4", *extra)
    learner = Learner(cfg, stats, torch.device("cpu"))
    rates, clock = [], []
    learner.on_batch = lambda done, total: (rates.append(learner.sgd.param_groups[0]["lr"]),
                                            clock.append(learner.progress(0, 1)))
    unlabeled = p["unlabeled"]
    if model == "cnn":                      # the teacher's targets stand in the pool's labels
        unlabeled = Pool(unlabeled.chunks, torch.zeros_like(unlabeled.labels), unlabeled.row_ids)
    for epoch in range(cfg.train.epochs):
        run_epoch(learner, epoch, p["train"], unlabeled)
    per_epoch = len(rates) // cfg.train.epochs
    pool_steps = learner.steps_of(unlabeled.n_chunks)
    assert per_epoch == pool_steps + learner.steps_of(p["train"].n_chunks) and pool_steps >= 2
    peak = int(np.argmax(rates))
    assert 0 < peak <= per_epoch, (peak, per_epoch)                     # one warm-up, in epoch 0 (its 1/4 of 4)
    assert all(b > a for a, b in zip(rates[:peak], rates[1:peak + 1])), rates[:peak + 1]
    assert all(b <= a for a, b in zip(rates[peak:], rates[peak + 1:])), rates[peak:]
    assert rates[-1] < 0.1 * max(rates)                                 # decayed to near 0 at the end
    steps = np.diff(clock)
    assert np.allclose(steps, 1 / per_epoch), steps                     # one clock, both passes on it
