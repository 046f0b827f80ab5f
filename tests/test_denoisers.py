import pytest
import torch
from torch import nn

from reverie.denoisers import (
    EDMDenoiser,
    EpsDenoiser,
    VDenoiser,
    X0Denoiser,
    make_denoiser,
)
from reverie.schedules import DiscreteVPSchedule, alpha_from_sigma, get_schedule

SCHED = DiscreteVPSchedule.from_name("linear", 1000)


class Oracle(nn.Module):
    """A 'network' that returns a fixed tensor and records its inputs."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x, c_noise, **cond):
        self.seen = (x, c_noise, cond)
        return self.out


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.5, 3.0, 150.0], dtype=torch.float64)
    return x0, noise, sigma


@pytest.mark.parametrize("cls", [EpsDenoiser, VDenoiser, X0Denoiser, EDMDenoiser])
def test_perfect_network_recovers_x0(cls):
    """Round trip eps/x0/v/EDM: a network that outputs its exact target gives back x0."""
    x0, noise, sigma = _case()
    x = x0 + sigma.view(-1, 1, 1, 1) * noise
    probe = cls(Oracle(None), schedule=SCHED)
    probe.model.out = probe.target(x0, noise, sigma)
    torch.testing.assert_close(probe(x, sigma), x0, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("cls", [EpsDenoiser, VDenoiser, X0Denoiser])
def test_analytic_targets_equal_generic_formula(cls):
    from reverie.denoisers import Denoiser

    x0, noise, sigma = _case(1)
    d = cls(Oracle(None), SCHED)
    torch.testing.assert_close(d.target(x0, noise, sigma), Denoiser.target(d, x0, noise, sigma))


def test_eps_v_x0_conversions():
    """v = alpha eps - sigma_vp x0, and x0 = alpha x_vp - sigma_vp v (Salimans & Ho 2022)."""
    x0, noise, sigma = _case(2)
    alpha = alpha_from_sigma(sigma).view(-1, 1, 1, 1)
    sigma_vp = sigma.view(-1, 1, 1, 1) * alpha
    x_vp = alpha * x0 + sigma_vp * noise
    v = VDenoiser(Oracle(None), SCHED).target(x0, noise, sigma)
    torch.testing.assert_close(alpha * x_vp - sigma_vp * v, x0)
    torch.testing.assert_close(sigma_vp * x_vp + alpha * v, noise)


@pytest.mark.parametrize("cls", [EpsDenoiser, VDenoiser, X0Denoiser, EDMDenoiser])
def test_zero_network_gives_c_skip_x(cls):
    _, _, sigma = _case()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    d = cls(Oracle(torch.zeros_like(x)), schedule=SCHED)
    c_skip = d.scalings(sigma)[0].view(-1, 1, 1, 1)
    torch.testing.assert_close(d(x, sigma), c_skip * x)


def test_vp_network_sees_vp_input_and_timestep():
    x0, noise, sigma = _case()
    sigma = SCHED.sigmas[torch.tensor([0, 10, 500, 999])]
    x = x0 + sigma.view(-1, 1, 1, 1) * noise
    net = Oracle(torch.zeros_like(x))
    EpsDenoiser(net, SCHED)(x, sigma)
    xin, c_noise, _ = net.seen
    ab = SCHED.alphas_cumprod[torch.tensor([0, 10, 500, 999])].view(-1, 1, 1, 1)
    torch.testing.assert_close(xin, ab.sqrt() * x0 + (1 - ab).sqrt() * noise)
    torch.testing.assert_close(c_noise, torch.tensor([0.0, 10, 500, 999], dtype=torch.float64))


def test_edm_scalings_closed_form():
    sd = 0.5
    sigma = torch.tensor([0.002, 0.5, 80.0], dtype=torch.float64)
    d = EDMDenoiser(Oracle(None), sigma_data=sd)
    c_skip, c_out, c_in = d.scalings(sigma)
    torch.testing.assert_close(c_skip, sd**2 / (sigma**2 + sd**2))
    torch.testing.assert_close(c_out, sigma * sd / (sigma**2 + sd**2).sqrt())
    torch.testing.assert_close(c_in, 1 / (sigma**2 + sd**2).sqrt())
    torch.testing.assert_close(d.c_noise(sigma), sigma.log() / 4)
    # EDM's design goal: unit-variance input and training target for data of std sigma_data.
    torch.testing.assert_close(c_in**2 * (sigma**2 + sd**2), torch.ones(3, dtype=torch.float64))


def test_learned_variance_splits_channels():
    x = torch.randn(2, 3, 4, 4)
    out = torch.cat([torch.zeros_like(x), torch.full_like(x, 0.5)], 1)
    d = EpsDenoiser(Oracle(out), SCHED, learned_variance=True)
    x0, frac = d.forward_with_variance(x, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(x0, x)
    torch.testing.assert_close(frac, torch.full_like(x, 0.75))


def test_continuous_schedule_time_scale():
    s = get_schedule("vp-linear")
    net = Oracle(torch.zeros(2, 1))
    EpsDenoiser(net, s, time_scale=1000.0)(torch.zeros(2, 1), torch.tensor([0.1, 10.0]))
    expected = s.t_from_sigma(torch.tensor([0.1, 10.0])) * 1000
    torch.testing.assert_close(net.seen[1], expected.float())


def test_zero_terminal_snr_top_noise_level_is_finite():
    s = DiscreteVPSchedule.from_name("scaled_linear", 1000, zero_terminal_snr=True)
    x = torch.randn(2, 3, 4, 4) * s.sigma_max
    for cls in (EpsDenoiser, VDenoiser):
        d = cls(Oracle(torch.randn(2, 3, 4, 4)), s)
        assert torch.isfinite(d(x, torch.full((2,), s.sigma_max))).all()


def test_make_denoiser_and_errors():
    assert isinstance(make_denoiser("v", Oracle(None), SCHED), VDenoiser)
    assert isinstance(make_denoiser("edm", Oracle(None), sigma_data=1.0), EDMDenoiser)
    with pytest.raises(ValueError, match="eps, x0, v, edm"):
        make_denoiser("score", Oracle(None), SCHED)
    with pytest.raises(ValueError, match="needs a schedule"):
        EpsDenoiser(Oracle(torch.zeros(1, 1)))(torch.zeros(1, 1), torch.ones(1))
