"""Masked (absorbing-state) diffusion on token sequences: MDLM (Sahoo et al. 2024, "Simple and Effective
Masked Diffusion Language Models").

Forward process. Each token of x0 is kept with probability ``alpha_t`` and replaced by the absorbing
[MASK] token otherwise, independently (D3PM absorbing, Austin et al. 2021):

    q(z_t | x0) = prod_l Cat(z_t^l; alpha_t * onehot(x0^l) + (1 - alpha_t) * onehot(MASK))

Log-linear schedule (MDLM Sec. 3.5): total noise sigma(t) = -log(1 - (1 - eps) t), so alpha_t =
exp(-sigma(t)) = 1 - (1 - eps) t, linear in t; ``eps`` keeps alpha_1 > 0 for training (MDLM uses 1e-3)
and is 0 for likelihoods, where the all-[MASK] prior must hold exactly at t = 1.

SUBS parameterization (MDLM Sec. 3.2.3): the network's prediction x_theta(z_t) puts zero mass on [MASK]
(its output head has no [MASK] row) and copies unmasked tokens (carry-over), so only masked positions
cost anything.

NELBO (MDLM eq. 10-11): with alpha_t' = d alpha / dt,

    L_inf = E_{t ~ U(0, 1]} E_q [ alpha_t' / (1 - alpha_t) * sum_{l: z_t^l = MASK} log <x_theta(z_t), x0^l> ]

which for the log-linear schedule (eps = 0) is E_t [(1 / t) * cross-entropy summed over masked tokens].
With T discretization steps (MDLM eq. 8) the bound takes t on the grid {1/T, ..., 1} and weight
(alpha_s - alpha_t) / (1 - alpha_t) * T with s = t - 1/T; it decreases towards L_inf as T grows.
Everything here is float64 where it is schedule arithmetic; log-probabilities come from the network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LogLinearSchedule", "mask_tokens", "subs_log_probs", "nelbo_terms", "sample_times"]


@dataclass(frozen=True)
class LogLinearSchedule:
    """alpha_t = 1 - (1 - eps) t; sigma(t) = -log(alpha_t) (MDLM Sec. 3.5). Float64 throughout."""

    eps: float = 1e-3

    def __post_init__(self):
        if not 0 <= self.eps < 1:
            raise ValueError(f"eps must be in [0, 1), got {self.eps}")

    def alpha(self, t: Tensor | float) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return 1 - (1 - self.eps) * t

    def sigma(self, t: Tensor | float) -> Tensor:
        return -torch.log(self.alpha(t))

    def weight(self, t: Tensor) -> Tensor:
        """-alpha_t' / (1 - alpha_t): the continuous-time NELBO weight of a masked token (1 / t when eps = 0)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return (1 - self.eps) / (1 - self.alpha(t))

    def unmask_probability(self, t: Tensor | float, s: Tensor | float) -> Tensor:
        """(alpha_s - alpha_t) / (1 - alpha_t): the chance a token masked at t is revealed at s < t (eq. 4)."""
        a_t, a_s = self.alpha(t), self.alpha(s)
        return (a_s - a_t) / (1 - a_t)


def sample_times(n: int, g: torch.Generator, low: float = 0.0, steps: int = 0) -> Tensor:
    """``n`` times in (low, 1], float64, low-discrepancy (one uniform shifted by i/n, MDLM Sec. 3.5's
    antithetic sampling); with ``steps`` T > 0 they are rounded up to the grid {1/T, ..., 1}."""
    u = (torch.rand((), generator=g, dtype=torch.float64) + torch.arange(n, dtype=torch.float64) / n) % 1.0
    t = 1.0 - u  # (0, 1]
    if steps > 0:
        return torch.ceil(t * steps).clamp(1, steps) / steps
    return low + (1 - low) * t


def mask_tokens(x0: Tensor, alpha: Tensor, mask_id: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """z_t ~ q(z_t | x0) for per-row ``alpha`` [B]: (z_t, masked) with ``masked`` the bool positions hit."""
    u = torch.rand(x0.shape, generator=g, dtype=torch.float64).to(x0.device)
    masked = u >= alpha.to(u.device).reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.where(masked, torch.full_like(x0, mask_id), x0), masked


def subs_log_probs(logits: Tensor, z: Tensor, mask_id: int) -> Tensor:
    """SUBS (MDLM Sec. 3.2.3): log x_theta over the data vocabulary (the head has no [MASK] entry, so zero
    mass on it), with unmasked positions carried over as one-hot (log 1 = 0 on z, -inf elsewhere).
    logits (B, L, V) with V the data vocabulary; z (B, L) may hold ``mask_id`` >= V."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    keep = z != mask_id
    if keep.any():
        carried = torch.full_like(logp, -math.inf)
        carried.scatter_(-1, z.clamp(max=logp.shape[-1] - 1)[..., None], 0.0)
        logp = torch.where(keep[..., None], carried, logp)
    return logp


def nelbo_terms(logits: Tensor, x0: Tensor, masked: Tensor, t: Tensor, schedule: LogLinearSchedule,
                steps: int = 0) -> Tensor:
    """Per-sequence NELBO estimate in nats [B] for one draw of (t, z_t): weight(t) * sum over masked
    positions of -log x_theta(z_t)[x0] (eq. 11); with ``steps`` T the discrete-time weight
    T * (alpha_s - alpha_t) / (1 - alpha_t), s = t - 1/T (eq. 8), for t on the T-grid."""
    ce = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), x0, reduction="none")  # (B, L)
    ce = (ce * masked).sum(dim=1).double()
    if steps > 0:
        w = steps * schedule.unmask_probability(t, t - 1.0 / steps)
    else:
        w = schedule.weight(t)
    return w.to(ce.device) * ce
