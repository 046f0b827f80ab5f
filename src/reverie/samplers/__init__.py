"""Samplers: pure functions over a denoiser ``D(x, sigma, **cond)`` and a decreasing sigma grid.

>>> sigmas = get_sigmas("karras", n=20, sigma_min=0.002, sigma_max=80.0)
>>> x0 = sample("dpmpp_2m", D, noise * sigmas[0], sigmas, generator=g)

Each family lives in its own module and registers its samplers in :data:`SAMPLERS` on import.
"""

from __future__ import annotations

import importlib
import pkgutil

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .base import SAMPLERS, SamplerStep, ancestral_step, check_grid, register, to_d
from .grids import GRIDS, SIGMA_GRIDS, get_sigmas, timesteps_for
from .tuning import TunedGrid, tune_sigmas

# Import every family module so that each registers its samplers.
for _m in pkgutil.iter_modules(__path__):
    if _m.name not in ("base", "grids", "tuning"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["sample", "SAMPLERS", "get_sigmas", "timesteps_for", "GRIDS", "SIGMA_GRIDS", "SamplerStep",
           "register", "ancestral_step", "to_d", "tune_sigmas", "TunedGrid"]


def sample(name: str, denoiser, x: Tensor, sigmas: Tensor, generator: torch.Generator | None = None,
           callback=None, progress: bool = False, cond: dict | None = None, **opts) -> Tensor:
    """Run sampler ``name`` from ``x`` (already scaled to ``sigmas[0]``) down to sigma 0.

    ``cond`` is passed to the denoiser as keyword arguments; ``opts`` go to the sampler (e.g.
    ``eta`` for ddim). ``progress=True`` shows a tqdm bar over the steps.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(sorted(SAMPLERS))}")
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
