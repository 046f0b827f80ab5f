"""Score SDEs (reverie.sde): closed-form marginals against the Fokker-Planck PDE solved by finite
differences, the denoiser view (sigma(t), s(t)), and the reverse SDE / probability-flow ODE with the
exact Gaussian-mixture score."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from reverie.gmm import GaussianMixture, ring2d, sliced_w2
from reverie.samplers import get_sigmas, sample
from reverie.schedules import DiscreteVPSchedule
from reverie.sde import SDES, UniformTime, discretize, get_sde

NAMES = sorted(SDES)


def _t(*v):
    return torch.tensor(v, dtype=torch.float64)


@pytest.mark.parametrize("name", NAMES)
def test_sigma_is_std_over_scale_and_inverts(name):
    sde = get_sde(name)
    t = torch.linspace(sde.t_min + 1e-3, 1, 50, dtype=torch.float64)
    sigma = sde.sigma_from_t(t)
    torch.testing.assert_close(sigma, sde.std(t) / sde.scale(t), rtol=1e-12, atol=0)
    torch.testing.assert_close(sde.t_from_sigma(sigma), t, rtol=1e-10, atol=1e-12)
    assert bool((sigma[1:] > sigma[:-1]).all())


@pytest.mark.parametrize("name", NAMES)
def test_ve_coordinates_obey_the_ve_sde(name):
    """x / s(t) has the drift-free SDE with g^2 / s^2 = d sigma^2 / dt (Ito), and the variance of the
    state obeys d var / dt = 2 f var + g^2 for a point mass (var = std^2)."""
    sde = get_sde(name)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6
    dsig2 = (sde.sigma_from_t(t + h) ** 2 - sde.sigma_from_t(t - h) ** 2) / (2 * h)
    torch.testing.assert_close(sde.diffusion(t) ** 2 / sde.scale(t) ** 2, dsig2, rtol=1e-6, atol=0)
    dvar = (sde.std(t + h) ** 2 - sde.std(t - h) ** 2) / (2 * h)
    if name == "ve-sde":  # var = sigma^2 of the smoothed data: same rate
        torch.testing.assert_close(dvar, sde.diffusion(t) ** 2, rtol=1e-6, atol=0)
    else:
        torch.testing.assert_close(dvar, 2 * sde.drift_coeff(t) * sde.std(t) ** 2 + sde.diffusion(t) ** 2,
                                   rtol=1e-6, atol=1e-9)
    ds = (sde.scale(t + h) - sde.scale(t - h)) / (2 * h)
    torch.testing.assert_close(ds, sde.drift_coeff(t) * sde.scale(t), rtol=1e-6, atol=0)


def test_paper_defaults():
    vp, sub, ve = get_sde("vp-sde"), get_sde("subvp-sde"), get_sde("ve-sde")
    assert (vp.beta_min, vp.beta_max, sub.beta_min, sub.beta_max) == (0.1, 20.0, 0.1, 20.0)
    assert ve.sigma_min == pytest.approx(0.01) and ve.sigma_max == pytest.approx(50.0)
    # sub-VP's variance is below VP's at every t (Song et al. 2021, Sec. 3.4)
    t = torch.linspace(0.01, 1, 20, dtype=torch.float64)
    assert bool((sub.std(t) < vp.std(t)).all())
    with pytest.raises(ValueError, match="unknown SDE"):
        get_sde("vv-sde")


# ---- the Fokker-Planck equation, by finite differences --------------------------------------------------
MIX_W, MIX_MU, MIX_S = (0.3, 0.7), (-1.2, 0.8), (0.25, 0.4)


def _mixture_density(x, mean_scale, extra_var, t0_var=0.0):
    """Closed-form marginal of the 1-D mixture: sum_k w_k N(s mu_k, s^2 (s_k^2 + t0_var) + extra_var)."""
    out = np.zeros_like(x)
    for w, mu, s in zip(MIX_W, MIX_MU, MIX_S):
        var = mean_scale**2 * (s**2 + t0_var) + extra_var
        out += w * np.exp(-((x - mean_scale * mu) ** 2) / (2 * var)) / math.sqrt(2 * math.pi * var)
    return out


def _marginal(sde, x, t):
    """p_t(x) of x_t = s(t) x0 + std(t) z, x0 from the mixture."""
    return _mixture_density(x, float(sde.scale(_t(t))), float(sde.std(_t(t)) ** 2))


def _fokker_planck(sde, p, x, t0, t1, steps):
    """Crank-Nicolson for dp/dt = -d/dx (f x p) + g^2 / 2 d^2p/dx^2, central differences, p = 0 outside."""
    n, dx = len(x), x[1] - x[0]
    dt = (t1 - t0) / steps
    for i in range(steps):
        tm = t0 + (i + 0.5) * dt
        f, g2 = float(sde.drift_coeff(_t(tm))), float(sde.diffusion(_t(tm)) ** 2)
        # L p_j = -(f x_{j+1} p_{j+1} - f x_{j-1} p_{j-1}) / (2 dx) + g2/2 (p_{j+1} - 2 p_j + p_{j-1}) / dx^2
        upper = -f * x[1:] / (2 * dx) + g2 / (2 * dx**2)     # coefficient of p_{j+1} in row j
        lower = f * x[:-1] / (2 * dx) + g2 / (2 * dx**2)     # coefficient of p_{j-1} in row j
        diag = np.full(n, -g2 / dx**2)
        lp = diag * p
        lp[:-1] += upper * p[1:]
        lp[1:] += lower * p[:-1]
        rhs = p + 0.5 * dt * lp
        ab = np.zeros((3, n))
        ab[0, 1:] = -0.5 * dt * upper
        ab[1] = 1 - 0.5 * dt * diag
        ab[2, :-1] = -0.5 * dt * lower
        p = scipy.linalg.solve_banded((1, 1), ab, rhs)
    return p


@pytest.mark.parametrize(("name", "t0", "times", "half_width"), [
    ("vp-sde", 0.0, (0.05, 0.2, 0.5, 1.0), 6.0),
    ("subvp-sde", 0.0, (0.05, 0.2, 0.5, 1.0), 6.0),
    ("ve-sde", 0.0, (0.1, 0.25, 0.4), 14.0),  # sigma 0.01 -> 0.76: the domain grows with sigma
])
def test_closed_form_marginal_solves_fokker_planck(name, t0, times, half_width):
    """From the exact density at t0, the PDE solution matches the closed-form marginal to <= 1e-3 at
    several t (it is ~1e-4 here; the FD error is O(dx^2 + dt^2))."""
    sde = get_sde(name)
    x = np.linspace(-half_width, half_width, 2401)
    p = _marginal(sde, x, t0)
    t_prev = t0
    for t in times:
        steps = max(20, int(round((t - t_prev) / 2e-4)))
        p = _fokker_planck(sde, p, x, t_prev, t, steps)
        exact = _marginal(sde, x, t)
        assert np.abs(p - exact).max() <= 1e-3, (name, t, np.abs(p - exact).max())
        t_prev = t
    # and the PDE is not trivially satisfied: the density did move
    assert np.abs(_marginal(sde, x, times[-1]) - _marginal(sde, x, t0)).max() > 0.1


# ---- reverse SDE and probability-flow ODE with the exact mixture score --------------------------------
RING = ring2d(k=8, radius=1.0, std=0.08)


@pytest.fixture(scope="module")
def ring_reference():
    n = 3000
    return RING.sample(n, torch.Generator().manual_seed(11)), RING.sample(n, torch.Generator().manual_seed(12))


def _prior(sde, n, seed=0):
    """x_1 in VE coordinates: x0 + sigma_max z, i.e. the marginal at t = 1 with the data's mean folded in."""
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return RING.sample(n, torch.Generator().manual_seed(seed + 100)) + z * sde.sigma_max


@pytest.mark.parametrize("name", NAMES)
def test_reverse_sde_with_exact_score_recovers_the_mixture(name, ring_reference):
    """The PC sampler (reverse diffusion + Langevin) from the SDE's own prior: sliced W2 to fresh mixture
    samples at the noise floor (two independent sample sets), and the right within-mode spread."""
    sde = get_sde(name)
    ref, ref2 = ring_reference
    floor = sliced_w2(ref, ref2)
    sigmas = get_sigmas("karras", 200, sde.sigma_min, sde.sigma_max)
    out = sample("pc", RING, _prior(sde, 3000), sigmas, generator=torch.Generator().manual_seed(1), snr=0.16)
    err = sliced_w2(out, ref)
    assert err < 1.6 * floor + 0.01, (err, floor)
    k = ((out[:, None] - RING.means[None]) ** 2).sum(-1).argmin(1)
    within = float((out - RING.means[k]).pow(2).mean().sqrt())
    assert abs(within / 0.08 - 1) < 0.06, within


def test_langevin_corrector_fixes_a_wrong_spread():
    """At a fixed sigma, Langevin steps with the snr rule move samples of the wrong variance to the true
    noised marginal (1-D Gaussian: the variance is exact), which the predictor alone never does."""
    from reverie.samplers.pc import langevin

    v, sigma = 0.25, 0.5
    gauss = GaussianMixture([1.0], [[0.0]], stds=v**0.5)
    x = torch.randn(20000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2.0
    x = langevin(gauss, x, sigma, {}, steps=300, snr=0.16, generator=torch.Generator().manual_seed(1))
    assert float(x.var()) == pytest.approx(v + sigma**2, rel=0.05)


def test_ode_sampler_follows_the_exact_flow_and_reports_nfe():
    """For Gaussian data N(m, v) the probability-flow ODE is x(sigma) = m + (x_T - m) sqrt((v + sigma^2)
    / (v + sigma_T^2)); with the final denoising step the output is D(x(sigma_min), sigma_min)."""
    m, v = 0.3, 0.2
    gauss = GaussianMixture([1.0], [[m, -m]], stds=v**0.5)
    lo, hi = 0.01, 50.0
    x_t = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * hi
    stats = {}
    out = sample("ode", gauss, x_t, get_sigmas("karras", 10, lo, hi), stats=stats)
    mean = torch.tensor([m, -m], dtype=torch.float64)
    x_lo = mean + (x_t - mean) * math.sqrt((v + lo**2) / (v + hi**2))
    expected = mean + (x_lo - mean) * v / (v + lo**2)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)
    assert 10 < stats["nfe"] < 400
    loose = {}
    sample("ode", gauss, x_t, get_sigmas("karras", 10, lo, hi), stats=loose, rtol=1e-2, atol=1e-2)
    assert loose["nfe"] < stats["nfe"]  # tolerance drives the NFE


# ---- training on continuous t ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_uniform_time_draws_sigma_of_uniform_t(name):
    sde = get_sde(name)
    lv = UniformTime(sde)(20000, torch.Generator().manual_seed(0))
    t = sde.t_from_sigma(lv.sigma)
    assert lv.t is None and bool((lv.weight == 1).all())
    assert float(t.min()) >= sde.t_min - 1e-9 and float(t.max()) <= 1 + 1e-9
    assert float(t.mean()) == pytest.approx((sde.t_min + 1) / 2, abs=0.01)


def test_discretized_vp_sde_is_ddpm_linear():
    """The VP SDE at T = 1000 levels is DDPM's linear schedule (beta_i = (beta_min + ...)/T) to O(1/T)."""
    chain = discretize(get_sde("vp-sde"), 1000)
    ddpm = DiscreteVPSchedule.from_name("linear", 1000)
    # sum_i -log(1 - beta_i) differs from sum_i beta_i by about sum_i beta_i^2 / 2 = O(1/T) (0.067 at the top),
    # while log alpha_bar itself falls to -10
    diff = (chain.alphas_cumprod.log() - ddpm.alphas_cumprod.log()).abs()
    second_order = (ddpm.betas**2 / 2).cumsum(0)
    assert bool((diff <= 1.05 * second_order + 2e-3).all()) and float(ddpm.alphas_cumprod.log()[-1]) < -9
    torch.testing.assert_close(chain.sigmas[-1], ddpm.sigmas[-1], rtol=0.05, atol=0)
