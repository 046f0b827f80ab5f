"""Predictor-corrector samplers of the reverse SDE (Song et al. 2021, "Score-Based Generative Modeling
through SDEs", Sec. 4.2, Algorithms 1-5), in VE coordinates.

Every SDE of the VE / VP / sub-VP family is, in VE coordinates x = x_t / s(t), the VE SDE
dx = sqrt(d sigma^2 / dt) dw with its own sigma(t) (``reverie.sde``), so one set of steps over a
decreasing sigma grid serves all of them, and any denoiser: the score is (D(x, sigma) - x) / sigma^2
(Tweedie; EDM eq. 3).

* ``reverse_diffusion`` predictor (their eq. 46-47): x <- x + (sigma_i^2 - sigma_{i+1}^2) score +
  sqrt(sigma_i^2 - sigma_{i+1}^2) z.
* ``euler_maruyama`` predictor: one Euler-Maruyama step of the reverse SDE dx = -2 sigma score dsigma +
  sqrt(2 sigma) dw with sigma as the time variable (the EDM time; the drift and diffusion are taken at
  the step's start): x <- x + 2 sigma_i (sigma_i - sigma_{i+1}) score + sqrt(2 sigma_i (sigma_i -
  sigma_{i+1})) z.
* Langevin corrector (Algorithm 4/5) at each level before its predictor step: ``corrector_steps``
  times, eps = 2 (snr |z| / |score|)^2, x <- x + eps score + sqrt(2 eps) z, with the norms averaged
  over the batch as in the paper's code (samples share a step size). In VE coordinates the step is
  the same for every SDE: the signal-to-noise rule is invariant to the scaling x_t = s x (Song et
  al.'s extra alpha_i factor for VP is not used).
* The step into sigma = 0 adds no noise and returns the denoised mean D(x, sigma_{n-1}) (the paper's
  "noise removal" last step); NFE = (1 + corrector_steps) per level.
"""

from __future__ import annotations

from .base import denoise, randn_like, register, report

PREDICTORS = ("reverse_diffusion", "euler_maruyama")


def _score(x, sigma: float, denoised):
    return (denoised - x) / sigma**2


def langevin(denoiser, x, sigma: float, cond: dict, steps: int, snr: float, generator):
    """``steps`` Langevin corrector steps at noise level sigma with the signal-to-noise step rule."""
    for _ in range(steps):
        grad = _score(x, sigma, denoise(denoiser, x, sigma, cond))
        z = randn_like(x, generator)
        # batch means of the per-sample norms, as in the paper's code: a per-sample ratio explodes where
        # one sample's score is near zero (low dimensions)
        grad_norm = grad.reshape(x.shape[0], -1).norm(dim=1).mean()
        z_norm = z.reshape(x.shape[0], -1).norm(dim=1).mean()
        eps = 2 * (snr * z_norm / grad_norm.clamp(min=1e-30)) ** 2
        x = x + eps * grad + (2 * eps) ** 0.5 * z
    return x


def predictor_step(kind: str, x, sigma: float, sigma_next: float, denoised, generator):
    """One predictor step from sigma to sigma_next > 0 (module docstring)."""
    if kind == "reverse_diffusion":
        var = sigma**2 - sigma_next**2
    elif kind == "euler_maruyama":
        var = 2 * sigma * (sigma - sigma_next)
    else:
        raise ValueError(f"unknown predictor {kind!r}; choose one of {', '.join(PREDICTORS)}")
    return x + var * _score(x, sigma, denoised) + var**0.5 * randn_like(x, generator)


def _run(denoiser, x, sigmas, generator, callback, cond, predictor, corrector_steps, snr):
    if corrector_steps < 0 or snr <= 0:
        raise ValueError(f"need corrector_steps >= 0 and snr > 0, got {corrector_steps} and {snr}")
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x = langevin(denoiser, x, sigma, cond, corrector_steps, snr, generator)
        denoised = denoise(denoiser, x, sigma, cond)
        x = denoised if sigma_next == 0 else predictor_step(predictor, x, sigma, sigma_next, denoised, generator)
        x = report(callback, i, sigmas, x, denoised)
    return x


@register("pc")
def sample_pc(denoiser, x, sigmas, *, generator=None, callback=None, cond=None,
              predictor: str = "reverse_diffusion", corrector_steps: int = 1, snr: float = 0.16):
    """Predictor-corrector sampling (Song et al. 2021, Algorithm 1): Langevin corrector, then predictor."""
    return _run(denoiser, x, sigmas, generator, callback, cond, predictor, corrector_steps, snr)


@register("reverse_diffusion")
def sample_reverse_diffusion(denoiser, x, sigmas, *, generator=None, callback=None, cond=None):
    """The reverse-diffusion predictor alone (Song et al. 2021, eq. 46-47)."""
    return _run(denoiser, x, sigmas, generator, callback, cond, "reverse_diffusion", 0, 1.0)


@register("euler_maruyama")
def sample_euler_maruyama(denoiser, x, sigmas, *, generator=None, callback=None, cond=None):
    """Euler-Maruyama on the reverse SDE, time variable sigma (module docstring)."""
    return _run(denoiser, x, sigmas, generator, callback, cond, "euler_maruyama", 0, 1.0)


__all__ = ["PREDICTORS", "langevin", "predictor_step", "sample_pc", "sample_reverse_diffusion",
           "sample_euler_maruyama"]
