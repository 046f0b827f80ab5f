"""MuLAN: an input-adaptive, per-pixel noise schedule with an auxiliary latent (Sahoo et al., NeurIPS 2024,
"Diffusion Models With Learned Adaptive Noise"), built on VDM's continuous-time machinery (``reverie.vdm``).

The forward process noises each dimension i at its own rate: z_t,i = alpha_t,i x_i + sigma_t,i eps_i with
alpha^2 = sigmoid(-gamma_i), sigma^2 = sigmoid(gamma_i), where gamma_i(c, t) depends on an auxiliary latent c
drawn from an encoder q(c | x) = N(mu(x), diag(var(x))) with prior p(c) = N(0, I). The model is
p(x) = int p(c) p(x | c) dc, and its negative ELBO (MuLAN Sec. 3 and App.; VDM eq. 11 per dimension) is, in
nats summed over dims,

    latent          KL(q(c | x) || N(0, I))                 = 0.5 sum(mu^2 + var - log var - 1)
    prior           KL(q(z_1 | x, c) || N(0, I))            (vdm.prior_kl at gamma_1)
    reconstruction  -log p(x | z_0, c)                       (vdm.reconstruction_nll at gamma_0)
    diffusion       0.5 E_t,eps [sum_i gamma_i'(c, t) (eps_i - eps_hat_i)^2]

With one gamma for every dimension the diffusion term is VDM's and depends on the schedule only through its
endpoints; with gamma per dimension and per input it is a line integral of a non-conservative field and the
schedule's shape changes the bound itself (MuLAN's point), so every parameter here follows the ELBO's
gradient (no variance trick).

Choices written down here:

* ``PolynomialGamma`` is MuLAN's polynomial schedule with fixed ends: gamma_i(c, t) = gamma_0 +
  (gamma_1 - gamma_0) f_i(t) / f_i(1), f_i'(t) = (a_i t^2 + b_i t + c_i)^2 >= 0, so each pixel's schedule is
  increasing by construction and all pixels share the endpoints. (a, b, c) per pixel come from a two-layer MLP
  of the latent; c = 1e-3 + softplus(.) > 0 keeps f_i(1) > 0. The head starts at a = b = 0, c = 1: the
  linear-in-gamma schedule, VDM's start. gamma'(t) is the closed form, not autograd. All float64. ``speed``
  multiplies the schedule's learning rate (its parameters are stored divided by it), as ``vdm.GammaNetwork``'s.
* The shared, fixed endpoints (VDM's initial -13.3, 5) make the prior and reconstruction terms VDM's.
* ``LatentEncoder``: two stride-2 convolutions and a linear head to (mu, softplus(.) variance); the head starts
  at zero weights with var = 1, so q(c | x) = p(c) and the latent term is 0 at initialization.
* The eps network is reverie's U-Net conditioned on the latent (``pooled``, MuLAN conditions its denoiser on the
  latent too), on the per-pixel gamma map as an extra input (``spatial``, normalized to [-1, 1] over
  ``vdm.GAMMA_REF``), and on the mean gamma through the usual noise embedding (``vdm.c_noise_from_gamma``).

Sampling through the denoiser view (:class:`MuLANDenoiser`). Samplers move a scalar sigma; here every pixel has
its own sigma_i(t) = exp(gamma_i(c, t) / 2). The view's scalar is a reference noise level s(t) on the
linear-in-gamma schedule between the shared endpoints (``MuLANNet.schedule_view``), so t = (2 log s - gamma_0) /
(gamma_1 - gamma_0). The probability-flow ODE of the per-pixel process in VE coordinates is
dx_i/dt = (gamma_i'(t) / 2) (x_i - D_i(x, t)) (Tweedie with a diagonal covariance); in the reference level it
reads dx/ds = (x - D'(x, s)) / s, the scalar VE ODE every sampler integrates, with

    D'_i = x_i - r_i (x_i - D_i),   r_i = gamma_i'(t) / (gamma_1 - gamma_0).

So any deterministic sampler (euler, heun, dpmpp_2m, unipc, ddim with eta 0) integrates MuLAN's ODE exactly in
the limit of small steps. At s = sigma_min every pixel has the same noise sigma_min (shared endpoints) and the view
returns D itself (r = 1): the samplers' final jump to sigma = 0 is the usual denoising step. Stochastic samplers
(ancestral, SDE) add isotropic noise and are only approximate for a per-pixel process. The latent of each image
is drawn from its prior N(0, I) (``MuLANNet.prior_condition``, seeded by the sampling seed) and passed as the
condition ``latent``; its schedule then stays fixed for that image's whole trajectory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .utils import append_dims
from .vdm import (
    GAMMA_REF,
    ELBOTerms,
    FixedGamma,
    VDMScheduleView,
    c_noise_from_gamma,
    prior_kl,
    reconstruction_nll,
    sample_times,
)

__all__ = ["PolynomialGamma", "LatentEncoder", "MuLANNet", "MuLANDenoiser", "MuLANTerms", "gaussian_kl",
           "per_pixel_diffusion_loss", "negative_elbo"]

_C_FLOOR = 1e-3


class PolynomialGamma(nn.Module):
    """gamma(c, t) [B, P] per pixel: MuLAN's monotone polynomial with fixed, shared endpoints (module docstring)."""

    def __init__(self, num_pixels: int, latent_dim: int, hidden: int = 64,
                 gamma_min: float = GAMMA_REF[0], gamma_max: float = GAMMA_REF[1], speed: float = 1.0):
        super().__init__()
        if not gamma_min < gamma_max:
            raise ValueError(f"need gamma_min < gamma_max, got {gamma_min} and {gamma_max}")
        if not speed > 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        self.num_pixels, self.gamma_min, self.gamma_max = num_pixels, float(gamma_min), float(gamma_max)
        self.speed = float(speed)
        f64 = dict(dtype=torch.float64)
        self.l1, self.l2 = nn.Linear(latent_dim, hidden, **f64), nn.Linear(hidden, hidden, **f64)
        self.head = nn.Linear(hidden, 3 * num_pixels, **f64)
        with torch.no_grad():  # a = b = 0, c = 1: linear in gamma at the start
            self.head.weight.zero_()
            self.head.bias.zero_()
            self.head.bias[2 * num_pixels:] = math.log(math.expm1(1 - _C_FLOOR))
            # stored as weight / speed and used as speed x stored: Adam moves each stored value by about lr a
            # step, so the schedule learns speed x faster (vdm.GammaNetwork's learning-rate multiplier)
            for p in self.parameters():
                p.div_(self.speed)

    def _linear(self, layer: nn.Linear, x: Tensor) -> Tensor:
        return F.linear(x, layer.weight * self.speed, layer.bias * self.speed)

    def coefficients(self, latent: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = F.silu(self._linear(self.l2, F.silu(self._linear(self.l1, latent.to(torch.float64)))))
        a, b, c = self._linear(self.head, h).chunk(3, dim=-1)
        return a, b, _C_FLOOR + F.softplus(c)

    @staticmethod
    def _integral(a: Tensor, b: Tensor, c: Tensor, t: Tensor) -> Tensor:
        """f(t) = int_0^t (a u^2 + b u + c)^2 du."""
        return (a * a * t**5 / 5 + a * b * t**4 / 2 + (b * b + 2 * a * c) * t**3 / 3 + b * c * t**2 + c * c * t)

    def forward(self, latent: Tensor, t: Tensor) -> Tensor:
        return self.with_derivative(latent, t)[0]

    def with_derivative(self, latent: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """gamma(c, t) and d gamma / dt, each [B, P] (float64); t [B] in [0, 1]."""
        a, b, c = self.coefficients(latent)
        t = t.to(torch.float64).reshape(-1, 1)
        scale = (self.gamma_max - self.gamma_min) / self._integral(a, b, c, torch.ones_like(t))
        gamma = self.gamma_min + scale * self._integral(a, b, c, t)
        return gamma, scale * (a * t * t + b * t + c) ** 2


class LatentEncoder(nn.Module):
    """q(c | x) = N(mu, diag(var)) from an image: (mu, var), each [B, latent_dim]."""

    def __init__(self, channels: int, resolution: int, latent_dim: int, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.head = nn.Linear(2 * width * math.ceil(resolution / 4) ** 2, 2 * latent_dim)
        with torch.no_grad():  # q(c | x) = N(0, I) = p(c) at the start
            self.head.weight.zero_()
            self.head.bias.zero_()
            self.head.bias[latent_dim:] = math.log(math.expm1(1.0))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = F.silu(self.conv2(F.silu(self.conv1(x))))
        mu, raw = self.head(h.flatten(1)).float().chunk(2, dim=-1)
        return mu, F.softplus(raw) + 1e-6


def gaussian_kl(mu: Tensor, var: Tensor) -> Tensor:
    """KL(N(mu, diag(var)) || N(0, I)) [B] in nats (MuLAN's latent term)."""
    mu, var = mu.to(torch.float64), var.to(torch.float64)
    return 0.5 * (mu * mu + var - var.log() - 1).sum(-1)


def per_pixel_diffusion_loss(noise: Tensor, eps_hat: Tensor, dgamma: Tensor) -> Tensor:
    """0.5 sum_i gamma_i'(t) (eps_i - eps_hat_i)^2 [B] in nats (``dgamma`` broadcasts against the images)."""
    err = (noise.to(torch.float64) - eps_hat.to(torch.float64)) ** 2
    return 0.5 * (dgamma.to(torch.float64) * err).reshape(err.shape[0], -1).sum(-1)


class MuLANNet(nn.Module):
    """An eps network with MuLAN's latent encoder and per-pixel schedule: saved as one module (``net.*``,
    ``gamma.*``, ``latent_encoder.*``); ``mulan_config`` travels in the model directory's ``config.json``."""

    def __init__(self, net: nn.Module, image_shape: tuple[int, int, int], latent_dim: int = 8, hidden: int = 64,
                 encoder_width: int = 16, gamma_min: float = GAMMA_REF[0], gamma_max: float = GAMMA_REF[1],
                 speed: float = 1.0):
        super().__init__()
        self.net, self.image_shape, self.latent_dim = net, tuple(image_shape), latent_dim
        self.gamma = PolynomialGamma(math.prod(image_shape), latent_dim, hidden, gamma_min, gamma_max, speed)
        self.latent_encoder = LatentEncoder(image_shape[0], image_shape[-1], latent_dim, encoder_width)
        self._settings = {"image_shape": list(image_shape), "latent_dim": latent_dim, "hidden": hidden,
                          "encoder_width": encoder_width, "gamma_min": gamma_min, "gamma_max": gamma_max,
                          "speed": speed}

    @property
    def config(self):
        return self.net.config

    def mulan_config(self) -> dict:
        return dict(self._settings)

    @property
    def schedule_view(self) -> VDMScheduleView:
        """The reference schedule samplers step along: linear in gamma between the shared endpoints."""
        return VDMScheduleView(FixedGamma("linear", self.gamma.gamma_min, self.gamma.gamma_max))

    def gamma_map(self, latent: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """gamma and gamma' shaped like the images [B, C, H, W] (float64)."""
        gamma, dgamma = self.gamma.with_derivative(latent, t)
        shape = (-1, *self.image_shape)
        return gamma.reshape(shape), dgamma.reshape(shape)

    def forward(self, x_vp: Tensor, gamma: Tensor, latent: Tensor) -> Tensor:
        """eps_hat for the VP latent ``x_vp`` at the per-pixel ``gamma`` map, conditioned on ``latent``."""
        mean = gamma.reshape(gamma.shape[0], -1).mean(-1)
        spatial = 2 * (gamma - GAMMA_REF[0]) / (GAMMA_REF[1] - GAMMA_REF[0]) - 1
        return self.net(x_vp, c_noise_from_gamma(mean).to(x_vp.dtype), pooled=latent.to(x_vp.dtype),
                        spatial=spatial.to(x_vp.dtype))

    def prior_condition(self, num_images: int, seed: int) -> dict:
        """Each image's latent drawn from the prior N(0, I), seeded (the generative model's first step)."""
        g = torch.Generator().manual_seed(seed + 7919)
        latent = torch.randn(num_images, self.latent_dim, generator=g)
        return {"latent": latent.to(next(self.parameters()).device)}

    def denoiser_view(self) -> MuLANDenoiser:
        return MuLANDenoiser(self)


class MuLANDenoiser:
    """``D'(x, s, latent=c)``: MuLAN's per-pixel process seen by samplers at a scalar reference level s
    (module docstring): D'_i = x_i - r_i (x_i - D_i), r_i = gamma_i'(t) / (gamma_1 - gamma_0), r = 1 at t = 0."""

    def __init__(self, net: MuLANNet):
        self.net = net

    def __call__(self, x: Tensor, sigma: Tensor, latent: Tensor | None = None, **cond) -> Tensor:
        if latent is None:
            raise ValueError("a MuLAN model needs its latent: pass latent= (reverie draws it from the prior)")
        g0, g1 = self.net.gamma.gamma_min, self.net.gamma.gamma_max
        s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).expand(x.shape[0])
        t = ((2 * s.log() - g0) / (g1 - g0)).clamp(0, 1)
        gamma, dgamma = self.net.gamma_map(latent, t)
        x64 = x.to(torch.float64)
        alpha = torch.sigmoid(-gamma).sqrt()
        eps_hat = self.net(x64.mul(alpha).to(x.dtype), gamma, latent).to(torch.float64)
        ratio = torch.where(append_dims(t <= 1e-9, gamma.ndim), torch.ones_like(dgamma), dgamma / (g1 - g0))
        return (x64 - ratio * torch.exp(gamma / 2) * eps_hat).to(x.dtype)


@dataclass
class MuLANTerms(ELBOTerms):
    """VDM's three terms plus the latent's KL [B] (nats)."""

    latent: Tensor

    @property
    def total(self) -> Tensor:
        return self.prior + self.reconstruction + self.diffusion + self.latent


def negative_elbo(model: MuLANNet, x0: Tensor, generator: torch.Generator, antithetic: bool = True,
                  num_levels: int = 256) -> MuLANTerms:
    """One-sample estimate of MuLAN's negative ELBO of ``x0`` (levels in [-1, 1]): c ~ q(c | x0)
    (reparameterized), one t and eps per image. Differentiable in every parameter; draws from ``generator`` (CPU)
    in a fixed order (t, eps, eps_0, c's noise)."""
    B, device = x0.shape[0], x0.device
    t = sample_times(B, generator, antithetic).to(device)
    noise = torch.randn(x0.shape, generator=generator).to(device, x0.dtype)
    noise_0 = torch.randn(x0.shape, generator=generator, dtype=torch.float64).to(device)
    mu, var = model.latent_encoder(x0)
    latent = mu + var.sqrt() * torch.randn(mu.shape, generator=generator).to(device, mu.dtype)
    gamma, dgamma = model.gamma_map(latent, t)
    alpha, sigma = torch.sigmoid(-gamma).sqrt().to(x0.dtype), torch.sigmoid(gamma).sqrt().to(x0.dtype)
    eps_hat = model(alpha * x0 + sigma * noise, gamma, latent)
    g0 = torch.tensor(model.gamma.gamma_min, dtype=torch.float64)
    g1 = torch.tensor(model.gamma.gamma_max, dtype=torch.float64)
    return MuLANTerms(prior_kl(x0, g1), reconstruction_nll(x0, g0, noise_0, num_levels),
                      per_pixel_diffusion_loss(noise, eps_hat, dgamma), x0[0].numel(), gaussian_kl(mu, var))
