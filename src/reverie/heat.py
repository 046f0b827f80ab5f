"""Heat-equation diffusion: the heat equation on images, inverse heat dissipation (IHDM; Rissanen et al.
2023, "Generative Modelling With Inverse Heat Dissipation") and blurring diffusion (Hoogeboom & Salimans
2023, "Blurring Diffusion Models").

**The PDE.** The forward process is u_t = Laplacian(u) on each image channel with Neumann (zero-flux)
boundaries. In the DCT-II basis (orthonormal, the Laplacian's eigenbasis under those boundaries) the
solution is exact: the coefficient of frequency (k, l) decays as exp(-lambda_kl t), with
lambda_kl = pi^2 (k^2 / H^2 + l^2 / W^2) for the continuous Laplacian on [0, H] x [0, W] (IHDM eq. 4,
``laplacian="continuous"``), or 4 sin^2(pi k / 2H) + 4 sin^2(pi l / 2W) for the 5-point finite-difference
Laplacian with mirrored boundary pixels (``"discrete"``). Blurring for time t equals a Gaussian blur of
width sigma_B = sqrt(2 t) (IHDM: t = sigma_B^2 / 2).

**IHDM** (:class:`IHDM`). Levels k = 0..K with t_0 = 0 and blur widths sigma_B,k log-spaced from
``blur_min`` (0.5) to ``blur_max`` (20) for k = 1..K. Training draws k, the input u_k = heat(x0, t_k) +
delta eps (delta = 0.01) and regresses the network's residual f(u_k, k) on heat(x0, t_{k-1}) - u_k (their
eq. 8: the less blurred, noise-free image). Sampling (their Alg. 2): u_{k-1} = u_k + f(u_k, k) + delta_s
eps for k = K..1, starting from a maximally blurred training image plus noise. Two mismatches of the
published code are avoided, and the choice is written here:

* training draws k uniformly from {1, ..., K}, the top level included (the code's ``randint(1, K)``
  never drew k = K, where sampling starts);
* the prior is heat(x, t_K) + delta eps, the distribution the network saw at level K in training (the
  code started from the blurred image without noise, an input it never trained on).

The last sampling step (k = 1) adds no noise, so the output is the network's noise-free estimate.

**Blurring diffusion** (:class:`BlurringSchedule`). Gaussian diffusion in DCT space with a per-frequency
signal scale: u_t = alpha_t d_t u_0 + sigma_t eps, with the cosine schedule alpha_t = cos(pi t / 2),
sigma_t = sin(pi t / 2), and d_t = (1 - d_min) exp(-lambda tau_t) + d_min, tau_t = sigma_B(t)^2 / 2 with
the blur width sigma_B(t) = sigma_B,max sin^2(pi t / 2) (their Sec. 4 and appendix code; sigma_B,max = 20,
d_min = 0.001). Earlier reverie commits used sigma_B,max sin(pi t / 2), which blurs more at every t
in (0, 1) than the paper (at t = 0.5, width 14.1 instead of 10). The network predicts eps (white
noise is white in both bases: the DCT is orthonormal); sampling is the ancestral step of their Sec. 3.2,
per frequency: alpha_{t|s} = a_t / a_s, sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2, mean
(alpha_{t|s} sigma_s^2 / sigma_t^2) u_t + (a_s sigma_{t|s}^2 / sigma_t^2) u0_hat, variance
sigma_{t|s}^2 sigma_s^2 / sigma_t^2, with a_t = alpha_t d_t and u0_hat from the eps prediction, clipped to
[-1, 1] in pixel space (``clip=True``), as DDPM's sampler does, because dividing by a_t amplifies the
high frequencies' error by up to 1 / d_min.

Everything here is float64 inside; images are [B, C, H, W].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from .utils import append_dims

__all__ = ["dct_matrix", "dct2", "idct2", "eigenvalues", "heat", "IHDM", "BlurringSchedule", "ihdm_sample",
           "blurring_sample", "dct_bounds", "LAPLACIANS"]

LAPLACIANS = ("continuous", "discrete")


@lru_cache(maxsize=16)
def _dct_matrix(n: int) -> Tensor:
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None]
    m = torch.cos(math.pi * k * (2 * i + 1) / (2 * n)) * math.sqrt(2 / n)
    m[0] /= math.sqrt(2)
    return m


def dct_matrix(n: int) -> Tensor:
    """The orthonormal DCT-II matrix [n, n] (float64): row k is the k-th cosine basis vector."""
    return _dct_matrix(n).clone()


def dct2(x: Tensor) -> Tensor:
    """2-D orthonormal DCT-II over the last two dims (in x's dtype)."""
    h, w = _dct_matrix(x.shape[-2]).to(x), _dct_matrix(x.shape[-1]).to(x)
    return h @ x @ w.T


def idct2(u: Tensor) -> Tensor:
    """Inverse of :func:`dct2`."""
    h, w = _dct_matrix(u.shape[-2]).to(u), _dct_matrix(u.shape[-1]).to(u)
    return h.T @ u @ w


def eigenvalues(height: int, width: int, laplacian: str = "continuous") -> Tensor:
    """lambda_kl [H, W] (float64) of -Laplacian with Neumann boundaries (module docstring)."""
    k = torch.arange(height, dtype=torch.float64)[:, None]
    lk = torch.arange(width, dtype=torch.float64)[None]
    if laplacian == "continuous":
        return math.pi**2 * (k**2 / height**2 + lk**2 / width**2)
    if laplacian == "discrete":
        return 4 * torch.sin(math.pi * k / (2 * height)) ** 2 + 4 * torch.sin(math.pi * lk / (2 * width)) ** 2
    raise ValueError(f"unknown laplacian {laplacian!r}; choose one of {', '.join(LAPLACIANS)}")


def heat(x: Tensor, t, laplacian: str = "continuous") -> Tensor:
    """The heat equation's solution at time t (scalar or [B]) from x [B, C, H, W]: exp(-lambda t) per frequency."""
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
    lam = eigenvalues(x.shape[-2], x.shape[-1], laplacian).to(x.device)
    decay = torch.exp(-lam * append_dims(t, x.ndim) if t.ndim else -lam * t)
    return idct2(dct2(x.to(torch.float64)) * decay).to(x.dtype)


@dataclass
class IHDM:
    """Inverse heat dissipation's forward process, loss and levels (module docstring)."""

    num_levels: int = 100         # K
    blur_min: float = 0.5
    blur_max: float = 20.0
    noise: float = 0.01           # delta: training noise, and the prior's
    laplacian: str = "continuous"

    def __post_init__(self):
        if self.num_levels < 1 or not 0 < self.blur_min <= self.blur_max or self.noise < 0:
            raise ValueError("IHDM needs num_levels >= 1, 0 < blur_min <= blur_max and noise >= 0")

    def times(self) -> Tensor:
        """t_k for k = 0..K [K + 1] (float64): t_0 = 0, t_k = sigma_B,k^2 / 2 with sigma_B log-spaced."""
        blur = torch.exp(torch.linspace(math.log(self.blur_min), math.log(self.blur_max), self.num_levels,
                                        dtype=torch.float64))
        return torch.cat([torch.zeros(1, dtype=torch.float64), blur**2 / 2])

    def blur(self, x0: Tensor, k) -> Tensor:
        """heat(x0, t_k) for a level k (int or [B] long)."""
        t = self.times()[torch.as_tensor(k, dtype=torch.long)]
        return heat(x0, t, self.laplacian)

    def draw_levels(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """k ~ U{1, ..., K}, the top level included."""
        return torch.randint(1, self.num_levels + 1, (batch_size,), generator=generator, device=generator.device)

    def training_pair(self, x0: Tensor, k: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """(input u_k = heat(x0, t_k) + delta noise, target heat(x0, t_{k-1}))."""
        return self.blur(x0, k) + self.noise * noise, self.blur(x0, k - 1)

    def c_noise(self, k: Tensor) -> Tensor:
        """The network's level input: 1000 k / K (the scale of DDPM's timestep embedding)."""
        return k.to(torch.float32) * (1000.0 / self.num_levels)

    def loss(self, net: Callable, x0: Tensor, k: Tensor, noise: Tensor, **cond) -> Tensor:
        """Per-sample MSE [B] of u_k + f(u_k, k) against heat(x0, t_{k-1}) (IHDM eq. 8, residual form)."""
        u_k, target = self.training_pair(x0, k, noise)
        pred = u_k + net(u_k, self.c_noise(k).to(x0.device), **cond)
        return (pred - target).pow(2).reshape(x0.shape[0], -1).mean(1)

    def prior(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Start states: the images blurred to level K plus delta noise (the training input at level K)."""
        k = torch.full((images.shape[0],), self.num_levels, dtype=torch.long)
        noise = torch.randn(images.shape, generator=generator, dtype=torch.float64).to(images.device, images.dtype)
        return self.blur(images, k) + self.noise * noise


@torch.no_grad()
def ihdm_sample(net: Callable, u: Tensor, process: IHDM, generator: torch.Generator | None = None,
                sampling_noise: float | None = None, callback=None, cond: dict | None = None) -> Tensor:
    """IHDM's noisy sampler (Rissanen et al. 2023, Alg. 2) from level-K states ``u``: u <- u + f(u, k) +
    delta_s eps for k = K..1, no noise on the last step. ``sampling_noise`` defaults to the training noise;
    ``callback(k, u)`` sees each new state (level k - 1). NFE = K."""
    delta = process.noise if sampling_noise is None else sampling_noise
    for k in range(process.num_levels, 0, -1):
        level = torch.full((u.shape[0],), k, dtype=torch.long)
        u = u + net(u, process.c_noise(level).to(u.device), **(cond or {}))
        if k > 1 and delta > 0:
            u = u + delta * torch.randn(u.shape, generator=generator, device=u.device, dtype=u.dtype)
        if callback is not None:
            callback(k - 1, u)
    return u


@dataclass
class BlurringSchedule:
    """Blurring diffusion's per-frequency alpha and sigma (module docstring), t in [0, 1]."""

    blur_max: float = 20.0      # sigma_B,max
    d_min: float = 0.001
    t_min: float = 1e-3
    t_max: float = 0.999        # alpha_t = cos(pi t / 2) is 0 at t = 1
    laplacian: str = "continuous"

    def alpha_sigma(self, t) -> tuple[Tensor, Tensor]:
        """Scalar alpha_t, sigma_t (float64, shape of t) of the cosine schedule."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return torch.cos(math.pi * t / 2), torch.sin(math.pi * t / 2)

    def dissipation(self, t, height: int, width: int) -> Tensor:
        """d_t [..., H, W] = (1 - d_min) exp(-lambda tau_t) + d_min, tau_t = sigma_B(t)^2 / 2 with the paper's
        blur width sigma_B(t) = sigma_B,max sin^2(pi t / 2)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        tau = (self.blur_max * torch.sin(math.pi * t / 2) ** 2) ** 2 / 2
        lam = eigenvalues(height, width, self.laplacian)
        return (1 - self.d_min) * torch.exp(-lam * tau[..., None, None]) + self.d_min

    def coefficients(self, t, height: int, width: int) -> tuple[Tensor, Tensor]:
        """(a_t = alpha_t d_t [..., H, W], sigma_t [..., 1, 1]) for t scalar or [B]."""
        alpha, sigma = self.alpha_sigma(t)
        return alpha[..., None, None] * self.dissipation(t, height, width), sigma[..., None, None]

    def noised(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = IDCT(a_t DCT(x0) + sigma_t DCT(noise)) = IDCT(a_t DCT(x0)) + sigma_t noise, for t [B]."""
        a, s = self.coefficients(t.to(torch.float64).cpu(), x0.shape[-2], x0.shape[-1])
        a, s = a[:, None].to(x0.device), s[:, None].to(x0.device)  # [B, 1, H, W]: every channel alike
        return (idct2(a * dct2(x0.to(torch.float64))) + s * noise.to(torch.float64)).to(x0.dtype)

    def posterior(self, u_t: Tensor, u0: Tensor, t, s) -> tuple[Tensor, Tensor]:
        """Mean and std of q(u_s | u_t, u0) per frequency (DCT coefficients [..., H, W]; t > s scalars)."""
        H, W = u_t.shape[-2:]
        a_t, sig_t = self.coefficients(t, H, W)
        a_s, sig_s = self.coefficients(s, H, W)
        alpha_ts = a_t / a_s
        var_ts = sig_t**2 - alpha_ts**2 * sig_s**2
        mean = alpha_ts * sig_s**2 / sig_t**2 * u_t + a_s * var_ts / sig_t**2 * u0
        return mean, (var_ts.clamp(min=0) * sig_s**2 / sig_t**2).sqrt()

    def draw_times(self, batch_size: int, generator: torch.Generator) -> Tensor:
        u = torch.rand(batch_size, generator=generator, device=generator.device, dtype=torch.float64)
        return self.t_min + (self.t_max - self.t_min) * u

    @staticmethod
    def c_noise(t: Tensor) -> Tensor:
        """The network's time input 1000 t."""
        return (t * 1000.0).to(torch.float32)

    def loss(self, net: Callable, x0: Tensor, t: Tensor, noise: Tensor, **cond) -> Tensor:
        """Per-sample eps-MSE [B] (their Sec. 3: the usual simple loss, here with per-frequency signal)."""
        x_t = self.noised(x0, t, noise)
        eps = net(x_t, self.c_noise(t).to(x0.device), **cond)
        return (eps - noise).pow(2).reshape(x0.shape[0], -1).mean(1)


def dct_bounds(images: Tensor, width: float = 3.0) -> tuple[Tensor, Tensor]:
    """Per-frequency bounds [H, W] (float64) of images [B, C, H, W]: mean -+ ``width`` std of each DCT coefficient
    (for ``blurring_sample``'s ``u0_bounds``)."""
    u = dct2(images.to(torch.float64)).flatten(0, 1)
    mean, std = u.mean(0), u.std(0)
    return mean - width * std, mean + width * std


@torch.no_grad()
def blurring_sample(net: Callable, noise: Tensor, schedule: BlurringSchedule, steps: int,
                    generator: torch.Generator | None = None, clip: bool = True, callback=None,
                    cond: dict | None = None, u0_bounds: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Ancestral sampling (Hoogeboom & Salimans 2023, Sec. 3.2) from x_{t_max} = noise (sigma_{t_max} ~ 1)
    over ``steps`` uniform steps in t down to 0; ``callback(i, x0_hat)`` sees each step's estimate. NFE = steps.

    ``u0_bounds`` (lo, hi) [H, W] (:func:`dct_bounds` of training images) clips the x0 estimate per DCT coefficient
    before the pixel clip. Why: u0 = (u_t - sigma_t eps_hat) / a_t multiplies the eps error by sigma_t / a_t, up to
    1 / (alpha_t d_min) in the frequencies blurred to the floor; after 600 training steps on MNIST that put the
    x0 estimate's RMS error at 15 to 2000 for t >= 0.3, which a clip in pixel space turns into salt and pepper."""
    B, _, H, W = noise.shape
    ts = torch.linspace(schedule.t_max, 0.0, steps + 1, dtype=torch.float64)
    u = dct2(noise.to(torch.float64)) * schedule.alpha_sigma(ts[0])[1]
    if u0_bounds is not None:  # once, not per step: the bounds in the sampler's dtype and device
        lo, hi = (b.to(u) for b in u0_bounds)
    for i in range(steps):
        t, s = ts[i], ts[i + 1]
        a_t, sig_t = schedule.coefficients(t, H, W)
        a_s, sig_s = schedule.coefficients(s, H, W)
        x_t = idct2(u).to(noise.dtype)
        eps = net(x_t, schedule.c_noise(t.expand(B)).to(noise.device), **(cond or {})).to(torch.float64)
        u0 = (u - sig_t * dct2(eps)) / a_t
        if u0_bounds is not None:
            u0 = u0.clamp(lo, hi)
        x0_hat = idct2(u0)
        if clip:
            x0_hat = x0_hat.clamp(-1, 1)
            u0 = dct2(x0_hat)
        if callback is not None:
            callback(i, x0_hat.to(noise.dtype))
        if float(s) == 0.0:
            u = u0
            break
        mean, std = schedule.posterior(u, u0, t, s)
        z = torch.randn(u.shape, generator=generator, dtype=torch.float64).to(u.device)
        u = mean + std * z
    return idct2(u).to(noise.dtype)
