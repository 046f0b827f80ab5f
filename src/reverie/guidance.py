"""Classifier-free guidance as a denoiser wrapper ``D' = f(D)`` (Ho & Salimans 2022, eq. 6).

    D_cfg(x, sigma) = D_u + w (D_c - D_u)

with ``D_u`` the unconditional (or negative-prompt) estimate. Both passes run as one batch.
Options:

* ``guidance_rescale`` phi (Lin et al. 2023, Sec. 3.4): rescale the guided estimate to the standard
  deviation of the conditional one, ``D = phi * D_cfg * std(D_c) / std(D_cfg) + (1 - phi) D_cfg``,
  per sample. reverie applies it to the denoised estimate x0_hat (the quantity whose over-
  exposure the paper corrects); diffusers applies it to the eps/v output instead.
* ``interval`` (Kynkäänniemi et al. 2024): guide only for sigma in ``[lo, hi]``; outside, the
  conditional estimate alone is used (one pass, half the cost).

With ``guidance_scale == 1`` the wrapper returns the conditional estimate exactly, in one pass.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .utils import append_dims


def _concat_cond(cond: dict, uncond: dict) -> dict:
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond need the same keys, got {sorted(cond)} and {sorted(uncond)}")
    out = {}
    for k, v in cond.items():
        u = uncond[k]
        if isinstance(v, Tensor):
            if u.shape[0] != v.shape[0] and u.shape[0] == 1:
                u = u.expand(v.shape[0], *u.shape[1:])
            out[k] = torch.cat([v, u])
        else:
            out[k] = v
    return out


class CFGDenoiser(nn.Module):
    """Guide ``denoiser`` with ``guidance_scale`` using ``uncond`` (the negative or empty condition);
    ``guidance_rescale`` is Lin et al.'s (2023) phi."""

    def __init__(self, denoiser, uncond: dict, guidance_scale: float = 4.0, guidance_rescale: float = 0.0,
                 interval: tuple[float, float] | None = None):
        super().__init__()
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if not 0 <= guidance_rescale <= 1:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
        self.denoiser, self.uncond = denoiser, uncond
        self.guidance_scale, self.guidance_rescale = guidance_scale, guidance_rescale
        self.interval = interval

    def _active(self, sigma: Tensor) -> bool:
        if self.guidance_scale == 1.0:
            return False
        if self.interval is None:
            return True
        lo, hi = self.interval
        s = float(sigma.flatten()[0])
        return lo <= s <= hi

    def forward(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        if not self._active(sigma):
            return self.denoiser(x, sigma, **cond)
        both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **_concat_cond(cond, self.uncond))
        return combine(both[: x.shape[0]], both[x.shape[0]:], self.guidance_scale, self.guidance_rescale)


def combine(d_cond: Tensor, d_uncond: Tensor, guidance_scale, guidance_rescale: float = 0.0) -> Tensor:
    """The guided estimate from the conditional and unconditional ones (module docstring); ``guidance_scale``
    may be a tensor (``reverie.export`` makes it an input of the ONNX graph)."""
    guided = d_uncond + guidance_scale * (d_cond - d_uncond)
    if guidance_rescale > 0:
        dims = tuple(range(1, guided.ndim))
        ratio = d_cond.std(dim=dims) / guided.std(dim=dims).clamp(min=1e-12)
        guided = guided * (guidance_rescale * append_dims(ratio, guided.ndim) + (1 - guidance_rescale))
    return guided
