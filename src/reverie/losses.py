"""Denoising losses (per sample, shape [B]), their weightings, and noise-level samplers.

Every loss regresses the raw network output F on its target (``Denoiser.target``), so that
``|F - target|^2 = |D - x0|^2 / c_out^2`` (Karras et al. 2022, "EDM", eq. 8). A weighting is a
weight w(sigma) on |D - x0|^2, applied to the F-MSE as ``w(sigma) * c_out(sigma)^2``:

==========  ==========================  ===================================================
weighting   w on |D - x0|^2             weight on the F-MSE
==========  ==========================  ===================================================
simple      1 / c_out^2                 1 (Ho et al. 2020, eq. 14: L_simple)
min_snr     min(snr, gamma)             eps: min(snr,g)/snr, v: min(snr,g)/(snr+1), x0: min(snr,g)
edm         (s^2 + sd^2) / (s sd)^2     lambda c_out^2, which is exactly 1 for EDMDenoiser
==========  ==========================  ===================================================

with snr = alpha^2 / sigma_vp^2 = 1 / sigma^2 in VE coordinates (min-SNR-gamma: Hang et al. 2023,
the weight min(snr, gamma) on the x0-MSE; EDM: Karras et al. 2022, Table 1, lambda(sigma)). For EDMDenoiser
c_out^2 = s^2 sd^2 / (s^2 + sd^2), so lambda c_out^2 = 1: EDM's weighting is plain MSE on F.

Noise-level samplers return a :class:`NoiseLevels` (sigma [B] float64, the integer timestep for
discrete schedules, and an importance weight per sample): multiply the per-sample loss by
``weight`` before averaging. Learned variances are trained with :func:`hybrid_loss` (Nichol &
Dhariwal 2021, Sec. 3.1).

Choices written down here:

* Noise levels must be finite: an infinite ``sigma_{T-1}`` (zero terminal SNR) is drawn as
  ``schedule.sigma_max``, where the network input differs from pure noise by 2**-12 of its norm.
* ``hybrid_loss`` measures L_vlb in bits per dimension and estimates the sum over t by T L_t, so
  ``lambda_vlb = 1e-3`` is the paper's lambda; the mean enters L_vlb through a stop-gradient.
* ``LossAwareTimesteps.update`` takes the unweighted per-sample losses; in multi-process training
  pass the all-gathered losses so that every process keeps the same history.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .likelihood import finite_sigmas, model_log_variance, vlb_term
from .process import ForwardProcess
from .schedules import DiscreteVPSchedule
from .utils import append_dims, mean_flat

__all__ = [
    "WEIGHTINGS",
    "NoiseLevels",
    "loss_weight",
    "denoising_loss",
    "hybrid_loss",
    "UniformTimesteps",
    "LogNormalSigmas",
    "LossAwareTimesteps",
    "pseudo_huber",
]

WEIGHTINGS = ("simple", "min_snr", "edm")


def _sigma64(sigma, batch_size: int, device) -> Tensor:
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=device)
    sigma = sigma.expand(batch_size) if sigma.ndim == 0 else sigma
    if not bool(torch.isfinite(sigma).all()):
        raise ValueError("sigma must be finite; draw an infinite top noise level as schedule.sigma_max")
    return sigma


def loss_weight(denoiser, sigma, weighting: str = "simple", min_snr_gamma: float = 5.0,
                sigma_data: float | None = None) -> Tensor:
    """Weight [B] (float64) on the F-MSE for ``weighting`` (see the module table)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    if weighting == "simple":
        return torch.ones_like(sigma)
    _, c_out, _ = denoiser.scalings(sigma)
    if weighting == "min_snr":  # Hang et al. 2023: min(snr, gamma) on |D - x0|^2
        snr = sigma**-2
        return snr.clamp(max=min_snr_gamma) * c_out**2
    if weighting == "edm":  # Karras et al. 2022, Table 1: lambda(sigma) on |D - x0|^2
        sd = sigma_data if sigma_data is not None else getattr(denoiser, "sigma_data", 0.5)
        lam = (sigma**2 + sd**2) / (sigma * sd) ** 2
        return lam * c_out**2
    raise ValueError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")


def _output_and_mse(denoiser, x0: Tensor, sigma: Tensor, noise: Tensor, cond: dict):
    """Noised input x, the network's mean output, its variance channels (or None), and the F-MSE."""
    x = x0 + append_dims(sigma.to(x0.dtype), x0.ndim) * noise
    out = denoiser.network_output(x, sigma.to(x0.dtype), **cond)
    mean_out, v = out.chunk(2, dim=1) if getattr(denoiser, "learned_variance", False) else (out, None)
    mse = mean_flat((mean_out - denoiser.target(x0, noise, sigma)) ** 2)
    return x, mean_out, v, mse


def denoising_loss(denoiser, x0: Tensor, sigma, noise: Tensor, weighting: str = "simple",
                   min_snr_gamma: float = 5.0, cond: dict | None = None,
                   sigma_data: float | None = None) -> Tensor:
    """Per-sample [B] weighted MSE between F(x0 + sigma noise) and its target (EDM eq. 2 and 8).

    For a learned-variance denoiser only the mean channels enter the MSE.
    """
    sigma = _sigma64(sigma, x0.shape[0], x0.device)
    w = loss_weight(denoiser, sigma, weighting, min_snr_gamma, sigma_data)
    *_, mse = _output_and_mse(denoiser, x0, sigma, noise, cond or {})
    return w.to(mse.dtype) * mse


def hybrid_loss(denoiser, x0: Tensor, t: Tensor, noise: Tensor, lambda_vlb: float = 1e-3,
                weighting: str = "simple", min_snr_gamma: float = 5.0, cond: dict | None = None,
                return_terms: bool = False):
    """L_hybrid = L_simple + lambda L_vlb per sample [B] (Nichol & Dhariwal 2021, eq. 16).

    L_vlb = T L_t in bits/dim: the KL term at the integer timestep t (decoder NLL at t = 0), with
    the model's mean behind a stop-gradient so that only the variance learns from it. With
    ``return_terms=True`` returns ``(total, l_simple, l_vlb)``.
    """
    schedule = getattr(denoiser, "schedule", None)
    if not isinstance(schedule, DiscreteVPSchedule) or not getattr(denoiser, "learned_variance", False):
        raise ValueError("hybrid_loss needs a learned-variance denoiser over a DiscreteVPSchedule")
    t = t.long().to(x0.device)
    sigma = finite_sigmas(schedule).to(x0.device)[t]
    x, mean_out, v, mse = _output_and_mse(denoiser, x0, sigma, noise, cond or {})
    l_simple = loss_weight(denoiser, sigma, weighting, min_snr_gamma).to(mse.dtype) * mse
    c_skip, c_out, _ = (append_dims(c, x0.ndim) for c in denoiser.scalings(sigma))
    x0_hat = c_skip * x.to(torch.float64) + c_out * mean_out.detach().to(torch.float64)
    process = ForwardProcess(schedule)
    x0_64 = x0.to(torch.float64)
    x_t = process.q_sample(x0_64, t, noise.to(torch.float64))
    logvar = model_log_variance(process, t, "learned", x_t, frac=(v.to(torch.float64) + 1) / 2)
    bits_per_dim = vlb_term(process, x0_64, x_t, t, x0_hat, logvar) / (x0[0].numel() * math.log(2.0))
    l_vlb = (schedule.num_timesteps * bits_per_dim).to(mse.dtype)
    total = l_simple + lambda_vlb * l_vlb
    return (total, l_simple, l_vlb) if return_terms else total


def pseudo_huber(a: Tensor, b: Tensor, c: float | None = None) -> Tensor:
    """Per-sample pseudo-Huber distance ``sqrt(|a - b|^2 + c^2) - c`` over all but the batch dim (Song &
    Dhariwal 2023, "improved consistency training", Sec. 3.3), with their ``c = 0.00054 sqrt(d)`` for d
    dimensions by default; computed in float32."""
    diff = (a.float() - b.float()).reshape(a.shape[0], -1)
    if c is None:
        c = 0.00054 * math.sqrt(diff.shape[1])
    return (diff.square().sum(dim=1) + c * c).sqrt() - c


@dataclass
class NoiseLevels:
    """A batch of training noise levels: VE ``sigma`` [B] (float64), the integer timestep ``t`` [B]
    for discrete schedules (else None), and importance ``weight`` [B] (float64) for the loss."""

    sigma: Tensor
    t: Tensor | None
    weight: Tensor


def _discrete(schedule) -> DiscreteVPSchedule:
    if not isinstance(schedule, DiscreteVPSchedule):
        raise ValueError(f"a DiscreteVPSchedule is required, got {type(schedule).__name__}")
    return schedule


class UniformTimesteps:
    """t ~ U{0, ..., T-1}, sigma = sigma_t (Ho et al. 2020, Algorithm 1); inf sigma -> sigma_max."""

    def __init__(self, schedule: DiscreteVPSchedule):
        self.schedule = _discrete(schedule)
        self.sigmas = finite_sigmas(schedule)

    def __call__(self, batch_size: int, generator: torch.Generator) -> NoiseLevels:
        T = self.schedule.num_timesteps
        t = torch.randint(0, T, (batch_size,), generator=generator, device=generator.device)
        sigma = self.sigmas.to(t.device)[t]
        return NoiseLevels(sigma, t, torch.ones_like(sigma))


class LogNormalSigmas:
    """ln sigma ~ N(p_mean, p_std^2) (Karras et al. 2022, Table 1, training)."""

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2):
        self.p_mean, self.p_std = p_mean, p_std

    def __call__(self, batch_size: int, generator: torch.Generator) -> NoiseLevels:
        z = torch.randn(batch_size, generator=generator, device=generator.device, dtype=torch.float64)
        sigma = (self.p_mean + self.p_std * z).exp()
        return NoiseLevels(sigma, None, torch.ones_like(sigma))


class LossAwareTimesteps:
    """Importance-sampled timesteps, p_t ∝ sqrt(E[L_t^2]) (Nichol & Dhariwal 2021, Sec. 3.3).

    Uniform until every t has ``history`` recorded losses; then p_t from the last ``history``
    losses per t, mixed with ``uniform_prob`` of the uniform distribution so every t keeps being
    visited. The weight 1 / (T p_t) makes ``weight * L_t`` an unbiased estimate of the mean of L_t.
    """

    def __init__(self, schedule: DiscreteVPSchedule, history: int = 10, uniform_prob: float = 1e-3):
        self.schedule = _discrete(schedule)
        self.sigmas = finite_sigmas(schedule)
        T = schedule.num_timesteps
        self.uniform_prob = uniform_prob
        self.losses = torch.zeros(T, history, dtype=torch.float64)  # oldest first
        self.counts = torch.zeros(T, dtype=torch.long)

    @property
    def ready(self) -> bool:
        return bool((self.counts == self.losses.shape[1]).all())

    def probabilities(self) -> Tensor:
        """p_t [T] (float64)."""
        T = self.schedule.num_timesteps
        if not self.ready:
            return torch.full((T,), 1.0 / T, dtype=torch.float64)
        p = self.losses.pow(2).mean(dim=1).sqrt()
        p = p / p.sum()
        return p * (1 - self.uniform_prob) + self.uniform_prob / T

    def __call__(self, batch_size: int, generator: torch.Generator) -> NoiseLevels:
        p = self.probabilities().to(generator.device)
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        sigma = self.sigmas.to(t.device)[t]
        return NoiseLevels(sigma, t, 1.0 / (len(p) * p[t]))

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Record the unweighted per-sample losses [B] seen at timesteps t [B]."""
        K = self.losses.shape[1]
        for ti, li in zip(t.tolist(), losses.detach().to("cpu", torch.float64).tolist()):
            if self.counts[ti] == K:
                self.losses[ti] = self.losses[ti].roll(-1)
                self.losses[ti, -1] = li
            else:
                self.losses[ti, self.counts[ti]] = li
                self.counts[ti] += 1

    def state_dict(self) -> dict:
        return {"losses": self.losses.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.losses.copy_(state["losses"])
        self.counts.copy_(state["counts"])
