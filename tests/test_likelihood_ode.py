"""Probability-flow ODE likelihood against closed forms: Gaussian and Gaussian-mixture data have exact
denoisers (reverie.gmm) and exact noised densities, so the ODE's NLL is known in advance.

For Gaussian data N(m, s^2 I) and the exact denoiser the flow is linear: x(sigma) = m + (x0 - m) r with
r = sqrt((s^2 + sigma^2) / (s^2 + sigma_min^2)), and the log-density increment is D log r. With the
prior N(0, sigma_max^2 I) that gives the value the solver must reproduce ("truncated" below), which
differs from -log N(x0; m, s^2 I) only by the documented endpoint biases.
"""

import math

import numpy as np
import pytest
import torch
from scipy import special
from torch import nn

from reverie.denoisers import EDMDenoiser, EpsDenoiser
from reverie.gmm import GaussianMixture
from reverie.likelihood import nll_bits_per_dim
from reverie.likelihood_ode import bits_per_dim_from_nll, dequantize_uniform, ode_bits_per_dim, ode_nll
from reverie.nets import create_network
from reverie.schedules import DiscreteVPSchedule

LN2 = math.log(2)
COSINE = DiscreteVPSchedule.from_name("cosine", 1000)  # sigma_min 0.0064, sigma_max 2.0e4
LINEAR = DiscreteVPSchedule.from_name("linear", 1000)  # sigma_min 0.0100, sigma_max 157
SCHED100 = DiscreteVPSchedule.from_name("linear", 100, beta_start=1e-3, beta_end=0.2)  # 0.0316 .. 221


class ExactEpsNet(nn.Module):
    """The exact eps-predictor of a Gaussian mixture on a discrete VP schedule. Fractional t maps to sigma
    by linear interpolation in log-sigma, the inverse of ``t_from_sigma``, so the wrapped EpsDenoiser is
    the mixture's exact denoiser at every sigma the ODE asks for, not only on the grid."""

    def __init__(self, gmm: GaussianMixture, schedule: DiscreteVPSchedule):
        super().__init__()
        self.gmm, self.log_sigmas = gmm, schedule.log_sigmas

    def forward(self, x_vp, t):
        t = t.double()
        lo = t.floor().long().clamp(max=len(self.log_sigmas) - 2)
        w = t - lo
        sigma = ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[lo + 1]).exp()
        sig = sigma.view(-1, *[1] * (x_vp.ndim - 1))
        x = x_vp * (1 + sig**2).sqrt()  # VE coordinates
        return (x - self.gmm.denoiser(x, sigma)) / sig


def vp_denoiser(gmm, schedule):
    return EpsDenoiser(ExactEpsNet(gmm, schedule), schedule)


def gaussian(m, s):
    return GaussianMixture([1.0], torch.as_tensor(m, dtype=torch.float64)[None], stds=s)


def truncated_nll(x0, m, s, lo, hi):
    """The ODE's exact answer for N(m, s^2 I) data between sigma_min = lo and sigma_max = hi."""
    D = x0.shape[1]
    r = math.sqrt((s**2 + hi**2) / (s**2 + lo**2))
    x_T = m + (x0 - m) * r
    prior = -0.5 * (D * math.log(2 * math.pi * hi**2) + (x_T**2).sum(1) / hi**2)
    return -(prior + D * math.log(r))


M3 = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
S3 = 0.5


def gaussian_data(n, seed=0):
    return M3 + S3 * torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# 1. exact divergence against closed forms


def test_edm_style_gaussian_matches_closed_form():
    """A schedule-free denoiser (EDM's 0.002 .. 80): the solver reproduces the truncated closed form to
    the solver tolerance; with sigma_max = 1e3 (top bias ~ |m| / sigma_max per dim) the NLL is the
    closed form -log N(x0; m, s^2 I) to 1e-3 relative."""
    gmm, x0 = gaussian(M3, S3), gaussian_data(8)
    r = ode_nll(gmm.denoiser, x0, hutchinson=False, dequantize=False)
    assert r.num_dims == 3 and 50 < r.nfe < 300
    torch.testing.assert_close(r.nll, truncated_nll(x0, M3, S3, 0.002, 80.0), rtol=0, atol=5e-4)
    torch.testing.assert_close(r.nll, -(r.prior_logp + r.delta_logp))
    # The top truncation is visible at sigma_max = 80 (~3e-3 relative) and gone at 1e3.
    r = ode_nll(gmm.denoiser, x0, sigma_max=1e3, hutchinson=False, dequantize=False)
    ref = -gmm.log_prob(x0)
    assert ((r.nll - ref) / ref).abs().max() < 1e-3, ((r.nll - ref) / ref)


def test_vp_schedule_gaussian_matches_closed_form():
    """An eps-network on DDPM's cosine schedule: endpoints from the schedule (sigma_min = sigmas[0],
    sigma_max = 2.0e4), the VP model read in VE coordinates; same two checks."""
    gmm, x0 = gaussian(M3, S3), gaussian_data(8, seed=1)
    r = ode_nll(vp_denoiser(gmm, COSINE), x0, hutchinson=False, dequantize=False)
    lo, hi = COSINE.sigma_min, COSINE.sigma_max
    torch.testing.assert_close(r.nll, truncated_nll(x0, M3, S3, lo, hi), rtol=0, atol=5e-4)
    ref = -gmm.log_prob(x0)
    assert ((r.nll - ref) / ref).abs().max() < 1e-3, ((r.nll - ref) / ref)


def test_vp_and_edm_views_of_one_model_agree():
    """The same Gaussian model as an eps-network on DDPM's linear schedule and as a plain VE denoiser,
    over the same sigma range, gives one NLL: the VP prior/coordinates are not mixed in."""
    gmm, x0 = gaussian(M3, S3), gaussian_data(6, seed=2)
    vp = ode_nll(vp_denoiser(gmm, LINEAR), x0, hutchinson=False, dequantize=False)
    ve = ode_nll(gmm.denoiser, x0, schedule=LINEAR, hutchinson=False, dequantize=False)
    torch.testing.assert_close(vp.nll, ve.nll, rtol=0, atol=2e-4)
    torch.testing.assert_close(vp.nll, truncated_nll(x0, M3, S3, LINEAR.sigma_min, LINEAR.sigma_max),
                               rtol=0, atol=5e-4)


def test_gaussian_mixture_nonlinear_flow_matches_exact_density():
    """Two anisotropic components in 2-D: a curved flow. The NLL is -log p_{sigma_min}(x0), the exact
    noised mixture density: to 2e-3 nats at the default tolerance 1e-5 and to 2e-4 at 1e-6; and
    -log p_0(x0) to 1e-3 relative (sigma_max = 1e4 makes the top truncation negligible)."""
    gmm = GaussianMixture([0.3, 0.7], [[-0.5, 0.2], [0.4, -0.1]], stds=[[0.15, 0.3], [0.25, 0.1]])
    x0 = gmm.sample(8, generator=torch.Generator().manual_seed(3))
    ref = -gmm.noised(0.002).log_prob(x0)
    for tol, err in [(1e-5, 2e-3), (1e-6, 2e-4)]:
        r = ode_nll(gmm.denoiser, x0, sigma_max=1e4, hutchinson=False, dequantize=False, rtol=tol, atol=tol)
        torch.testing.assert_close(r.nll, ref, rtol=0, atol=err)
    ref = -gmm.log_prob(x0)
    assert ((r.nll - ref) / ref).abs().max() < 1e-3


# ---------------------------------------------------------------------------------------------
# 2. Hutchinson


def rotated_gaussian():
    """N(M3, C) with C = Q diag(lam) Q^T, Q a fixed random rotation: dD/dx has off-diagonal entries."""
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    lam = torch.tensor([0.02, 0.1, 0.5], dtype=torch.float64)
    return GaussianMixture([1.0], M3[None], covs=(q @ torch.diag(lam) @ q.T)[None]), q, lam


@pytest.mark.parametrize("probe, tol", [("rademacher", 0.1), ("gaussian", 0.2)])
def test_hutchinson_is_unbiased_with_the_variance_of_one_probe_per_solve(probe, tol):
    """One point, 2000 copies, one probe each. For a Gaussian N(m, C) the estimate is the exact NLL plus
    z^T A z - tr A with A = integral dD/dx ds = Q diag(a) Q^T, a = ln((lam + lo^2) hi^2 / (lo^2 (lam + hi^2))) / 2.
    Mean: within 4 standard errors of the exact-divergence NLL. Variance: 2 sum_{i!=j} A_ij^2
    (Rademacher) or 2 ||A||_F^2 (Gaussian), which holds only if each probe is kept for the whole solve;
    ``tol`` is ~3.5 standard errors of the sample variance (Gaussian quadratic forms have heavy tails)."""
    gmm, q, lam = rotated_gaussian()
    x0 = torch.tensor([[0.1, 0.4, -0.3]], dtype=torch.float64)
    exact = ode_nll(gmm.denoiser, x0, hutchinson=False, dequantize=False).nll
    n = 2000
    est = ode_nll(gmm.denoiser, x0.repeat(n, 1), probe=probe, dequantize=False,
                  generator=torch.Generator().manual_seed(5)).nll
    se = est.std() / math.sqrt(n)
    assert abs(float(est.mean() - exact)) < 4 * se, (float(est.mean()), float(exact), float(se))
    lo, hi = 0.002, 80.0
    a = 0.5 * torch.log((lam + lo**2) * hi**2 / (lo**2 * (lam + hi**2)))
    A = q @ torch.diag(a) @ q.T
    var = 2 * (A**2).sum() - (2 * A.diagonal().pow(2).sum() if probe == "rademacher" else 0)
    assert abs(float(est.var() / var) - 1) < tol, (float(est.var()), float(var))


def test_more_probes_shrink_the_variance_and_rademacher_is_exact_for_isotropic_jacobians():
    gmm, x0 = gaussian(M3, S3), gaussian_data(1, seed=5)
    exact = ode_nll(gmm.denoiser, x0, hutchinson=False, dequantize=False).nll
    # dD/dx = s^2 / (s^2 + sigma^2) I: z^T J z = tr J for every Rademacher z.
    rad = ode_nll(gmm.denoiser, x0.repeat(50, 1), dequantize=False, generator=torch.Generator().manual_seed(6)).nll
    torch.testing.assert_close(rad, exact.expand_as(rad), rtol=0, atol=2e-4)
    rotated, _, _ = rotated_gaussian()
    var = [ode_nll(rotated.denoiser, x0.repeat(1000, 1), probe="gaussian", num_probes=k, dequantize=False,
                   generator=torch.Generator().manual_seed(7)).nll.var() for k in (1, 4)]
    assert 3 < float(var[0] / var[1]) < 5  # 4 probes: a quarter of the variance


# ---------------------------------------------------------------------------------------------
# 3. against the discrete ELBO

MU, S = 0.05, 0.25  # as in test_likelihood.py: edge bins hold ~1e-4 of the mass
GRID = torch.linspace(-1, 1, 256, dtype=torch.float64)


def discretized_gaussian_data(n, dims, seed):
    """x0 ~ N(MU, S^2) rounded to the 256 levels, and the exact -log P(x0) in nats per sample."""
    g = torch.Generator().manual_seed(seed)
    k = ((MU + S * torch.randn(n, dims, generator=g, dtype=torch.float64) + 1) * 127.5).round().clamp(0, 255)
    x0 = GRID[k.long()]
    hi = np.where(k.numpy() == 255, np.inf, (x0.numpy() + 1 / 255 - MU) / S)
    lo = np.where(k.numpy() == 0, -np.inf, (x0.numpy() - 1 / 255 - MU) / S)
    log_p = np.log(special.ndtr(hi) - special.ndtr(lo))  # bins near the mode: no cancellation at S = 0.25
    return x0, -torch.from_numpy(log_p).sum(1)


def test_elbo_is_above_the_ode_nll_which_is_tight():
    """What is comparable: the ELBO bounds -log P_chain(k) of the discrete DDPM chain; the dequantized
    ODE value bounds -log P_ode(k) = -log of the ODE density's mass on the bin. Both are upper bounds on
    the NLL of a discrete model built from the same exact denoiser, so both lie above the data's exact
    NLL (known here: discretized Gaussian) in expectation and can be compared in bits/dim. With the
    exact denoiser the ODE density is the data density smoothed at sigma_min (0.0316 here, 6e-5 nats/dim
    of bias in expectation) and the dequantization gap is ~(Delta/S)^2/24 per dim, so the ODE figure sits
    on the exact NLL. The ELBO (fixed_large) carries its variance gap, 0.074 bits/dim in expectation
    on this 100-step schedule (closed form in test_likelihood.py), against a per-sample noise of
    ~0.7 bits/dim: 4096 samples resolve it at ~6 standard errors."""
    x0, exact = discretized_gaussian_data(4096, 4, seed=8)
    exact_bits = exact / (4 * LN2)
    den = vp_denoiser(gaussian(torch.full((4,), MU), S), SCHED100)
    ode = ode_bits_per_dim(den, x0, hutchinson=False, generator=torch.Generator().manual_seed(9))
    elbo = nll_bits_per_dim(den, x0, generator=torch.Generator().manual_seed(10), max_batch=1 << 16)
    ode_gap, elbo_gap = ode - exact_bits, elbo - exact_bits  # exact NLL as a control variate
    se = [float(v.std()) / math.sqrt(len(v)) for v in (ode_gap, elbo_gap, elbo - ode)]
    assert abs(float(ode_gap.mean())) < max(4 * se[0], 2e-3), (float(ode_gap.mean()), se[0])
    assert float(elbo_gap.mean()) > -3 * se[1]
    diff = float((elbo - ode).mean())
    assert 3 * se[2] < diff < 0.1, (diff, se[2])


def test_dequantization_and_bits_per_dim_conversion():
    x0 = GRID[torch.randint(0, 256, (4000, 3), generator=torch.Generator().manual_seed(11))]
    y = dequantize_uniform(x0, generator=torch.Generator().manual_seed(12))
    u = (y - x0) * 127.5  # in bin widths
    assert u.abs().max() <= 0.5 and abs(float(u.mean())) < 0.02 and abs(float(u.var()) - 1 / 12) < 0.005
    # A density of 127.5^D on one bin is a probability of 1: zero bits. nll = -D log 127.5.
    nll = torch.tensor([-3 * math.log(127.5)])
    assert float(bits_per_dim_from_nll(nll, 3).abs()) < 1e-12
    assert float(bits_per_dim_from_nll(torch.zeros(1), 1)) == pytest.approx(math.log2(127.5))


# ---------------------------------------------------------------------------------------------
# 4. a real network


def tiny_unet():
    torch.manual_seed(0)
    return create_network("unet-tiny", model_channels=8, sample_size=8, head_channels=8).eval()


def test_zero_initialized_edm_unet_is_the_gaussian_denoiser():
    """An untrained EDM-preconditioned U-Net outputs 0, so D = c_skip x = sd^2 / (sd^2 + sigma^2) x, the
    exact denoiser of N(0, sd^2 I): the ODE NLL through the real network (float32, 4-D images,
    Hutchinson with Rademacher probes, exact for an isotropic Jacobian) is the closed form."""
    den = EDMDenoiser(tiny_unet(), sigma_data=0.5)
    x0 = 0.5 * torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(13))
    r = ode_nll(den, x0, dequantize=False, generator=torch.Generator().manual_seed(14))
    ref = truncated_nll(x0.double().flatten(1), 0.0, 0.5, 0.002, 80.0)
    assert r.num_dims == 192
    torch.testing.assert_close(r.nll, ref, rtol=1e-4, atol=0)


def test_perturbed_unet_runs_end_to_end_and_is_reproducible():
    net = tiny_unet()
    with torch.no_grad():
        g = torch.Generator().manual_seed(15)
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    den = EDMDenoiser(net, sigma_data=0.5)
    x0 = GRID[torch.randint(0, 256, (2, 3, 8, 8), generator=torch.Generator().manual_seed(16))].float()
    kw = dict(rtol=1e-3, atol=1e-3, num_probes=2)
    a, b, c = (ode_nll(den, x0, generator=torch.Generator().manual_seed(s), **kw) for s in (17, 17, 18))
    assert torch.isfinite(a.bits_per_dim).all() and a.nfe > 10
    assert torch.equal(a.bits_per_dim, b.bits_per_dim) and a.nfe == b.nfe
    assert not torch.equal(a.bits_per_dim, c.bits_per_dim)  # the dequantization and probes do matter
    # The network moved the model off N(0, 0.5^2 I): bits/dim differ from the zero network's.
    zero = ode_nll(EDMDenoiser(tiny_unet(), sigma_data=0.5), x0, generator=torch.Generator().manual_seed(17), **kw)
    assert (a.bits_per_dim - zero.bits_per_dim).abs().min() > 1e-3


def test_bad_input_is_rejected():
    gmm, x0 = gaussian(M3, S3), gaussian_data(2)
    with pytest.raises(ValueError, match="256-level grid"):
        ode_nll(gmm.denoiser, x0)
    with pytest.raises(ValueError, match="rademacher, gaussian"):
        ode_nll(gmm.denoiser, x0, dequantize=False, probe="uniform")
    with pytest.raises(ValueError, match="num_probes"):
        ode_nll(gmm.denoiser, x0, dequantize=False, num_probes=0)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        ode_nll(gmm.denoiser, x0, dequantize=False, sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="RK45"):
        ode_nll(gmm.denoiser, x0, dequantize=False, method="Euler")
    with pytest.raises(ValueError, match="batch"):
        ode_nll(gmm.denoiser, x0[0], dequantize=False)
