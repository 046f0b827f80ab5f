"""Score SDEs: the VE, VP and sub-VP stochastic differential equations of Song et al. 2021
("Score-Based Generative Modeling through Stochastic Differential Equations", Sec. 3.4, App. B).

Each SDE is linear, dx = f(t) x dt + g(t) dw, on t in [t_min, 1], so its perturbation kernel is a
Gaussian x_t = s(t) x0 + std(t) z with a closed form:

==========  ==========================  ====================  ===============================
SDE         f(t), g(t)^2                 s(t) (mean scale)    std(t)
==========  ==========================  ====================  ===============================
VE (eq.30)  0, d sigma_t^2 / dt          1                    sigma_t = s_min (s_max/s_min)^t
VP (eq.32)  -beta/2, beta                exp(-B/2)            sqrt(1 - exp(-B))
sub-VP      -beta/2, beta (1 - e^-2B)    exp(-B/2)            1 - exp(-B)
(eq. 34)
==========  ==========================  ====================  ===============================

with beta(t) = beta_min + t (beta_max - beta_min) and B(t) = int_0^t beta = beta_min t +
(beta_max - beta_min) t^2 / 2 (eq. 33; defaults beta 0.1 to 20, VE sigma 0.01 to 50).

The denoiser view (``reverie.denoisers``): x = x_t / s(t) is in VE coordinates with noise level
sigma(t) = std(t) / s(t), and by Ito's formula it obeys the VE SDE dx = sqrt(d sigma^2/dt) dw for
every SDE of this family (the drift cancels; for sub-VP, g^2 / s^2 = d sigma^2 / dt is checked in the
tests). So a model of any of the three is a denoiser D(x, sigma) like every other reverie model, and
every sampler runs on it; each class here is also a schedule (``sigma_from_t``, ``t_from_sigma``,
``sigma_min``, ``sigma_max``).

Choices written down here:

* The VE marginal std is sigma_t itself, so x_{t_min} is the data smoothed by sigma_min = 0.01 (as in
  the paper's code); the density at t solves the Fokker-Planck equation started from that at any
  earlier t0 (the tests' check).
* Training on continuous t (:class:`UniformTime`): t ~ U(t_min, 1), sigma = sigma(t). The paper's
  weighting lambda(t) = std(t)^2 (eq. 7, "lambda propto 1 / E|grad log p_0t|^2") on the score error
  is |eps_hat - eps|^2 for an eps network, i.e. reverie's ``simple`` weighting; the other weightings
  (min_snr, edm) apply unchanged.
* The network (an eps-predicting ``EpsDenoiser`` over this schedule) sees x / sqrt(1 + sigma^2),
  which is exactly the VP state and unit-variance input for VE and sub-VP too, and the time 999 t
  (Song et al.'s continuous DDPM++ models), from ``t_from_sigma``.
* ``discretize`` gives the T-level discrete VP chain with the SDE's sigma(t) at t_i = linspace(t_min,
  1, T): the ELBO of that chain (``reverie.likelihood``) stands beside the exact ODE likelihood. For the
  VP SDE with T = 1000 it is DDPM's linear schedule up to O(1/T).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .losses import NoiseLevels
from .schedules import DiscreteVPSchedule, VESchedule, VPLinearSchedule, _f64, alpha_from_sigma
from .utils import append_dims

__all__ = ["VESDE", "VPSDE", "SubVPSDE", "SDES", "get_sde", "is_sde", "UniformTime", "discretize",
           "TIME_SCALE"]

TIME_SCALE = 999.0  # network time input 999 t (Song et al. 2021, continuous DDPM++ models)


class _SDE:
    """What every SDE answers (on top of the schedule interface): f, g, s, std and the marginal."""

    name = "sde"

    def scale(self, t) -> Tensor:
        """Mean scale s(t) of the perturbation kernel."""
        raise NotImplementedError

    def std(self, t) -> Tensor:
        """Standard deviation std(t) of the perturbation kernel."""
        raise NotImplementedError

    def drift_coeff(self, t) -> Tensor:
        """f(t) of the drift f(t) x."""
        raise NotImplementedError

    def diffusion(self, t) -> Tensor:
        """g(t)."""
        raise NotImplementedError

    def marginal(self, x0: Tensor, t) -> tuple[Tensor, Tensor]:
        """Mean s(t) x0 and std(t) (broadcast over x0's trailing dims) of p_0t(x_t | x0)."""
        t = _f64(t)
        s, std = self.scale(t), self.std(t)
        if t.ndim:
            s, std = append_dims(s, x0.ndim), append_dims(std, x0.ndim)
        return s.to(x0.dtype) * x0, std.to(x0.dtype)

    def to_state(self, x_ve: Tensor, t) -> Tensor:
        """The SDE's own state x_t = s(t) x from VE coordinates."""
        s = self.scale(_f64(t))
        return x_ve * (append_dims(s, x_ve.ndim) if s.ndim else s).to(x_ve.dtype)

    def config(self) -> dict:
        return {"kind": self.name, **{k: getattr(self, k) for k in self.__dataclass_fields__}}


@dataclass
class VPSDE(_SDE, VPLinearSchedule):
    """Variance preserving SDE (Song et al. 2021, eq. 32); sigma(t) = sqrt(e^B - 1)."""

    name = "vp-sde"

    def big_b(self, t) -> Tensor:
        t = _f64(t)
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def beta(self, t) -> Tensor:
        return self.beta_min + _f64(t) * (self.beta_max - self.beta_min)

    def scale(self, t):
        return torch.exp(-0.5 * self.big_b(t))

    def std(self, t):
        return (-torch.expm1(-self.big_b(t))).sqrt()

    def drift_coeff(self, t):
        return -0.5 * self.beta(t)

    def diffusion(self, t):
        return self.beta(t).sqrt()


@dataclass
class SubVPSDE(VPSDE):
    """Sub-VP SDE (Song et al. 2021, eq. 34): std(t) = 1 - e^-B, so sigma(t) = 2 sinh(B / 2)."""

    name = "subvp-sde"

    def std(self, t):
        return -torch.expm1(-self.big_b(t))

    def diffusion(self, t):
        return (self.beta(t) * -torch.expm1(-2 * self.big_b(t))).sqrt()

    def sigma_from_t(self, t) -> Tensor:
        return 2 * torch.sinh(0.5 * self.big_b(t))

    def t_from_sigma(self, sigma) -> Tensor:
        big_b = 2 * torch.asinh(_f64(sigma) / 2)
        d = self.beta_max - self.beta_min
        return (-self.beta_min + (self.beta_min**2 + 2 * d * big_b).sqrt()) / d


@dataclass
class VESDE(_SDE, VESchedule):
    """Variance exploding SDE (Song et al. 2021, eq. 30): g^2 = d sigma_t^2 / dt, s = 1."""

    name = "ve-sde"

    def scale(self, t):
        return torch.ones_like(_f64(t))

    def std(self, t):
        return self.sigma_from_t(t)

    def drift_coeff(self, t):
        return torch.zeros_like(_f64(t))

    def diffusion(self, t):
        sigma = self.sigma_from_t(t)
        return sigma * math.sqrt(2 * math.log(self.sigma_hi / self.sigma_lo))

    def config(self) -> dict:
        return {"kind": self.name, "sigma_min": self.sigma_lo, "sigma_max": self.sigma_hi}


SDES = {"vp-sde": VPSDE, "subvp-sde": SubVPSDE, "ve-sde": VESDE}


def get_sde(name: str, **kwargs):
    """``vp-sde`` (beta 0.1 .. 20, t_min 1e-3), ``subvp-sde`` (likewise) or ``ve-sde`` (sigma 0.01 .. 50)."""
    if name not in SDES:
        raise ValueError(f"unknown SDE {name!r}; choose one of {', '.join(SDES)}")
    if name == "ve-sde":
        lo, hi = kwargs.pop("sigma_min", 0.01), kwargs.pop("sigma_max", 50.0)
        return VESDE(sigma_lo=lo, sigma_hi=hi, **kwargs)
    return SDES[name](**kwargs)


def is_sde(schedule) -> bool:
    return isinstance(schedule, _SDE)


class UniformTime:
    """Continuous training times t ~ U(t_min, t_max), sigma = sigma(t) (Song et al. 2021, eq. 7)."""

    def __init__(self, sde):
        self.sde = sde

    def __call__(self, batch_size: int, generator: torch.Generator) -> NoiseLevels:
        u = torch.rand(batch_size, generator=generator, device=generator.device, dtype=torch.float64)
        t = self.sde.t_min + (self.sde.t_max - self.sde.t_min) * u
        sigma = self.sde.sigma_from_t(t)
        return NoiseLevels(sigma, None, torch.ones_like(sigma))


def discretize(sde, num_timesteps: int = 1000) -> DiscreteVPSchedule:
    """The discrete VP chain whose VE levels are sigma(t_i), t_i = linspace(t_min, t_max, T) (for the ELBO)."""
    t = torch.linspace(sde.t_min, sde.t_max, num_timesteps, dtype=torch.float64)
    alpha_bar = alpha_from_sigma(sde.sigma_from_t(t)) ** 2
    prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    return DiscreteVPSchedule(1 - alpha_bar / prev, name=f"{sde.name}-discretized")
