"""The forward (noising) process of a discrete VP diffusion, as a Markov chain.

Ho et al. 2020 ("DDPM"): one step q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) (eq. 2),
its closed form q(x_t | x0) = N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I) (eq. 4), and the
posterior q(x_{t-1} | x_t, x0) = N(mu_tilde, beta_tilde I) (eqs. 6-7). Timesteps are 0-based:
t = 0 is the first noising step, so alpha_bar_{-1} = 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .schedules import DiscreteVPSchedule
from .utils import append_dims


class ForwardProcess:
    """q(x_t | x0), q(x_t | x_{t-1}) and q(x_{t-1} | x_t, x0) for a :class:`DiscreteVPSchedule`.

    ``t`` is a LongTensor ``[B]``; coefficients are gathered in float64 and cast to ``x``'s dtype.
    """

    def __init__(self, schedule: DiscreteVPSchedule):
        self.schedule = schedule
        s = schedule
        ab = s.alphas_cumprod
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        self.alphas_cumprod_prev = ab_prev
        # beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t   (eq. 7)
        self.posterior_variance = (1 - ab_prev) / (1 - ab) * s.betas
        # log(beta_tilde) is -inf at t = 0; improved-diffusion clips it to the t = 1 value.
        pv = self.posterior_variance.clone()
        pv[0] = pv[1]
        self.posterior_log_variance_clipped = pv.log()
        self.posterior_mean_coef_x0 = s.betas * ab_prev.sqrt() / (1 - ab)
        self.posterior_mean_coef_xt = (1 - ab_prev) * s.alphas.sqrt() / (1 - ab)

    def _gather(self, table: Tensor, t: Tensor, like: Tensor) -> Tensor:
        vals = table.to(t.device)[t.long()].to(like.dtype)
        return append_dims(vals, like.ndim)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Draw x_t ~ q(x_t | x0) = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise (eq. 4)."""
        ab = self.schedule.alphas_cumprod
        return self._gather(ab.sqrt(), t, x0) * x0 + self._gather((1 - ab).sqrt(), t, x0) * noise

    def q_step(self, x_prev: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """One Markov step x_t ~ q(x_t | x_{t-1}) = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) noise."""
        b = self.schedule.betas
        return self._gather((1 - b).sqrt(), t, x_prev) * x_prev + self._gather(b.sqrt(), t, x_prev) * noise

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0) (eqs. 6-7)."""
        mean = (self._gather(self.posterior_mean_coef_x0, t, x_t) * x0
                + self._gather(self.posterior_mean_coef_xt, t, x_t) * x_t)
        var = self._gather(self.posterior_variance, t, x_t)
        log_var = self._gather(self.posterior_log_variance_clipped, t, x_t)
        return mean, var, log_var


def frame_noise(shape, rho: float, generator: torch.Generator | None = None) -> Tensor:
    """Unit Gaussian noise for clips ``(B, C, T, H, W)`` whose frames share a fraction ``rho`` of their variance.

    Ge et al. 2023 ("Preserve Your Own Correlation", arXiv 2305.10474, its mixed noise model): every frame's noise is
    eps_t = sqrt(rho) * eps_shared + sqrt(1 - rho) * eps_t_ind, so each frame is N(0, I) and any two frames of a
    clip correlate by rho (the paper's alpha: rho = alpha^2 / (1 + alpha^2)). The per-frame part is drawn first,
    so ``rho = 0`` draws exactly ``torch.randn(shape)`` and nothing more."""
    ind = torch.randn(shape, generator=generator, dtype=torch.float32)
    if rho == 0:
        return ind
    if len(shape) != 5:
        raise ValueError(f"frame-correlated noise needs clips (B, C, T, H, W), got shape {tuple(shape)}")
    shared = torch.randn((*shape[:2], 1, *shape[3:]), generator=generator, dtype=torch.float32)
    return rho ** 0.5 * shared + (1 - rho) ** 0.5 * ind
