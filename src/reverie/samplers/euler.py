"""Euler, Euler ancestral and Heun on the probability-flow ODE dx/dsigma = (x - D) / sigma
(Karras et al. 2022, "EDM", Algorithms 1-2)."""

from __future__ import annotations

from .base import ancestral_step, denoise, randn_like, register, report, to_d


def _churn(x, sigma, s_churn, s_tmin, s_tmax, s_noise, n_steps, generator):
    """EDM Algorithm 2, lines 4-6: raise sigma to sigma_hat by gamma, adding matching noise."""
    gamma = min(s_churn / n_steps, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (1 + gamma)
    if gamma > 0:
        x = x + randn_like(x, generator) * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
    return x, sigma_hat


@register("euler")
def sample_euler(denoiser, x, sigmas, *, generator=None, callback=None, cond=None,
                 s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """First-order Euler steps (EDM Algorithm 2 without the Heun correction)."""
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x, sigma_hat = _churn(x, sigma, s_churn, s_tmin, s_tmax, s_noise, n, generator)
        denoised = denoise(denoiser, x, sigma_hat, cond)
        x = x + to_d(x, sigma_hat, denoised) * (sigma_next - sigma_hat)
        x = report(callback, i, sigmas, x, denoised)
    return x


@register("euler_ancestral")
def sample_euler_ancestral(denoiser, x, sigmas, *, generator=None, callback=None, cond=None,
                           eta=1.0, s_noise=1.0):
    """Euler step down to sigma_down, then fresh noise of std sigma_up (ancestral sampling)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(denoiser, x, sigma, cond)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        if sigma_up > 0:
            x = x + randn_like(x, generator) * s_noise * sigma_up
        x = report(callback, i, sigmas, x, denoised)
    return x


@register("heun")
def sample_heun(denoiser, x, sigmas, *, generator=None, callback=None, cond=None,
                s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Heun's second-order method (EDM Algorithm 2); the last step to sigma 0 is Euler."""
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x, sigma_hat = _churn(x, sigma, s_churn, s_tmin, s_tmax, s_noise, n, generator)
        denoised = denoise(denoiser, x, sigma_hat, cond)
        d = to_d(x, sigma_hat, denoised)
        x_next = x + d * (sigma_next - sigma_hat)
        if sigma_next > 0:
            denoised_2 = denoise(denoiser, x_next, sigma_next, cond)
            d_2 = to_d(x_next, sigma_next, denoised_2)
            x_next = x + (d + d_2) / 2 * (sigma_next - sigma_hat)
        x = report(callback, i, sigmas, x_next, denoised)
    return x
