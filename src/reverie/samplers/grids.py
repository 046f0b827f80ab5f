"""Decreasing noise-level grids for sampling; every grid ends with sigma = 0.

* ``karras``: Karras et al. 2022, eq. 5 (``rho`` = 7);
* ``exponential``: uniform in log-sigma;
* ``linspace-t``: fractional timesteps ``linspace(T-1, 0, n)`` mapped through the schedule (the
  default of EulerDiscrete-style samplers);
* ``ddim-leading`` / ``ddim-trailing`` / ``ddim-linspace``: integer timesteps as in Song et al.
  2021 (DDIM) and the spacings compared by Lin et al. 2023, Table 2. "trailing" starts at
  t = T-1; "leading" steps by T // n from 0 (plus ``offset``) and never reaches T-1.

After the last timestep the grid goes to sigma 0, i.e. alpha_bar_prev = 1, so no noise is left in
the output. An infinite top sigma (zero terminal SNR) is replaced by ``schedule.sigma_max``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

GRIDS = ("karras", "exponential", "linspace-t", "ddim-leading", "ddim-trailing", "ddim-linspace")
SIGMA_GRIDS = ("karras", "exponential")  # defined by sigma_min / sigma_max alone: the only ones an EDM model has


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _discrete_timesteps(kind: str, n: int, T: int, offset: int) -> Tensor:
    i = torch.arange(n, dtype=torch.float64)
    if kind == "ddim-leading":
        t = i * (T // n) + offset
    elif kind == "ddim-trailing":
        # T, T - T/n, ... computed as numpy's arange does (start + i * step), so that x.5 ties round
        # as in diffusers; always exactly n values (np.arange with a float step can give n + 1).
        t = ((T + i * ((T - T / n) - T)).round() - 1).flip(0)
    elif kind == "ddim-linspace":
        t = (i * ((T - 1) / (n - 1))).round() if n > 1 else i
    else:  # linspace-t: fractional
        t = i * ((T - 1) / (n - 1)) if n > 1 else i
    if kind == "ddim-leading" and n > 1 and offset + (n - 1) * (T // n) > T - 1:
        raise ValueError(f"offset {offset} pushes the leading grid past t = {T - 1}")
    return t.clamp(0, T - 1).flip(0)


def timesteps_for(kind: str, n: int, schedule, offset: int = 0) -> Tensor:
    """The decreasing (float64) timesteps of a t-based grid kind, without the final sigma 0."""
    if kind not in ("linspace-t", "ddim-leading", "ddim-trailing", "ddim-linspace"):
        raise ValueError(f"grid {kind!r} is not defined by timesteps")
    if not hasattr(schedule, "num_timesteps"):
        raise ValueError(f"grid {kind!r} needs a discrete schedule")
    if n > schedule.num_timesteps:
        raise ValueError(f"n={n} is more than the schedule's {schedule.num_timesteps} timesteps")
    return _discrete_timesteps(kind, n, schedule.num_timesteps, offset)


def get_sigmas(kind: str, n: int, sigma_min: float | None = None, sigma_max: float | None = None,
               schedule=None, rho: float = 7.0, offset: int = 0) -> Tensor:
    """A float64 grid of ``n`` decreasing noise levels followed by 0 (length ``n + 1``).

    ``karras`` and ``exponential`` take ``sigma_min`` / ``sigma_max`` (or a schedule's); the
    t-based kinds need a discrete ``schedule``.
    """
    if n < 1:
        raise ValueError(f"the number of steps must be at least 1, got {n}")
    if kind in SIGMA_GRIDS:
        lo = sigma_min if sigma_min is not None else getattr(schedule, "sigma_min", None)
        hi = sigma_max if sigma_max is not None else getattr(schedule, "sigma_max", None)
        if lo is None or hi is None:
            raise ValueError(f"grid {kind!r} needs sigma_min and sigma_max (or a schedule)")
        if not 0 < lo < hi:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {lo} and {hi}")
        ramp = torch.linspace(0, 1, n, dtype=torch.float64)
        if kind == "karras":  # Karras et al. 2022, eq. 5
            sigmas = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        else:
            sigmas = torch.exp(math.log(hi) + ramp * (math.log(lo) - math.log(hi)))
        return _append_zero(sigmas)
    if kind in GRIDS:
        t = timesteps_for(kind, n, schedule, offset)
        if kind == "linspace-t":
            sigmas = schedule.sigma_from_t(t)
        else:
            sigmas = schedule.sigmas[t.long()].clone()
        sigmas = sigmas.clamp(max=schedule.sigma_max)  # inf at zero terminal SNR
        return _append_zero(sigmas)
    raise ValueError(f"unknown sigma grid {kind!r}; choose one of {', '.join(GRIDS)}")
