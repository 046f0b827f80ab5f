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


class RegionalDenoiser(nn.Module):
    """Regional prompting on a layout model: inside each object's box, the estimate conditioned on that object
    alone (its phrase as the caption, its box as the layout); elsewhere the whole prompt's. ``regions``: one
    condition dict per object slot (the batch's j-th objects), ``weights`` (J, B, 1, ...) from
    :func:`reverie.layout.region_weights`:

        D_c = (1 - sum_j w_j) D(x | prompt) + sum_j w_j D(x | object j),   then guidance on D_c as CFGDenoiser's

    (compositing the conditional estimates, as MultiDiffusion (Bar-Tal et al. 2023) composites its regions'
    denoised images). Guidance is linear, so this equals guiding each region and compositing, bar
    ``guidance_rescale``, applied once to D_c. One batch: the prompt's and the unconditional passes for every
    sample, and region j's only for the samples whose weight map j is not empty (an image with one object
    costs three passes, not J + 2)."""

    def __init__(self, denoiser, regions: list[dict], weights: Tensor, uncond: dict | None = None,
                 guidance_scale: float = 1.0, guidance_rescale: float = 0.0):
        super().__init__()
        if len(regions) != weights.shape[0]:
            raise ValueError(f"got {len(regions)} regions and {weights.shape[0]} weight maps")
        self.denoiser, self.regions, self.weights = denoiser, regions, weights
        self.rows = [torch.nonzero(w.flatten(1).any(1)).flatten() for w in weights]  # the samples each region needs
        self.uncond = uncond if uncond and guidance_scale != 1.0 else None
        self.guidance_scale, self.guidance_rescale = guidance_scale, guidance_rescale

    def forward(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        b = x.shape[0]
        conds = [cond, *self.regions, *([self.uncond] if self.uncond is not None else [])]
        if any(set(c) != set(cond) for c in conds):
            raise ValueError(f"every region's condition needs the keys {sorted(cond)}")
        everyone = torch.arange(b, device=x.device)
        rows = [everyone, *(r.to(x.device) for r in self.rows), *([everyone] if self.uncond is not None else [])]

        def take(v: Tensor, r: Tensor) -> Tensor:  # a batch-1 condition holds for every sample
            return v.expand(b, *v.shape[1:])[r]

        merged = {k: torch.cat([take(c[k], r) for c, r in zip(conds, rows)]) if isinstance(v, Tensor) else v
                  for k, v in cond.items()}
        sigma = sigma.reshape(-1).expand(b) if sigma.numel() == 1 else sigma
        out = self.denoiser(torch.cat([x[r] for r in rows]), torch.cat([sigma[r] for r in rows]), **merged)
        out = out.split([len(r) for r in rows])
        w = self.weights.to(device=out[0].device, dtype=out[0].dtype)
        d_c = out[0] * (1 - w.sum(0))
        for j, r in enumerate(rows[1:1 + len(self.regions)]):
            d_c = d_c.index_add(0, r, w[j, r] * out[1 + j])
        if self.uncond is None:
            return d_c
        return combine(d_c, out[-1], self.guidance_scale, self.guidance_rescale)
