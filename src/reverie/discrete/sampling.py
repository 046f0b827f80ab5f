"""Samplers of masked diffusion: ancestral (D3PM / MDLM), caching (MDLM Sec. 4.2) and EDLM's energy-based
importance sampling (Xu et al. 2025, "Energy-Based Diffusion Language Models", Alg. 1-2).

All three walk the time grid t_i = i / T, i = T..1, and take the posterior step of MDLM eq. 4 with the
SUBS prediction x_theta(z_t): a token still masked at t is revealed at s = t - 1/T with probability
(alpha_s - alpha_t) / (1 - alpha_t), as a draw x0^l ~ x_theta(z_t)^l; revealed tokens never change.

- ``ancestral``: one network evaluation per step.
- ``caching``: a model without time conditioning gives the same x_theta while z does not change, so a
  row is re-evaluated only after a step that revealed one of its tokens. Same random draws as
  ``ancestral``, hence the same samples (for a network whose rows do not interact), with at most
  min(T, L) evaluations per row.
- ``edlm``: inside the window ``window[0] <= t <= window[1]`` draw k full candidates x0^(j) from the
  factorized x_theta, weight them by exp(-E(x0^(j))) with the residual energy

      E(x0) = -log p_AR(x0) + log p_theta(x0 | z_t)         (EDLM Sec. 4, AR energy)

  so that the weights are p_AR / p_theta: self-normalized importance sampling from p_theta towards the
  AR joint restricted to sequences consistent with z_t; resample one candidate and take the usual
  posterior step as if it were x0. Outside the window it is the caching sampler. (The released code
  weights by softmax(+E): the wrong sign, its issue #3; ``test_discrete.py`` checks ours on a toy.)

Corrector sweeps (``corrector_sweeps`` S > 0, after any sampler): S passes over the positions that were
masked, a block B of them at a time re-masked and redrawn left to right, each token from the denoiser's
conditional given everything else (the proposal q(x_B | x without B), a chain of |B| calls). Without an
energy model the redraw is kept (for one-token blocks: Gibbs on the denoiser's own conditionals, where it
is sharpest). With an energy model it is Metropolis-Hastings targeting the energy model's joint restricted
to the given tokens, p_E(x | unmasked part): x' (x with the block redrawn) is kept with probability

    min(1, p_E(x') q(x_B) / (p_E(x) q(x'_B)))

(both q's from the same context, x without B; q(x_B) scores the old block under the same chain). That is
EDLM's target, p_theta * exp(-E) = p_E, reached by a Markov chain instead of by importance weights: exact
in the limit of sweeps for any proposal that can reach every block, and efficient because a short block
proposed from both sides is close to the target's own conditional. Infilling uses it: IS with a few
candidates of 24 factorized tokens has a tiny effective sample size.

Every categorical draw is made in float64 by inverse CDF: float32 Gumbel-max truncates the Gumbel tail
and so lowers the sampling temperature (Zheng et al. 2024), which flatters generative perplexity.
Randomness only through the explicit generator: same seed, same text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .process import LogLinearSchedule, subs_log_probs

__all__ = ["EDLM_WINDOW", "MASKED_SAMPLERS", "SamplerStats", "sample_categorical", "edlm_energy", "importance_resample",
           "sample_masked", "corrector_sweeps"]

MASKED_SAMPLERS = ("ancestral", "caching", "edlm")
# EDLM's importance sampling at every step by default: with the shipped Shakespeare models and k = 8 it gave
# gen-ppl 15.5 at 32 steps (ancestral: 16.7-16.9 at 1,024), where the noisiest 60% alone, (0.4, 1), gave 18.1
# (256 samples each; benchmarks/diffusion_lm.py, README).
EDLM_WINDOW = (0.0, 1.0)
# Default corrector block (generate-text, reverie serve): on the shipped Shakespeare pair, 16 MH sweeps in blocks of
# 6 gave infill judge perplexity 5.02, single tokens 5.64 after 32 (benchmarks/results/diffusion_lm_infill.json).
CORRECTOR_BLOCK = 6

# denoise(z (B, L) long, t (B,) float64) -> logits (B, L, V) over the data vocabulary
Denoise = Callable[[Tensor, Tensor], Tensor]
# log_likelihood(x0 (N, L) long) -> (N,) float64: the energy model's log p(x0)
LogLikelihood = Callable[[Tensor], Tensor]


@dataclass
class SamplerStats:
    """What a sampling run cost: network evaluations (rows) and energy evaluations (candidate rows)."""

    denoiser_rows: int = 0
    energy_rows: int = 0
    steps: int = 0
    history: list = field(default_factory=list)
    proposals: int = 0                  # corrector: block proposals (one per row and block)
    accepted: int = 0                   # corrector: proposals kept (all of them without an energy model)


def sample_categorical(log_probs: Tensor, g: torch.Generator) -> Tensor:
    """One draw per row of ``log_probs`` (..., V) in float64 by inverse CDF; rows need not be normalized.
    -inf entries are never drawn."""
    p = torch.exp(log_probs.double() - log_probs.double().amax(dim=-1, keepdim=True))
    cdf = p.cumsum(dim=-1)
    u = torch.rand(p.shape[:-1], generator=g, dtype=torch.float64).to(p.device) * cdf[..., -1]
    idx = torch.searchsorted(cdf, u[..., None], right=True).squeeze(-1)
    return idx.clamp(max=p.shape[-1] - 1)


def edlm_energy(log_p_ar: Tensor, log_p_diffusion: Tensor) -> Tensor:
    """EDLM's residual energy of a candidate: E = -log p_AR(x0) + log p_theta(x0 | z_t) (float64)."""
    return log_p_diffusion.double() - log_p_ar.double()


def importance_resample(energy: Tensor, g: torch.Generator) -> Tensor:
    """Index of the kept candidate per column: ``energy`` (k, B) -> (B,), drawn with weights exp(-E) / Z
    (self-normalized importance weights of target p_theta * exp(-E) under proposal p_theta)."""
    return sample_categorical(-energy.double().T, g)


def _candidate_log_prob(log_probs: Tensor, x0: Tensor, masked: Tensor) -> Tensor:
    """log prod_{masked l} x_theta(z_t)^l[x0^l] in float64: (B, L, V), (B, L), (B, L) -> (B,)."""
    picked = log_probs.double().gather(-1, x0[..., None]).squeeze(-1)
    return torch.where(masked, picked, torch.zeros_like(picked)).sum(dim=-1)


def _edlm_x0(log_probs: Tensor, z: Tensor, masked: Tensor, energy_model: LogLikelihood, k: int,
             g: torch.Generator, stats: SamplerStats) -> Tensor:
    """k candidates from the factorized x_theta, one of them kept by importance resampling."""
    candidates = torch.stack([torch.where(masked, sample_categorical(log_probs, g), z) for _ in range(k)])
    log_q = torch.stack([_candidate_log_prob(log_probs, c, masked) for c in candidates])  # (k, B)
    B, L = z.shape
    log_ar = energy_model(candidates.reshape(k * B, L)).double().reshape(k, B).to(log_q.device)
    stats.energy_rows += k * B
    keep = importance_resample(edlm_energy(log_ar, log_q), g)  # (B,)
    return candidates[keep, torch.arange(B, device=z.device)]


def sample_masked(denoise: Denoise, z: Tensor, steps: int, mask_id: int, g: torch.Generator,
                  sampler: str = "caching", energy_model: LogLikelihood | None = None, k: int = 2,
                  window: tuple[float, float] = EDLM_WINDOW, time_conditioned: bool = False,
                  schedule: LogLinearSchedule | None = None, callback=None,
                  corrector: int = 0, corrector_block: int = 1) -> tuple[Tensor, SamplerStats]:
    """Fill every ``mask_id`` position of ``z`` (B, L) over ``steps`` steps; other positions (a prompt,
    both sides of an infill) stay as given; then ``corrector`` sweeps of :func:`corrector_sweeps` (MH towards
    ``energy_model``'s joint when given, Gibbs on the denoiser otherwise). Returns the tokens and what it
    cost (module docstring). ``callback(i, z)`` follows step i = steps, ..., 1 and then sweep s = 1, 2, ...
    with i = 1 - s, so that ``steps - i + 1`` counts both (a progress bar, ``reverie serve``'s cancel)."""
    if sampler not in MASKED_SAMPLERS:
        raise ValueError(f"unknown text sampler {sampler!r}; choose one of {', '.join(MASKED_SAMPLERS)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if sampler == "edlm" and (energy_model is None or k < 1):
        raise ValueError("the edlm sampler needs an energy model (an AR text model) and k >= 1")
    if corrector < 0 or corrector_block < 1:
        raise ValueError(f"corrector sweeps must be >= 0 and its block >= 1, got {corrector} and {corrector_block}")
    schedule = schedule or LogLinearSchedule(eps=0.0)
    cache = sampler != "ancestral" and not time_conditioned
    editable = z == mask_id
    stats, z = SamplerStats(steps=steps), z.clone()
    B = z.shape[0]
    log_probs, stale = None, torch.ones(B, dtype=torch.bool, device=z.device)
    for i in range(steps, 0, -1):
        t, s = i / steps, (i - 1) / steps
        masked = z == mask_id
        if not masked.any():
            break
        t_rows = torch.full((B,), t, dtype=torch.float64)
        if not cache or log_probs is None:
            log_probs = subs_log_probs(denoise(z, t_rows), z, mask_id)
            stats.denoiser_rows += B
        elif stale.any():
            rows = stale.nonzero().squeeze(-1)
            log_probs[rows] = subs_log_probs(denoise(z[rows], t_rows[rows.cpu()]), z[rows], mask_id)
            stats.denoiser_rows += len(rows)
        if sampler == "edlm" and window[0] <= t <= window[1]:
            x0 = _edlm_x0(log_probs, z, masked, energy_model, k, g, stats)
        else:
            x0 = sample_categorical(log_probs, g)
        p_reveal = float(schedule.unmask_probability(t, s)) if s > 0 else 1.0
        u = torch.rand(z.shape, generator=g, dtype=torch.float64).to(z.device)
        reveal = masked & (u < p_reveal)
        z = torch.where(reveal, x0, z)
        stale = reveal.any(dim=1)
        if callback is not None:
            callback(i, z)
    if corrector:
        swept = None if callback is None else (lambda sweep, x: callback(1 - sweep, x))
        z = corrector_sweeps(denoise, z, editable, corrector, mask_id, g, energy_model, stats, corrector_block,
                             callback=swept)
    return z, stats


def corrector_sweeps(denoise: Denoise, x: Tensor, editable: Tensor, sweeps: int, mask_id: int, g: torch.Generator,
                     energy_model: LogLikelihood | None = None, stats: SamplerStats | None = None,
                     block: int = 1, callback=None) -> Tensor:
    """``sweeps`` passes over the ``editable`` positions of ``x`` (B, L) in blocks of ``block`` consecutive ones (each
    row's j-th to (j + block - 1)-th editable position, all rows at once; the block boundaries shift by half a block
    every other sweep). A block is re-masked and redrawn position by position, left to right, each token from the
    denoiser's conditional given the rest (a chain of ``block`` calls), and the redrawn block is kept always (no
    ``energy_model``: for ``block`` 1, Gibbs on the denoiser) or with the Metropolis-Hastings probability towards
    ``energy_model``'s joint, whose reverse proposal probability (the old block under the same chain) costs
    ``block`` - 1 more calls (module docstring). The denoiser is called with t = 1 / L; ``callback(s, x)`` follows
    sweep s = 1, ..., ``sweeps``. Blocks move words where single tokens must pass through misspellings: on the
    shipped Shakespeare pair, blocks of 6 reached in 8 sweeps what single tokens had not in 32 (README)."""
    if block < 1:
        raise ValueError(f"corrector block must be >= 1, got {block}")
    stats = stats if stats is not None else SamplerStats()
    x = x.clone()
    B, L = x.shape
    counts = editable.sum(dim=1)
    order = torch.argsort((~editable).to(torch.int8), dim=1, stable=True)  # each row's editable positions first
    n_max = int(counts.max()) if B else 0
    log_e = None
    if energy_model is not None and n_max:
        log_e = energy_model(x).double()
        stats.energy_rows += B

    def chain(z, first, pos, valid, given=None):
        """Walk the block left to right from ``first`` (the logits with the whole block masked): draw each
        token (``given`` None) or read it from ``given``; returns the tokens and their summed log q."""
        out, total, lp = z.clone(), torch.zeros(len(z), dtype=torch.float64), first
        idx = torch.arange(len(z))
        for k, (p, v) in enumerate(zip(pos, valid)):
            lpk = lp[idx, p].double()
            tok = sample_categorical(lpk, g).to(z.device) if given is None else given[idx, p]
            tok = torch.where(v, tok, out[idx, p])
            total += torch.where(v, lpk[idx, tok], torch.zeros_like(total))
            out[idx, p] = tok
            if k + 1 < len(pos):
                lp = subs_log_probs(denoise(out, t_rows[: len(z)]), out, mask_id)
                stats.denoiser_rows += len(z)
        return out, total

    t_rows = torch.full((B,), 1.0 / L, dtype=torch.float64)
    for sweep in range(sweeps):
        offset = (sweep % 2) * (block // 2)
        for j0 in range(-offset, n_max, block):
            js = [j for j in range(j0, j0 + block) if 0 <= j < n_max]
            rows = (counts > js[0]).nonzero().squeeze(-1)
            idx = torch.arange(len(rows))
            cur = x[rows]
            valid = [counts[rows] > j for j in js]
            pos = [order[rows, j] for j in js]
            z = cur.clone()
            for p, v in zip(pos, valid):
                z[idx[v], p[v]] = mask_id
            first = subs_log_probs(denoise(z, t_rows[: len(rows)]), z, mask_id)
            stats.denoiser_rows += len(rows)
            new, lq_new = chain(z, first, pos, valid)
            stats.proposals += len(rows)
            if energy_model is None:
                x[rows] = new
                stats.accepted += len(rows)
                continue
            moved = (new != cur).any(dim=1).nonzero().squeeze(-1)  # an unchanged block is accepted trivially
            stats.accepted += len(rows) - len(moved)
            if len(moved) == 0:
                continue
            _, lq_old = chain(z[moved], first[moved], [p[moved] for p in pos], [v[moved] for v in valid],
                              given=cur[moved])
            log_e_new = energy_model(new[moved]).double().to(log_e.device)
            stats.energy_rows += len(moved)
            r = rows[moved]
            log_ratio = log_e_new - log_e[r] + (lq_old - lq_new[moved]).to(log_e.device)
            u = torch.rand(len(moved), generator=g, dtype=torch.float64).to(log_e.device)
            accept = (torch.log(u) < log_ratio).to(x.device)
            x[r[accept]] = new[moved][accept]
            log_e[r[accept]] = log_e_new[accept]
            stats.accepted += int(accept.sum())
        if callback is not None:
            callback(sweep + 1, x)
    return x
