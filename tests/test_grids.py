"""Sampling grids (reverie.samplers.get_sigmas / timesteps_for) against their formulas and diffusers 0.42.1.

diffusers keeps its schedules in float32, so its sigmas are compared at rtol 1e-3 (the float32
cumprod is off by up to ~3e-4 at the smallest cosine sigma); integer timesteps must match exactly.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from reverie.samplers import GRIDS, get_sigmas, timesteps_for
from reverie.samplers.base import check_grid
from reverie.schedules import DiscreteVPSchedule, VPLinearSchedule

diffusers = pytest.importorskip("diffusers")
# diffusers 0.42.1 under numpy 2 warns on every set_timesteps; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

T = 1000
DIFFUSERS_NAME = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2",
                  "sigmoid": "sigmoid"}
BETA_RANGE = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012), "cosine": (1e-4, 0.02),
              "sigmoid": (1e-4, 0.02)}
T_KINDS = ("linspace-t", "ddim-leading", "ddim-trailing", "ddim-linspace")


@functools.cache
def _schedule(name: str = "linear", zero_terminal_snr: bool = False) -> DiscreteVPSchedule:
    return DiscreteVPSchedule.from_name(name, zero_terminal_snr=zero_terminal_snr)


def _diffusers(cls, name: str = "linear", **config):
    b0, b1 = BETA_RANGE[name]
    return cls(num_train_timesteps=T, beta_schedule=DIFFUSERS_NAME[name], beta_start=b0, beta_end=b1, **config)


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
@pytest.mark.parametrize("name", DIFFUSERS_NAME)
def test_alphas_cumprod_match_diffusers(name, zero_terminal_snr):
    ref = _diffusers(diffusers.DDPMScheduler, name, rescale_betas_zero_snr=zero_terminal_snr).alphas_cumprod
    ours = _schedule(name, zero_terminal_snr).alphas_cumprod
    torch.testing.assert_close(ours, ref.double(), rtol=5e-5, atol=0)  # float32 cumprod over 1000 steps


def _timestep_mismatches(spacing: str, offset: int = 0, n_max: int = T) -> list:
    """Every n in 1..n_max where timesteps_for differs from DDPMScheduler.set_timesteps."""
    sched = diffusers.DDPMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
    bad = []
    for n in range(1, n_max + 1):
        sched.set_timesteps(n)
        # np.arange with a float step can return n + 1 values, the last one -1 (numpy's docs warn
        # about float steps): a diffusers bug on "trailing" (n = 61, 103, ...); we want exactly n.
        ref = sched.timesteps[:n]
        ours = timesteps_for(f"ddim-{spacing}", n, _schedule(), offset=offset)
        if len(ours) != n or not torch.equal(ours.long(), ref):
            bad.append(n)
    return bad


def test_leading_timesteps_match_diffusers_for_every_n():
    assert _timestep_mismatches("leading") == []
    # with steps_offset = 1, n = T would ask for timestep T, past the table (diffusers indexes out of range)
    assert _timestep_mismatches("leading", offset=1, n_max=T - 1) == []


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_trailing_and_linspace_timesteps_match_diffusers_for_every_n(spacing):
    assert _timestep_mismatches(spacing) == []


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
@pytest.mark.parametrize("spacing,n", [("linspace", 20), ("linspace", 7), ("leading", 10), ("leading", 50),
                                       ("trailing", 15), ("trailing", 50)])
def test_euler_grid_matches_diffusers(name, spacing, n):
    """EulerDiscreteScheduler: sigma interpolated linearly in t at its (possibly fractional) timesteps."""
    kind = "linspace-t" if spacing == "linspace" else f"ddim-{spacing}"
    sched = _diffusers(diffusers.EulerDiscreteScheduler, name, timestep_spacing=spacing)
    sched.set_timesteps(n)
    schedule = _schedule(name)
    torch.testing.assert_close(timesteps_for(kind, n, schedule), sched.timesteps.double(), rtol=0, atol=1e-4)
    torch.testing.assert_close(get_sigmas(kind, n, schedule=schedule), sched.sigmas.double(), rtol=1e-3, atol=0)


@pytest.mark.parametrize("name", ["scaled_linear", "cosine"])
def test_zero_terminal_snr_trailing_grid_matches_diffusers(name):
    # diffusers caps alpha_bar[T-1] = 0 at 2**-24 (sigma 4096); reverie does the same unless the table
    # already passes that level (the linear schedule does), see schedules.py.
    sched = _diffusers(diffusers.EulerDiscreteScheduler, name, timestep_spacing="trailing",
                       rescale_betas_zero_snr=True)
    sched.set_timesteps(10)
    ours = get_sigmas("ddim-trailing", 10, schedule=_schedule(name, True))
    torch.testing.assert_close(ours, sched.sigmas.double(), rtol=1e-3, atol=0)


def test_linspace_t_interpolates_sigma_linearly_between_timesteps():
    schedule = _schedule("cosine")
    t = timesteps_for("linspace-t", 20, schedule)
    lo = t.floor().long()
    w = t - lo
    hi = (lo + 1).clamp(max=T - 1)
    expected = (1 - w) * schedule.sigmas[lo] + w * schedule.sigmas[hi]
    torch.testing.assert_close(get_sigmas("linspace-t", 20, schedule=schedule)[:-1], expected,
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("n", [1, 2, 10, 37])
def test_karras_is_uniform_in_sigma_to_the_one_over_rho(n):
    """Karras et al. 2022, eq. 5: sigma_i^(1/rho) is linear in i, from sigma_max to sigma_min."""
    rho, lo, hi = 7.0, 0.002, 80.0
    sigmas = get_sigmas("karras", n, sigma_min=lo, sigma_max=hi, rho=rho)
    assert len(sigmas) == n + 1 and float(sigmas[-1]) == 0.0
    assert float(sigmas[0]) == pytest.approx(hi, rel=1e-12)
    if n > 1:
        assert float(sigmas[-2]) == pytest.approx(lo, rel=1e-12)
        steps = torch.diff(sigmas[:-1] ** (1 / rho))
        torch.testing.assert_close(steps, steps[:1].expand_as(steps), rtol=1e-9, atol=0)


@pytest.mark.parametrize("n", [2, 10, 37])
def test_exponential_is_uniform_in_log_sigma(n):
    lo, hi = 0.03, 14.6
    sigmas = get_sigmas("exponential", n, sigma_min=lo, sigma_max=hi)
    assert float(sigmas[-1]) == 0.0
    torch.testing.assert_close(sigmas[[0, -2]], torch.tensor([hi, lo], dtype=torch.float64), rtol=1e-12, atol=0)
    steps = torch.diff(sigmas[:-1].log())
    torch.testing.assert_close(steps, torch.full_like(steps, (math.log(lo) - math.log(hi)) / (n - 1)),
                               rtol=1e-9, atol=0)


@pytest.mark.parametrize("kind,flag", [("karras", "use_karras_sigmas"),
                                       ("exponential", "use_exponential_sigmas")])
def test_karras_and_exponential_match_diffusers_with_schedule_range(kind, flag):
    sched = _diffusers(diffusers.EulerDiscreteScheduler, "scaled_linear", **{flag: True})
    sched.set_timesteps(25)
    ours = get_sigmas(kind, 25, schedule=_schedule("scaled_linear"))
    torch.testing.assert_close(ours, sched.sigmas.double(), rtol=1e-3, atol=0)


@pytest.mark.parametrize("n", [1, 2, 7, 50, 999, 1000])
@pytest.mark.parametrize("kind", GRIDS)
def test_every_grid_is_decreasing_and_ends_at_zero(kind, n):
    sigmas = get_sigmas(kind, n, schedule=_schedule("cosine"))
    assert sigmas.dtype == torch.float64 and len(sigmas) == n + 1
    assert float(sigmas[-1]) == 0.0 and bool(torch.isfinite(sigmas).all())
    assert bool((torch.diff(sigmas) < 0).all())
    check_grid(sigmas)  # what every sampler validates


@pytest.mark.parametrize("kind", GRIDS)
@pytest.mark.parametrize("n", [0, -3])
def test_bad_step_count_raises(kind, n):
    with pytest.raises(ValueError, match="at least 1"):
        get_sigmas(kind, n, schedule=_schedule())


@pytest.mark.parametrize("kind", T_KINDS)
def test_t_grids_reject_too_many_steps_and_continuous_schedules(kind):
    with pytest.raises(ValueError, match="timesteps"):
        get_sigmas(kind, T + 1, schedule=_schedule())
    with pytest.raises(ValueError, match="discrete schedule"):
        get_sigmas(kind, 10, schedule=VPLinearSchedule())


def test_bad_kind_and_sigma_range_raise():
    with pytest.raises(ValueError, match="karras"):  # the message lists the valid kinds
        get_sigmas("cosine-t", 10, schedule=_schedule())
    with pytest.raises(ValueError, match="sigma_min"):
        get_sigmas("karras", 10)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        get_sigmas("exponential", 10, sigma_min=5.0, sigma_max=1.0)
