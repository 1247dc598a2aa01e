import numpy as np
import pytest
import torch
from plain_pools import synth_pools

from dec_ray.method.losses import ccc, ccc_loss, ccc_torch, sentence_means
from dec_ray.method.models import Encoder, build_model


def test_compact_encoder_is_the_official_layout():
    enc = Encoder("compact")
    convs = [m for m in enc.conv if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128, 128]
    assert [c.stride[0] for c in convs] == [1, 1, 2, 2, 2, 2, 2]
    assert enc.flat_dim == 1024 and enc.conv_shape == (128, 2, 4)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in enc.conv)
    # convs + BN: 384 + 9312 + 18624 + 37056 + 74112 + 2 * 147840 = 435168; fc 1024*256 + 256
    assert sum(p.numel() for p in enc.parameters()) == 435_168 + 262_400


def test_vgg16_bn_encoder():
    enc = Encoder("vgg16")
    assert sum(isinstance(m, torch.nn.Conv2d) for m in enc.conv) == 13
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in enc.conv) == 13
    assert enc.flat_dim == 512 * 1 * 4


@pytest.fixture(scope="module")
def real_batch():
    """22 real chunks: two rendered sentences through the method's features, no Ray or Parquet."""
    stats, pools = synth_pools(sizes=(("train", 2),))
    return pools["train"].chunk_inputs(torch.arange(22), stats.feature_normalizer(torch.device("cpu")))


@pytest.mark.parametrize("name", ["deepemocluster", "cnn", "ae", "vae"])
def test_forward_backward_on_real_chunks(name, real_batch):
    m = build_model(name, width=0.25, k=7, n_outputs=3)
    out = m(real_batch)
    assert out["pred"].shape == (22, 3) and out["embedding"].shape == (22, 256)
    loss = ccc_loss(out["pred"], torch.randn(22, 3))
    if name == "deepemocluster":
        assert out["logits"].shape == (22, 7)
        loss = loss + torch.nn.functional.cross_entropy(out["logits"], torch.randint(0, 7, (22,)))
    if name in ("ae", "vae"):
        assert out["recon"].shape == real_batch.shape
        loss = loss + torch.nn.functional.mse_loss(out["recon"], real_batch)
    loss.backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if p.requires_grad)


def test_fresh_top_layer_is_reproducible():
    m = build_model("deepemocluster", width=0.125, k=5)
    m.reset_top(torch.Generator().manual_seed(3))
    w = m.top.weight.detach().clone()
    assert abs(float(w.std()) - 0.01) < 0.003 and float(m.top.bias.detach().abs().sum()) == 0
    m.reset_top(torch.Generator().manual_seed(3))
    assert torch.equal(w, m.top.weight)


def test_ccc_matches_numpy_formula():
    rng = np.random.default_rng(0)
    g = rng.normal(size=500)
    p = 0.6 * g + rng.normal(scale=0.5, size=500) + 0.3
    direct = 2 * np.cov(p, g, bias=True)[0, 1] / (p.var() + g.var() + (p.mean() - g.mean()) ** 2)
    assert np.isclose(ccc(p, g), direct)
    t = ccc_torch(torch.tensor(np.stack([p, g], 1)), torch.tensor(np.stack([g, g], 1)))
    assert np.isclose(float(t[0]), direct) and np.isclose(float(t[1]), 1.0)
    assert np.isclose(float(ccc_loss(torch.tensor(p[:, None]), torch.tensor(g[:, None]))), 1 - direct)


def test_sentence_prediction_is_the_mean_of_its_chunks():
    ids, means = sentence_means(np.array([[1.0], [3.0], [10.0]]), np.array([7, 7, 2]))
    assert list(ids) == [2, 7] and np.allclose(means[:, 0], [10.0, 2.0])


@pytest.mark.parametrize("name", ["deepemocluster", "cnn"])
def test_the_functionals_join_the_sentence_encoding(name, real_batch):
    """model.functionals: the sentence head reads a row of functionals per sentence beside its
    chunks; the prediction depends on them, every chunk of a sentence gets the sentence's, and the
    gradient reaches the encoder; without them it refuses, as the chunk head refuses them."""
    torch.manual_seed(0)
    m = build_model(name, width=0.25, k=7, n_outputs=2, sentence_chunks=11, functionals=88, init="torch").eval()
    f = torch.randn(2, 88)
    a, b = m(real_batch, f)["pred"], m(real_batch, f + 1)["pred"]
    assert a.shape == (22, 2) and not torch.allclose(a, b)
    assert torch.equal(a[:11], a[:1].expand(11, 2)) and torch.equal(a[11:], a[11:12].expand(11, 2))
    ccc_loss(m.train()(real_batch, f)["pred"], torch.randn(22, 2)).backward()
    assert m.encoder.fc[0].weight.grad is not None
    with pytest.raises(ValueError, match="functionals per sentence"):
        m(real_batch)
    with pytest.raises(ValueError, match="chunk head"):
        build_model(name, width=0.25, functionals=88)
