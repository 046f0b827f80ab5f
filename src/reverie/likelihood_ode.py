"""Exact negative log-likelihood through the probability-flow ODE, and bits per dimension.

A denoiser ``D(x, sigma)`` defines the probability-flow ODE (Song et al. 2021, "Score-Based
Generative Modeling through SDEs", eq. 13; in VE coordinates Karras et al. 2022, "EDM", eq. 1 with
the score (D - x) / sigma^2 of their eq. 3)

    dx / dsigma = (x - D(x, sigma)) / sigma,

a continuous normalizing flow whose marginals are the model's noised densities p_sigma. By the
instantaneous change of variables (Chen et al. 2018, Thm. 1; Grathwohl et al. 2019, "FFJORD",
Sec. 2; Song et al. 2021, App. D.2) the density of a point x0 at sigma_min is

    log p_{sigma_min}(x0) = log p_prior(x(sigma_max)) + integral_{sigma_min}^{sigma_max} div f dsigma,

integrated forward from x(sigma_min) = x0 together with the log-density increment. Below, n is
the number of dimensions of one sample.

Choices written down here:

* Time variable s = log sigma: dx/ds = x - D(x, sigma), the same curves as above, but the rates are
  O(1) (for Gaussian data exactly sigma^2 / (v + sigma^2) <= 1) instead of O(1/sigma), so RK45's
  error control spends its steps evenly over the decades of sigma. div f = n - tr(dD/dx): the
  identity part is exact and only tr(dD/dx) is estimated, which for Gaussian probes removes the
  identity's variance 2 n and costs nothing.
* Divergence: exact (one backward pass per dimension: for small n) or Hutchinson's estimator
  tr(J) = E[z^T J z] with z Rademacher or standard normal (Hutchinson 1989; FFJORD Sec. 3),
  z^T J by one vector-Jacobian product. As in FFJORD the ``num_probes`` probes of a sample are drawn
  once and kept for the whole solve, so the estimate z^T (integral J ds) z is unbiased for the
  integral, not only for each step; the trajectory x(s) never sees the probes.
* The whole batch is one ODE state [x (B*n), delta_logp (B)], integrated in float64 by scipy's
  adaptive RK45 (Dormand-Prince; ``method`` also takes RK23 or DOP853), rtol = atol = 1e-5 by
  default. The solver class is stepped as ``scipy.integrate.solve_ivp`` steps it, so that progress
  can be shown. The denoiser runs in x0's dtype. A shared step size means a sample's result moves
  with its batch-mates at the tolerance level. The denoiser must treat samples independently (no
  batch statistics) and be deterministic (call ``.eval()``).
* Endpoints: sigma_min / sigma_max from the ``schedule`` argument, else the denoiser's schedule
  (``DiscreteVPSchedule``: ``sigmas[0]`` and the finite ``sigma_max``, also under zero terminal SNR),
  else EDM's 0.002 / 80 (Karras et al. 2022, Table 1) for schedule-free denoisers; explicit
  ``sigma_min`` / ``sigma_max`` override either.
* VP models are integrated in VE coordinates too. The VP ODE in (x_vp, t) (Song et al. 2021, eq. 13
  with the VP drift) is this ODE under x = x_vp / alpha (EDM eq. 4 with s(t) = alpha): the same curves,
  densities differing by the Jacobian alpha^n. The data are placed at the VE state x(sigma_min) = x0,
  where the model's marginal is the data convolved with N(0, sigma_min^2 I) and not rescaled; reading
  x0 as the VP state would evaluate a copy of the data shrunk by alpha_min. The prior is
  N(0, sigma_max^2 I), the noise alone, for every parameterization, so one denoiser gives one number
  whether it was trained as eps, v, x0 or EDM. (DDPM's VP prior N(0, I) on x_vp is
  N(0, (1 + sigma_max^2) I) here; the two differ by O(1 / sigma_max^4) nats per dimension on average.)
* Truncation bias. Bottom: the result is -log p_{sigma_min}(x0), the model smoothed at sigma_min, not
  the unreachable sigma -> 0 limit. For data of per-dimension variance v its expectation exceeds the
  sigma -> 0 value by n (delta - log(1 + delta)) / 2 ~ n delta^2 / 4, delta = sigma_min^2 / v (a point's
  own value moves to first order, +-delta/2 per dimension). For DDPM's linear schedule (sigma_min =
  0.0100) and v = 0.0625 that is 6e-7 nats per dimension. Top: replacing p_{sigma_max} by the prior
  moves a point's value by about x_T . E[x0] / sigma_max^2, of zero mean and standard deviation
  ~|E x0| / sigma_max (first order: 3e-3 relative for the 3-D Gaussian of the tests at sigma_max = 80);
  averaged over the data it costs KL(p_{sigma_max} || prior) ~ |E x0|^2 / (2 sigma_max^2), at most
  1 / (2 sigma_max^2) nats per dimension for data in [-1, 1]: 2e-5 for DDPM (sigma_max = 157), 8e-5
  for EDM (80). Pass a larger ``sigma_max`` (the cost grows with log sigma_max) where one point's
  value matters.
* Dequantization and bits per dimension. reverie's images are L = 256 levels x0 = 2k / (L-1) - 1 in
  [-1, 1]; level k owns the bin x0 + [-Delta/2, Delta/2]^n, Delta = 2 / (L-1), centred as the ELBO's
  discretized decoder (``likelihood.discretized_gaussian_log_likelihood``) centres it. A density p
  gives the discrete model P(k) = integral_bin p = Delta^n E_u[p(x0 + u)], u ~ U(-Delta/2, Delta/2)^n,
  and by Jensen (Theis et al. 2016, "A note on the evaluation of generative models")

      -log P(k) <= E_u[-log p(x0 + u)] - n log Delta = E_u[-log p(x0 + u)] + n log((L-1)/2).

  Dividing by n ln 2: bits/dim = (nll / n + log((L-1)/2)) / ln 2, an offset of +log2(127.5) = 6.994
  bits for 256 levels. The sign checks out in pixel units y' = 127.5 (y + 1), bins of width 1:
  densities there are 127.5^-n times ours, so their nll is ours plus n log 127.5 nats. With
  ``dequantize=True`` each x0 gets one u (one unbiased draw of the bound); with ``dequantize=False``
  the density is read at x0 itself and bits/dim is the point approximation P(k) ~ Delta^n p(x0), not
  a bound. The ELBO's decoder extends the edge bins to +-inf; here an edge level is charged only its
  own bin, a slightly looser bound for saturated pixels.
* Randomness, in order: the dequantization noise, then the probes, all from ``generator`` on x0's
  device. Same generator state, same result, to the byte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.integrate
import torch
from torch import Tensor
from tqdm.auto import tqdm

__all__ = [
    "PROBES",
    "ODENLLResult",
    "sigma_range",
    "dequantize_uniform",
    "bits_per_dim_from_nll",
    "ode_nll",
    "ode_bits_per_dim",
]

PROBES = ("rademacher", "gaussian")
EDM_SIGMA_MIN, EDM_SIGMA_MAX = 0.002, 80.0  # Karras et al. 2022, Table 1
SOLVERS = ("RK45", "RK23", "DOP853")


@dataclass
class ODENLLResult:
    """Per-sample results of :func:`ode_nll` ([B] float64 tensors on x0's device; the CPU for MPS).

    ``nll = -(prior_logp + delta_logp)`` is -log p_{sigma_min} of the (dequantized) input in nats,
    as a density on reverie's [-1, 1] scale; ``bits_per_dim`` is the discrete-data figure of the
    module docstring; ``nfe`` counts right-hand-side evaluations (each one denoiser call plus one
    backward pass per probe, or per dimension when the divergence is exact).
    """

    nll: Tensor
    bits_per_dim: Tensor
    prior_logp: Tensor
    delta_logp: Tensor
    nfe: int
    num_dims: int


def sigma_range(denoiser, schedule=None, sigma_min: float | None = None,
                sigma_max: float | None = None) -> tuple[float, float]:
    """The ODE's ``(sigma_min, sigma_max)``: explicit values, else the schedule's (the argument's or
    the denoiser's), else EDM's 0.002 / 80."""
    schedule = schedule if schedule is not None else getattr(denoiser, "schedule", None)
    lo = sigma_min if sigma_min is not None else (schedule.sigma_min if schedule is not None else EDM_SIGMA_MIN)
    hi = sigma_max if sigma_max is not None else (schedule.sigma_max if schedule is not None else EDM_SIGMA_MAX)
    lo, hi = float(lo), float(hi)
    if not 0 < lo < hi < math.inf:
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={lo}, sigma_max={hi}")
    return lo, hi


def _host64(x: Tensor) -> Tensor:
    """``x`` in float64 on its device, or on the CPU for MPS (which has no float64)."""
    return x.detach().to("cpu" if x.device.type == "mps" else x.device).to(torch.float64)


def dequantize_uniform(x0: Tensor, num_levels: int = 256, generator: torch.Generator | None = None) -> Tensor:
    """x0 + u in float64 (on the CPU for MPS), u ~ U(-Delta/2, Delta/2) per element, Delta = 2 / (num_levels - 1):
    a uniform point of each level's bin (module docstring). ``x0`` must lie on the ``num_levels`` grid in [-1, 1]."""
    if num_levels < 2:
        raise ValueError(f"num_levels must be >= 2, got {num_levels}")
    x64 = _host64(x0)
    levels = (x64 + 1) * ((num_levels - 1) / 2)
    # A tenth of a level tolerates float16 / bfloat16 rounding of the grid values.
    if bool((x64.abs() > 1 + 1e-6).any()) or bool(((levels - levels.round()).abs() > 0.1).any()):
        raise ValueError(f"dequantize=True needs x0 on the {num_levels}-level grid in [-1, 1] "
                         "(2k / (num_levels - 1) - 1); pass dequantize=False for continuous data")
    # float32 draws (2^-24 of a bin apart) work on every device, MPS included.
    u = _host64(torch.rand(x0.shape, generator=generator, device=x0.device)) - 0.5
    return x64 + u * (2 / (num_levels - 1))


def bits_per_dim_from_nll(nll: Tensor, num_dims: int, num_levels: int = 256) -> Tensor:
    """(nll / n + log((L-1)/2)) / ln 2: nats of a density on [-1, 1] to bits/dim of L-level data."""
    return (nll / num_dims + math.log((num_levels - 1) / 2)) / math.log(2)


def _draw_probes(x0: Tensor, num_probes: int, probe: str, generator, dtype) -> Tensor:
    """``num_probes`` probes per sample, [K, B, ...] on x0's device, drawn once for the whole solve."""
    shape = (num_probes, *x0.shape)
    if probe == "rademacher":
        z = torch.randint(0, 2, shape, generator=generator, device=x0.device).to(torch.float32) * 2 - 1
    else:
        z = torch.randn(shape, generator=generator, device=x0.device)
    return z.to(dtype)


def _vjp(out: Tensor, x: Tensor, v: Tensor | None, retain: bool) -> Tensor:
    (g,) = torch.autograd.grad(out, x, grad_outputs=v, retain_graph=retain, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def _trace_jacobian(den: Tensor, x: Tensor, probes: Tensor | None) -> Tensor:
    """tr(dD/dx) per sample [B] in float64: exact (one backward pass per dimension) when ``probes``
    is None, else Hutchinson's mean of z^T (dD/dx) z over the probes."""
    B = x.shape[0]
    trace = torch.zeros(B, dtype=torch.float64, device=_host64(x).device)
    if not den.requires_grad:  # D does not depend on x at all
        return trace
    if probes is None:
        flat = den.reshape(B, -1)
        n = flat.shape[1]
        for i in range(n):  # samples are independent, so d(sum_b D_bi)/dx_b is row b's gradient
            trace += _host64(_vjp(flat[:, i].sum(), x, None, retain=i < n - 1).reshape(B, -1)[:, i])
        return trace
    K = probes.shape[0]
    for k in range(K):
        vjp = _vjp(den, x, probes[k], retain=k < K - 1)
        trace += (_host64(vjp) * _host64(probes[k])).reshape(B, -1).sum(1)
    return trace / K


class _AugmentedFlow:
    """d[x, delta_logp]/ds = [x - D(x, e^s), n - tr(dD/dx)] on the flat float64 state, s = log sigma."""

    def __init__(self, denoiser, shape, dtype, device, cond: dict, probes: Tensor | None):
        self.denoiser, self.shape, self.dtype, self.device = denoiser, shape, dtype, device
        self.cond, self.probes = cond, probes
        self.numel = math.prod(shape)
        self.nfe = 0

    def __call__(self, s: float, y: np.ndarray) -> np.ndarray:
        self.nfe += 1
        B, dims = self.shape[0], self.numel // self.shape[0]
        state = torch.tensor(y[: self.numel], dtype=torch.float64).view(self.shape)
        x = state.to(self.dtype, copy=True).to(self.device)  # a leaf of its own for autograd
        sigma = torch.full((B,), math.exp(s), dtype=self.dtype, device=self.device)
        with torch.enable_grad():
            x.requires_grad_(True)
            den = self.denoiser(x, sigma, **self.cond)
            trace = _trace_jacobian(den, x, self.probes)
        dx = state - den.detach().cpu().to(torch.float64)  # the float64 state, not its cast
        return np.concatenate([dx.reshape(-1).numpy(), (dims - trace.cpu()).numpy()])


def _check_options(x0: Tensor, num_probes: int, probe: str, rtol: float, atol: float, method: str) -> None:
    if x0.ndim < 2 or x0.shape[0] == 0:
        raise ValueError(f"x0 must be a non-empty batch [B, ...] with at least 2 dims, got shape {tuple(x0.shape)}")
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; choose one of {', '.join(PROBES)}")
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be > 0, got rtol={rtol}, atol={atol}")
    if method not in SOLVERS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(SOLVERS)}")


def ode_nll(denoiser, x0: Tensor, *, schedule=None, sigma_min: float | None = None,
            sigma_max: float | None = None, hutchinson: bool = True, num_probes: int = 1,
            probe: str = "rademacher", rtol: float = 1e-5, atol: float = 1e-5, method: str = "RK45",
            dequantize: bool = True, num_levels: int = 256, generator: torch.Generator | None = None,
            cond: dict | None = None, progress: bool = False) -> ODENLLResult:
    """-log p_{sigma_min}(x0) per sample through the probability-flow ODE (Song et al. 2021, App. D.2).

    ``denoiser`` is any reverie denoiser ``D(x, sigma, **cond)``; ``cond`` holds its batched
    conditioning. ``hutchinson=False`` computes the divergence exactly (n backward passes per
    evaluation: for small n). ``dequantize`` adds uniform noise within each level's bin (x0 must then
    be on the ``num_levels`` grid in [-1, 1]). Module docstring: endpoints, biases, bits/dim.
    """
    _check_options(x0, num_probes, probe, rtol, atol, method)
    lo, hi = sigma_range(denoiser, schedule, sigma_min, sigma_max)
    x = dequantize_uniform(x0, num_levels, generator) if dequantize else _host64(x0)
    dtype = x0.dtype if x0.is_floating_point() else torch.float32
    probes = _draw_probes(x0, num_probes, probe, generator, dtype) if hutchinson else None
    B, numel = x.shape[0], x.numel()
    y0 = np.concatenate([x.reshape(-1).cpu().numpy(), np.zeros(B)])
    s0, s1 = math.log(lo), math.log(hi)
    flow = _AugmentedFlow(denoiser, tuple(x.shape), dtype, x0.device, cond or {}, probes)
    # solve_ivp's own loop over the solver's steps, written out to report accepted progress.
    solver = getattr(scipy.integrate, method)(flow, s0, y0, s1, rtol=rtol, atol=atol)
    with tqdm(total=1000, desc="ODE NLL", disable=not progress, leave=False) as bar:
        while solver.status == "running":
            message = solver.step()
            bar.update(round(1000 * (solver.t - s0) / (s1 - s0)) - bar.n)  # per mille of log sigma
            bar.set_postfix(sigma=f"{math.exp(solver.t):.3g}", nfe=flow.nfe, refresh=False)
    if solver.status == "failed":
        raise RuntimeError(f"the probability-flow ODE solve failed after {flow.nfe} evaluations: {message}")
    end = torch.from_numpy(solver.y.copy()).to(x.device)
    x_T, delta = end[:numel].view(B, -1), end[numel:]
    dims = numel // B
    prior = -0.5 * (dims * math.log(2 * math.pi * hi**2) + x_T.pow(2).sum(1) / hi**2)
    nll = -(prior + delta)
    return ODENLLResult(nll, bits_per_dim_from_nll(nll, dims, num_levels), prior, delta, flow.nfe, dims)


def ode_bits_per_dim(denoiser, x0: Tensor, **kwargs) -> Tensor:
    """Bits per dimension [B] of ``num_levels``-level data in [-1, 1] through the probability-flow ODE;
    ``kwargs`` go to :func:`ode_nll` (``dequantize=True`` by default: an upper bound in expectation)."""
    return ode_nll(denoiser, x0, **kwargs).bits_per_dim
