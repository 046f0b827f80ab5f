"""Multistep consistency sampling (Song et al. 2023, Algorithm 1; the LCM sampler of Luo et al. 2023).

The denoiser is a consistency function ``f(x, sigma)`` (``reverie.denoisers.ConsistencyFunction``), which
maps any point of a probability-flow ODE trajectory to its origin in one call. Step ``i`` evaluates
``x0 = f(x, sigmas[i])`` and, unless the next level is 0, noises that estimate back up to the next level:
``x = x0 + sigmas[i + 1] z`` (VE coordinates: the level's noise is sigma z; Song et al. write
``sqrt(sigma^2 - sigma_min^2)``, a difference below 1e-4 here that would tie the sampler to the model's
sigma_min). One denoiser call per step; a one-step grid ``[sigma_max, 0]`` is one-step generation.
"""

from __future__ import annotations

from .base import denoise, randn_like, register, report


@register("consistency")
def sample_consistency(denoiser, x, sigmas, *, generator=None, callback=None, cond=None):
    """Song et al. 2023, Algorithm 1, on the decreasing grid ``sigmas`` (its last entry 0)."""
    cond = cond or {}
    for i in range(len(sigmas) - 1):
        denoised = denoise(denoiser, x, float(sigmas[i]), cond)
        sigma_next = float(sigmas[i + 1])
        x_next = denoised + sigma_next * randn_like(x, generator) if sigma_next > 0 else denoised
        x = report(callback, i, sigmas, x_next, denoised)
    return x
