import pytest
import torch

from reverie.process import ForwardProcess
from reverie.schedules import DiscreteVPSchedule


@pytest.fixture(scope="module")
def proc():
    return ForwardProcess(DiscreteVPSchedule.from_name("linear", 1000))


def test_markov_chain_matches_closed_form_in_distribution(proc):
    """Chaining T single steps q(x_t|x_{t-1}) gives q(x_t|x0) (Ho et al. 2020, eq. 4)."""
    g = torch.Generator().manual_seed(0)
    n = 40_000
    x0 = torch.tensor([1.5, -0.5, 0.0], dtype=torch.float64).expand(n, 3)
    x = x0.clone()
    checkpoints = {99: None, 499: None, 999: None}
    for t in range(1000):
        tt = torch.full((n,), t)
        x = proc.q_step(x, tt, torch.randn(x.shape, generator=g, dtype=torch.float64))
        if t in checkpoints:
            checkpoints[t] = x.clone()
    ab = proc.schedule.alphas_cumprod
    for t, xt in checkpoints.items():
        mean, var = ab[t].sqrt() * x0[0], (1 - ab[t]).expand(3)
        se_mean = (var / n).sqrt()
        assert (xt.mean(0) - mean).abs().max() < 4 * se_mean.max()
        # Var of a sample variance of a Gaussian: 2 var^2 / (n - 1)
        se_var = (2 * var**2 / (n - 1)).sqrt()
        assert (xt.var(0) - var).abs().max() < 4 * se_var.max()
        # q_sample draws from the same distribution
        fresh = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        direct = proc.q_sample(x0, torch.full((n,), t), fresh)
        assert (direct.mean(0) - xt.mean(0)).abs().max() < 6 * se_mean.max()


def test_posterior_equals_bayes_rule(proc):
    """q(x_{t-1}|x_t,x0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x0): product of Gaussians (Ho et al. eqs. 6-7)."""
    s = proc.schedule
    t = torch.tensor([1, 10, 500, 999])
    x0 = torch.tensor([0.3, -1.0, 0.7, 0.1], dtype=torch.float64)
    xt = torch.tensor([0.5, 2.0, -1.0, 0.4], dtype=torch.float64)
    ab_prev = s.alphas_cumprod[t - 1]
    beta = s.betas[t]
    # prior N(sqrt(ab_prev) x0, 1 - ab_prev); likelihood in x_{t-1}: N(x_t / sqrt(1-beta), beta/(1-beta))
    p_prec = 1 / (1 - ab_prev)
    l_prec = (1 - beta) / beta
    var = 1 / (p_prec + l_prec)
    mean = var * (p_prec * ab_prev.sqrt() * x0 + l_prec * xt / (1 - beta).sqrt())
    m, v, logv = proc.q_posterior(x0, xt, t)
    torch.testing.assert_close(m, mean)
    torch.testing.assert_close(v, var)
    torch.testing.assert_close(logv, var.log())


def test_posterior_at_t0_is_x0_and_log_variance_is_clipped(proc):
    x0 = torch.randn(5, 2, dtype=torch.float64)
    xt = torch.randn(5, 2, dtype=torch.float64)
    m, v, logv = proc.q_posterior(x0, xt, torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(m, x0)
    assert float(v.abs().max()) == 0.0
    assert torch.isfinite(logv).all()
    torch.testing.assert_close(logv[0, 0], proc.posterior_variance[1].log())


def test_process_broadcasts_over_any_rank(proc):
    for shape in [(2, 3), (2, 1, 16), (2, 3, 4, 4), (2, 3, 2, 4, 4)]:
        x0 = torch.ones(shape)
        out = proc.q_sample(x0, torch.tensor([0, 999]), torch.zeros(shape))
        assert out.shape == shape and out.dtype == torch.float32
        ab = proc.schedule.alphas_cumprod
        assert float(out[1].flatten()[0]) == pytest.approx(float(ab[999].sqrt()), rel=1e-6)
