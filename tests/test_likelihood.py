"""ELBO / bits-per-dim against closed forms on Gaussian data, where the optimal denoiser is known.

Data: x0 ~ N(MU, S^2) per dimension, discretized to the 256 levels in [-1, 1]. S = 0.25 keeps
[-1, 1] four standard deviations wide, so the edge bins (which absorb the tails) hold ~1e-4 of
the mass: with S = 0.5 about 5% of the data sits on the edges, where any smooth model's posterior
over x_(0) is far from q's and the bound is loose by ~0.15 bits/dim for reasons unrelated to the
code. The exact denoiser of the continuous Gaussian is E[x0 | x] = MU + S^2 / (S^2 + sigma^2) (x - MU).
"""

import math

import mpmath
import numpy as np
import pytest
import torch
from scipy import special, stats
from torch import nn

from reverie.denoisers import EDMDenoiser, EpsDenoiser, VDenoiser, X0Denoiser
from reverie.likelihood import (
    VARIANCES,
    discretized_gaussian_log_likelihood,
    nll_bits_per_dim,
    normal_kl,
    prior_kl,
    vlb_terms,
)
from reverie.schedules import DiscreteVPSchedule

MU, S = 0.05, 0.25
GRID = torch.linspace(-1, 1, 256, dtype=torch.float64)
HALF = 1 / 255
LN2 = math.log(2)
# DDPM's linear schedule (1e-4 .. 0.02 over 1000 steps) rescaled to 100 steps.
SCHED100 = DiscreteVPSchedule.from_name("linear", 100, beta_start=1e-3, beta_end=0.2)


def _tables(schedule):
    """Posterior coefficients written out by hand from the betas (Ho et al. 2020, eqs. 6-7)."""
    beta = schedule.betas
    ab = torch.cumprod(1 - beta, 0)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    beta_tilde = (1 - ab_prev) / (1 - ab) * beta
    coef_x0 = ab_prev.sqrt() * beta / (1 - ab)
    coef_xt = (1 - ab_prev) * (1 - beta).sqrt() / (1 - ab)
    return beta, ab, beta_tilde, coef_x0, coef_xt


def _log_var(schedule, variance, frac=None):
    beta, _, beta_tilde, _, _ = _tables(schedule)
    small = beta_tilde.clone()
    small[0] = beta_tilde[1]
    if variance == "fixed_small":
        return small.log()
    if variance == "fixed_large":
        return beta.log()
    return frac * beta.log() + (1 - frac) * small.log()


def optimal_frac(schedule):
    """The frac that makes p(x_(t-1)|x_(t)) exact for Gaussian data: Var = beta_tilde + coef^2 Var(x0|x_t)."""
    beta, ab, beta_tilde, coef_x0, _ = _tables(schedule)
    sigma2 = (1 - ab) / ab
    target = beta_tilde + coef_x0**2 * S**2 * sigma2 / (S**2 + sigma2)
    small = beta_tilde.clone()
    small[0] = beta_tilde[1]
    frac = ((target.log() - small.log()) / (beta.log() - small.log())).clamp(0, 1)
    frac[0] = 1.0  # decoder: the fixed_large variance, so learned and fixed_large share it
    return frac


class GaussianNet(nn.Module):
    """The exact network for Gaussian data, as an eps, x0 or v predictor; with ``frac`` [T] it also
    returns the learned-variance channel v = 2 frac - 1 (Nichol & Dhariwal 2021, Sec. 3.1)."""

    def __init__(self, schedule, kind, frac=None):
        super().__init__()
        self.schedule, self.kind, self.frac = schedule, kind, frac

    def forward(self, x_vp, t):
        sigma = self.schedule.sigma_from_t(t.double()).view(-1, *[1] * (x_vp.ndim - 1))
        alpha = (1 + sigma**2).rsqrt()
        x = x_vp / alpha
        x0_hat = MU + S**2 / (S**2 + sigma**2) * (x - MU)
        eps = (x - x0_hat) / sigma
        out = {"eps": eps, "x0": x0_hat, "v": alpha * eps - sigma * alpha * x0_hat}[self.kind]
        if self.frac is None:
            return out
        frac = self.frac[t.round().long()].view(-1, *[1] * (x_vp.ndim - 1))
        return torch.cat([out, (2 * frac - 1).expand_as(out)], dim=1)


def gaussian_denoiser(schedule, kind="eps", frac=None):
    cls = {"eps": EpsDenoiser, "x0": X0Denoiser, "v": VDenoiser}[kind]
    return cls(GaussianNet(schedule, kind, frac), schedule, learned_variance=frac is not None)


def bin_probs():
    """P(k) of the discretized N(MU, S^2) over the 256 bins (edges to +-inf)."""
    edges = np.concatenate([[-np.inf], (GRID[:-1].numpy() + GRID[1:].numpy()) / 2, [np.inf]])
    return torch.from_numpy(np.diff(stats.norm.cdf((edges - MU) / S)))


def sample_data(n, shape, seed):
    """x0 ~ discretized N(MU, S^2): round a Gaussian draw to the grid; the edges absorb the tails."""
    g = torch.Generator().manual_seed(seed)
    k = ((MU + S * torch.randn(n, *shape, generator=g, dtype=torch.float64) + 1) * 127.5).round()
    k = k.clamp(0, 255).long()
    return GRID[k], k


# ---------------------------------------------------------------------------------------------
# building blocks


def test_normal_kl_closed_form_and_monte_carlo():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    lv1, lv2 = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    kl = normal_kl(m1, lv1, m2, lv2)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(kl, ref, rtol=1e-12, atol=1e-12)
    # Monte Carlo: E_{x~N1}[log N1(x) - log N2(x)]
    x = m1 + (0.5 * lv1).exp() * torch.randn(100_000, 5, generator=g, dtype=torch.float64)
    log_ratio = (torch.distributions.Normal(m1, (0.5 * lv1).exp()).log_prob(x)
                 - torch.distributions.Normal(m2, (0.5 * lv2).exp()).log_prob(x))
    se = log_ratio.std(0) / math.sqrt(x.shape[0])
    assert ((log_ratio.mean(0) - kl).abs() < 5 * se).all()
    assert float(normal_kl(0.3, -1.0, 0.3, -1.0)) == 0.0


@pytest.mark.parametrize("mean", [-3.0, -1.0, -0.37, 0.0, 0.5, 0.999, 2.5])
@pytest.mark.parametrize("log_scale", [-12.0, -6.0, -3.0, -0.5, 2.0, 8.0])
def test_discretized_likelihood_is_a_distribution_over_the_256_bins(mean, log_scale):
    logp = discretized_gaussian_log_likelihood(GRID, torch.tensor(mean, dtype=torch.float64),
                                               torch.tensor(log_scale, dtype=torch.float64))
    assert torch.isfinite(logp).all()
    assert abs(float(logp.exp().sum()) - 1) < 1e-10  # bin edges carry ~1e-17 rounding


def test_discretized_likelihood_matches_references_including_far_tails():
    # Moderate cases: scipy's CDF differences, where they have not underflowed.
    mean, scale = 0.1, 0.05
    edges = np.array([-np.inf, *((GRID[:-1] + GRID[1:]) / 2).tolist(), np.inf])
    lower = np.diff(stats.norm.cdf(edges, loc=mean, scale=scale))
    upper = -np.diff(stats.norm.sf(edges, loc=mean, scale=scale))  # no cancellation above the mean
    ref = torch.from_numpy(np.where(GRID.numpy() > mean, upper, lower))
    got = discretized_gaussian_log_likelihood(GRID, torch.tensor(mean, dtype=torch.float64),
                                              torch.tensor(math.log(scale), dtype=torch.float64))
    ok = ref > 1e-200
    assert int(ok.sum()) > 60 and torch.isfinite(got).all()
    torch.testing.assert_close(got[ok], ref[ok].log(), rtol=1e-9, atol=1e-12)
    # Far tails: interior bins 20-60 scales from the mean, against 50-digit arithmetic.
    mpmath.mp.dps = 50
    for x_idx, mean, scale in [(200, -0.5, 0.02), (20, 0.7, 0.03), (128, -1.0, 0.01)]:
        x = float(GRID[x_idx])
        phi = lambda z: mpmath.ncdf(mpmath.mpf(z))  # noqa: E731
        lo, hi = (x - HALF - mean) / scale, (x + HALF - mean) / scale
        exact = float(mpmath.log(phi(-lo) - phi(-hi) if x > mean else phi(hi) - phi(lo)))
        got = discretized_gaussian_log_likelihood(torch.tensor(x, dtype=torch.float64),
                                                  torch.tensor(mean, dtype=torch.float64),
                                                  torch.tensor(math.log(scale), dtype=torch.float64))
        assert math.isfinite(float(got)) and abs(float(got) - exact) < 1e-9 * abs(exact)
    # Edge bins extend to +-inf: log P(X > 1 - half) = log_ndtr(-(1 - half - mean) / scale).
    got = discretized_gaussian_log_likelihood(torch.tensor(1.0, dtype=torch.float64),
                                              torch.tensor(-1.0, dtype=torch.float64),
                                              torch.tensor(math.log(1e-3), dtype=torch.float64))
    assert float(got) == pytest.approx(special.log_ndtr(-(2 - HALF) / 1e-3), rel=1e-12)


def test_discretized_likelihood_gradients_are_finite_everywhere():
    mean = torch.linspace(-3, 3, 41, dtype=torch.float64).repeat_interleave(3).requires_grad_()
    log_scale = torch.tensor([-9.0, -3.0, 1.0], dtype=torch.float64).repeat(41).requires_grad_()
    x = GRID[torch.arange(123) * 2 % 256]
    discretized_gaussian_log_likelihood(x, mean, log_scale).sum().backward()
    assert torch.isfinite(mean.grad).all() and torch.isfinite(log_scale.grad).all()


@pytest.mark.parametrize("zero_snr", [False, True])
def test_prior_kl_closed_form(zero_snr):
    sched = DiscreteVPSchedule.from_name("cosine", 50, zero_terminal_snr=zero_snr)
    x0, _ = sample_data(6, (3, 2), seed=1)
    ab = float(sched.alphas_cumprod[-1])
    # KL(N(sqrt(ab) x0, 1 - ab) || N(0, 1)) = (ab x0^2 - ab - log(1 - ab)) / 2 per dimension
    ref = (0.5 * (ab * x0**2 - ab - math.log1p(-ab))).sum((1, 2))
    torch.testing.assert_close(prior_kl(sched, x0), ref, rtol=1e-10, atol=1e-14)
    if zero_snr:
        assert (prior_kl(sched, x0) == 0).all()


# ---------------------------------------------------------------------------------------------
# the bound on Gaussian data


def _bin_prob(x0, mean, sd):
    """P(bin of x0) under N(mean, sd^2), computed on the side away from the mode (no cancellation)."""
    hi = np.where(x0 > 1 - HALF, np.inf, (x0 + HALF - mean) / sd)
    lo = np.where(x0 < -1 + HALF, -np.inf, (x0 - HALF - mean) / sd)
    return np.where(lo + hi > 0, special.ndtr(-lo) - special.ndtr(-hi), special.ndtr(hi) - special.ndtr(lo))


def _expected_terms_given_x0(schedule, x0, variance, frac=None):
    """E[L_(t-1) | x0] [K, T] for scalar data values x0 [K]: Gaussian KLs in closed form for t >= 1,
    the decoder NLL by Gauss-Hermite quadrature over x0_hat ~ N(m, v) for t = 0."""
    _, ab, beta_tilde, coef_x0, _ = (t.numpy() for t in _tables(schedule))
    x0 = np.asarray(x0, dtype=np.float64)[:, None]
    sigma2 = (1 - ab) / ab
    k = S**2 / (S**2 + sigma2)
    err2 = (1 - k) ** 2 * (x0 - MU) ** 2 + k**2 * sigma2  # E[(x0 - x0_hat)^2 | x0]
    lv = _log_var(schedule, variance, frac).numpy()
    beta_tilde[0] = beta_tilde[1]  # column 0 is the decoder, filled below
    kl = 0.5 * (lv - np.log(beta_tilde) + (beta_tilde + coef_x0**2 * err2) / np.exp(lv) - 1)
    z, w = np.polynomial.hermite.hermgauss(60)
    x0_hat = MU + k[0] * (x0 - MU) + math.sqrt(2 * k[0] ** 2 * sigma2[0]) * z
    kl[:, 0] = -(w * np.log(_bin_prob(x0, x0_hat, math.exp(0.5 * lv[0])))).sum(1) / math.sqrt(math.pi)
    return torch.from_numpy(kl)


def _expected_bound_bits(schedule, variance, frac=None):
    """E_P[bound] per dimension in bits, exactly: the sum over the 256 atoms weighted by P(k)."""
    ab = float(schedule.alphas_cumprod[-1])
    prior = 0.5 * (ab * GRID**2 - ab - math.log1p(-ab))
    per_atom = _expected_terms_given_x0(schedule, GRID.numpy(), variance, frac).sum(1) + prior
    return float((bin_probs() * per_atom).sum()) / LN2


@pytest.mark.parametrize("variance", VARIANCES)
def test_every_term_matches_its_closed_form(variance):
    """Monte Carlo mean of each L_(t-1) over the noise equals E[L_(t-1) | x0] for fixed x0."""
    frac = optimal_frac(SCHED100) * 0.7 if variance == "learned" else None  # any frac is a valid model
    den = gaussian_denoiser(SCHED100, "eps", frac)
    values = [-0.6, -0.0196, 0.2, 0.9]
    n = 2000
    x0 = torch.tensor(values, dtype=torch.float64).repeat_interleave(n).view(-1, 1)
    x0 = GRID[((x0 + 1) * 127.5).round().long()]
    r = vlb_terms(den, x0, variance=variance, generator=torch.Generator().manual_seed(0), max_batch=1 << 16)
    terms = r.terms.view(len(values), n, -1)
    mc, se = terms.mean(1), terms.std(1) / math.sqrt(n)
    ref = _expected_terms_given_x0(SCHED100, x0.view(-1, n)[:, 0].numpy(), variance, frac)
    z = (mc - ref) / se
    assert z.abs().max() < 5, (z.abs().max(), mc[:, :3], ref[:, :3])
    # The terms' sum, over 100 independent noise draws, is then right to a fraction of a percent.
    assert (mc.sum(1) / ref.sum(1) - 1).abs().max() < 0.01


def test_bound_equals_trajectory_estimate():
    """The KL-form bound (DDPM eq. 5) has the expectation of log q(z|x0) - log p(x0, z) over whole
    forward chains z (DDPM eq. 3), written here from scratch with scipy densities."""
    betas = torch.linspace(0.01, 0.7, 8, dtype=torch.float64)
    sched = DiscreteVPSchedule(betas)
    beta, ab, _, coef_x0, coef_xt = (t.numpy() for t in _tables(sched))
    den = gaussian_denoiser(sched, "v")
    n, x0_val = 40_000, float(GRID[150])
    x0 = torch.full((n, 1), x0_val, dtype=torch.float64)
    bound = vlb_terms(den, x0, variance="fixed_large", generator=torch.Generator().manual_seed(0)).total

    rng = np.random.default_rng(0)
    T = len(beta)
    z = np.empty((T, n))
    z[0] = math.sqrt(ab[0]) * x0_val + math.sqrt(1 - ab[0]) * rng.standard_normal(n)
    for t in range(1, T):
        z[t] = math.sqrt(1 - beta[t]) * z[t - 1] + math.sqrt(beta[t]) * rng.standard_normal(n)
    log_q = stats.norm.logpdf(z[0], math.sqrt(ab[0]) * x0_val, math.sqrt(1 - ab[0]))
    log_q += sum(stats.norm.logpdf(z[t], math.sqrt(1 - beta[t]) * z[t - 1], math.sqrt(beta[t]))
                 for t in range(1, T))

    def x0_hat(t):
        sigma2 = (1 - ab[t]) / ab[t]
        return MU + S**2 / (S**2 + sigma2) * (z[t] / math.sqrt(ab[t]) - MU)

    log_p = stats.norm.logpdf(z[T - 1])
    for t in range(1, T):
        mean = coef_x0[t] * x0_hat(t) + coef_xt[t] * z[t]
        log_p += stats.norm.logpdf(z[t - 1], mean, math.sqrt(beta[t]))
    sd0 = math.sqrt(beta[0])
    log_p += np.log(special.ndtr((x0_val + HALF - x0_hat(0)) / sd0) - special.ndtr((x0_val - HALF - x0_hat(0)) / sd0))
    traj = log_q - log_p
    se = math.sqrt(traj.var() / n + float(bound.var()) / n)
    assert abs(traj.mean() - float(bound.mean())) < 4 * se, (traj.mean(), float(bound.mean()), se)


ENTROPY_BITS = float(-(bin_probs() * bin_probs().log()).sum()) / LN2  # exact NLL of the data, bits/dim


@pytest.mark.parametrize("schedule", [SCHED100, DiscreteVPSchedule.from_name("linear", 1000)],
                         ids=["T100", "T1000"])
def test_expected_bound_is_tight_and_never_below_the_exact_nll(schedule):
    """E_P[bound] from the closed forms above (which the previous test ties to vlb_terms), summed
    exactly over the 256 atoms: with the exact mean and the optimal learned variance p matches q
    step by step, so the bound is within 0.005 bits/dim of H(P), and being a bound, not below it."""
    frac = optimal_frac(schedule)
    gap = {v: _expected_bound_bits(schedule, v, frac if v == "learned" else None) - ENTROPY_BITS
           for v in VARIANCES}
    assert 0 <= gap["learned"] < 0.005, gap
    assert gap["learned"] <= gap["fixed_large"] < 0.1
    assert gap["fixed_small"] > 0.5  # beta_tilde is far too small for the first steps (Improved DDPM Fig. 2)


@pytest.fixture(scope="module")
def data_and_nll():
    x0, k = sample_data(2048, (2, 2), seed=3)
    nll = -bin_probs().log()[k].sum((1, 2))  # exact -log P(x0) per sample, in nats
    return x0, nll


def _gap(bits, nll):
    """Mean and standard error of (bound - exact NLL), bits/dim; the exact NLL is a control variate."""
    gap = bits - nll / (4 * LN2)
    return float(gap.mean()), float(gap.std() / math.sqrt(len(gap)))


def test_monte_carlo_bound_on_sampled_data(data_and_nll):
    """nll_bits_per_dim on data drawn from P: finite, not below H(P), equal to the exact E_P[bound]."""
    x0, nll = data_and_nll
    frac = optimal_frac(SCHED100)
    den = gaussian_denoiser(SCHED100, "eps", frac)
    bits = {var: nll_bits_per_dim(den, x0, variance=var, generator=torch.Generator().manual_seed(4),
                                  max_batch=1 << 16) for var in ("learned", "fixed_large")}
    gap, se = _gap(bits["learned"], nll)
    assert torch.isfinite(bits["learned"]).all()
    assert gap > -3 * se and abs(gap - (_expected_bound_bits(SCHED100, "learned", frac) - ENTROPY_BITS)) < 4 * se
    # Same noise for both: the optimal learned variance is the tighter, by the closed-form margin.
    diff = bits["fixed_large"] - bits["learned"]
    exact = _expected_bound_bits(SCHED100, "fixed_large") - _expected_bound_bits(SCHED100, "learned", frac)
    assert float(diff.mean()) > 0 and abs(float(diff.mean()) - exact) < 4 * float(diff.std()) / math.sqrt(len(diff))


def test_monte_carlo_bound_with_1000_steps(data_and_nll):
    x0, nll = data_and_nll[0][:512], data_and_nll[1][:512]
    sched = DiscreteVPSchedule.from_name("linear", 1000)
    bits = nll_bits_per_dim(gaussian_denoiser(sched, "x0"), x0, generator=torch.Generator().manual_seed(5),
                            max_batch=1 << 16)
    gap, se = _gap(bits, nll)
    exact = _expected_bound_bits(sched, "fixed_large") - ENTROPY_BITS
    assert torch.isfinite(bits).all()
    assert gap > -3 * se and abs(gap - exact) < 4 * se, (gap, se, exact)


def test_parameterizations_give_the_same_bound():
    x0, _ = sample_data(64, (2, 3), seed=6)
    frac = optimal_frac(SCHED100)
    out = {kind: vlb_terms(gaussian_denoiser(SCHED100, kind, frac), x0,
                           generator=torch.Generator().manual_seed(7)) for kind in ("eps", "x0", "v")}
    for kind in ("x0", "v"):
        torch.testing.assert_close(out[kind].terms, out["eps"].terms, rtol=1e-7, atol=1e-9)
    assert out["eps"].num_dims == 6


def test_timestep_batching_does_not_change_the_result():
    x0, _ = sample_data(8, (1, 3), seed=8)
    den = gaussian_denoiser(SCHED100, "v")
    a = vlb_terms(den, x0, generator=torch.Generator().manual_seed(9), max_batch=8, progress=True)
    b = vlb_terms(den, x0, generator=torch.Generator().manual_seed(9), max_batch=10_000)
    assert torch.equal(a.terms, b.terms) and torch.equal(a.x0_mse, b.x0_mse)


@pytest.mark.parametrize("kind", ["eps", "v"])
def test_zero_terminal_snr_bound_is_finite(kind):
    sched = DiscreteVPSchedule.from_name("linear", 100, zero_terminal_snr=True, beta_start=1e-3, beta_end=0.2)
    x0, _ = sample_data(32, (1, 2), seed=10)
    r = vlb_terms(gaussian_denoiser(sched, kind), x0, generator=torch.Generator().manual_seed(11))
    assert torch.isfinite(r.terms).all() and (r.prior_kl == 0).all()
    assert torch.isfinite(r.bits_per_dim()).all()


def test_bad_input_is_rejected():
    x0, _ = sample_data(4, (1, 2), seed=12)
    with pytest.raises(ValueError, match="DiscreteVPSchedule"):
        vlb_terms(EDMDenoiser(GaussianNet(SCHED100, "x0")), x0)
    with pytest.raises(ValueError, match="learned_variance"):
        vlb_terms(gaussian_denoiser(SCHED100), x0, variance="learned")
    with pytest.raises(ValueError, match="fixed_small, fixed_large, learned"):
        vlb_terms(gaussian_denoiser(SCHED100), x0, variance="small")
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        vlb_terms(gaussian_denoiser(SCHED100), x0 + 2)
