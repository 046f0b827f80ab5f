import math

import pytest
import torch

from reverie.schedules import (
    CONTINUOUS_SCHEDULES,
    DISCRETE_SCHEDULES,
    DiscreteVPSchedule,
    alpha_from_sigma,
    get_schedule,
    logsnr_from_sigma,
    vp_sigma_from_sigma,
)

DIFFUSERS_NAMES = {"linear": "linear", "scaled_linear": "scaled_linear",
                   "cosine": "squaredcos_cap_v2", "sigmoid": "sigmoid"}


@pytest.mark.parametrize("name", DISCRETE_SCHEDULES)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_alphas_cumprod_match_diffusers(name, zero_snr):
    from diffusers import DDPMScheduler

    # diffusers' defaults are the linear schedule's endpoints; Stable Diffusion passes its own.
    ends = {"beta_start": 0.00085, "beta_end": 0.012} if name == "scaled_linear" else {}
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=DIFFUSERS_NAMES[name],
                        rescale_betas_zero_snr=zero_snr, **ends)
    s = DiscreteVPSchedule.from_name(name, 1000, zero_terminal_snr=zero_snr)
    # diffusers builds betas in float32; agreement to float32 precision is the best possible.
    torch.testing.assert_close(s.alphas_cumprod.float(), ref.alphas_cumprod, rtol=2e-5, atol=1e-7)
    assert s.alphas_cumprod.dtype == torch.float64


def test_linear_closed_form_and_monotone():
    s = DiscreteVPSchedule.from_name("linear", 1000)
    assert s.betas[0] == pytest.approx(1e-4) and s.betas[-1] == pytest.approx(0.02)
    assert torch.allclose(s.alphas_cumprod, torch.cumprod(1 - s.betas, 0))
    assert bool((s.sigmas[1:] > s.sigmas[:-1]).all())
    # sigma_VE^2 = (1 - alpha_bar) / alpha_bar, logSNR = log(alpha_bar / (1 - alpha_bar))
    ab = s.alphas_cumprod
    torch.testing.assert_close(logsnr_from_sigma(s.sigmas), torch.log(ab / (1 - ab)))


def test_cosine_beta_capped():
    s = DiscreteVPSchedule.from_name("cosine", 1000)
    assert float(s.betas.max()) == pytest.approx(0.999)


@pytest.mark.parametrize("name", DISCRETE_SCHEDULES)
def test_zero_terminal_snr_is_exact_and_finite_downstream(name):
    base = DiscreteVPSchedule.from_name(name, 1000)
    s = DiscreteVPSchedule.from_name(name, 1000, zero_terminal_snr=True)
    assert float(s.alphas_cumprod[-1]) == 0.0
    assert math.isinf(float(s.sigmas[-1]))
    # Lin et al. 2023 keep the first alpha_bar unchanged.
    assert float(s.alphas_cumprod[0]) == pytest.approx(float(base.alphas_cumprod[0]), rel=1e-12)
    # The finite stand-in for the top noise level keeps sigmas increasing and t_from_sigma finite.
    assert math.isfinite(s.sigma_max) and s.sigma_max > float(s.sigmas[-2])
    t = s.t_from_sigma(torch.tensor([s.sigma_max, 1e30, float("inf")]))
    torch.testing.assert_close(t, torch.full((3,), 999.0, dtype=torch.float64), rtol=0, atol=1e-6)
    assert torch.isfinite(s.sigma_from_t(torch.arange(1000.0))).all()


@pytest.mark.parametrize("name", DISCRETE_SCHEDULES)
def test_t_from_sigma_inverts_grid_and_is_monotone(name):
    s = DiscreteVPSchedule.from_name(name, 1000)
    t = torch.arange(1000, dtype=torch.float64)
    torch.testing.assert_close(s.t_from_sigma(s.sigmas), t, atol=1e-9, rtol=0)
    torch.testing.assert_close(s.sigma_from_t(t), s.sigmas)
    # Between grid points: log-linear in sigma, so the geometric mean maps to the midpoint.
    mid = (s.sigmas[10] * s.sigmas[11]).sqrt()
    assert float(s.t_from_sigma(mid)) == pytest.approx(10.5, abs=1e-9)
    dense = torch.logspace(-3, 5, 500, dtype=torch.float64)
    tt = s.t_from_sigma(dense)
    assert bool((tt[1:] >= tt[:-1]).all()) and float(tt.min()) == 0 and float(tt.max()) == 999


def test_sigma_from_t_is_linear_between_grid_points():
    s = DiscreteVPSchedule.from_name("scaled_linear", 1000)
    assert float(s.sigma_from_t(12.25)) == pytest.approx(
        0.75 * float(s.sigmas[12]) + 0.25 * float(s.sigmas[13]), rel=1e-12)


@pytest.mark.parametrize("name", CONTINUOUS_SCHEDULES)
def test_continuous_t_sigma_round_trip(name):
    s = get_schedule(name)
    t = torch.linspace(s.t_min, s.t_max, 101, dtype=torch.float64)
    sigma = s.sigma_from_t(t)
    assert bool((sigma[1:] > sigma[:-1]).all())
    torch.testing.assert_close(s.t_from_sigma(sigma), t, rtol=1e-9, atol=1e-9)


def test_vp_linear_matches_integral_of_beta():
    s = get_schedule("vp-linear")
    # alpha_bar(t) = exp(-int_0^t beta(u) du), beta(u) = beta_min + u (beta_max - beta_min)
    t = torch.linspace(0, 1, 2001, dtype=torch.float64)
    beta = s.beta_min + t * (s.beta_max - s.beta_min)
    integral = torch.cumulative_trapezoid(beta, t)
    torch.testing.assert_close(s.alpha_bar(t[1:]), torch.exp(-integral), rtol=1e-6, atol=1e-12)


def test_vp_cosine_matches_discrete_cosine_alpha_bar():
    s = get_schedule("vp-cosine")
    d = DiscreteVPSchedule.from_name("cosine", 1000)
    t = torch.arange(1, 900)
    # The discrete table is alpha_bar((t + 1) / T) of the continuous schedule (before beta capping).
    expected = d.alphas_cumprod[t]
    torch.testing.assert_close(s.alpha_bar((t + 1).double() / 1000), expected, rtol=1e-9, atol=1e-12)


def test_edm_and_ve_ranges():
    edm = get_schedule("edm")
    assert edm.sigma_min == pytest.approx(0.002) and edm.sigma_max == pytest.approx(80.0)
    ve = get_schedule("ve", sigma_min=0.01, sigma_max=50.0)
    assert ve.sigma_min == pytest.approx(0.01) and ve.sigma_max == pytest.approx(50.0)


def test_vp_identities():
    sigma = torch.logspace(-3, 4, 50, dtype=torch.float64)
    a, s = alpha_from_sigma(sigma), vp_sigma_from_sigma(sigma)
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(sigma))
    torch.testing.assert_close(s / a, sigma)
    assert float(vp_sigma_from_sigma(torch.tensor(float("inf")))) == 1.0


def test_bad_names_are_clear_errors():
    with pytest.raises(ValueError, match="choose one of"):
        get_schedule("quadratic")
    with pytest.raises(ValueError, match="choose one of"):
        DiscreteVPSchedule.from_name("nope")
    with pytest.raises(ValueError):
        DiscreteVPSchedule.from_name("linear", num_timesteps=1)
