"""Pieces shared by every sampler: the registry, the noise draw, the ODE derivative, the
ancestral step split, and the per-step callback.

A sampler is a pure function ``fn(denoiser, x, sigmas, *, generator, callback, **opts) -> x0``
over a decreasing float64 grid ``sigmas`` that ends at 0; ``x`` is already scaled to
``sigmas[0]`` (VE coordinates). No hidden step index: everything a step needs is in the grid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..utils import append_dims

SAMPLERS: dict[str, Callable] = {}


def check_sampler(name: str) -> str:
    """``name`` if it is a registered sampler; otherwise a ValueError naming the valid ones."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(sorted(SAMPLERS))}")
    return name


def register(name: str):
    """Class the decorated function as sampler ``name`` in :data:`SAMPLERS`."""

    def deco(fn):
        if name in SAMPLERS:
            raise ValueError(f"sampler {name!r} registered twice")
        SAMPLERS[name] = fn
        fn.sampler_name = name
        return fn

    return deco


@dataclass
class SamplerStep:
    """What a callback sees after step ``i``: ``x`` is the new state at ``sigma_next``."""

    i: int
    sigma: float
    sigma_next: float
    x: Tensor
    denoised: Tensor


def report(callback, i: int, sigmas: Tensor, x: Tensor, denoised: Tensor) -> Tensor:
    """Call ``callback`` after step ``i``; a tensor it returns replaces ``x``."""
    if callback is None:
        return x
    out = callback(SamplerStep(i, float(sigmas[i]), float(sigmas[i + 1]), x, denoised))
    return x if out is None else out


def randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like ``x``, drawn only from the explicit generator."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def denoise(denoiser, x: Tensor, sigma, cond: dict) -> Tensor:
    """Call ``denoiser(x, sigma[B], **cond)`` with a per-sample sigma in x's dtype."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
    return denoiser(x, s, **cond)


def to_d(x: Tensor, sigma, denoised: Tensor) -> Tensor:
    """Probability-flow ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma (EDM eq. 3 / 4)."""
    return (x - denoised) / append_dims(torch.as_tensor(sigma, dtype=x.dtype, device=x.device), x.ndim)


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step sigma_from -> sigma_to into a deterministic part down to ``sigma_down`` plus
    fresh noise of std ``sigma_up`` (sigma_down^2 + sigma_up^2 = sigma_to^2); eta=1 matches the
    DDPM ancestral variance in VE coordinates (Song et al. 2021, DDIM eq. 16)."""
    if sigma_to == 0 or eta == 0:
        return float(sigma_to), 0.0
    up2 = sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2
    sigma_up = min(float(sigma_to), eta * up2**0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return float(sigma_down), float(sigma_up)


def check_grid(sigmas: Tensor) -> Tensor:
    """Validate a sampling grid: 1-D, at least two entries, non-increasing, last entry 0."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError("sigmas must be a 1-D grid with at least 2 entries (use get_sigmas)")
    if float(sigmas[-1]) != 0.0:
        raise ValueError("the sigma grid must end at 0 (get_sigmas does this)")
    if bool((sigmas[1:] > sigmas[:-1]).any()):
        raise ValueError("the sigma grid must be non-increasing")
    if not bool(torch.isfinite(sigmas).all()):
        raise ValueError("the sigma grid must be finite; cap an infinite top at schedule.sigma_max")
    return sigmas


def sample(name: str, denoiser, x: Tensor, sigmas: Tensor, generator: torch.Generator | None = None,
           callback=None, progress: bool = False, cond: dict | None = None, **opts) -> Tensor:
    """Run sampler ``name`` from ``x`` (already scaled to ``sigmas[0]``) down to sigma 0.

    ``cond`` is passed to the denoiser as keyword arguments; ``opts`` go to the sampler (e.g.
    ``eta`` for ddim). ``progress=True`` shows a tqdm bar over the steps.
    """
    check_sampler(name)
    sigmas = check_grid(sigmas)
    if progress:
        bar = tqdm(total=len(sigmas) - 1, desc=name, leave=False)
        user_cb = callback

        def callback(step):  # noqa: F811 - wrap the user's callback with a progress update
            bar.update(1)
            return user_cb(step) if user_cb is not None else None

    with torch.no_grad():
        out = SAMPLERS[name](denoiser, x, sigmas, generator=generator, callback=callback,
                             cond=cond or {}, **opts)
    if progress:
        bar.close()
    return out
