"""PFGM++: Poisson flow generative models in N + D dimensions (Xu et al. 2023, "PFGM++: Unlocking the
Potential of Physics-Inspired Generative Models").

The data are charges on the N-dimensional plane of an (N + D)-dimensional space, and generation
follows the electric field of Poisson's equation from a large hemisphere back to the plane. Training
perturbs a data point x0 within the plane by the kernel of their eq. 4: a radius R with
R1 = R^2 / (R^2 + r^2) ~ Beta(N/2, D/2) (so R = r sqrt(R1 / (1 - R1))) and a uniform direction. With
the alignment r = sigma sqrt(D) (their Sec. 4) the objective, the ODE dx/dr = (x - D(x, r)) / r and
therefore EDM's schedules, preconditioning and samplers carry over with sigma = r / sqrt(D); as D -> inf
the kernel tends to EDM's Gaussian N(0, sigma^2 I) (their Prop. 3.2).

Choices written down here:

* The draw uses only normal variates from an explicit generator: with z_N ~ N(0, I_N) and an
  independent z_D ~ N(0, I_D), |z_N|^2 / 2 ~ Gamma(N/2) and |z_D|^2 / 2 ~ Gamma(D/2), so
  R1 = |z_N|^2 / (|z_N|^2 + |z_D|^2) ~ Beta(N/2, D/2), the direction z_N / |z_N| is uniform and
  independent of R1, and the perturbation R z_N / |z_N| = sigma z_N sqrt(D) / |z_D|. It is sigma times a
  unit "noise" whose coordinates have variance D / (D - 2) (a multivariate t with D degrees of freedom).
* ``D = 0`` means D = inf: the Gaussian, so one code path serves EDM too.
* Sampling starts from the same kernel at sigma_max around zero (the prior of their Sec. 3.2, the
  data mean being negligible at sigma_max = 80); every reverie sampler then runs on the EDM-preconditioned
  denoiser unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .utils import append_dims

__all__ = ["pfgm_noise", "radius_from_sigma", "sigma_from_radius", "radial_beta"]


def radius_from_sigma(sigma, D: int) -> float | Tensor:
    """r = sigma sqrt(D) (Xu et al. 2023, Sec. 4, the alignment with EDM's sigma)."""
    return sigma * math.sqrt(D)


def sigma_from_radius(r, D: int) -> float | Tensor:
    return r / math.sqrt(D)


def pfgm_noise(shape, D: int, generator: torch.Generator | None = None, device=None,
               dtype=torch.float32) -> Tensor:
    """Unit PFGM++ perturbations [B, ...]: x = x0 + sigma * noise is the kernel of eq. 4 at r = sigma sqrt(D)
    (module docstring); ``D = 0`` gives standard normal noise (D -> inf, EDM)."""
    if D < 0 or int(D) != D:
        raise ValueError(f"D must be a non-negative integer (0: infinity, i.e. EDM), got {D}")
    z = torch.randn(shape, generator=generator, device=device, dtype=torch.float64)
    if D == 0:
        return z.to(dtype)
    z_d = torch.randn(shape[0], int(D), generator=generator, device=device, dtype=torch.float64)
    factor = math.sqrt(D) / z_d.norm(dim=1)
    return (z * append_dims(factor, z.ndim)).to(dtype)


def radial_beta(noise: Tensor, D: int) -> Tensor:
    """R1 = R^2 / (R^2 + r^2) [B] of unit perturbations (r = sqrt(D) at sigma 1): Beta(N/2, D/2) if drawn right."""
    r2 = noise.reshape(noise.shape[0], -1).to(torch.float64).pow(2).sum(1)
    return r2 / (r2 + D)
