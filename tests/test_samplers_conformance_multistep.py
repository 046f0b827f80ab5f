"""DPM-Solver++(2M), SDE-DPM-Solver++(2M) and UniPC: conformance to diffusers 0.42.1 and closed-form
checks on N(0, I) data.

Conformance: the same small fixed random conv net (it reads t, so a timestep error shows), the same
initial noise and timesteps, float64 on both sides. diffusers calls the raw net on VP inputs;
reverie wraps it as an EpsDenoiser / VDenoiser. diffusers starts from x_vp = noise
(init_noise_sigma = 1), which is x = noise / alpha(sigma_0) in VE coordinates; at sigma = 0 both
coordinates agree. We compare every intermediate state, mapped to VP coordinates (in UniPC the
predictor's output; its correction happens at the next step on both sides), not only the end.

Known diffusers 0.42.1 defects met here (reported nowhere we could find), where reverie follows
the paper instead:
* UniPC with solver_type="bh1" and final_sigmas_type="zero" returns NaN at the last step: with
  sigma_next = 0, h = inf and B(h) = -h = -inf multiplies the empty (zero) UniP-1 correction sum.
  UniP-1 has no such term (Zhao et al. 2023, Sec. 3.1): the exact step to 0 is x = D. We compare
  that step with diffusers' own data prediction there (``model_outputs[-1]``).
* UniPC with lower_order_final=False and final_sigmas_type="zero" divides by r = 0 (order 2: NaN)
  or solves a singular system (order 3) at the last step; we compare all steps before it.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from reverie.denoisers import EpsDenoiser, VDenoiser
from reverie.samplers import get_sigmas, sample
from reverie.schedules import DiscreteVPSchedule

DIFFUSERS_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction"}
DENOISERS = {"eps": EpsDenoiser, "v": VDenoiser}
NOISE_SEED = 1234

# (reverie sampler, reverie options, diffusers scheduler class name, diffusers options)
CASES = [
    ("dpmpp_2m", {}, "dpm", {"algorithm_type": "dpmsolver++", "solver_type": "midpoint"}),
    ("dpmpp_2m", {"solver_type": "heun"}, "dpm", {"algorithm_type": "dpmsolver++", "solver_type": "heun"}),
    ("dpmpp_2m_sde", {}, "dpm", {"algorithm_type": "sde-dpmsolver++", "solver_type": "midpoint"}),
    ("dpmpp_2m_sde", {"solver_type": "heun"}, "dpm",
     {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}),
    ("unipc", {"order": 2, "variant": "bh1"}, "unipc", {"solver_order": 2, "solver_type": "bh1"}),
    ("unipc", {"order": 2, "variant": "bh2"}, "unipc", {"solver_order": 2, "solver_type": "bh2"}),
    ("unipc", {"order": 3, "variant": "bh1"}, "unipc", {"solver_order": 3, "solver_type": "bh1"}),
    ("unipc", {"order": 3, "variant": "bh2"}, "unipc", {"solver_order": 3, "solver_type": "bh2"}),
]


class TinyNet(torch.nn.Module):
    """A fixed random conv net F(x, t); t enters through cos(t / 50) so an off-by-one timestep
    moves the output by ~1e-2, far above the 1e-4 tolerance."""

    def __init__(self, channels: int = 2, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.randn(channels, channels, 3, 3, generator=g, dtype=torch.float64) * 0.3
        self.w2 = torch.randn(channels, channels, 3, 3, generator=g, dtype=torch.float64) * 0.3
        self.phase = torch.randn(channels, generator=g, dtype=torch.float64)

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        a = torch.tanh(F.conv2d(x, self.w1.to(x.dtype), padding=1))
        b = F.conv2d(torch.tanh(x), self.w2.to(x.dtype), padding=1)
        return a * torch.cos(t / 50 + self.phase.to(x.dtype).view(1, -1, 1, 1)) + b * (t / 1000)


def _reference_scheduler(kind, schedule, prediction, spacing, **opts):
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    ends = {"beta_start": 0.00085, "beta_end": 0.012} if schedule == "scaled_linear" else {}
    cls = DPMSolverMultistepScheduler if kind == "dpm" else UniPCMultistepScheduler
    return cls(num_train_timesteps=1000, beta_schedule=DIFFUSERS_SCHEDULES[schedule],
               prediction_type=DIFFUSERS_PREDICTION[prediction], timestep_spacing=spacing,
               final_sigmas_type="zero", **ends, **opts)


def _sde_noises(shape, n):
    """The draws reverie's SDE sampler makes from Generator(NOISE_SEED): one per step into a
    nonzero sigma, in order; the step to 0 draws none (diffusers' draw there is multiplied by 0)."""
    g = torch.Generator().manual_seed(NOISE_SEED)
    draws = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n - 1)]
    return draws + [torch.zeros(shape, dtype=torch.float64)]


def _run_diffusers(ref, net, noise, sde, steps=None):
    states, x = [], noise.clone()
    noises = _sde_noises(noise.shape, len(ref.timesteps)) if sde else None
    for i, t in enumerate(ref.timesteps[:steps]):
        extra = {"variance_noise": noises[i]} if sde else {}
        x = ref.step(net(x, t), t, x, **extra).prev_sample
        states.append(x)
    return states


def _run_reverie(name, denoiser, noise, sigmas, **opts):
    """reverie's state after each step, in diffusers' VP coordinates x_vp = x / sqrt(1 + sigma^2)."""
    states = []

    def keep(step):
        states.append(step.x / math.sqrt(1 + step.sigma_next**2))

    x = noise * math.sqrt(1 + float(sigmas[0]) ** 2)  # diffusers' x_vp = noise, in VE coordinates
    gen = torch.Generator().manual_seed(NOISE_SEED)
    out = sample(name, denoiser, x, sigmas, generator=gen, callback=keep, **opts)
    assert torch.equal(out, states[-1])  # sigma = 0: VP and VE coordinates agree
    return states


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def _setup(schedule, prediction, n, spacing, kind, ref_opts):
    s = DiscreteVPSchedule.from_name(schedule, 1000)
    ref = _reference_scheduler(kind, schedule, prediction, spacing, **ref_opts)
    ref.set_timesteps(n)
    sigmas = torch.cat([s.sigmas[ref.timesteps], torch.zeros(1, dtype=torch.float64)])
    if spacing == "trailing":  # reverie's own grid is diffusers' trailing spacing
        torch.testing.assert_close(get_sigmas("ddim-trailing", n, schedule=s), sigmas, rtol=0, atol=0)
    net = TinyNet()
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return ref, net, DENOISERS[prediction](net, s), noise, sigmas


@pytest.mark.parametrize("n, spacing", [(7, "trailing"), (16, "linspace")])
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("schedule", list(DIFFUSERS_SCHEDULES))
@pytest.mark.parametrize("name, opts, kind, ref_opts", CASES,
                         ids=[f"{c[0]}-{'-'.join(map(str, c[1].values())) or 'default'}" for c in CASES])
def test_matches_diffusers(name, opts, kind, ref_opts, schedule, prediction, n, spacing):
    ref, net, denoiser, noise, sigmas = _setup(schedule, prediction, n, spacing, kind, ref_opts)
    ref_states = _run_diffusers(ref, net, noise, sde=name == "dpmpp_2m_sde")
    if not bool(torch.isfinite(ref_states[-1]).all()):
        # diffusers bh1 bug (module docstring): its last UniP-1 step to sigma 0 is D itself.
        assert ref_opts.get("solver_type") == "bh1"
        ref_states[-1] = ref.model_outputs[-1]
    states = _run_reverie(name, denoiser, noise, sigmas, **opts)
    assert len(states) == len(ref_states) == n
    errs = [_rel_err(a, b) for a, b in zip(states, ref_states)]
    assert max(errs) < 1e-4, errs


@pytest.mark.parametrize("order", [2, 3])
def test_unipc_without_lower_order_final_matches_diffusers(order):
    ref_opts = {"solver_order": order, "solver_type": "bh2", "lower_order_final": False}
    ref, net, denoiser, noise, sigmas = _setup("linear", "eps", 8, "trailing", "unipc", ref_opts)
    # diffusers fails at the last step here (module docstring): compare the steps before it.
    ref_states = _run_diffusers(ref, net, noise, sde=False, steps=7)
    states = _run_reverie("unipc", denoiser, noise, sigmas, order=order, lower_order_final=False)
    errs = [_rel_err(a, b) for a, b in zip(states[:7], ref_states)]
    assert max(errs) < 1e-4, errs
    # lower_order_final changes the orders near the end (order 3: step 6 uses 3 instead of 2).
    default = _run_reverie("unipc", denoiser, noise, sigmas, order=order)
    if order == 3:
        assert _rel_err(default[6], states[6]) > 1e-6
    else:
        assert torch.equal(default[6], states[6])


def test_unipc_disable_corrector_matches_diffusers():
    ref_opts = {"solver_order": 2, "solver_type": "bh2", "disable_corrector": [0, 3]}
    ref, net, denoiser, noise, sigmas = _setup("scaled_linear", "v", 7, "trailing", "unipc", ref_opts)
    ref_states = _run_diffusers(ref, net, noise, sde=False)
    states = _run_reverie("unipc", denoiser, noise, sigmas, disable_corrector=(0, 3))
    assert max(_rel_err(a, b) for a, b in zip(states, ref_states)) < 1e-4
    corrected = _run_reverie("unipc", denoiser, noise, sigmas)
    assert _rel_err(corrected[-1], states[-1]) > 1e-4  # the corrector does change the result


def _conv_setup(n=10):
    s = DiscreteVPSchedule.from_name("linear", 1000)
    denoiser = EpsDenoiser(TinyNet(), s)
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = get_sigmas("karras", n, schedule=s)
    return denoiser, x * sigmas[0], sigmas


def test_unip2_without_corrector_is_dpmpp_2m():
    # UniP-2 with rho = 1/2 and B(h) = e^{-h} - 1 is exactly DPM-Solver++(2M) (Zhao et al. 2023).
    denoiser, x, sigmas = _conv_setup()
    a = sample("unipc", denoiser, x, sigmas, order=2, variant="bh2", use_corrector=False)
    b = sample("dpmpp_2m", denoiser, x, sigmas)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_sde_with_eta_zero_is_the_ode_and_draws_no_noise():
    denoiser, x, sigmas = _conv_setup()
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    a = sample("dpmpp_2m_sde", denoiser, x, sigmas, generator=gen, eta=0.0)
    assert torch.equal(gen.get_state(), state)
    torch.testing.assert_close(a, sample("dpmpp_2m", denoiser, x, sigmas), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name, opts", [("dpmpp_2m", {}), ("dpmpp_2m_sde", {}),
                                        ("dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.5}),
                                        ("unipc", {}), ("unipc", {"order": 3, "variant": "bh1"})])
def test_final_step_to_zero_is_the_exact_denoise(name, opts):
    denoiser, x, sigmas = _conv_setup(n=6)
    steps = []
    gen = torch.Generator().manual_seed(3)
    out = sample(name, denoiser, x, sigmas, generator=gen, callback=steps.append, **opts)
    assert [st.sigma_next for st in steps] == sigmas[1:].tolist()
    assert bool(torch.isfinite(out).all())
    assert torch.equal(out, steps[-1].denoised)  # no residual noise, no extrapolation at sigma 0
    if name == "dpmpp_2m_sde":  # one draw per step into a nonzero sigma, none for the last step
        replay = torch.Generator().manual_seed(3)
        for _ in range(len(sigmas) - 2):
            torch.randn(x.shape, generator=replay, dtype=x.dtype)
        assert torch.equal(gen.get_state(), replay.get_state())


# --- N(0, I) data: D(x, sigma) = x / (1 + sigma^2); the ODE gives x(0) = x(sigma_max) / sqrt(1 + sigma_max^2)

SIGMA_MAX = 80.0


def gaussian_denoiser(x, sigma):
    return x / (1 + sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))) ** 2)


ORDER_CASES = [  # (sampler, options, expected global order)
    ("dpmpp_2m", {}, 2),
    ("dpmpp_2m", {"solver_type": "heun"}, 2),
    ("unipc", {"order": 1}, 2),  # UniC-1 raises UniP-1 (DDIM) by one order
    ("unipc", {"order": 2, "variant": "bh1"}, 3),
    ("unipc", {"order": 2, "variant": "bh2"}, 3),
    ("unipc", {"order": 3}, 4),
    ("unipc", {"order": 3, "use_corrector": False}, 3),
]


@pytest.mark.parametrize("name, opts, order", ORDER_CASES)
def test_convergence_order_on_gaussian_data(name, opts, order):
    # sigma_min = 1e-4 keeps the first-order step to 0 below 1e-8 (its error is ~sigma_min^2 / 2).
    exact = SIGMA_MAX / math.sqrt(1 + SIGMA_MAX**2)
    errs = []
    for n in (32, 64, 128):
        sigmas = get_sigmas("karras", n, sigma_min=1e-4, sigma_max=SIGMA_MAX)
        x = torch.full((1, 1), SIGMA_MAX, dtype=torch.float64)
        errs.append(abs(sample(name, gaussian_denoiser, x, sigmas, **opts).item() - exact) / exact)
    rates = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert errs[0] > errs[1] > errs[2]
    assert abs(rates[-1] - order) < 0.35, (errs, rates)


@pytest.mark.parametrize("name, opts", [("dpmpp_2m", {}), ("unipc", {}), ("unipc", {"order": 3})])
def test_ode_output_variance_approaches_one(name, opts):
    # The samplers are linear in x here: Var(out) = gain^2 sigma_max^2 for x ~ N(0, sigma_max^2),
    # which tends to sigma_max^2 / (1 + sigma_max^2) = 1 - 1.6e-4.
    dev = []
    for n in (20, 40, 80):
        sigmas = get_sigmas("karras", n, sigma_min=0.002, sigma_max=SIGMA_MAX)
        gain = sample(name, gaussian_denoiser, torch.ones(1, dtype=torch.float64), sigmas, **opts).item()
        dev.append(abs(gain**2 * SIGMA_MAX**2 - 1))
    assert dev[0] > dev[1] > dev[2] and dev[2] < 5e-3, dev


@pytest.mark.parametrize("opts", [{}, {"solver_type": "heun"}, {"eta": 0.5}])
def test_sde_output_variance_approaches_one(opts, monkeypatch):
    # Linear elementwise problem: out = g x + sum_k c_k z_k. Draw k returns the basis vector
    # e_{k+1} over a batch of n + 1 entries, so entry 0 carries g x and entry k + 1 carries c_k, and
    # the exact output variance for x ~ N(0, sigma_max^2) is (g sigma_max)^2 + sum_k c_k^2.
    from reverie.samplers import dpm_solver

    dev = []
    for n in (10, 20, 40, 80):
        draws = []

        def basis_draw(x, generator, draws=draws):
            draws.append(1)
            e = torch.zeros_like(x)
            e[len(draws)] = 1.0
            return e

        monkeypatch.setattr(dpm_solver, "randn_like", basis_draw)
        x = torch.zeros(n + 1, dtype=torch.float64)
        x[0] = SIGMA_MAX
        sigmas = get_sigmas("karras", n, sigma_min=0.002, sigma_max=SIGMA_MAX)
        out = sample("dpmpp_2m_sde", gaussian_denoiser, x, sigmas, **opts)
        assert len(draws) == n - 1  # one draw per step into a nonzero sigma
        dev.append(abs(out.pow(2).sum().item() - 1))
    # measured: 0.40 0.20 0.046 0.010 (midpoint), 2.2 0.54 0.086 0.018 (heun), 0.41 0.14 0.031 0.007
    assert all(a > b for a, b in zip(dev, dev[1:])) and dev[-1] < 0.025, dev
    assert dev[-2] / dev[-1] > 3  # the bias shrinks about 4x per doubling of the steps


@pytest.mark.parametrize("name, opts, match", [
    ("dpmpp_2m", {"solver_type": "rk4"}, "solver_type"),
    ("dpmpp_2m_sde", {"eta": -1.0}, "eta"),
    ("unipc", {"order": 4}, "order"),
    ("unipc", {"variant": "bh3"}, "variant"),
])
def test_bad_options_raise(name, opts, match):
    denoiser, x, sigmas = _conv_setup(n=3)
    with pytest.raises(ValueError, match=match):
        sample(name, denoiser, x, sigmas, **opts)


def test_unipc_rejects_repeated_sigmas():
    sigmas = torch.tensor([10.0, 1.0, 1.0, 0.1, 0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample("unipc", gaussian_denoiser, torch.ones(1, 1, dtype=torch.float64), sigmas)


def test_dpmpp_2m_tolerates_repeated_sigmas():
    # A zero-length step leaves x alone and the multistep history skips it (no division by
    # h_prev = 0): the run equals the one on the grid without the repeat.
    sigmas = torch.tensor([10.0, 1.0, 1.0, 0.1, 0.0], dtype=torch.float64)
    x = torch.full((1, 1), 10.0, dtype=torch.float64)
    out = sample("dpmpp_2m", gaussian_denoiser, x, sigmas)
    ref = sample("dpmpp_2m", gaussian_denoiser, x, sigmas[[0, 1, 3, 4]])
    ddim = sample("unipc", gaussian_denoiser, x, sigmas[[0, 1, 3, 4]], order=1, use_corrector=False)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=0)
    assert abs(out.item() - ddim.item()) > 1e-3  # and it is still second order there
