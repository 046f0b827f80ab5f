"""DPM-Solver++(2M) and its SDE variant (Lu et al. 2022, "DPM-Solver++", Algorithm 2), data
prediction, multistep, in VE coordinates.

With lambda = -log(sigma) (for the VE sigma this is log(alpha / sigma_vp), the paper's half
log-SNR) and h = lambda_next - lambda > 0, the probability-flow ODE reads dx/dlambda = D - x, whose
exact solution is the paper's data-prediction formula divided by alpha_next:

    x_next = e^{-h} x + int_lambda^lambda_next e^{-(lambda_next - l)} D(l) dl.

Freezing D gives DDIM; a line through the current and the previous denoised output (r = h_prev / h,
D1 = (D - D_prev) / r ~ h dD/dlambda) gives 2M.

SDE variant: add Ornstein-Uhlenbeck noise in lambda-time with rate ``eta``, which keeps every
marginal p_sigma (eta = 1 is the reverse diffusion SDE, eta = 0 the ODE). The drift becomes
(1 + eta)(D - x), and for a frozen D the exact transition is

    x_next = (sigma_next / sigma) e^{-eta h} x + (1 - e^{-(1+eta) h}) D
             + sigma_next sqrt(1 - e^{-2 eta h}) z,        z ~ N(0, I).

With eta = 1 the first-order step is DDPM's ancestral step and the whole update is diffusers'
"sde-dpmsolver++". The linear-in-lambda term D1 gets the weight 1 - (1 - e^{-kh}) / (kh),
k = 1 + eta, integrated exactly (solver type "heun"), or its midpoint rule (1 - e^{-kh}) / 2
("midpoint", the paper's 2M).

Choices written down here:

* The first step is first order (there is no previous denoised output yet).
* The step to sigma = 0 is first order and exact: lambda_next = inf, so e^{-h} = 0 and
  x_next = D(x, sigma). That is the paper's "lower order at the final step" trick, always on
  here; its second-order term would diverge (r -> 0). ``lower_order_final`` caps the order of step
  i at the number of steps left (n - i) for grids of fewer than 15 steps, the rule diffusers and
  the DPM-Solver reference code use; for 2M it only ever touches that last step, so it changes
  nothing on a grid ending at 0 and is kept so every multistep sampler takes the same options.
* A zero-length step (a repeated sigma) leaves x unchanged and the history skips it, so the
  next step is second order from the last distinct noise level.
"""

from __future__ import annotations

import math

from .base import denoise, randn_like, register, report

SOLVER_TYPES = ("midpoint", "heun")
LOWER_ORDER_FINAL_STEPS = 15  # below this many steps lower_order_final applies (DPM-Solver++)


def _d1_coeff(kh: float, solver_type: str) -> float:
    """Weight of D1 = h dD/dlambda: exact integral 1 - (1 - e^{-kh}) / (kh), or its midpoint rule."""
    if solver_type == "midpoint":
        return -0.5 * math.expm1(-kh)
    return 1.0 + math.expm1(-kh) / kh


def _dpmpp_2m_step(x, denoised, denoised_prev, sigma, sigma_next, h_prev, eta, solver_type):
    """One DPM-Solver++(2M) / SDE-DPM-Solver++(2M) step without its noise term (module docstring)."""
    h = math.log(sigma / sigma_next)
    kh = (1.0 + eta) * h
    x_next = (sigma_next / sigma) * math.exp(-eta * h) * x - math.expm1(-kh) * denoised
    if denoised_prev is not None and h > 0:
        d1 = (denoised - denoised_prev) * (h / h_prev)  # (D - D_prev) / r, r = h_prev / h
        x_next = x_next + _d1_coeff(kh, solver_type) * d1
    return x_next, h


def _check(eta: float, solver_type: str) -> None:
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"unknown solver_type {solver_type!r}; choose one of {', '.join(SOLVER_TYPES)}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")


def _multistep(denoiser, x, sigmas, generator, callback, cond, eta, solver_type, lower_order_final,
               s_noise):
    _check(eta, solver_type)
    n = len(sigmas) - 1
    cap_final = lower_order_final and n < LOWER_ORDER_FINAL_STEPS
    denoised_prev, h_prev = None, 0.0
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(denoiser, x, sigma, cond)
        if sigma_next == 0:
            x_next = denoised  # exact: lambda_next = inf (see module docstring)
        else:
            first_order = h_prev == 0 or (cap_final and n - i < 2)
            prev = None if first_order else denoised_prev
            x_next, h = _dpmpp_2m_step(x, denoised, prev, sigma, sigma_next, h_prev, eta, solver_type)
            if eta > 0 and h > 0:
                noise_std = sigma_next * math.sqrt(-math.expm1(-2.0 * eta * h))
                x_next = x_next + randn_like(x, generator) * (s_noise * noise_std)
            if h > 0:
                denoised_prev, h_prev = denoised, h
        x = report(callback, i, sigmas, x_next, denoised)
    return x


@register("dpmpp_2m")
def sample_dpmpp_2m(denoiser, x, sigmas, *, generator=None, callback=None, cond=None,
                    solver_type="midpoint", lower_order_final=True):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): one denoiser call per step, second order."""
    return _multistep(denoiser, x, sigmas, generator, callback, cond or {}, 0.0, solver_type,
                      lower_order_final, 1.0)


@register("dpmpp_2m_sde")
def sample_dpmpp_2m_sde(denoiser, x, sigmas, *, generator=None, callback=None, cond=None,
                        eta=1.0, solver_type="midpoint", lower_order_final=True, s_noise=1.0):
    """SDE-DPM-Solver++(2M): the 2M update on the reverse SDE, one fresh noise draw per step.

    ``eta`` scales the injected noise (1: the reverse diffusion SDE, 0: :func:`sample_dpmpp_2m`);
    ``solver_type`` is "midpoint" or "heun" (how the second-order term is integrated).
    """
    return _multistep(denoiser, x, sigmas, generator, callback, cond or {}, float(eta), solver_type,
                      lower_order_final, s_noise)
