"""SpecAugment-style augmentation of normalised chunks, on their device: a time shift, one time
mask and one frequency mask per chunk (Park et al., 2019). DeepCluster-style methods learn what
their pseudo-labels make invariant, and depend on such views; the official DeepEmoCluster has none
(``train.augment_pool``: in the pseudo-label stage only; off by default)."""
from __future__ import annotations

import torch

MAX_SHIFT = 8          # frames, circular, either way
MAX_TIME_MASK = 10     # frames (of 62)
MAX_FREQ_MASK = 16     # mel bins (of 128)


def spec_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(N, m, F) normalised chunks -> augmented copy; masked cells are 0, the Train mean."""
    n, m, f = x.shape
    dev = x.device

    def draw(high: int) -> torch.Tensor:
        return torch.randint(0, high, (n,), generator=generator, device=dev)

    shift = draw(2 * MAX_SHIFT + 1) - MAX_SHIFT
    frames = (torch.arange(m, device=dev)[None, :] - shift[:, None]) % m          # circular shift
    out = torch.gather(x, 1, frames[:, :, None].expand(n, m, f))
    t_width, f_width = draw(MAX_TIME_MASK + 1), draw(MAX_FREQ_MASK + 1)
    t0 = (torch.rand(n, generator=generator, device=dev) * (m - t_width + 1)).long()
    f0 = (torch.rand(n, generator=generator, device=dev) * (f - f_width + 1)).long()
    t = torch.arange(m, device=dev)[None, :]
    fr = torch.arange(f, device=dev)[None, :]
    t_mask = (t >= t0[:, None]) & (t < (t0 + t_width)[:, None])                   # (N, m)
    f_mask = (fr >= f0[:, None]) & (fr < (f0 + f_width)[:, None])                 # (N, F)
    keep = ~(t_mask[:, :, None] | f_mask[:, None, :])
    return out * keep.to(out.dtype)
