"""Encoders, heads and the four models: DeepEmoCluster, CNN-regressor, CNN-AE, CNN-VAE.

Input is a batch of chunks (N, 62, 128) or (N, 1, 62, 128). Every model returns a dict so that the
training loop can take what its loss needs: 'pred' (N, A) always; 'logits' and 'embedding' for
DeepEmoCluster; 'recon' (and 'mu', 'logvar') for the auto-encoders.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from dec_ray.data.functionals import EGEMAPS_DIM

COMPACT_CHANNELS = (32, 32, 64, 64, 128, 128, 128)       # official code's "vgg16"
COMPACT_STRIDES = (1, 1, 2, 2, 2, 2, 2)
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _ch(c: int, width: float) -> int:
    return max(4, int(round(c * width)))


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> List[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class Encoder(nn.Module):
    """Conv feature extractor -> flatten -> Linear(embed_dim) + ReLU + Dropout."""

    def __init__(self, kind: str = "compact", width: float = 1.0, embed_dim: int = 256,
                 dropout: float = 0.5, input_shape: Tuple[int, int] = (62, 128)):
        super().__init__()
        layers: List[nn.Module] = []
        cin = 1
        if kind == "compact":
            for c, s in zip(COMPACT_CHANNELS, COMPACT_STRIDES):
                layers += _conv_bn_relu(cin, _ch(c, width), s)
                cin = _ch(c, width)
        elif kind == "vgg16":
            for c in VGG16_LAYOUT:
                if c == "M":
                    layers.append(nn.MaxPool2d(2))
                else:
                    layers += _conv_bn_relu(cin, _ch(c, width))
                    cin = _ch(c, width)
        else:
            raise ValueError(f"unknown encoder {kind!r}")
        self.conv = nn.Sequential(*layers)
        with torch.no_grad():
            out = self.conv(torch.zeros(1, 1, *input_shape))
        self.conv_shape = tuple(out.shape[1:])                # (C, H, W) before flatten
        self.flat_dim = int(out.numel())                      # 1024 for the compact net at width 1
        self.fc = nn.Sequential(nn.Linear(self.flat_dim, embed_dim), nn.ReLU(inplace=True), nn.Dropout(dropout))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        return self.conv(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def regressor(embed_dim: int, hidden: int, outputs: int, chunks: int = 0, functionals: int = 0) -> nn.Module:
    """The chunk regressor (the official), or with ``chunks`` > 0 the sentence-level head (with
    ``functionals`` values per sentence joined to its encoding)."""
    if chunks > 0:
        return SentenceRegressor(embed_dim, hidden, outputs, chunks, functionals)
    if functionals:
        raise ValueError("functionals join the sentence head's encoding: the chunk head has none")
    return nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, outputs))


class SentenceRegressor(nn.Module):
    """``model.head: sentence`` (Temporal-Enhanced DeepEmoCluster, Lin & Busso 2024): a sentence's
    chunk encodings, in order, through a bidirectional GRU, attention pooling over the chunks, and
    an MLP: one prediction per sentence, modelled as a whole. It reads batches of whole sentences
    (``chunks`` consecutive chunks each; the samplers keep them so) and returns the sentence's
    prediction for each of its chunks, so that the mean over a sentence's chunks, the CCC over a
    batch's chunks and everything downstream are the sentence's. ``functionals`` > 0
    (``model.functionals``): that many values per sentence (its normalised eGeMAPS) are joined to
    the pooled encoding before the MLP."""

    def __init__(self, embed_dim: int, hidden: int, outputs: int, chunks: int, functionals: int = 0):
        super().__init__()
        self.chunks, self.functionals = chunks, functionals
        self.gru = nn.GRU(embed_dim, hidden // 2, batch_first=True, bidirectional=True)
        self.attention = nn.Linear(2 * (hidden // 2), 1)
        self.out = nn.Sequential(nn.Linear(2 * (hidden // 2) + functionals, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, outputs))

    def forward(self, h: torch.Tensor, functionals: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not torch.jit.is_tracing() and h.shape[0] % self.chunks:
            raise ValueError(f"the sentence head reads whole sentences: {h.shape[0]} chunks is not a multiple "
                             f"of {self.chunks}")
        seq, _ = self.gru(h.reshape(-1, self.chunks, h.shape[-1]).float())
        weights = torch.softmax(self.attention(seq).squeeze(-1), dim=1)
        pooled = (weights.unsqueeze(-1) * seq).sum(1)
        if self.functionals:
            if functionals is None:
                raise ValueError(f"this model reads {self.functionals} functionals per sentence beside its chunks")
            pooled = torch.cat([pooled, functionals.to(pooled.dtype)], 1)
        return self.out(pooled).repeat_interleave(self.chunks, 0)


def _regress(head: nn.Module, h: torch.Tensor, functionals: Optional[torch.Tensor]) -> torch.Tensor:
    """The regressor's output; the functionals go to a head that reads them (``model.functionals``)."""
    return head(h, functionals) if getattr(head, "functionals", 0) else head(h)


class DeepEmoCluster(nn.Module):
    """Encoder + cluster classifier (Linear-ReLU, then a top layer of K re-initialised after every
    clustering) + emotion regressor. The clustering embedding is the classifier's first Linear
    output before its ReLU (as DeepCluster's compute_features)."""

    def __init__(self, encoder: Encoder, k: int, n_outputs: int, embed_dim: int = 256, hidden: int = 256,
                 sentence_chunks: int = 0, functionals: int = 0):
        super().__init__()
        self.encoder = encoder
        self.cls_hidden = nn.Linear(embed_dim, hidden)
        self.top = nn.Linear(hidden, k)
        self.regressor = regressor(embed_dim, hidden, n_outputs, sentence_chunks, functionals)
        self.reset_top(torch.Generator().manual_seed(0))

    def reset_top(self, generator: torch.Generator) -> None:
        """A fresh top layer, N(0, 0.01) and bias 0, identical on every rank given the generator."""
        with torch.no_grad():
            w = torch.randn(self.top.weight.shape, generator=generator) * 0.01
            self.top.weight.copy_(w.to(self.top.weight.device))
            self.top.bias.zero_()

    def forward(self, x: torch.Tensor, functionals: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        h = self.encoder(x)
        emb = self.cls_hidden(h)
        return {"embedding": emb, "logits": self.top(torch.relu(emb)), "pred": _regress(self.regressor, h, functionals)}


class CNNRegressor(nn.Module):
    """Baseline: encoder + regressor, supervised only."""

    def __init__(self, encoder: Encoder, n_outputs: int, embed_dim: int = 256, hidden: int = 256,
                 sentence_chunks: int = 0, functionals: int = 0):
        super().__init__()
        self.encoder = encoder
        self.regressor = regressor(embed_dim, hidden, n_outputs, sentence_chunks, functionals)

    def forward(self, x: torch.Tensor, functionals: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        h = self.encoder(x)
        return {"embedding": h, "pred": _regress(self.regressor, h, functionals)}


class Decoder(nn.Module):
    """Mirror of the compact encoder with transposed convolutions, cropped to the input shape."""

    def __init__(self, conv_shape: Tuple[int, int, int], embed_dim: int, width: float,
                 out_shape: Tuple[int, int] = (62, 128)):
        super().__init__()
        self.conv_shape = conv_shape
        self.out_shape = out_shape
        self.fc = nn.Sequential(nn.Linear(embed_dim, int(torch.tensor(conv_shape).prod())), nn.ReLU(inplace=True))
        chans = [conv_shape[0]] + [_ch(c, width) for c in reversed(COMPACT_CHANNELS[:-1])]
        layers: List[nn.Module] = []
        for cin, cout, s in zip(chans[:-1], chans[1:], reversed(COMPACT_STRIDES[1:])):
            if s == 2:
                layers += [nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1), nn.BatchNorm2d(cout), nn.ReLU(True)]
            else:
                layers += _conv_bn_relu(cin, cout)
        layers.append(nn.Conv2d(chans[-1], 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc(z).view(-1, *self.conv_shape)
        x = self.net(x)
        h, w = self.out_shape
        if x.shape[-2] < h or x.shape[-1] < w:
            x = nn.functional.interpolate(x, size=(max(h, x.shape[-2]), max(w, x.shape[-1])))
        return x[..., :h, :w].squeeze(1)


class CNNAutoEncoder(nn.Module):
    """Baseline CNN-AE (variational=False) and CNN-VAE (variational=True)."""

    def __init__(self, encoder: Encoder, n_outputs: int, embed_dim: int = 256, hidden: int = 256,
                 width: float = 1.0, variational: bool = False):
        super().__init__()
        self.encoder = encoder
        self.variational = variational
        if variational:
            encoder.fc = nn.Identity()       # the VAE maps conv features to mu / logvar instead
            self.mu = nn.Linear(encoder.flat_dim, embed_dim)
            self.logvar = nn.Linear(encoder.flat_dim, embed_dim)
        self.decoder = Decoder(encoder.conv_shape, embed_dim, width)
        self.regressor = regressor(embed_dim, hidden, n_outputs)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if not self.variational:
            h = self.encoder(x)
            return {"embedding": h, "pred": self.regressor(h), "recon": self.decoder(h)}
        f = self.encoder.features(x)
        mu, logvar = self.mu(f), self.logvar(f).clamp(-10, 10)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return {"embedding": mu, "pred": self.regressor(torch.relu(mu)), "recon": self.decoder(z),
                "mu": mu, "logvar": logvar}


@torch.no_grad()
def official_init(model: nn.Module) -> nn.Module:
    """The official code's _initialize_weights: conv (and transposed conv) weights
    N(0, sqrt(2 / (9 * out_channels))), linear N(0, 0.01), BatchNorm weight 1, every bias 0."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            m.weight.normal_(0, (2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)) ** 0.5)
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.fill_(1)
        elif isinstance(m, nn.Linear):
            m.weight.normal_(0, 0.01)
        else:
            continue
        if m.bias is not None:
            m.bias.zero_()
    return model


def build_model(name: str, encoder: str = "compact", width: float = 1.0, k: int = 10, n_outputs: int = 1,
                embed_dim: int = 256, hidden: int = 256, dropout: float = 0.5, init: str = "official",
                sentence_chunks: int = 0, functionals: int = 0) -> nn.Module:
    """``sentence_chunks`` > 0: the sentence-level head over that many chunks (DeepEmoCluster, CNN),
    reading ``functionals`` values per sentence beside them."""
    enc = Encoder(encoder, width, embed_dim, dropout)
    if name == "deepemocluster":
        model = DeepEmoCluster(enc, k, n_outputs, embed_dim, hidden, sentence_chunks, functionals)
    elif name == "cnn":
        model = CNNRegressor(enc, n_outputs, embed_dim, hidden, sentence_chunks, functionals)
    elif sentence_chunks or functionals:
        raise ValueError(f"model.head=sentence is offered for deepemocluster and cnn, not {name}")
    elif name in ("ae", "vae"):
        if encoder != "compact":
            raise ValueError("the AE/VAE decoders mirror the compact encoder only")
        model = CNNAutoEncoder(enc, n_outputs, embed_dim, hidden, width, variational=name == "vae")
    else:
        raise ValueError(f"unknown model {name!r}")
    return official_init(model) if init == "official" else model


def model_from_config(cfg) -> nn.Module:
    m = cfg.model
    return build_model(m.name, m.encoder, m.width, cfg.cluster.k, len(m.attributes), m.embed_dim,
                       m.hidden_dim, m.dropout, m.init, cfg.features.num_chunks if m.head == "sentence" else 0,
                       functionals_dim(cfg))


def functionals_dim(cfg) -> int:
    """Values per sentence the model reads beside its chunks (``model.functionals``): 0 or 88."""
    return EGEMAPS_DIM if cfg.model.functionals == "egemaps" else 0
