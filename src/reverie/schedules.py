"""Noise schedules: discrete VP schedules from betas, and continuous VP / VE / EDM schedules.

Every schedule answers the same two questions for the samplers, in variance-exploding (VE)
coordinates (Karras et al. 2022, "EDM", Sec. 2):

* ``sigma_from_t(t)``: the VE noise level at time ``t``;
* ``t_from_sigma(sigma)``: the time a network was trained on for a given VE noise level.

For a VP process ``x_t = alpha_t x0 + sigma_t eps`` (Ho et al. 2020, eq. 4) the VE noise level is
``sigma = sigma_t / alpha_t = sqrt((1 - alpha_bar) / alpha_bar)`` and ``logSNR = -2 log sigma``.
All arithmetic is float64; callers cast at the boundary.

Choices written down here:

* ``sigmoid`` follows the discrete beta schedule of GeoDiff (Xu et al. 2022) as diffusers does:
  ``beta = sigmoid(linspace(-6, 6)) * (beta_end - beta_start) + beta_start``.
* ``zero_terminal_snr=True`` rescales betas so that ``alpha_bar[T-1] == 0`` exactly (Lin et al.
  2023, Algorithm 1); ``sigmas[T-1]`` is then ``inf``. Sampling grids cap the top noise level at
  ``schedule.sigma_max`` (the VE sigma of ``alpha_bar = 2**-24``, ~4096, or one log-linear step past
  ``sigmas[T-2]`` if that is larger), where a VP input differs from pure noise by at most 2**-12 of
  its norm; that keeps every downstream quantity finite.
* ``sigma_from_t`` interpolates sigma linearly between integer timesteps (what EulerDiscrete-style
  samplers assume), ``t_from_sigma`` interpolates t linearly in log-sigma (k-diffusion, diffusers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "DiscreteVPSchedule",
    "VPLinearSchedule",
    "VPCosineSchedule",
    "VESchedule",
    "EDMSchedule",
    "get_schedule",
    "DISCRETE_SCHEDULES",
    "CONTINUOUS_SCHEDULES",
    "alpha_from_sigma",
    "vp_sigma_from_sigma",
    "logsnr_from_sigma",
    "sigma_from_logsnr",
]

DISCRETE_SCHEDULES = ("linear", "scaled_linear", "cosine", "sigmoid")
CONTINUOUS_SCHEDULES = ("vp-linear", "vp-cosine", "ve", "edm")

# Top noise level used in place of an infinite one (zero terminal SNR): alpha_bar = 2**-24.
_ZERO_SNR_ALPHA_BAR = 2.0**-24


def _f64(x) -> Tensor:
    # MPS has no float64; there schedule math runs on the CPU copy.
    x = torch.as_tensor(x)
    if x.device.type == "mps":
        x = x.cpu()
    return x.to(torch.float64)


def alpha_from_sigma(sigma: Tensor) -> Tensor:
    """VP signal scale alpha = 1 / sqrt(1 + sigma^2) for a VE noise level sigma."""
    return torch.rsqrt(1.0 + sigma**2)


def vp_sigma_from_sigma(sigma: Tensor) -> Tensor:
    """VP noise scale sigma_t = sigma / sqrt(1 + sigma^2); equals 1 at sigma = inf."""
    sigma = torch.as_tensor(sigma)
    out = sigma * torch.rsqrt(1.0 + sigma**2)
    return torch.where(torch.isinf(sigma), torch.ones_like(out), out)


def logsnr_from_sigma(sigma: Tensor) -> Tensor:
    """log SNR = log(alpha^2 / sigma_t^2) = -2 log sigma (Kingma et al. 2021, eq. 3)."""
    return -2.0 * torch.log(sigma)


def sigma_from_logsnr(logsnr: Tensor) -> Tensor:
    """Inverse of :func:`logsnr_from_sigma`."""
    return torch.exp(-0.5 * logsnr)


def _betas(name: str, num_timesteps: int, beta_start: float | None, beta_end: float | None):
    T = num_timesteps
    if name == "linear":  # Ho et al. 2020, Sec. 4
        return torch.linspace(beta_start or 1e-4, beta_end or 0.02, T, dtype=torch.float64)
    if name == "scaled_linear":  # Rombach et al. 2022 (Stable Diffusion)
        b0, b1 = beta_start or 0.00085, beta_end or 0.012
        return torch.linspace(b0**0.5, b1**0.5, T, dtype=torch.float64) ** 2
    if name == "cosine":  # Nichol & Dhariwal 2021, eq. 17
        s = 0.008
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    if name == "sigmoid":  # GeoDiff (Xu et al. 2022)
        b0, b1 = beta_start or 1e-4, beta_end or 0.02
        return torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (b1 - b0) + b0
    raise ValueError(
        f"unknown discrete schedule {name!r}; choose one of {', '.join(DISCRETE_SCHEDULES)}"
    )


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale betas so the last alpha_bar is exactly 0 (Lin et al. 2023, Algorithm 1)."""
    sqrt_ab = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


class DiscreteVPSchedule:
    """A discrete variance-preserving schedule over integer timesteps t = 0 .. T-1.

    ``betas``, ``alphas_cumprod`` (alpha_bar, Ho et al. 2020 eq. 4) and ``sigmas`` (VE noise
    levels) are float64 tensors of shape ``[T]``.
    """

    def __init__(self, betas: Tensor, name: str = "custom", zero_terminal_snr: bool = False):
        betas = _f64(betas).flatten()
        if betas.numel() < 2 or bool(((betas <= 0) | (betas > 1)).any()):
            raise ValueError("betas must have at least 2 entries, each in (0, 1]")
        self.name = name
        self.zero_terminal_snr = zero_terminal_snr
        self.betas = betas
        self.alphas = 1 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        if zero_terminal_snr:
            self.alphas_cumprod[-1] = 0.0  # exact, not a rounding residue
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        self.log_sigmas = self.sigmas.log()

    @classmethod
    def from_name(
        cls,
        name: str,
        num_timesteps: int = 1000,
        zero_terminal_snr: bool = False,
        beta_start: float | None = None,
        beta_end: float | None = None,
    ) -> DiscreteVPSchedule:
        """Build ``linear``, ``scaled_linear``, ``cosine`` or ``sigmoid`` with T steps."""
        if num_timesteps < 2:
            raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
        betas = _betas(name, num_timesteps, beta_start, beta_end)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas, name=name, zero_terminal_snr=zero_terminal_snr)

    @property
    def num_timesteps(self) -> int:
        return self.betas.numel()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def finite_sigmas(self) -> Tensor:
        """``sigmas`` with an infinite top level (zero terminal SNR) replaced by ``sigma_max``."""
        return self.sigmas.clamp(max=self.sigma_max)

    @property
    def sigma_max(self) -> float:
        """Largest finite noise level a sampler should start from (see module docstring)."""
        top = float(self.sigmas[-1])
        if math.isinf(top):
            # 2**-24 as diffusers does, unless the grid already passes it (the linear schedule
            # does): then extrapolate log-sigma linearly one step, keeping sigmas increasing.
            cap = math.sqrt((1 - _ZERO_SNR_ALPHA_BAR) / _ZERO_SNR_ALPHA_BAR)
            if cap > float(self.sigmas[-2]):
                return cap
            return float(self.sigmas[-2] ** 2 / self.sigmas[-3])
        return top

    def config(self) -> dict:
        return {"kind": "discrete", "name": self.name, "num_timesteps": self.num_timesteps,
                "zero_terminal_snr": self.zero_terminal_snr}

    def sigma_from_t(self, t) -> Tensor:
        """VE sigma at (possibly fractional) timestep t, linear in sigma between grid points.

        Linear in sigma is diffusers' convention for fractional timesteps (EulerDiscrete's
        ``linspace`` grids interpolate its sigma table this way), kept for exact conformance;
        :meth:`t_from_sigma` is linear in log-sigma (k-diffusion's). The two agree at integer t
        and differ between grid points (up to ~2% in sigma near t = 0 on the linear schedule), so
        they are not exact inverses there."""
        t = _f64(t).clamp(0, self.num_timesteps - 1)
        lo = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - lo
        sig = self.sigmas.to(t.device).clone()
        if math.isinf(float(sig[-1])):
            sig[-1] = self.sigma_max
        return (1 - w) * sig[lo] + w * sig[lo + 1]

    def t_from_sigma(self, sigma) -> Tensor:
        """Fractional timestep for VE sigma, linear in log-sigma between grid points."""
        log_sigma = _f64(sigma).log()
        ls = self.log_sigmas.to(log_sigma.device)
        if math.isinf(float(ls[-1])):
            ls = ls.clone()
            ls[-1] = math.log(self.sigma_max)
        idx = torch.searchsorted(ls, log_sigma.clamp(ls[0], ls[-1]).contiguous())
        hi = idx.clamp(1, self.num_timesteps - 1)
        lo = hi - 1
        w = ((log_sigma - ls[lo]) / (ls[hi] - ls[lo])).clamp(0, 1)
        return lo.to(torch.float64) + w

    def alpha_bar(self, t) -> Tensor:
        """alpha_bar at timestep t (integer t: exact table value)."""
        return alpha_from_sigma(self.sigma_from_t(t)) ** 2

    def logsnr(self, t) -> Tensor:
        return logsnr_from_sigma(self.sigma_from_t(t))


@dataclass
class _Continuous:
    """Shared helpers for continuous-time schedules over t in [t_min, t_max]."""

    def alpha_bar(self, t) -> Tensor:
        return alpha_from_sigma(self.sigma_from_t(t)) ** 2

    def logsnr(self, t) -> Tensor:
        return logsnr_from_sigma(self.sigma_from_t(t))

    @property
    def sigma_min(self) -> float:
        return float(self.sigma_from_t(self.t_min))

    @property
    def sigma_max(self) -> float:
        return float(self.sigma_from_t(self.t_max))


@dataclass
class VPLinearSchedule(_Continuous):
    """Continuous VP with linear beta(t) (Song et al. 2021, eq. 33): t in [t_min, 1].

    log alpha_bar(t) = -t^2 (beta_max - beta_min) / 2 - t beta_min.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-3
    t_max: float = 1.0

    def config(self) -> dict:
        return {"kind": "vp-linear", "beta_min": self.beta_min, "beta_max": self.beta_max}

    def sigma_from_t(self, t) -> Tensor:
        t = _f64(t)
        neg_log_ab = 0.5 * t**2 * (self.beta_max - self.beta_min) + t * self.beta_min
        return torch.expm1(neg_log_ab).sqrt()

    def t_from_sigma(self, sigma) -> Tensor:
        d = self.beta_max - self.beta_min
        neg_log_ab = torch.log1p(_f64(sigma) ** 2)
        return (-self.beta_min + (self.beta_min**2 + 2 * d * neg_log_ab).sqrt()) / d


@dataclass
class VPCosineSchedule(_Continuous):
    """Continuous cosine schedule (Nichol & Dhariwal 2021, eq. 17): t in [t_min, t_max].

    alpha_bar(t) = cos^2((t + s) / (1 + s) * pi/2) / cos^2(s / (1 + s) * pi/2); t_max < 1 keeps
    the top noise level finite.
    """

    s: float = 0.008
    t_min: float = 1e-4
    t_max: float = 0.9946

    def config(self) -> dict:
        return {"kind": "vp-cosine", "s": self.s, "t_max": self.t_max}

    def _f(self, t):
        return torch.cos((t + self.s) / (1 + self.s) * math.pi / 2)

    def sigma_from_t(self, t) -> Tensor:
        t = _f64(t)
        alpha_bar = (self._f(t) / self._f(torch.zeros_like(t))) ** 2
        return ((1 - alpha_bar) / alpha_bar).sqrt()

    def t_from_sigma(self, sigma) -> Tensor:
        sigma = _f64(sigma)
        sqrt_ab = alpha_from_sigma(sigma) * self._f(torch.zeros_like(sigma))
        return torch.arccos(sqrt_ab.clamp(-1, 1)) * 2 / math.pi * (1 + self.s) - self.s


@dataclass
class VESchedule(_Continuous):
    """Variance exploding (Song et al. 2021, eq. 31): sigma(t) = s_min (s_max / s_min)^t."""

    sigma_lo: float = 0.01
    sigma_hi: float = 50.0
    t_min: float = 0.0
    t_max: float = 1.0

    def config(self) -> dict:
        return {"kind": "ve", "sigma_min": self.sigma_lo, "sigma_max": self.sigma_hi}

    def sigma_from_t(self, t) -> Tensor:
        return self.sigma_lo * (self.sigma_hi / self.sigma_lo) ** _f64(t)

    def t_from_sigma(self, sigma) -> Tensor:
        return torch.log(_f64(sigma) / self.sigma_lo) / math.log(self.sigma_hi / self.sigma_lo)


@dataclass
class EDMSchedule(_Continuous):
    """EDM (Karras et al. 2022, Table 1): sigma(t) = t, in [0.002, 80]."""

    t_min: float = 0.002
    t_max: float = 80.0

    def config(self) -> dict:
        return {"kind": "edm", "sigma_min": self.t_min, "sigma_max": self.t_max}

    def sigma_from_t(self, t) -> Tensor:
        return _f64(t).clone()

    def t_from_sigma(self, sigma) -> Tensor:
        return _f64(sigma).clone()


def get_schedule(name: str, **kwargs):
    """Any schedule by name: discrete ``linear`` ... or continuous ``vp-linear`` ... ``edm``."""
    if name in DISCRETE_SCHEDULES:
        return DiscreteVPSchedule.from_name(name, **kwargs)
    if name == "vp-linear":
        return VPLinearSchedule(**kwargs)
    if name == "vp-cosine":
        return VPCosineSchedule(**kwargs)
    if name == "ve":
        lo, hi = kwargs.pop("sigma_min", 0.01), kwargs.pop("sigma_max", 50.0)
        return VESchedule(sigma_lo=lo, sigma_hi=hi, **kwargs)
    if name == "edm":
        lo, hi = kwargs.pop("sigma_min", 0.002), kwargs.pop("sigma_max", 80.0)
        return EDMSchedule(t_min=lo, t_max=hi, **kwargs)
    valid = ", ".join(DISCRETE_SCHEDULES + CONTINUOUS_SCHEDULES)
    raise ValueError(f"unknown schedule {name!r}; choose one of {valid}")
