"""The Gaussian-mixture target: exact denoiser against closed forms, Monte Carlo and Tweedie's
formula; sampling moments; float64 stability at the ends of the noise range; sliced W2."""

import math

import pytest
import torch

from reverie.gmm import GaussianMixture, grid2d, random_mixture, ring2d, sliced_w2

SIGMAS = (0.002, 0.05, 0.5, 3.0, 80.0, 4096.0)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _random_cov(d, seed):
    a = torch.randn(d, d, generator=_gen(seed), dtype=torch.float64)
    return a @ a.T / d + 0.05 * torch.eye(d, dtype=torch.float64)


def _mixed_sigmas(n):
    return torch.tensor(SIGMAS, dtype=torch.float64).repeat(n // len(SIGMAS) + 1)[:n]


@pytest.mark.parametrize("sigma", SIGMAS)
def test_single_gaussian_closed_form(sigma):
    """K = 1: D(x, s) = mu + C (C + s^2 I)^-1 (x - mu) (Gaussian conditioning)."""
    d = 5
    mu = torch.randn(d, generator=_gen(1), dtype=torch.float64)
    C = _random_cov(d, 2)
    gmm = GaussianMixture([1.0], mu[None], covs=C[None])
    x = mu + sigma * torch.randn(64, d, generator=_gen(3), dtype=torch.float64)
    expected = mu + (C @ torch.linalg.solve(C + sigma**2 * torch.eye(d, dtype=torch.float64), (x - mu).T)).T
    torch.testing.assert_close(gmm.denoiser(x, torch.full((64,), sigma)), expected, rtol=1e-10, atol=1e-10)


def test_per_sample_sigma_matches_scalar_calls():
    """A [B] sigma with different entries gives each row what a scalar sigma gives it."""
    gmm = random_mixture(dim=6, k=4, seed=3)
    sig = _mixed_sigmas(12)
    x = gmm.sample(12, _gen(0)) + sig[:, None] * torch.randn(12, 6, generator=_gen(1), dtype=torch.float64)
    batched = gmm.denoiser(x, sig)
    rows = torch.cat([gmm.denoiser(x[i:i + 1], float(sig[i])) for i in range(12)])
    torch.testing.assert_close(batched, rows, rtol=1e-12, atol=1e-12)


def _dense_mixture_denoiser(gmm, x, sigma):
    """Reference: responsibilities from torch.distributions, component means by linalg.solve."""
    eye = torch.eye(gmm.dim, dtype=torch.float64)
    logs, posts = [], []
    for w, mu, C in zip(gmm.weights, gmm.means, gmm.covs):
        S = C + sigma**2 * eye
        logs.append(w.log() + torch.distributions.MultivariateNormal(mu, S).log_prob(x))
        posts.append(mu + (C @ torch.linalg.solve(S, (x - mu).T)).T)
    resp = torch.stack(logs, 1).softmax(1)
    return torch.einsum("nk,kni->ni", resp, torch.stack(posts))


@pytest.mark.parametrize("sigma", (0.01, 0.3, 2.0))
def test_full_covariance_mixture_matches_dense_reference(sigma):
    gmm = random_mixture(dim=7, k=5, seed=4, std_range=(0.05, 0.5))
    x = gmm.noised(sigma).sample(200, _gen(5))
    torch.testing.assert_close(gmm.denoiser(x, sigma), _dense_mixture_denoiser(gmm, x, sigma),
                               rtol=1e-10, atol=1e-10)


def test_diagonal_mixture_matches_dense_reference():
    """Axis-aligned components take a separate code path (no rotations, expanded quadratic form
    for a shared sigma): same answers as the dense reference, shared and per-row sigma."""
    gmm = random_mixture(dim=6, k=5, seed=8, rotate=False)
    assert gmm._diagonal
    for sigma in (0.002, 0.3, 80.0):
        x = gmm.noised(sigma).sample(100, _gen(9))
        torch.testing.assert_close(gmm.denoiser(x, sigma), _dense_mixture_denoiser(gmm, x, sigma),
                                   rtol=1e-9, atol=1e-10)
    sig = _mixed_sigmas(12)
    x = gmm.sample(12, _gen(0)) + sig[:, None] * torch.randn(12, 6, generator=_gen(1), dtype=torch.float64)
    rows = torch.cat([_dense_mixture_denoiser(gmm, x[i:i + 1], float(sig[i])) for i in range(12)])
    torch.testing.assert_close(gmm.denoiser(x, sig), rows, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sigma", (0.15, 0.6))
def test_denoiser_matches_monte_carlo_posterior_mean(sigma):
    """E[x0 | x] by self-normalized importance sampling over x0 ~ p_0, weights N(x; x0, s^2 I)."""
    gmm = ring2d(k=8, radius=1.0, std=0.2)
    x0 = gmm.sample(400_000, _gen(7))
    x = gmm.noised(sigma).sample(6, _gen(8))  # typical points, so the importance weights spread
    logw = -((x[:, None, :] - x0[None]) ** 2).sum(-1) / (2 * sigma**2)  # [6, N]
    w = logw.softmax(1)
    mc = w @ x0
    ess = 1 / (w**2).sum(1)  # effective sample size sets the MC error: std ~ spread / sqrt(ess)
    assert bool((ess > 2000).all())
    tol = 6 * (sigma + 0.2) / ess.sqrt()
    err = (gmm.denoiser(x, sigma) - mc).abs().max(dim=1).values
    assert bool((err < tol).all()), (err, tol)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_tweedie_formula(sigma):
    """D(x, s) = x + s^2 grad_x log p_s(x) (Tweedie / Efron 2011), gradient by autograd."""
    gmm = grid2d(n=3, spacing=0.6, std=0.07)
    x = gmm.noised(sigma).sample(50, _gen(11)).requires_grad_(True)
    (grad,) = torch.autograd.grad(gmm.noised(sigma).log_prob(x).sum(), x)
    tweedie = x.detach() + sigma**2 * grad
    # x + s^2 grad cancels terms of size |x| ~ s: the absolute error floor grows with sigma.
    atol = 1e-10 * max(1.0, sigma**2)
    torch.testing.assert_close(gmm.denoiser(x.detach(), sigma), tweedie, rtol=1e-8, atol=atol)


def test_sample_moments():
    gmm = random_mixture(dim=4, k=3, seed=2)
    n = 200_000
    x = gmm.sample(n, _gen(0))
    cov = gmm.cov()
    se_mean = (cov.diagonal() / n).sqrt()
    assert bool(((x.mean(0) - gmm.mean()).abs() < 5 * se_mean).all())
    # Var of an empirical covariance entry <= sqrt(E x_i^4 E x_j^4) / n; 5 sigma with slack.
    emp = torch.cov(x.T)
    tol = 5 * 3 * cov.diagonal().max() / math.sqrt(n)
    assert float((emp - cov).abs().max()) < tol


def test_sample_component_frequencies():
    """Well-separated components: the nearest mean identifies each sample's component."""
    weights = torch.arange(1, 9, dtype=torch.float64)
    gmm = GaussianMixture(weights, ring2d(k=8, radius=1.0).means, stds=0.05)
    n = 100_000
    x = gmm.sample(n, _gen(4))
    k = ((x[:, None] - gmm.means[None]) ** 2).sum(-1).argmin(1)
    freq = torch.bincount(k, minlength=8).double() / n
    se = (gmm.weights * (1 - gmm.weights) / n).sqrt()
    assert bool(((freq - gmm.weights).abs() < 5 * se).all()), (freq, gmm.weights)


def test_sample_is_reproducible_and_log_prob_normalized():
    gmm = ring2d()
    assert torch.equal(gmm.sample(100, _gen(3)), gmm.sample(100, _gen(3)))
    # The density integrates to 1 over a fine grid covering the ring.
    t = torch.linspace(-2, 2, 801, dtype=torch.float64)
    xy = torch.cartesian_prod(t, t)
    mass = gmm.log_prob(xy).exp().sum() * (t[1] - t[0]) ** 2
    assert abs(float(mass) - 1) < 1e-6


def test_noised_marginal():
    gmm = random_mixture(dim=3, k=4, seed=6)
    noisy = gmm.noised(2.5)
    torch.testing.assert_close(noisy.cov(), gmm.cov() + 6.25 * torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(noisy.mean(), gmm.mean())
    # p_sigma is p_0 convolved with N(0, s^2 I): log densities agree with a sample-based check.
    x0 = gmm.sample(100_000, _gen(1))
    y = torch.zeros(1, 3, dtype=torch.float64)
    mc = torch.distributions.Normal(0.0, 2.5).log_prob(y - x0).sum(-1).exp().mean()
    assert abs(float(noisy.log_prob(y).exp()) / float(mc) - 1) < 0.02


def test_stable_at_extreme_sigmas_and_far_points():
    """Tiny sigma far from every component and huge sigma: finite, and the right limits."""
    gmm = ring2d(k=8, radius=1.0, std=0.08)
    far = torch.tensor([[60.0, 0.5], [-3.0, -40.0]], dtype=torch.float64)
    d = gmm.denoiser(far, 0.002)
    assert bool(torch.isfinite(d).all())
    # Far away at tiny sigma the nearest component (by Euclidean distance, equal stds) wins
    # outright and D is its Gaussian posterior mean, which is almost x itself.
    nearest = ((far[:, None] - gmm.means[None]) ** 2).sum(-1).argmin(1)
    mu = gmm.means[nearest]
    shrink = 0.08**2 / (0.08**2 + 0.002**2)
    torch.testing.assert_close(d, mu + shrink * (far - mu), rtol=1e-12, atol=1e-12)
    # sigma -> inf: the posterior is the prior, D -> mixture mean + Cov x / sigma^2.
    x = 4096.0 * torch.randn(100, 2, generator=_gen(0), dtype=torch.float64)
    d = gmm.denoiser(x, 4096.0)
    approx = gmm.mean() + x @ gmm.cov() / 4096.0**2
    torch.testing.assert_close(d, approx, rtol=0, atol=1e-3)
    # float32 in, float32 out, finite.
    d32 = gmm.denoiser(x.float(), torch.full((100,), 4096.0))
    assert d32.dtype == torch.float32 and bool(torch.isfinite(d32).all())
    # Image-shaped input [B, 1, 1, 2] is flattened and reshaped back.
    img = x.reshape(100, 1, 1, 2)
    torch.testing.assert_close(gmm.denoiser(img, 4096.0).reshape(100, 2), d)


def test_sliced_w2_of_a_shift():
    """Shifting a sample by a moves every projection by theta.a: SW2^2 = E (theta.a)^2 = |a|^2 / D."""
    d = 16
    x = torch.randn(1000, d, generator=_gen(0), dtype=torch.float64)
    a = torch.full((d,), 0.3, dtype=torch.float64)
    sw = sliced_w2(x, x + a, num_projections=2048)
    assert abs(sw - float(a.norm()) / math.sqrt(d)) < 0.05 * float(a.norm()) / math.sqrt(d)
    assert sliced_w2(x, x) == 0.0


@pytest.mark.parametrize("kwargs", [
    {"weights": [1.0], "means": [[0.0, 0.0]]},  # neither covs nor stds
    {"weights": [1.0, 1.0], "means": [[0.0, 0.0]], "stds": 0.1},  # weights / means mismatch
    {"weights": [1.0], "means": [[0.0, 0.0]], "covs": [[[1.0, 0.0], [0.0, -1.0]]]},  # not PSD
    {"weights": [1.0], "means": [0.0, 0.0], "stds": 0.1},  # means not [K, D]
])
def test_bad_input_raises(kwargs):
    with pytest.raises(ValueError):
        GaussianMixture(**kwargs)
