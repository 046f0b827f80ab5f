"""Networks seen as denoisers ``D(x, sigma, **cond) -> x0_hat`` in VE coordinates.

One table per parameterization (Karras et al. 2022, "EDM", eq. 7 and Table 1):

    D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma), **cond)

With alpha = 1 / sqrt(1 + sigma^2) and sigma_vp = sigma * alpha, a VP network sees
``x_vp = c_in x = alpha x`` and its timestep ``c_noise = t(sigma)`` from the schedule:

==========  =================  =====================  ==================  ======================
            c_skip             c_out                  c_in                F predicts
==========  =================  =====================  ==================  ======================
eps         1                  -sigma                 alpha               eps (Ho et al. 2020)
x0          0                  1                      alpha               x0
v           alpha^2            -sigma_vp              alpha               v = alpha eps - sigma_vp x0
edm         sd^2/(s^2+sd^2)    s sd/sqrt(s^2+sd^2)    1/sqrt(s^2+sd^2)    EDM target, c_noise=ln(s)/4
==========  =================  =====================  ==================  ======================

``target(x0, noise, sigma)`` is what F should output for ``x = x0 + sigma * noise``; the losses
regress F on it. Coefficients are computed in float64 and cast to the input's dtype.

Learned variance (Nichol & Dhariwal 2021, Sec. 3.1): with ``learned_variance=True`` the network
returns ``2 C`` channels; the second half, ``v`` in [-1, 1], interpolates the DDPM step's
log-variance between beta_t and beta_tilde_t. ``forward`` returns only ``x0_hat``;
``forward_with_variance`` also returns the interpolation fraction ``(v + 1) / 2``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .schedules import alpha_from_sigma, vp_sigma_from_sigma
from .utils import append_dims, batch_sigma

__all__ = [
    "Denoiser",
    "EpsDenoiser",
    "X0Denoiser",
    "VDenoiser",
    "EDMDenoiser",
    "PREDICTION_TYPES",
    "make_denoiser",
]


class Denoiser(nn.Module):
    """Base class: subclasses define ``scalings(sigma)`` and, where it is exact, ``target``."""

    prediction_type = "custom"

    def __init__(self, model: nn.Module, schedule=None, time_scale: float = 1.0,
                 learned_variance: bool = False):
        super().__init__()
        self.model = model
        self.schedule = schedule
        self.time_scale = time_scale
        self.learned_variance = learned_variance

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(c_skip, c_out, c_in)`` for a float64 ``[B]`` sigma."""
        raise NotImplementedError

    def c_noise(self, sigma: Tensor) -> Tensor:
        """The network's time input: the schedule's (fractional) timestep for sigma."""
        if self.schedule is None:
            raise ValueError(f"{type(self).__name__} needs a schedule to map sigma to timesteps")
        return self.schedule.t_from_sigma(sigma) * self.time_scale

    def _coeffs(self, x: Tensor, sigma) -> tuple[Tensor, ...]:
        sigma64 = batch_sigma(sigma, x).to(torch.float64)
        c_skip, c_out, c_in = self.scalings(sigma64)
        c_noise = self.c_noise(sigma64).to(x.dtype)
        return (*(append_dims(c.to(x.dtype), x.ndim) for c in (c_skip, c_out, c_in)), c_noise)

    def network_output(self, x: Tensor, sigma, **cond) -> Tensor:
        """Raw network output F(c_in x, c_noise, **cond) (all channels)."""
        _, _, c_in, c_noise = self._coeffs(x, sigma)
        return self.model(x * c_in, c_noise, **cond)

    def forward_with_variance(self, x: Tensor, sigma, **cond) -> tuple[Tensor, Tensor | None]:
        """``(x0_hat, frac)``; frac in [0, 1] when the network learns its variance, else None."""
        c_skip, c_out, c_in, c_noise = self._coeffs(x, sigma)
        out = self.model(x * c_in, c_noise, **cond)
        frac = None
        if self.learned_variance:
            out, v = out.chunk(2, dim=1)
            frac = (v + 1) / 2
        return c_skip * x + c_out * out, frac

    def forward(self, x: Tensor, sigma, **cond) -> Tensor:
        return self.forward_with_variance(x, sigma, **cond)[0]

    def target(self, x0: Tensor, noise: Tensor, sigma) -> Tensor:
        """What F should output for x = x0 + sigma * noise: (x0 - c_skip x) / c_out (EDM eq. 8)."""
        sigma64 = batch_sigma(sigma, x0).to(torch.float64)
        c_skip, c_out, _ = (append_dims(c.to(x0.dtype), x0.ndim) for c in self.scalings(sigma64))
        x = x0 + append_dims(sigma64.to(x0.dtype), x0.ndim) * noise
        return (x0 - c_skip * x) / c_out


class EpsDenoiser(Denoiser):
    """A network that predicts the noise eps (Ho et al. 2020, eq. 11)."""

    prediction_type = "eps"

    def scalings(self, sigma):
        return torch.ones_like(sigma), -sigma, alpha_from_sigma(sigma)

    def target(self, x0, noise, sigma):
        return noise


class X0Denoiser(Denoiser):
    """A network that predicts the clean sample x0 directly."""

    prediction_type = "x0"

    def scalings(self, sigma):
        return torch.zeros_like(sigma), torch.ones_like(sigma), alpha_from_sigma(sigma)

    def target(self, x0, noise, sigma):
        return x0


class VDenoiser(Denoiser):
    """A network that predicts v = alpha eps - sigma_vp x0 (Salimans & Ho 2022, Sec. 4)."""

    prediction_type = "v"

    def scalings(self, sigma):
        alpha = alpha_from_sigma(sigma)
        return alpha**2, -vp_sigma_from_sigma(sigma), alpha

    def target(self, x0, noise, sigma):
        sigma64 = batch_sigma(sigma, x0).to(torch.float64)
        alpha = append_dims(alpha_from_sigma(sigma64).to(x0.dtype), x0.ndim)
        sigma_vp = append_dims(vp_sigma_from_sigma(sigma64).to(x0.dtype), x0.ndim)
        return alpha * noise - sigma_vp * x0


class EDMDenoiser(Denoiser):
    """EDM preconditioning (Karras et al. 2022, Table 1, "Ours"); needs no schedule."""

    prediction_type = "edm"

    def __init__(self, model: nn.Module, sigma_data: float = 0.5, schedule=None,
                 learned_variance: bool = False):
        super().__init__(model, schedule=schedule, learned_variance=learned_variance)
        self.sigma_data = sigma_data

    def scalings(self, sigma):
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        return c_skip, c_out, c_in

    def c_noise(self, sigma):
        return sigma.clamp(min=1e-20).log() / 4


PREDICTION_TYPES = {"eps": EpsDenoiser, "x0": X0Denoiser, "v": VDenoiser, "edm": EDMDenoiser}


def make_denoiser(prediction_type: str, model: nn.Module, schedule=None, **kwargs) -> Denoiser:
    """Wrap ``model`` as a denoiser for ``prediction_type`` in ``eps``, ``x0``, ``v``, ``edm``."""
    try:
        cls = PREDICTION_TYPES[prediction_type]
    except KeyError:
        valid = ", ".join(PREDICTION_TYPES)
        raise ValueError(f"unknown prediction type {prediction_type!r}; choose one of {valid}") from None
    if cls is EDMDenoiser:
        return cls(model, schedule=schedule, **kwargs)
    return cls(model, schedule, **kwargs)


def consistency_scalings(sigma: Tensor, sigma_min: float, width: float) -> tuple[Tensor, Tensor]:
    """``(c_skip, c_out)`` of a consistency function (Song et al. 2023, Appendix C, eq. 26 with sigma_data
    replaced by a boundary ``width``): ``c_skip = w^2 / ((sigma - sigma_min)^2 + w^2)``, ``c_out = (sigma -
    sigma_min) / sqrt((sigma - sigma_min)^2 + w^2)``; so ``c_skip = 1, c_out = 0`` at ``sigma_min``."""
    s = sigma - sigma_min
    return width**2 / (s**2 + width**2), s / (s**2 + width**2).sqrt()


class ConsistencyFunction(nn.Module):
    """A consistency model ``f(x, sigma) = c_skip x + c_out D(x, sigma)`` over a denoiser ``D`` (a wrapper
    ``D' = f(D)``, seen by samplers as a denoiser): ``f(x, sigma_min) = x`` exactly, the boundary condition
    of Song et al. 2023 (eq. 3). As in latent consistency models (Luo et al. 2023, eq. 9), ``D`` keeps the
    teacher's parameterization (the student starts as the teacher's x0 estimate) and the narrow ``width``
    (LCM's timestep scaling) makes ``f = D`` everywhere but next to ``sigma_min``."""

    def __init__(self, denoiser: nn.Module, sigma_min: float, width: float = 0.005):
        super().__init__()
        if not (sigma_min >= 0 and width > 0):
            raise ValueError(f"need sigma_min >= 0 and width > 0, got {sigma_min} and {width}")
        self.denoiser, self.sigma_min, self.width = denoiser, float(sigma_min), float(width)

    @property
    def model(self) -> nn.Module:
        return self.denoiser.model

    def forward(self, x: Tensor, sigma, **cond) -> Tensor:
        sigma = batch_sigma(sigma, x) if not isinstance(sigma, Tensor) or sigma.ndim == 0 else sigma
        # sigma_min given in a lower precision (the samplers pass x's dtype) is still the boundary, exactly
        at_min = sigma <= torch.tensor(self.sigma_min, dtype=sigma.dtype)
        sigma64 = torch.where(at_min, self.sigma_min, sigma.to(torch.float64))
        c_skip, c_out = (append_dims(c.to(x.dtype), x.ndim)
                         for c in consistency_scalings(sigma64, self.sigma_min, self.width))
        return c_skip * x + c_out * self.denoiser(x, sigma, **cond)
