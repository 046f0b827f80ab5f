"""Masked diffusion math (reverie.discrete) against exact computations on toy distributions.

A toy "model" here is a known joint p over V^L short sequences; its exact SUBS prediction at z_t is the
conditional of each masked token given the visible ones, computed by enumeration. With exact conditionals
MDLM's continuous-time NELBO is exactly -log p(x) (any-order autoregression: every order of unmasking is
a chain rule of p), and the one-step bound is the sum of the marginals' -log p.
"""

import itertools
import math

import pytest
import torch

from reverie.discrete import (
    LogLinearSchedule,
    edlm_energy,
    importance_resample,
    mask_tokens,
    nelbo_terms,
    sample_categorical,
    sample_masked,
    sample_times,
    subs_log_probs,
)
from reverie.text.chars import CharTokenizer

V, L = 3, 3
MASK = V


def toy_joint(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(V ** L, generator=g, dtype=torch.float64) ** 3  # uneven: a few likely sequences
    return (p / p.sum()).reshape((V,) * L)


ALL_X = torch.tensor(list(itertools.product(range(V), repeat=L)))  # (V^L, L) in row-major order


def exact_conditional_logits(joint: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """log p(x^l = v | visible tokens of z) for every row of z (N, L) -> (N, L, V)."""
    flat = joint.reshape(-1)
    out = torch.empty(len(z), L, V, dtype=torch.float64)
    for i, row in enumerate(z):
        consistent = ((ALL_X == row) | (row == MASK)).all(dim=1)
        w = torch.where(consistent, flat, torch.zeros_like(flat))
        for pos in range(L):
            out[i, pos] = torch.log(torch.stack([w[ALL_X[:, pos] == v].sum() for v in range(V)]) / w.sum())
    return out


def all_states_logits(joint):
    states = torch.tensor(list(itertools.product(range(V + 1), repeat=L)))
    return states, exact_conditional_logits(joint, states)


def lookup(states, table, z):
    index = (z * torch.tensor([(V + 1) ** (L - 1 - i) for i in range(L)])).sum(dim=1)
    return table[index]


def test_subs_zero_mass_on_mask_and_carry_over():
    logits = torch.randn(2, 4, V)
    z = torch.tensor([[0, MASK, 2, MASK], [MASK, MASK, MASK, 1]])
    logp = subs_log_probs(logits, z, MASK)
    assert logp.shape == (2, 4, V)  # no [MASK] column: zero mass on it
    keep = z != MASK
    assert torch.equal(logp[keep].argmax(-1), z[keep]) and torch.all(logp[keep].exp().sum(-1) == 1)
    assert torch.allclose(logp[~keep], torch.log_softmax(logits, -1)[~keep])


def test_log_linear_schedule():
    s = LogLinearSchedule(eps=1e-3)
    t = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    assert torch.allclose(s.alpha(t), 1 - (1 - 1e-3) * t) and s.alpha(t).dtype == torch.float64
    assert torch.allclose(s.sigma(t), -torch.log1p(-(1 - 1e-3) * t))
    s0 = LogLinearSchedule(0.0)
    assert torch.allclose(s0.weight(t[1:]), 1 / t[1:])  # -alpha'/(1-alpha) = 1/t
    assert float(s0.unmask_probability(0.5, 0.25)) == pytest.approx(0.5)  # (alpha_s - alpha_t)/(1 - alpha_t)


def test_masking_rate_and_stratified_times():
    g = torch.Generator().manual_seed(0)
    t = sample_times(1000, g)
    assert t.min() > 0 and t.max() <= 1
    gaps = torch.sort(t).values.diff()
    assert torch.allclose(gaps, torch.full_like(gaps, 1e-3), atol=1e-9)  # one uniform shifted by i/n
    x = torch.zeros(4, 20000, dtype=torch.long)
    alpha = torch.tensor([1.0, 0.75, 0.5, 0.0], dtype=torch.float64)
    z, masked = mask_tokens(x, alpha, MASK, g)
    assert torch.equal(z == MASK, masked)
    assert torch.allclose(masked.double().mean(1), 1 - alpha, atol=0.01)


def test_nelbo_with_exact_conditionals_is_minus_log_likelihood():
    """Monte Carlo of the library's NELBO terms with the exact denoiser converges to -log p(x)."""
    joint = toy_joint()
    states, table = all_states_logits(joint)
    schedule, g = LogLinearSchedule(0.0), torch.Generator().manual_seed(1)
    for x in ALL_X[[0, 7, 13, 26]]:
        n = 40000
        xs = x.repeat(n, 1)
        t = sample_times(n, g)
        z, masked = mask_tokens(xs, schedule.alpha(t), MASK, g)
        terms = nelbo_terms(lookup(states, table, z), xs, masked, t, schedule)
        target = -math.log(float(joint[tuple(x)]))
        se = float(terms.std()) / math.sqrt(n)
        assert abs(float(terms.mean()) - target) < 4 * se + 1e-3, (float(terms.mean()), target, se)


def test_discrete_time_bound_one_step_is_factorized_and_tightens():
    """T = 1 is the factorized bound sum_l -log p(x^l) for each x; over x ~ p the T-step bound falls towards
    the entropy H(p) as T grows (per x it need not: the bound is on the T-step model's own likelihood)."""
    joint = toy_joint()
    states, table = all_states_logits(joint)
    schedule, g = LogLinearSchedule(0.0), torch.Generator().manual_seed(2)

    def bound(xs, steps):
        t = sample_times(len(xs), g, steps=steps)
        z, masked = mask_tokens(xs, schedule.alpha(t), MASK, g)
        return nelbo_terms(lookup(states, table, z), xs, masked, t, schedule, steps=steps)

    x = ALL_X[11]
    marginals = sum(-math.log(float(joint.sum(dim=[d for d in range(L) if d != pos])[x[pos]])) for pos in range(L))
    assert float(bound(x.repeat(100, 1), 1).mean()) == pytest.approx(marginals, rel=1e-6)  # all masked, weight 1
    flat = joint.reshape(-1)
    xs = ALL_X[sample_categorical(torch.log(flat).expand(60000, -1), g)]
    entropy = float(-(flat * flat.log()).sum())
    means = [float(bound(xs, steps).mean()) for steps in (1, 2, 4, 16, 0)]
    assert all(a > b for a, b in zip(means, means[1:])), means
    assert means[-1] == pytest.approx(entropy, abs=0.03) and means[0] > entropy + 0.2


def test_float64_categorical_matches_probabilities_and_is_seeded():
    logits = torch.tensor([0.0, -1.0, -3.0, -8.0, -math.inf])
    p = torch.softmax(logits.double(), 0)
    g = torch.Generator().manual_seed(0)
    draws = sample_categorical(logits.expand(400000, 5), g)
    freq = torch.bincount(draws, minlength=5).double() / len(draws)
    assert freq[4] == 0
    assert torch.all((freq - p).abs() <= 5 * torch.sqrt(p * (1 - p) / len(draws)) + 1e-12)
    # the same generator state gives the same draws whatever the input precision: the draw is float64
    a = sample_categorical(logits.expand(1000, 5).float(), torch.Generator().manual_seed(3))
    b = sample_categorical(logits.expand(1000, 5).double(), torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def toy_proposal_and_target():
    target = toy_joint(seed=5)
    proposal_logits = torch.log(torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)).expand(L, V)
    return target, proposal_logits


def edlm_one_step(target, proposal_logits, n, k, seed, sign=1.0):
    """The full edlm sampler over one step (t = 1: every token revealed at once) with a factorized wrong
    proposal as the diffusion model and the exact log p as the AR energy."""
    def denoise(z, t):
        return proposal_logits.expand(len(z), L, V).clone()

    def energy_model(x0):
        return sign * torch.log(target[tuple(x0.T)])

    z = torch.full((n, L), MASK)
    out, stats = sample_masked(denoise, z, steps=1, mask_id=MASK, g=torch.Generator().manual_seed(seed),
                               sampler="edlm", energy_model=energy_model, k=k, window=(0.0, 1.0))
    return out, stats


def empirical(samples):
    index = (samples * torch.tensor([V ** (L - 1 - i) for i in range(L)])).sum(1)
    return torch.bincount(index, minlength=V ** L).double() / len(samples)


def test_edlm_importance_sampling_recovers_the_target_from_a_wrong_proposal():
    target, proposal_logits = toy_proposal_and_target()
    p = target.reshape(-1)
    q = torch.exp(sum(torch.meshgrid(*proposal_logits.unbind(0), indexing="ij"))).reshape(-1)  # factorized
    assert 0.5 * float((q - p).abs().sum()) > 0.3  # the proposal is deliberately wrong
    tv = {}
    for k in (16, 256):  # self-normalized importance sampling: its bias falls as 1/k
        out, stats = edlm_one_step(target, proposal_logits, n=10000, k=k, seed=0)
        assert stats.energy_rows == k * 10000
        tv[k] = 0.5 * float((empirical(out) - p).abs().sum())
    assert tv[256] < 0.035 and tv[16] > 2 * tv[256], tv
    # k = 1 is the proposal itself
    out1, _ = edlm_one_step(target, proposal_logits, n=20000, k=1, seed=0)
    assert 0.5 * float((empirical(out1) - q).abs().sum()) < 0.03


def test_energy_sign_weights_are_p_ar_over_p_diffusion():
    log_ar = torch.tensor([[-1.0], [-3.0]], dtype=torch.float64)
    log_q = torch.tensor([[-2.0], [-2.0]], dtype=torch.float64)
    e = edlm_energy(log_ar, log_q)
    assert torch.equal(e, log_q - log_ar)  # E = -log p_AR + log p_diffusion
    g = torch.Generator().manual_seed(0)
    picks = importance_resample(e.expand(2, 20000), g).double()  # 20000 independent columns
    w = torch.exp(-e[:, 0]) / torch.exp(-e[:, 0]).sum()  # weights exp(-E) = p_AR / p_diffusion
    assert abs(float(picks.mean()) - float(w[1])) < 0.01
    # the reference code's softmax(+E) would prefer the candidate the AR model finds less likely
    target, proposal_logits = toy_proposal_and_target()
    wrong, _ = edlm_one_step(target, proposal_logits, n=10000, k=64, seed=0, sign=-1.0)
    assert 0.5 * float((empirical(wrong) - target.reshape(-1)).abs().sum()) > 0.3


def infill_conditional(target, first):
    """p(x_1, x_2 | x_0 = first) of the toy joint, flattened over the V^2 pairs."""
    c = target[first].reshape(-1)
    return c / c.sum()


def infill_pairs(out):
    return torch.bincount(out[:, 1] * V + out[:, 2], minlength=V * V).double() / len(out)


@pytest.mark.parametrize("block", [1, 2])
@pytest.mark.parametrize("proposal", ["blind", "other_joint"])
def test_mh_corrector_reaches_the_energy_models_conditional_from_a_wrong_proposal(block, proposal):
    """Infill x_1, x_2 given x_0 with a wrong denoiser: context-blind and factorized, or the exact conditionals
    of another joint (context-dependent, so a block's reverse proposal probability matters). MH sweeps towards
    the exact log p as the energy reach p(x_1, x_2 | x_0) from the wrong draw, one token or a block at a time."""
    target, proposal_logits = toy_proposal_and_target()
    states, table = all_states_logits(toy_joint(seed=11))

    def denoise(z, t):
        if proposal == "blind":
            return proposal_logits.expand(len(z), L, V).clone()
        return lookup(states, table, z).clone()

    def energy_model(x):
        return torch.log(target[tuple(x.T)])

    n, first = 20000, 2
    z = torch.full((n, L), MASK)
    z[:, 0] = first
    exact = infill_conditional(target, first)
    tv = {}
    for sweeps in (0, 40):
        out, stats = sample_masked(denoise, z, 4, MASK, torch.Generator().manual_seed(0), sampler="caching",
                                   energy_model=energy_model, corrector=sweeps, corrector_block=block)
        assert (out[:, 0] == first).all() and not (out == MASK).any()
        tv[sweeps] = 0.5 * float((infill_pairs(out) - exact).abs().sum())
    assert tv[0] > 0.1 and tv[40] < 0.03, tv
    assert 0.1 * stats.proposals < stats.accepted < stats.proposals
    if block == 1:
        assert stats.proposals == 40 * 2 * n
    # the same sweeps with no energy model keep the denoiser's own (wrong) law
    plain, _ = sample_masked(denoise, z, 4, MASK, torch.Generator().manual_seed(0), corrector=40,
                             corrector_block=block)
    assert 0.5 * float((infill_pairs(plain) - exact).abs().sum()) > 0.1
    again, _ = sample_masked(denoise, z[:50], 4, MASK, torch.Generator().manual_seed(1), energy_model=energy_model,
                             corrector=3, corrector_block=block)
    same, _ = sample_masked(denoise, z[:50], 4, MASK, torch.Generator().manual_seed(1), energy_model=energy_model,
                            corrector=3, corrector_block=block)
    assert torch.equal(again, same)
    seen = []  # the callback follows steps 4..1, then sweeps 1..3 as i = 0, -1, -2, with the tokens so far
    last, _ = sample_masked(denoise, z[:50], 4, MASK, torch.Generator().manual_seed(1), energy_model=energy_model,
                            corrector=3, corrector_block=block, callback=lambda i, x: seen.append((i, x.clone())))
    assert [i for i, _ in seen][-3:] == [0, -1, -2] and torch.equal(last, same) and torch.equal(seen[-1][1], same)
    assert not (seen[-4][1] == MASK).any()
    with pytest.raises(ValueError, match="corrector"):
        sample_masked(denoise, z[:1], 4, MASK, torch.Generator(), corrector=-1)
    with pytest.raises(ValueError, match="block"):
        sample_masked(denoise, z[:1], 4, MASK, torch.Generator(), corrector=1, corrector_block=0)


def test_gibbs_corrector_on_exact_conditionals_recovers_the_joint():
    """With the exact single-token conditionals as the denoiser, Gibbs sweeps alone (no energy model) turn a
    badly started infill (every position drawn from its marginal given x_0 only, in one step) into
    p(x_1, x_2 | x_0)."""
    target = toy_joint(seed=5)
    states, table = all_states_logits(target)

    def denoise(z, t):
        return lookup(states, table, z).clone()

    n, first = 20000, 2
    z = torch.full((n, L), MASK)
    z[:, 0] = first
    exact = infill_conditional(target, first)
    one_step, _ = sample_masked(denoise, z, 1, MASK, torch.Generator().manual_seed(0))  # independent marginals
    assert 0.5 * float((infill_pairs(one_step) - exact).abs().sum()) > 0.08
    fixed, stats = sample_masked(denoise, z, 1, MASK, torch.Generator().manual_seed(0), corrector=20)
    assert 0.5 * float((infill_pairs(fixed) - exact).abs().sum()) < 0.02
    assert stats.accepted == stats.proposals == 20 * 2 * n and stats.energy_rows == 0


def row_pure_denoiser(vocab=5, length=12, seed=0):
    """A deterministic denoiser whose rows do not interact: logits depend on the row's own tokens."""
    w = torch.randn(vocab + 1, vocab, generator=torch.Generator().manual_seed(seed))

    bias = torch.randn(1, length, vocab, generator=torch.Generator().manual_seed(seed + 1))

    def denoise(z, t):
        return w[z].sum(dim=1, keepdim=True) + bias  # (B, 1, V) + (1, L, V)
    return denoise


def test_caching_equals_ancestral_with_fewer_evaluations():
    denoise = row_pure_denoiser()
    z = torch.full((6, 12), 5)
    a, sa = sample_masked(denoise, z, 64, 5, torch.Generator().manual_seed(0), sampler="ancestral")
    c, sc = sample_masked(denoise, z, 64, 5, torch.Generator().manual_seed(0), sampler="caching")
    assert torch.equal(a, c) and not (a == 5).any()
    assert sa.denoiser_rows == 64 * 6 and sc.denoiser_rows <= 6 * 13
    b, _ = sample_masked(denoise, z, 64, 5, torch.Generator().manual_seed(0), sampler="caching")
    assert torch.equal(b, c)  # same seed, same tokens


def test_prompt_and_infill_positions_are_kept():
    denoise = row_pure_denoiser()
    z = torch.full((3, 12), 5)
    z[:, :3] = torch.tensor([1, 2, 3])
    z[:, -2:] = torch.tensor([4, 0])
    out, _ = sample_masked(denoise, z, 8, 5, torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :3], z[:, :3]) and torch.equal(out[:, -2:], z[:, -2:]) and not (out == 5).any()


def test_sampler_arguments_are_checked():
    denoise = row_pure_denoiser()
    z = torch.full((1, 12), 5)
    with pytest.raises(ValueError, match="unknown text sampler"):
        sample_masked(denoise, z, 8, 5, torch.Generator(), sampler="gibbs")
    with pytest.raises(ValueError, match="energy model"):
        sample_masked(denoise, z, 8, 5, torch.Generator(), sampler="edlm")


def test_char_tokenizer_byte_fallback_round_trip():
    tok = CharTokenizer.fit("To be, or not to be")
    text = "To be — or naïve ☃ not"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(tok) == len(set("To be, or not to be")) + 256
    assert len(ids) > len(text)  # unseen characters became several byte tokens
    assert CharTokenizer.from_dict(tok.to_dict()).encode(text) == ids
