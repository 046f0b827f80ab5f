"""The probability-flow ODE solved by an adaptive Runge-Kutta method (Song et al. 2021, "Score-Based
Generative Modeling through SDEs", Sec. 4.3: RK45, rtol = atol = 1e-5).

In VE coordinates the probability-flow ODE of every SDE is dx/dsigma = (x - D(x, sigma)) / sigma (EDM
eq. 3 / 4). As in ``reverie.likelihood_ode`` it is integrated in s = log sigma, dx/ds = x - D, whose rates
are O(1) over every decade of sigma, by scipy's Dormand-Prince RK45 (``method`` also takes RK23 or
DOP853) in float64, from sigmas[0] down to the grid's smallest positive sigma; the last step returns
D(x, sigma_min) (the paper's denoising step). The grid's inner points are not used: the solver picks its
own steps. NFE = the solver's evaluations + 1; pass ``stats={}`` to get it back as ``stats["nfe"]``.
The callback sees each accepted solver step as a step from the previous sigma to the new one.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.integrate
import torch

from .base import SamplerStep, denoise, register

SOLVERS = ("RK45", "RK23", "DOP853")


@register("ode")
def sample_ode(denoiser, x, sigmas, *, generator=None, callback=None, cond=None,
               rtol: float = 1e-5, atol: float = 1e-5, method: str = "RK45", stats: dict | None = None):
    """Adaptive probability-flow ODE sampling (module docstring); ``generator`` is unused (deterministic)."""
    if method not in SOLVERS:
        raise ValueError(f"unknown ODE method {method!r}; choose one of {', '.join(SOLVERS)}")
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be > 0, got {rtol} and {atol}")
    positive = sigmas[sigmas > 0]
    hi, lo = float(positive[0]), float(positive[-1])
    shape, dtype, device = x.shape, x.dtype, x.device
    nfe = 0

    def rhs(s: float, y: np.ndarray) -> np.ndarray:
        nonlocal nfe
        nfe += 1
        state = torch.from_numpy(y).view(shape)
        den = denoise(denoiser, state.to(device, dtype), math.exp(s), cond)
        return (state - den.cpu().to(torch.float64)).reshape(-1).numpy()

    y = x.detach().cpu().to(torch.float64).reshape(-1).numpy().copy()
    if hi > lo:
        solver = getattr(scipy.integrate, method)(rhs, math.log(hi), y, math.log(lo), rtol=rtol, atol=atol)
        i, prev = 0, hi
        while solver.status == "running":
            message = solver.step()
            if solver.status == "failed":
                raise RuntimeError(f"the probability-flow ODE solve failed after {nfe} evaluations: {message}")
            if callback is not None:
                now = math.exp(solver.t)
                state = torch.from_numpy(solver.y.copy()).view(shape).to(device, dtype)
                callback(SamplerStep(i, prev, now, state, state))
                i, prev = i + 1, now
        y = solver.y
    x = torch.from_numpy(np.ascontiguousarray(y)).view(shape).to(device, dtype)
    out = denoise(denoiser, x, lo, cond)
    if stats is not None:
        stats["nfe"] = nfe + 1
    return out
