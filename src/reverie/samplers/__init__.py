"""Samplers: pure functions over a denoiser ``D(x, sigma, **cond)`` and a decreasing sigma grid.

>>> sigmas = get_sigmas("karras", n=20, sigma_min=0.002, sigma_max=80.0)
>>> x0 = sample("dpmpp_2m", D, noise * sigmas[0], sigmas, generator=g)

Each family lives in its own module and registers its samplers in :data:`SAMPLERS` on import.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import SAMPLERS, SamplerStep, ancestral_step, check_grid, check_sampler, register, sample, to_d
from .grids import GRIDS, SIGMA_GRIDS, get_sigmas, timesteps_for
from .tuning import TunedGrid, tune_sigmas

# Import every family module so that each registers its samplers.
for _m in pkgutil.iter_modules(__path__):
    if _m.name not in ("base", "grids", "tuning"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["sample", "SAMPLERS", "get_sigmas", "timesteps_for", "GRIDS", "SIGMA_GRIDS", "SamplerStep",
           "register", "ancestral_step", "to_d", "tune_sigmas", "TunedGrid", "check_grid", "check_sampler"]
