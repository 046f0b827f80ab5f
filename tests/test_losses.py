"""Denoising losses, their weightings, noise-level samplers and the hybrid loss, against closed forms."""

import math

import numpy as np
import pytest
import torch
from scipy import special
from torch import nn

from reverie.denoisers import EDMDenoiser, EpsDenoiser, VDenoiser, X0Denoiser
from reverie.losses import (
    LogNormalSigmas,
    LossAwareTimesteps,
    UniformTimesteps,
    denoising_loss,
    hybrid_loss,
    loss_weight,
)
from reverie.schedules import DiscreteVPSchedule

SCHED = DiscreteVPSchedule.from_name("linear", 1000)
SIGMAS = torch.tensor([1e-3, 0.05, 0.3, 0.4472135955, 1.0, 7.0, 200.0], dtype=torch.float64)
MU, S = 0.05, 0.25  # Gaussian data for the learned-variance tests


class Oracle(nn.Module):
    """A 'network' that returns a fixed tensor."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x, c_noise, **cond):
        return self.out


class TinyNet(nn.Module):
    """A 1x1 conv plus a time embedding: any finite network will do for the finiteness checks."""

    def __init__(self, channels, out_channels):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(out_channels, channels, generator=g) / channels**0.5)
        self.time = nn.Parameter(torch.randn(out_channels, generator=g))

    def forward(self, x, c_noise):
        h = torch.einsum("oc,bc...->bo...", self.weight, x)
        return h + (self.time * c_noise.view(-1, 1) / 1000).view(*h.shape[:2], *[1] * (h.ndim - 2))


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(len(SIGMAS), 3, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    delta = 0.1 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    return x0, noise, delta


def _view(v, like):
    return v.view(-1, *[1] * (like.ndim - 1))


# ---------------------------------------------------------------------------------------------
# weightings


@pytest.mark.parametrize("gamma", [5.0, 1.0])
def test_min_snr_weights_equal_the_closed_forms(gamma):
    """Hang et al. 2023: eps min(snr,g)/snr, v min(snr,g)/(snr+1), x0 min(snr,g), snr = 1/sigma^2."""
    snr = SIGMAS**-2
    clipped = snr.clamp(max=gamma)
    expected = {EpsDenoiser: clipped / snr, VDenoiser: clipped / (snr + 1), X0Denoiser: clipped}
    for cls, ref in expected.items():
        w = loss_weight(cls(Oracle(None), SCHED), SIGMAS, "min_snr", min_snr_gamma=gamma)
        torch.testing.assert_close(w, ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("sigma_data", [0.5, 1.3])
def test_edm_weight_is_exactly_one_on_f_for_the_edm_denoiser(sigma_data):
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 times c_out^2 = sigma^2 sd^2 / (sigma^2 + sd^2)."""
    sigma = torch.logspace(-4, 4, 33, dtype=torch.float64)
    w = loss_weight(EDMDenoiser(Oracle(None), sigma_data=sigma_data), sigma, "edm")
    torch.testing.assert_close(w, torch.ones_like(sigma), rtol=1e-13, atol=0)


def _oracle_outputs(x, x0_hat, sigma):
    """What each parameterization's network outputs to make D(x, sigma) = x0_hat (closed forms)."""
    s = _view(sigma, x)
    alpha = (1 + s**2).rsqrt()
    eps_hat = (x - x0_hat) / s
    sd = 0.5
    c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt()
    return {
        EpsDenoiser: eps_hat,
        X0Denoiser: x0_hat,
        VDenoiser: alpha * eps_hat - s * alpha * x0_hat,
        EDMDenoiser: (x0_hat - c_skip * x) / c_out,
    }


def test_losses_of_all_parameterizations_agree_for_the_same_x0_error():
    """Same x0_hat error delta: eps-MSE = |delta|^2/sigma^2, v-MSE = |delta|^2 (1 + sigma^2)/sigma^2,
    x0-MSE = |delta|^2; min-SNR and EDM weightings turn all of them into min(snr,g)|delta|^2 and
    lambda(sigma)|delta|^2."""
    x0, noise, delta = _case()
    x = x0 + _view(SIGMAS, x0) * noise
    err = delta.pow(2).mean(dim=(1, 2, 3))
    simple = {EpsDenoiser: err / SIGMAS**2, VDenoiser: err * (1 + SIGMAS**2) / SIGMAS**2,
              X0Denoiser: err, EDMDenoiser: err * (SIGMAS**2 + 0.25) / (SIGMAS * 0.5) ** 2}
    lam = (SIGMAS**2 + 0.25) / (SIGMAS * 0.5) ** 2
    for cls, out in _oracle_outputs(x, x0 + delta, SIGMAS).items():
        den = cls(Oracle(out), schedule=SCHED)
        torch.testing.assert_close(den(x, SIGMAS), x0 + delta, rtol=1e-9, atol=1e-9)
        got = {w: denoising_loss(den, x0, SIGMAS, noise, weighting=w) for w in ("simple", "min_snr", "edm")}
        torch.testing.assert_close(got["simple"], simple[cls], rtol=1e-8, atol=0)
        torch.testing.assert_close(got["min_snr"], (SIGMAS**-2).clamp(max=5.0) * err, rtol=1e-8, atol=0)
        torch.testing.assert_close(got["edm"], lam * err, rtol=1e-8, atol=0)


def test_learned_variance_loss_uses_only_the_mean_channels():
    x0, noise, delta = _case(1)
    x = x0 + _view(SIGMAS, x0) * noise
    eps_hat = _oracle_outputs(x, x0 + delta, SIGMAS)[EpsDenoiser]
    garbage = 1e3 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    plain = EpsDenoiser(Oracle(eps_hat), SCHED)
    learned = EpsDenoiser(Oracle(torch.cat([eps_hat, garbage], dim=1)), SCHED, learned_variance=True)
    for w in ("simple", "min_snr"):
        torch.testing.assert_close(denoising_loss(learned, x0, SIGMAS, noise, weighting=w),
                                   denoising_loss(plain, x0, SIGMAS, noise, weighting=w), rtol=0, atol=0)


def test_bad_arguments_are_rejected():
    x0, noise, _ = _case()
    den = EpsDenoiser(Oracle(noise), SCHED)
    with pytest.raises(ValueError, match="simple, min_snr, edm"):
        denoising_loss(den, x0, SIGMAS, noise, weighting="snr")
    with pytest.raises(ValueError, match="sigma_max"):
        denoising_loss(den, x0, torch.full_like(SIGMAS, math.inf), noise)
    with pytest.raises(ValueError, match="learned-variance"):
        hybrid_loss(den, x0, torch.zeros(len(x0), dtype=torch.long), noise)
    with pytest.raises(ValueError, match="DiscreteVPSchedule"):
        UniformTimesteps(None)


# ---------------------------------------------------------------------------------------------
# noise-level samplers


def test_uniform_timesteps():
    sampler = UniformTimesteps(SCHED)
    levels = sampler(200_000, torch.Generator().manual_seed(0))
    assert levels.t.dtype == torch.long and 0 <= int(levels.t.min()) and int(levels.t.max()) < 1000
    assert torch.equal(levels.sigma, SCHED.sigmas[levels.t]) and (levels.weight == 1).all()
    counts = torch.bincount(levels.t, minlength=1000).double()
    chi2 = float(((counts - 200.0) ** 2 / 200.0).sum())
    assert chi2 < 999 + 5 * math.sqrt(2 * 999)  # chi-square with 999 degrees of freedom
    again = sampler(200_000, torch.Generator().manual_seed(0))
    assert torch.equal(again.t, levels.t)


def test_uniform_timesteps_cap_an_infinite_top_sigma():
    sched = DiscreteVPSchedule.from_name("linear", 20, zero_terminal_snr=True, beta_start=0.005, beta_end=0.4)
    assert math.isinf(float(sched.sigmas[-1]))
    levels = UniformTimesteps(sched)(2000, torch.Generator().manual_seed(1))
    top = levels.t == 19
    assert top.any() and (levels.sigma[top] == sched.sigma_max).all()
    assert torch.equal(levels.sigma[~top], sched.sigmas[levels.t[~top]])


def test_log_normal_sigmas():
    sampler = LogNormalSigmas(p_mean=-1.2, p_std=1.2)
    n = 100_000
    levels = sampler(n, torch.Generator().manual_seed(0))
    log_sigma = levels.sigma.log()
    assert levels.t is None and levels.sigma.dtype == torch.float64 and (levels.weight == 1).all()
    assert abs(float(log_sigma.mean()) + 1.2) < 4 * 1.2 / math.sqrt(n)
    assert abs(float(log_sigma.std()) - 1.2) < 4 * 1.2 / math.sqrt(2 * n)
    assert torch.equal(sampler(n, torch.Generator().manual_seed(0)).sigma, levels.sigma)


def _filled_loss_aware(T=50, seed=0):
    """A LossAwareTimesteps whose history holds 10 fake losses per t, with E[L_t^2] known."""
    sched = DiscreteVPSchedule.from_name("cosine", T)
    sampler = LossAwareTimesteps(sched)
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(T, generator=g, dtype=torch.float64) * 3 + 0.1
    history = scale[:, None] * torch.rand(T, 10, generator=g, dtype=torch.float64)
    for k in range(10):
        assert not sampler.ready
        np.testing.assert_allclose(sampler.probabilities().numpy(), 1 / T)
        sampler.update(torch.arange(T), history[:, k])
    assert sampler.ready
    return sampler, history


def test_loss_aware_probabilities_follow_the_second_moment():
    """Improved DDPM Sec. 3.3: p_t ∝ sqrt(E[L_t^2]) over the last 10 losses, mixed with 1e-3 uniform."""
    sampler, history = _filled_loss_aware()
    T = history.shape[0]
    rms = history.pow(2).mean(1).sqrt()
    expected = 0.999 * rms / rms.sum() + 0.001 / T
    torch.testing.assert_close(sampler.probabilities(), expected, rtol=1e-12, atol=0)
    # Only the last 10 losses count: two more at t = 3 push out its two oldest.
    sampler.update(torch.tensor([3, 3]), torch.tensor([50.0, 60.0]))
    newest = torch.cat([history[3, 2:], torch.tensor([50.0, 60.0], dtype=torch.float64)])
    torch.testing.assert_close(sampler.losses[3], newest)
    rms[3] = newest.pow(2).mean().sqrt()
    torch.testing.assert_close(sampler.probabilities(), 0.999 * rms / rms.sum() + 0.001 / T, rtol=1e-12, atol=0)


def test_loss_aware_weights_make_the_estimator_unbiased():
    sampler, history = _filled_loss_aware(seed=1)
    T = history.shape[0]
    p = sampler.probabilities()
    levels = sampler(400_000, torch.Generator().manual_seed(2))
    w_t = 1.0 / (T * p)
    torch.testing.assert_close(levels.weight, w_t[levels.t], rtol=1e-12, atol=0)
    L = history.mean(1)  # any per-t loss
    # Exactly: sum_t p_t w_t L_t = mean_t L_t.
    assert float((p * w_t * L).sum()) == pytest.approx(float(L.mean()), rel=1e-12)
    # By sampling: the frequencies follow p, and the weighted sample mean estimates mean_t L_t.
    freq = torch.bincount(levels.t, minlength=T).double() / len(levels.t)
    assert ((freq - p).abs() < 5 * (p * (1 - p) / len(levels.t)).sqrt()).all()
    est = levels.weight * L[levels.t]
    assert abs(float(est.mean() - L.mean())) < 5 * float(est.std()) / math.sqrt(len(est))
    assert torch.equal(sampler(1000, torch.Generator().manual_seed(3)).t,
                       sampler(1000, torch.Generator().manual_seed(3)).t)


def test_loss_aware_state_round_trip():
    sampler, _ = _filled_loss_aware(seed=4)
    fresh = LossAwareTimesteps(sampler.schedule)
    fresh.load_state_dict(sampler.state_dict())
    assert fresh.ready and torch.equal(fresh.probabilities(), sampler.probabilities())


# ---------------------------------------------------------------------------------------------
# zero terminal SNR


@pytest.mark.parametrize("cls", [EpsDenoiser, VDenoiser])
def test_zero_terminal_snr_losses_are_finite_at_the_last_timestep(cls):
    sched = DiscreteVPSchedule.from_name("scaled_linear", 1000, zero_terminal_snr=True)
    sigma = UniformTimesteps(sched).sigmas[-1].expand(4)
    assert float(sigma[0]) == sched.sigma_max
    x0 = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    den = cls(TinyNet(3, 3), sched)
    for w in ("simple", "min_snr", "edm"):
        loss = denoising_loss(den, x0, sigma, noise, weighting=w)
        assert torch.isfinite(loss).all() and (loss > 0).all()
    # The exact target is (nearly) the pure-noise one: eps = noise, v = alpha eps - sigma_vp x0 ~ -x0.
    target = den.target(x0, noise, sigma)
    torch.testing.assert_close(target, noise if cls is EpsDenoiser else -x0, atol=1e-3, rtol=0)
    assert float(denoising_loss(cls(Oracle(target), sched), x0, sigma, noise).max()) < 1e-10
    learned = cls(TinyNet(3, 6), sched, learned_variance=True)
    t = torch.full((4,), 999)
    assert torch.isfinite(hybrid_loss(learned, x0, t, noise)).all()


# ---------------------------------------------------------------------------------------------
# hybrid loss (learned variance)


HYB_SCHED = DiscreteVPSchedule.from_name("linear", 100, beta_start=1e-3, beta_end=0.2)


class GaussianVarNet(nn.Module):
    """eps-network for x0 ~ N(MU, S^2): exact mean times a parameter ``scale`` (1 = exact), and one
    learned variance value v for every element."""

    def __init__(self, schedule, v=0.0):
        super().__init__()
        self.schedule = schedule
        self.scale = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
        self.v = nn.Parameter(torch.tensor(v, dtype=torch.float64))

    def forward(self, x_vp, t):
        sigma = self.schedule.sigma_from_t(t.double()).view(-1, *[1] * (x_vp.ndim - 1))
        x = x_vp * (1 + sigma**2).sqrt()
        x0_hat = MU + S**2 / (S**2 + sigma**2) * (x - MU)
        eps = self.scale * (x - x0_hat) / sigma
        return torch.cat([eps, self.v.expand_as(eps)], dim=1)


def _gaussian_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x0 = (((MU + S * torch.randn(n, 1, 4, generator=g, dtype=torch.float64)) + 1) * 127.5).round() / 127.5 - 1
    return x0.clamp(-1, 1), torch.randn(x0.shape, generator=g, dtype=torch.float64)


def _posterior(schedule):
    beta = schedule.betas
    ab = torch.cumprod(1 - beta, 0)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    beta_tilde = (1 - ab_prev) / (1 - ab) * beta
    log_small = beta_tilde.log()
    log_small[0] = log_small[1]
    return ab, beta_tilde, log_small, ab_prev.sqrt() * beta / (1 - ab)


def test_hybrid_loss_terms_equal_the_closed_forms():
    """L_simple is the eps-MSE; L_vlb = T * (KL or decoder NLL) / (D ln 2), checked against the Gaussian
    KL written out and scipy's CDF for the decoder; lambda_vlb scales it."""
    net = GaussianVarNet(HYB_SCHED, v=-0.3)
    den = EpsDenoiser(net, HYB_SCHED, learned_variance=True)
    x0, noise = _gaussian_data(64, seed=0)
    t = torch.arange(64) % 7 * 16 // 6  # includes t = 0 (decoder) and several KL terms
    t[:3] = 0
    total, l_simple, l_vlb = hybrid_loss(den, x0, t, noise, lambda_vlb=0.01, return_terms=True)
    torch.testing.assert_close(l_simple, denoising_loss(den, x0, HYB_SCHED.sigmas[t], noise))
    torch.testing.assert_close(total, l_simple + 0.01 * l_vlb)

    ab, beta_tilde, log_small, coef = (v[t].view(-1, 1, 1) for v in _posterior(HYB_SCHED))
    sigma2 = (1 - ab) / ab
    x0_hat = MU + S**2 / (S**2 + sigma2) * (x0 + sigma2.sqrt() * noise - MU)
    frac = (-0.3 + 1) / 2
    lv = frac * HYB_SCHED.betas[t].view(-1, 1, 1).log() + (1 - frac) * log_small
    kl = 0.5 * (lv - beta_tilde.log() + (beta_tilde + coef**2 * (x0 - x0_hat) ** 2) / lv.exp() - 1)
    x0n, meann, sdn = x0.numpy(), x0_hat.detach().numpy(), (0.5 * lv).exp().numpy()
    hi = np.where(x0n > 1 - 1 / 255, np.inf, (x0n + 1 / 255 - meann) / sdn)
    lo = np.where(x0n < -1 + 1 / 255, -np.inf, (x0n - 1 / 255 - meann) / sdn)
    decoder = -np.log(special.ndtr(hi) - special.ndtr(lo))
    term = torch.where(t.view(-1, 1, 1) == 0, torch.from_numpy(decoder), kl).sum((1, 2))
    torch.testing.assert_close(l_vlb, 100 * term / (4 * math.log(2)), rtol=1e-9, atol=1e-12)


def test_hybrid_loss_gradients_respect_the_stop_gradient():
    """The mean learns from L_simple only; the variance from L_vlb only (Improved DDPM Sec. 3.1)."""
    x0, noise = _gaussian_data(32, seed=1)
    t = torch.arange(32) * 3 % 100
    grads = {}
    for part in ("simple", "vlb"):
        net = GaussianVarNet(HYB_SCHED, v=0.2)
        with torch.no_grad():
            net.scale.fill_(1.3)
        _, l_simple, l_vlb = hybrid_loss(EpsDenoiser(net, HYB_SCHED, learned_variance=True), x0, t, noise,
                                         return_terms=True)
        (l_simple if part == "simple" else l_vlb).sum().backward()
        grads[part] = (net.scale.grad, net.v.grad)
    assert grads["simple"][1] is None or float(grads["simple"][1]) == 0
    assert abs(float(grads["simple"][0])) > 1e-3
    assert grads["vlb"][0] is None or float(grads["vlb"][0]) == 0
    assert abs(float(grads["vlb"][1])) > 1e-3


def test_hybrid_loss_learns_the_optimal_variance():
    """Gradient descent on the variance parameter alone, at one timestep, converges to the frac that
    makes Sigma_t = beta_tilde_t + coef_t^2 Var(x0 | x_t), the true reverse variance of Gaussian data."""
    t_val = 4
    ab, beta_tilde, log_small, coef = (float(v[t_val]) for v in _posterior(HYB_SCHED))
    sigma2 = (1 - ab) / ab
    target = beta_tilde + coef**2 * S**2 * sigma2 / (S**2 + sigma2)
    log_large = math.log(float(HYB_SCHED.betas[t_val]))
    frac_opt = (math.log(target) - log_small) / (log_large - log_small)
    assert 0.2 < frac_opt < 0.95
    net = GaussianVarNet(HYB_SCHED, v=-0.9)
    den = EpsDenoiser(net, HYB_SCHED, learned_variance=True)
    opt = torch.optim.Adam([net.v], lr=0.1)
    t = torch.full((256,), t_val)
    for step in range(100):
        if step == 50:
            opt.param_groups[0]["lr"] = 0.02
        x0, noise = _gaussian_data(256, seed=100 + step)
        opt.zero_grad()
        hybrid_loss(den, x0, t, noise).mean().backward()
        opt.step()
    frac = (net.v.item() + 1) / 2
    assert abs(frac - frac_opt) < 0.03, (frac, frac_opt)
