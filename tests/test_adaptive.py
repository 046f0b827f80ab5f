"""Loss-aware timestep sampling (reverie.losses.LossAwareTimesteps): importance weights keep the loss unbiased."""

from __future__ import annotations

import math

import torch

from reverie.losses import LossAwareTimesteps, UniformTimesteps
from reverie.schedules import DiscreteVPSchedule

T = 20
# A toy problem with a known expected loss per timestep: L_t = m_t * E, E ~ Exponential(1), so E[L_t] = m_t
# and E[L_t^2] = 2 m_t^2. The losses span three decades, as a diffusion loss does over t.
M = torch.logspace(-2, 1, T, dtype=torch.float64)


def toy_losses(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    e = -torch.log1p(-torch.rand(t.shape, generator=g, dtype=torch.float64))
    return M[t] * e


def warmed_up(seed: int = 0) -> tuple[LossAwareTimesteps, torch.Generator]:
    levels = LossAwareTimesteps(DiscreteVPSchedule.from_name("linear", T), history=10)
    g = torch.Generator().manual_seed(seed)
    while not levels.ready:
        lv = levels(64, g)
        levels.update(lv.t, toy_losses(lv.t, g))
    return levels, g


def test_uniform_until_every_timestep_has_its_history():
    levels = LossAwareTimesteps(DiscreteVPSchedule.from_name("linear", T), history=3)
    torch.testing.assert_close(levels.probabilities(), torch.full((T,), 1 / T, dtype=torch.float64))
    levels.update(torch.arange(T - 1).repeat(3), torch.ones(3 * (T - 1)))
    assert not levels.ready  # the last timestep has no loss yet
    levels.update(torch.tensor([T - 1] * 3), torch.ones(3))
    assert levels.ready


def test_probabilities_follow_the_root_mean_square_of_the_history():
    levels, _ = warmed_up()
    rms = levels.losses.pow(2).mean(1).sqrt()
    expected = (1 - levels.uniform_prob) * rms / rms.sum() + levels.uniform_prob / T
    torch.testing.assert_close(levels.probabilities(), expected)
    # with 10 draws per t the history tracks sqrt(E[L_t^2]) = sqrt(2) m_t: loud timesteps are drawn far more
    p = levels.probabilities()
    assert float(p[-1] / p[0]) > 100


def test_weighted_loss_is_exactly_unbiased_under_the_current_probabilities():
    """E_{t ~ p}[w_t L_t] = sum_t p_t L_t / (T p_t) = mean_t L_t, whatever p is."""
    levels, g = warmed_up()
    p = levels.probabilities()
    lv = levels(10, g)
    torch.testing.assert_close(lv.weight, 1 / (T * p[lv.t]))
    # p is a distribution (the uniform mixture included), so the expectation of the weighted loss is the mean
    assert float(p.sum()) == 1.0 or math.isclose(float(p.sum()), 1.0, rel_tol=1e-12)
    assert math.isclose(float((p * (1 / (T * p)) * M).sum()), float(M.mean()), rel_tol=1e-12)


def test_weighted_loss_estimates_the_uniform_mean_with_lower_variance():
    """Monte Carlo on the toy problem, the history updating as in training: the importance-weighted batch mean
    is an unbiased estimate of mean_t E[L_t], and its variance is below uniform sampling's."""
    levels, g = warmed_up(1)
    uniform = UniformTimesteps(DiscreteVPSchedule.from_name("linear", T))
    aware, plain = [], []
    for _ in range(3000):
        lv = levels(16, g)
        losses = toy_losses(lv.t, g)
        aware.append(float((lv.weight * losses).mean()))
        levels.update(lv.t, losses)
        lu = uniform(16, g)
        plain.append(float((lu.weight * toy_losses(lu.t, g)).mean()))
    aware, plain = torch.tensor(aware, dtype=torch.float64), torch.tensor(plain, dtype=torch.float64)
    exact = float(M.mean())
    for est in (aware, plain):
        assert abs(float(est.mean()) - exact) < 4 * float(est.std()) / math.sqrt(len(est))
    assert float(aware.var()) < 0.5 * float(plain.var())


def test_history_round_trips_through_state_dict():
    levels, g = warmed_up(2)
    again = LossAwareTimesteps(DiscreteVPSchedule.from_name("linear", T), history=10)
    again.load_state_dict(levels.state_dict())
    torch.testing.assert_close(again.probabilities(), levels.probabilities())
