"""The variational bound (ELBO) of a discrete VP diffusion, its terms, and bits per dimension.

Ho et al. 2020 ("DDPM", eq. 5 and Sec. 3.3) with 0-based timesteps as in ``process.py``: the
latents x_(0) .. x_(T-1) are DDPM's x_1 .. x_T and x0 is the data. The negative ELBO is

    L = KL(q(x_(T-1) | x0) || N(0, I))                                        prior
      + sum_{t=1}^{T-1} KL(q(x_(t-1) | x_(t), x0) || p(x_(t-1) | x_(t)))        KL terms
      - log p(x0 | x_(0))                                                     decoder

where p(x_(t-1) | x_(t)) = N(mu_tilde(x_(t), x0_hat), Sigma_t): the model's mean is the posterior
mean with x0 replaced by the denoiser's x0_hat (DDPM eq. 7 and 10), and the decoder is the
discretized Gaussian of DDPM eq. 13 over 256 levels in [-1, 1]. (Exact NLL via the ODE: ``likelihood_ode.py``.)

Choices written down here:

* Any denoiser ``D(x, sigma) -> x0_hat`` can be evaluated, as long as a :class:`DiscreteVPSchedule`
  defines the chain (the denoiser's own, or the ``schedule`` argument). The network sees x_(t) in
  VE coordinates at ``sigma_t``; an infinite ``sigma_{T-1}`` (zero terminal SNR) is replaced by
  ``schedule.sigma_max`` for the network call only.
* Variances (Nichol & Dhariwal 2021, Sec. 3.1): ``fixed_large`` is Sigma_t = beta_t at every t,
  including the decoder (DDPM's sigma_t^2 = beta_t); ``fixed_small`` is beta_tilde_t, with the
  decoder's beta_tilde_0 = 0 replaced by beta_tilde_1 as ``ForwardProcess`` clips it; ``learned``
  interpolates the two log-variances with the network's ``frac`` (Improved DDPM eq. 15).
* The normal CDF is ``torch.special.log_ndtr`` (exact to working precision), not the tanh
  approximation. An interior bin's probability Phi(b) - Phi(a) is computed in log space from the
  tail the bin lies in, so a bin far in a tail gets its true (tiny) probability instead of 0 or a
  clamp: the bound stays finite and never understates the NLL.
* Every one of the T timesteps is evaluated, one noise draw per (sample, t): an unbiased estimate
  of each term. A strided subset would be the bound of a different, respaced model, not an exact
  bound of this one, so it is not offered. Timesteps are batched ``max_batch // B`` at a time;
  the noise is drawn per timestep in order, so the batching never changes the result.
* Terms are in nats, summed over dimensions, computed in float64 (the network runs in x0's dtype).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .process import ForwardProcess
from .schedules import DiscreteVPSchedule
from .utils import append_dims

__all__ = [
    "VARIANCES",
    "VLBTerms",
    "normal_kl",
    "discretized_gaussian_log_likelihood",
    "finite_sigmas",
    "model_log_variance",
    "prior_kl",
    "vlb_term",
    "vlb_terms",
    "nll_bits_per_dim",
]

VARIANCES = ("fixed_small", "fixed_large", "learned")


def _sum_flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).sum(dim=1)


def normal_kl(mean1, logvar1, mean2, logvar2) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats (Ho et al. 2020, eq. 5)."""
    mean1, logvar1, mean2, logvar2 = (torch.as_tensor(v) for v in (mean1, logvar1, mean2, logvar2))
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor,
                                        num_levels: int = 256) -> Tensor:
    """log P(bin of x) under N(mean, e^(2 log_scale)), bins of width 2/(num_levels-1) on [-1, 1]
    with the edge bins extended to -inf / +inf (Ho et al. 2020, eq. 13). Elementwise."""
    half = 1.0 / (num_levels - 1)
    inv_scale = torch.exp(-log_scale)
    lo = (x - half - mean) * inv_scale
    hi = (x + half - mean) * inv_scale
    # Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi): use the side where both are small (no cancellation).
    flip = (lo + hi) > 0
    a, b = torch.where(flip, -hi, lo), torch.where(flip, -lo, hi)
    log_b = torch.special.log_ndtr(b)
    interior = log_b + torch.log(-torch.expm1(torch.special.log_ndtr(a) - log_b))
    left = torch.special.log_ndtr(hi)  # P(X < -1 + half)
    right = torch.special.log_ndtr(-lo)  # P(X > 1 - half)
    return torch.where(x < -1 + half, left, torch.where(x > 1 - half, right, interior))


def finite_sigmas(schedule: DiscreteVPSchedule) -> Tensor:
    """The schedule's VE sigmas [T] with an infinite top (zero terminal SNR) set to ``sigma_max``."""
    sigmas = schedule.sigmas.clone()
    sigmas[torch.isinf(sigmas)] = schedule.sigma_max
    return sigmas


def _gather(table: Tensor, t: Tensor, like: Tensor) -> Tensor:
    return append_dims(table.to(device=t.device)[t.long()].to(like.dtype), like.ndim)


def model_log_variance(process: ForwardProcess, t: Tensor, variance: str, like: Tensor,
                       frac: Tensor | None = None) -> Tensor:
    """log Sigma_t of p(x_(t-1) | x_(t)): fixed_small, fixed_large, or learned (Improved DDPM eq. 15)."""
    log_small = _gather(process.posterior_log_variance_clipped, t, like)
    log_large = _gather(process.schedule.betas.log(), t, like)
    if variance == "fixed_small":
        return log_small
    if variance == "fixed_large":
        return log_large
    if variance == "learned":
        if frac is None:
            raise ValueError("variance='learned' needs the network's frac (a learned-variance denoiser)")
        return frac * log_large + (1 - frac) * log_small
    raise ValueError(f"unknown variance {variance!r}; choose one of {', '.join(VARIANCES)}")


def prior_kl(schedule: DiscreteVPSchedule, x0: Tensor) -> Tensor:
    """KL(q(x_(T-1) | x0) || N(0, I)) per sample [B], in nats (Ho et al. 2020, L_T of eq. 5)."""
    x0 = x0.to(torch.float64)
    alpha_bar = schedule.alphas_cumprod[-1].to(x0.device)
    kl = normal_kl(alpha_bar.sqrt() * x0, torch.log1p(-alpha_bar), 0.0, 0.0)
    return _sum_flat(kl)


def vlb_term(process: ForwardProcess, x0: Tensor, x_t: Tensor, t: Tensor, x0_hat: Tensor,
             model_logvar: Tensor, num_levels: int = 256) -> Tensor:
    """L_(t-1) per sample [B] in nats: the KL term for t >= 1, the decoder NLL for t = 0
    (Ho et al. 2020, eq. 5 and 13). ``x_t`` is the VP sample, ``t`` a LongTensor [B]."""
    true_mean, _, true_logvar = process.q_posterior(x0, x_t, t)
    model_mean, _, _ = process.q_posterior(x0_hat, x_t, t)
    kl = _sum_flat(normal_kl(true_mean, true_logvar, model_mean, model_logvar))
    # The decoder only where t = 0 (it costs more than the KL); there the posterior mean has
    # coefficient 1 on x0_hat and 0 on x_t, so the decoder's mean is x0_hat.
    idx = (t == 0).nonzero().squeeze(1)
    if idx.numel() == 0:
        return kl
    logvar = model_logvar.expand_as(x0)[idx]
    nll = -_sum_flat(discretized_gaussian_log_likelihood(x0[idx], model_mean[idx], 0.5 * logvar, num_levels))
    return kl.index_copy(0, idx, nll.to(kl.dtype))


@dataclass
class VLBTerms:
    """The terms of the negative ELBO per sample, in nats summed over dimensions.

    ``terms[:, 0]`` is the decoder NLL, ``terms[:, t]`` for t >= 1 is KL(q(x_(t-1)|x_(t),x0) || p);
    ``x0_mse[:, t]`` is the mean squared error of x0_hat at timestep t.
    """

    prior_kl: Tensor  # [B]
    terms: Tensor  # [B, T]
    x0_mse: Tensor  # [B, T]
    num_dims: int

    @property
    def decoder_nll(self) -> Tensor:
        return self.terms[:, 0]

    @property
    def total(self) -> Tensor:
        """The negative ELBO per sample [B], in nats."""
        return self.prior_kl + self.terms.sum(dim=1)

    def bits_per_dim(self) -> Tensor:
        """The negative ELBO per sample [B] in bits per dimension: nats / (D ln 2)."""
        return self.total / (self.num_dims * math.log(2.0))


def _resolve(denoiser, schedule, variance) -> tuple[DiscreteVPSchedule, str]:
    schedule = schedule if schedule is not None else getattr(denoiser, "schedule", None)
    if not isinstance(schedule, DiscreteVPSchedule):
        raise ValueError("the ELBO needs a DiscreteVPSchedule: give the denoiser one or pass schedule=")
    learned = getattr(denoiser, "learned_variance", False)
    variance = variance or ("learned" if learned else "fixed_large")
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; choose one of {', '.join(VARIANCES)}")
    if variance == "learned" and not learned:
        raise ValueError("variance='learned' needs a denoiser built with learned_variance=True")
    return schedule, variance


def _repeat(v, c: int):
    return v.repeat(c, *([1] * (v.ndim - 1))) if isinstance(v, Tensor) and v.ndim > 0 else v


def _denoise_vp(denoiser, x_t: Tensor, t: Tensor, sigmas: Tensor, cond: dict, dtype) -> tuple:
    """x0_hat (float64) and frac (or None) for VP samples x_t at integer timesteps t."""
    sigma = sigmas.to(t.device)[t]
    x = (x_t * append_dims((1 + sigma**2).sqrt(), x_t.ndim)).to(dtype)  # x_ve = x_vp / alpha
    if hasattr(denoiser, "forward_with_variance"):
        x0_hat, frac = denoiser.forward_with_variance(x, sigma.to(dtype), **cond)
    else:
        x0_hat, frac = denoiser(x, sigma.to(dtype), **cond), None
    return x0_hat.to(torch.float64), None if frac is None else frac.to(torch.float64)


def _vlb_chunk(denoiser, process, sigmas, x0, ts, variance, generator, cond, clip_denoised):
    """Terms and x0 MSE [c, B] for the timesteps ``ts`` [c], all in one network call."""
    B, c = x0.shape[0], len(ts)
    x0_rep = _repeat(x0, c).to(torch.float64)
    t = ts.to(x0.device).repeat_interleave(B)
    # One draw per timestep, in order: the result does not depend on how timesteps are chunked.
    noise = torch.cat([torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float64)
                       for _ in range(c)])
    x_t = process.q_sample(x0_rep, t, noise)
    cond_rep = {k: _repeat(v, c) for k, v in cond.items()}
    x0_hat, frac = _denoise_vp(denoiser, x_t, t, sigmas, cond_rep, x0.dtype)
    if clip_denoised:
        x0_hat = x0_hat.clamp(-1, 1)
    logvar = model_log_variance(process, t, variance, x_t, frac)
    term = vlb_term(process, x0_rep, x_t, t, x0_hat, logvar)
    mse = (x0_hat - x0_rep).pow(2).reshape(c * B, -1).mean(dim=1)
    return term.reshape(c, B), mse.reshape(c, B)


def vlb_terms(denoiser, x0: Tensor, *, variance: str | None = None, schedule=None,
              generator: torch.Generator | None = None, cond: dict | None = None,
              clip_denoised: bool = False, max_batch: int = 1024, progress: bool = False) -> VLBTerms:
    """Every term of the negative ELBO of data ``x0`` in [-1, 1] (Ho et al. 2020, eq. 5).

    ``variance`` is ``fixed_small``, ``fixed_large`` or ``learned`` (default: learned for a
    learned-variance denoiser, else fixed_large). Noise comes from ``generator`` (on x0's device); each network call
    sees at most ``max_batch`` samples; ``progress=True`` shows a tqdm bar over timestep chunks.
    """
    schedule, variance = _resolve(denoiser, schedule, variance)
    if bool((x0.abs() > 1).any()):
        raise ValueError("x0 must be data scaled to [-1, 1] (256 levels) for the discretized decoder")
    process, sigmas = ForwardProcess(schedule), finite_sigmas(schedule)
    B, T = x0.shape[0], schedule.num_timesteps
    chunks = torch.arange(T).split(max(1, max_batch // B))
    terms, mses = [], []
    with torch.no_grad():
        for ts in tqdm(chunks, desc="ELBO", disable=not progress, leave=False):
            term, mse = _vlb_chunk(denoiser, process, sigmas, x0, ts, variance, generator,
                                   cond or {}, clip_denoised)
            terms.append(term)
            mses.append(mse)
        prior = prior_kl(schedule, x0)
    num_dims = x0[0].numel()
    return VLBTerms(prior, torch.cat(terms).T.contiguous(), torch.cat(mses).T.contiguous(), num_dims)


def nll_bits_per_dim(denoiser, x0: Tensor, **kwargs) -> Tensor:
    """Upper bound on the NLL of ``x0`` per sample [B], in bits per dimension (the negative ELBO
    divided by D ln 2; Ho et al. 2020, eq. 5). ``kwargs`` go to :func:`vlb_terms`."""
    return vlb_terms(denoiser, x0, **kwargs).bits_per_dim()
