"""reverie.vdm: the monotone schedule, its denoiser view, the continuous-time ELBO and its invariance."""

from __future__ import annotations

import math

import pytest
import torch

from reverie.denoisers import EpsDenoiser
from reverie.gmm import GaussianMixture
from reverie.samplers import get_sigmas
from reverie.vdm import (
    GAMMA_REF,
    FixedGamma,
    GammaNetwork,
    VDMNet,
    c_noise_from_gamma,
    continuous_elbo,
    gamma_with_derivative,
    make_gamma,
    optimal_gaussian_diffusion_loss,
    prior_kl,
    reconstruction_nll,
)

G0, G1 = -10.0, 6.0


def scrambled_network(seed: int = 0, **kwargs) -> GammaNetwork:
    """A GammaNetwork far from its near-linear start: large random raw weights."""
    gen = torch.Generator().manual_seed(seed)
    net = GammaNetwork(**kwargs)
    with torch.no_grad():
        for p in (net.w1, net.w2, net.b2, net.w3):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 3)
    return net


def schedules():
    return {"linear": FixedGamma("linear", G0, G1), "cosine": FixedGamma("cosine", G0, G1),
            "learned": scrambled_network(0, gamma_min=G0, gamma_max=G1, hidden=64)}


def gaussian_denoiser(v: float):
    """The optimal denoiser for data N(0, v I): E[x0 | x0 + sigma eps = x] = v / (v + sigma^2) x."""
    def D(x, sigma):
        s2 = sigma.to(torch.float64).reshape(-1, *([1] * (x.ndim - 1))) ** 2
        return (v / (v + s2) * x.to(torch.float64)).to(x.dtype)
    return D


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gamma_network_is_monotone_with_exact_endpoints(seed):
    net = scrambled_network(seed, gamma_min=G0, gamma_max=G1, hidden=32)
    t = torch.linspace(0, 1, 10_001, dtype=torch.float64)
    gamma, dgamma = (v.detach() for v in gamma_with_derivative(net, t))
    assert bool((gamma.diff() > 0).all()) and bool((dgamma > 0).all())
    assert float(gamma[0]) == pytest.approx(G0, abs=1e-12) and float(gamma[-1]) == pytest.approx(G1, abs=1e-12)
    # the autograd derivative is the derivative: central differences agree
    h = 1e-6
    mid = torch.tensor([0.3, 0.7], dtype=torch.float64)
    fd = (net(mid + h) - net(mid - h)) / (2 * h)
    torch.testing.assert_close(gamma_with_derivative(net, mid)[1], fd.detach(), rtol=1e-6, atol=1e-6)


def test_cosine_schedule_is_the_truncated_cosine():
    cos = FixedGamma("cosine", G0, G1)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    alpha2 = torch.sigmoid(-cos(t))
    theta = torch.atan(torch.exp(torch.tensor(G0 / 2))) + t * (
        torch.atan(torch.exp(torch.tensor(G1 / 2))) - torch.atan(torch.exp(torch.tensor(G0 / 2))))
    torch.testing.assert_close(alpha2, torch.cos(theta) ** 2)
    assert float(cos(t[:1])) == pytest.approx(G0) and float(cos(t[-1:])) == pytest.approx(G1)


@pytest.mark.parametrize("name", ["linear", "cosine", "learned"])
def test_diffusion_integral_is_invariant_to_the_schedule_by_quadrature(name):
    """0.5 int gamma'(t) e^-gamma E|x0 - D*|^2 dt: the same value for every schedule with these endpoints."""
    v, n = 0.25, 16
    schedule = schedules()[name]
    t = torch.linspace(0, 1, 400_001, dtype=torch.float64)
    gamma, dgamma = gamma_with_derivative(schedule, t)
    integrand = 0.5 * dgamma * n * v / (v + gamma.exp())
    value = float(torch.trapezoid(integrand.detach(), t))
    assert value == pytest.approx(optimal_gaussian_diffusion_loss(v, n, G0, G1), rel=1e-5)


def test_elbo_estimates_agree_across_schedules_and_with_the_closed_form():
    """The Monte-Carlo diffusion term of continuous_elbo, under three schedules with equal endpoints."""
    v, n, B = 0.25, 8, 40_000
    x0 = torch.randn(B, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * math.sqrt(v)
    exact = optimal_gaussian_diffusion_loss(v, n, G0, G1)
    estimates = {}
    for name, schedule in schedules().items():
        terms = continuous_elbo(gaussian_denoiser(v), x0, schedule, torch.Generator().manual_seed(1),
                                num_levels=2)
        mean, se = float(terms.diffusion.mean()), float(terms.diffusion.std()) / math.sqrt(B)
        assert abs(mean - exact) < 4 * se, (name, mean, exact, se)
        estimates[name] = (mean, se)
    # the schedule changes the estimator's variance, not its mean
    assert len({round(se, 6) for _, se in estimates.values()}) == 3


def test_prior_kl_matches_torch_distributions():
    x0 = torch.rand(3, 5, dtype=torch.float64) * 2 - 1
    g1 = torch.tensor(1.5, dtype=torch.float64)
    q = torch.distributions.Normal(torch.sigmoid(-g1).sqrt() * x0, torch.sigmoid(g1).sqrt())
    p = torch.distributions.Normal(torch.zeros_like(x0), torch.ones_like(x0))
    torch.testing.assert_close(prior_kl(x0, g1), torch.distributions.kl_divergence(q, p).sum(-1))


def test_reconstruction_is_the_normalized_gaussian_over_levels():
    L, g0 = 8, torch.tensor(-4.0, dtype=torch.float64)
    levels = torch.linspace(-1, 1, L, dtype=torch.float64)
    x0 = levels[torch.tensor([[0, 3], [7, 5]])]
    noise = torch.randn(2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sigma0 = math.exp(-2.0)
    z = x0 + sigma0 * noise
    pdf = torch.exp(-0.5 * ((z[..., None] - levels) / sigma0) ** 2)
    p_true = (pdf / pdf.sum(-1, keepdim=True)).gather(-1, ((x0 + 1) * (L - 1) / 2).round().long()[..., None])
    torch.testing.assert_close(reconstruction_nll(x0, g0, noise, L), -p_true.log().squeeze(-1).sum(-1))


def test_elbo_of_the_exact_denoiser_is_the_data_entropy():
    """Data uniform over K points on the 256-level grid: with the data's own optimal denoiser the bound is
    tight up to the endpoints, so the ELBO in bits per dimension is log2(K) / d."""
    d, K, B = 3, 4, 4000
    gen = torch.Generator().manual_seed(0)
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    points = levels[torch.randint(0, 256, (K, d), generator=gen)]
    data = GaussianMixture(torch.full((K,), 1 / K), points, stds=torch.full((K,), 1e-6))
    x0 = points[torch.randint(0, K, (B,), generator=gen)]
    schedule = FixedGamma("linear", -13.3, 9.0)
    terms = continuous_elbo(data.denoiser, x0, schedule, torch.Generator().manual_seed(1), num_t=4)
    bpd, se = float(terms.bits_per_dim().mean()), float(terms.bits_per_dim().std()) / math.sqrt(B)
    assert bpd == pytest.approx(math.log2(K) / d, abs=4 * se + 0.01)
    # the endpoints' share: ~0.007 nats per dimension of decoder error at sigma_0 = 1.3e-3, a tiny prior KL
    assert float(terms.reconstruction.mean()) < 0.05 and float(terms.prior.mean()) < 0.01


def test_variance_gradient_is_the_gradient_of_the_squared_loss():
    net = scrambled_network(1, hidden=16)
    t = torch.tensor([0.1, 0.4, 0.8], dtype=torch.float64)
    weights = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)

    def losses(box=None):
        gamma, dgamma = gamma_with_derivative(net, t, create_graph=True, box=box)
        return weights * dgamma * torch.sigmoid(gamma)   # any per-sample loss of gamma(t) and gamma'(t)

    shape_params = (net.w1, net.w2, net.b2, net.w3)
    expected = torch.autograd.grad(losses().pow(2).mean(), shape_params)
    box = {}
    loss = losses(box)
    box["scale"] = 2 * loss.detach()
    got = torch.autograd.grad(loss.mean(), shape_params)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    # the endpoints keep the plain gradient of the loss
    box = {}
    loss = losses(box)
    box["scale"] = 2 * loss.detach()
    plain = torch.autograd.grad(losses().mean(), (net.gamma_0, net.gamma_1))
    torch.testing.assert_close(torch.autograd.grad(loss.mean(), (net.gamma_0, net.gamma_1)), plain)


class _Probe(torch.nn.Module):
    """A 'network' that returns its noise input, broadcast: to read what the denoiser passes."""

    config = None

    def forward(self, x, c_noise, **cond):
        return c_noise.reshape(-1, *([1] * (x.ndim - 1))).expand_as(x).to(x.dtype) + 0 * x


def test_schedule_view_round_trips_and_drives_samplers():
    model = VDMNet(_Probe(), scrambled_network(2, hidden=16))
    view = model.schedule_view
    t = torch.tensor([0.0, 3.3, 500.0, 998.7, 999.0], dtype=torch.float64)
    torch.testing.assert_close(view.t_from_sigma(view.sigma_from_t(t)), t, atol=1e-9, rtol=0)
    assert view.sigma_min == pytest.approx(math.exp(GAMMA_REF[0] / 2))
    assert float(view.sigmas[-1]) == pytest.approx(view.sigma_max)
    for grid in ("karras", "ddim-trailing", "linspace-t"):
        sigmas = get_sigmas(grid, 10, schedule=view)
        assert sigmas[-1] == 0 and bool((sigmas[:-1].diff() < 0).all())
    # EpsDenoiser over the view: the network sees c_noise(2 log sigma), through sigma -> t -> gamma
    D = EpsDenoiser(model, view)
    sigma = torch.tensor([0.01, 1.0, 10.0], dtype=torch.float64)  # inside [sigma_min, sigma_max]
    x = torch.zeros(3, 1, 2, 2)
    out = D(x, sigma.float())
    expected = -sigma * c_noise_from_gamma(2 * sigma.log())
    torch.testing.assert_close(out[:, 0, 0, 0].double(), expected, rtol=1e-5, atol=1e-5)


def test_make_gamma_round_trips_the_config():
    for schedule in schedules().values():
        again = make_gamma(schedule.config())
        assert type(again) is type(schedule) and again.config() == schedule.config()
    with pytest.raises(ValueError, match="unknown VDM schedule kind"):
        make_gamma({"kind": "sigmoid"})
    with pytest.raises(ValueError, match="gamma_min < gamma_max"):
        GammaNetwork(gamma_min=2.0, gamma_max=1.0)


def test_speed_rescales_the_parameters_not_the_function():
    torch.manual_seed(5)
    slow = GammaNetwork(hidden=8)
    torch.manual_seed(5)
    fast = GammaNetwork(hidden=8, speed=30.0)
    t = torch.linspace(0, 1, 9, dtype=torch.float64)
    torch.testing.assert_close(fast(t), slow(t))
    torch.testing.assert_close(fast.w3 * 30, slow.w3)
    assert make_gamma(fast.config()).speed == 30.0
