"""DDPM ancestral sampling (Ho et al. 2020) and DDIM (Song et al. 2021), written in VE coordinates.

A step goes from ``sigma = sigmas[i]`` (VP time t) to ``sigma_next = sigmas[i + 1]`` (VP time s)
with ``alpha_bar = 1 / (1 + sigma^2)``; skipped timesteps use ``beta_t := 1 - alpha_bar_t /
alpha_bar_s`` (Nichol & Dhariwal 2021, Sec. 4). Dividing the VP updates by ``alpha_s`` (``x = x_vp /
alpha``) and writing ``eps = (x - x0) / sigma``, ``r = sigma_next^2 / sigma^2``:

* DDIM, eq. 12: ``x_s = x0 + sqrt(sigma_next^2 - sigma_up^2) eps + sigma_up z``, where
  ``sigma_up = eta * sigma_next * sqrt(1 - r)`` is eq. 16's std divided by alpha_s. That is an
  Euler step to ``sigma_down`` plus fresh noise: :func:`base.ancestral_step` computes the split.
* DDPM posterior q(x_s | x_t, x0), eqs. 6-7: mean ``r x + (1 - r) x0``; variance
  ``beta_tilde / alpha_bar_s = sigma_next^2 (1 - r)`` ("fixed_small"; DDIM with eta = 1 is the
  same sampler) or ``beta / alpha_bar_s = (sigma^2 - sigma_next^2)(1 + sigma_next^2) / (1 + sigma^2)``
  ("fixed_large"); "learned" interpolates the two log-variances with the network's fraction
  (Nichol & Dhariwal 2021, eq. 15; diffusers calls this ``learned_range``).

Choices written down here:

* No noise on the last step (to sigma 0), for every variance (Ho et al. 2020, Alg. 2: z = 0 at t = 1).
  The DDPM reference code puts beta_tilde_2 in place of beta_1 in the "fixed_large" variance; that
  entry only matters for the likelihood, as sampling adds no noise there, so "fixed_large" is plain
  beta_t here (as in diffusers' DDPMScheduler).
* ``clip_denoised=c`` clips x0_hat to [-c, c] (diffusers' DDPM/DDIM do so by default with c = 1).
  DDIM then re-derives eps from the clipped x0 (as improved-diffusion does; diffusers'
  ``use_clipped_model_output=True``): the sampler then equals DDIM on the clipped denoiser.
* A step draws noise only where it adds some, one ``randn_like`` per step, in step order.
"""

from __future__ import annotations

import math

import torch

from .base import ancestral_step, denoise, randn_like, register, report

VARIANCES = ("fixed_small", "fixed_large", "learned")


def _clip(denoised, clip_denoised: float | None):
    return denoised if clip_denoised is None else denoised.clamp(-clip_denoised, clip_denoised)


def _denoise_with_variance(denoiser, x, sigma: float, cond: dict):
    """``(x0_hat, frac)`` from a denoiser whose network also predicts its variance."""
    if not hasattr(denoiser, "forward_with_variance"):
        raise ValueError("variance='learned' needs a denoiser with forward_with_variance (see denoisers.py)")
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
    denoised, frac = denoiser.forward_with_variance(x, s, **cond)
    if frac is None:
        raise ValueError("variance='learned' needs a denoiser built with learned_variance=True")
    return denoised, frac


def posterior_variances(sigma: float, sigma_next: float) -> tuple[float, float]:
    """``(beta_tilde, beta) / alpha_bar_s`` of q(x_s | x_t, x0) in VE units (Ho et al. 2020, eq. 7)."""
    r = sigma_next**2 / sigma**2
    small = sigma_next**2 * (1 - r)
    large = (sigma**2 - sigma_next**2) * (1 + sigma_next**2) / (1 + sigma**2)
    return small, large


@register("ddpm")
def sample_ddpm(denoiser, x, sigmas, *, generator=None, callback=None, cond=None,
                variance: str = "fixed_small", clip_denoised: float | None = None):
    """Ancestral sampling from the posterior q(x_s | x_t, x0_hat) (Ho et al. 2020, eqs. 6-7, Alg. 2)."""
    if variance not in VARIANCES:
        raise ValueError(f"unknown DDPM variance {variance!r}; choose one of {', '.join(VARIANCES)}")
    cond = cond or {}
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        if variance == "learned":
            denoised, frac = _denoise_with_variance(denoiser, x, sigma, cond)
        else:
            denoised, frac = denoise(denoiser, x, sigma, cond), None
        denoised = _clip(denoised, clip_denoised)
        r = sigma_next**2 / sigma**2
        x_next = r * x + (1 - r) * denoised
        if 0 < sigma_next < sigma:  # a repeated sigma is the identity step: nothing to add
            small, large = posterior_variances(sigma, sigma_next)
            if frac is not None:  # Nichol & Dhariwal 2021, eq. 15
                std = torch.exp(0.5 * (frac * math.log(large) + (1 - frac) * math.log(small)))
            else:
                std = math.sqrt(small if variance == "fixed_small" else large)
            x_next = x_next + std * randn_like(x, generator)
        x = report(callback, i, sigmas, x_next, denoised)
    return x


@register("ddim")
def sample_ddim(denoiser, x, sigmas, *, generator=None, callback=None, cond=None,
                eta: float = 0.0, clip_denoised: float | None = None):
    """DDIM (Song et al. 2021, eq. 12); ``eta`` scales the noise of eq. 16 (0: deterministic)."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    cond = cond or {}
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = _clip(denoise(denoiser, x, sigma, cond), clip_denoised)
        # eta > 1 would ask for more noise than sigma_next holds; ancestral_step caps it there.
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x_next = denoised + (sigma_down / sigma) * (x - denoised)
        if sigma_up > 0:
            x_next = x_next + sigma_up * randn_like(x, generator)
        x = report(callback, i, sigmas, x_next, denoised)
    return x
