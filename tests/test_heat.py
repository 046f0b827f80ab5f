"""Heat-equation diffusion (reverie.heat): the DCT solution of the heat equation with Neumann boundaries
against explicit finite differences, IHDM's process / loss / sampler, and blurring diffusion's
per-frequency alpha and sigma with its ancestral sampler."""

import math

import pytest
import torch

from reverie.heat import (
    IHDM,
    BlurringSchedule,
    blurring_sample,
    dct2,
    dct_bounds,
    dct_matrix,
    eigenvalues,
    heat,
    idct2,
    ihdm_sample,
)


def _neumann_laplacian(u, h=1.0):
    """5-point Laplacian with mirrored (zero-flux) boundary cells."""
    p = torch.nn.functional.pad(u, (1, 1, 1, 1), mode="replicate")
    return (p[..., 2:, 1:-1] + p[..., :-2, 1:-1] + p[..., 1:-1, 2:] + p[..., 1:-1, :-2] - 4 * u) / h**2


def _rk4(u, t_end, dt, h=1.0):
    """Explicit RK4 in time for u_t = Laplacian(u)."""
    steps = int(round(t_end / dt))
    for _ in range(steps):
        k1 = _neumann_laplacian(u, h)
        k2 = _neumann_laplacian(u + dt / 2 * k1, h)
        k3 = _neumann_laplacian(u + dt / 2 * k2, h)
        k4 = _neumann_laplacian(u + dt * k3, h)
        u = u + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return u


def test_dct_is_orthonormal_and_inverts():
    m = dct_matrix(12)
    torch.testing.assert_close(m @ m.T, torch.eye(12, dtype=torch.float64), atol=1e-13, rtol=0)
    x = torch.randn(2, 3, 12, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(idct2(dct2(x)), x, atol=1e-12, rtol=0)
    # the DC coefficient is the mean times sqrt(H W)
    torch.testing.assert_close(dct2(x)[..., 0, 0], x.mean((-2, -1)) * math.sqrt(120), atol=1e-12, rtol=0)


@pytest.mark.parametrize("t", [0.5, 3.0, 20.0])
def test_dct_heat_matches_finite_differences_on_the_pixel_grid(t):
    """The discrete Laplacian's DCT solution is the method-of-lines solution: RK4 to <= 1e-4 (it is ~1e-8)."""
    x = torch.rand(1, 2, 16, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    fd = _rk4(x, t, dt=0.01)
    exact = heat(x, t, laplacian="discrete")
    assert float((fd - exact).abs().max()) <= 1e-4
    assert float((exact - x).abs().max()) > 0.1  # it did blur
    # mass is conserved (Neumann: no flux through the border)
    torch.testing.assert_close(exact.mean((-2, -1)), x.mean((-2, -1)), atol=1e-12, rtol=0)


def test_continuous_laplacian_matches_a_refined_finite_difference_grid():
    """The continuous Laplacian (IHDM's eigenvalues) against finite differences on a grid 15x finer: cosine
    modes of the coarse grid are the PDE's exact solutions, sampled at coarse cell centres (<= 1e-4)."""
    H, m = 8, 15
    coeffs = torch.zeros(1, 1, H, H, dtype=torch.float64)
    coeffs[0, 0, 0, 0], coeffs[0, 0, 1, 0], coeffs[0, 0, 0, 2], coeffs[0, 0, 1, 1] = 2.0, 1.0, -0.7, 0.5
    x = idct2(coeffs)
    t = 1.5
    exact = heat(x, t, laplacian="continuous")
    # the same cosines on the fine cell centres (pixel units: coarse cell i spans [i, i + 1])
    centres = (torch.arange(H * m, dtype=torch.float64) + 0.5) / m
    basis = torch.stack([torch.cos(math.pi * k * centres / H) * math.sqrt((1 if k == 0 else 2) / H)
                         for k in range(H)])  # [K, fine]
    fine = basis.T @ coeffs[0, 0] @ basis
    fd = _rk4(fine[None, None], t, dt=1.25e-3, h=1.0 / m)  # RK4 is stable to lambda dt = 2.78
    coarse = fd[..., m // 2::m, m // 2::m]
    assert float((coarse - exact).abs().max()) <= 1e-4
    assert float((exact - x).abs().max()) > 0.1


def test_heat_is_a_gaussian_blur_of_width_sqrt_2t():
    """Away from the borders a point source spreads to a Gaussian of variance 2 t per axis."""
    x = torch.zeros(1, 1, 65, 65, dtype=torch.float64)
    x[..., 32, 32] = 1.0
    t = 4.0
    out = heat(x, t, laplacian="continuous")[0, 0]
    ii = torch.arange(65, dtype=torch.float64) - 32
    var_row = float((out.sum(1) * ii**2).sum())
    assert var_row == pytest.approx(2 * t, rel=0.03)


def test_eigenvalues():
    lam = eigenvalues(4, 6, "continuous")
    assert float(lam[0, 0]) == 0 and float(lam[1, 0]) == pytest.approx(math.pi**2 / 16)
    disc = eigenvalues(32, 32, "discrete")
    assert float(disc[1, 0]) == pytest.approx(float(eigenvalues(32, 32)[1, 0]), rel=1e-3)
    with pytest.raises(ValueError, match="unknown laplacian"):
        eigenvalues(4, 4, "spectral")


# ---- IHDM ----------------------------------------------------------------------------------------------
def test_ihdm_levels_training_pairs_and_prior():
    p = IHDM(num_levels=10, blur_min=0.5, blur_max=20.0, noise=0.01)
    t = p.times()
    assert float(t[0]) == 0 and float(t[1]) == pytest.approx(0.125) and float(t[-1]) == pytest.approx(200.0)
    k = p.draw_levels(5000, torch.Generator().manual_seed(0))
    assert int(k.min()) == 1 and int(k.max()) == 10  # the top level K is drawn (the IHDM code's randint never did)
    x0 = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    levels = torch.tensor([1, 2, 5, 10])
    u_k, target = p.training_pair(x0, levels, noise)
    torch.testing.assert_close(target[0], x0[0], atol=1e-6, rtol=0)  # level 0 is the data
    torch.testing.assert_close(u_k - 0.01 * noise, p.blur(x0, levels), atol=1e-6, rtol=0)
    # the prior is the level-K training input: blurred data plus delta noise
    prior = p.prior(x0.repeat(64, 1, 1, 1), torch.Generator().manual_seed(3))
    resid = prior - p.blur(x0.repeat(64, 1, 1, 1), torch.full((256,), 10))
    assert float(resid.std()) == pytest.approx(0.01, rel=0.05)
    # the loss is the residual's error: zero for the exact residual, positive otherwise
    exact = lambda u, c: target - u  # noqa: E731 - a net that knows the answer
    assert float(p.loss(exact, x0, levels, noise).max()) < 1e-12
    assert float(p.loss(lambda u, c: torch.zeros_like(u), x0, levels, noise).min()) > 0


def test_ihdm_sampler_inverts_the_heat_equation_with_an_oracle():
    """With f(u, k) = heat(u, t_{k-1} - t_k) - u (the exact inverse step) and no noise, K sampling steps take
    heat(x0, t_K) back to x0; the level passed to the network runs K..1."""
    p = IHDM(num_levels=6, blur_min=0.3, blur_max=1.0, noise=0.0)
    t = p.times()
    x0 = torch.rand(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    seen = []

    def oracle(u, c):
        k = int(round(float(c[0]) * p.num_levels / 1000))
        seen.append(k)
        return heat(u, t[k - 1] - t[k]) - u

    out = ihdm_sample(oracle, p.blur(x0, torch.full((2,), 6)), p)
    assert seen == [6, 5, 4, 3, 2, 1]
    torch.testing.assert_close(out, x0, atol=1e-8, rtol=0)


# ---- blurring diffusion ------------------------------------------------------------------------------
def test_blurring_coefficients_are_the_heat_equation_under_a_cosine_schedule():
    s = BlurringSchedule(blur_max=20.0, d_min=0.0)
    x0 = torch.rand(3, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    alpha, sigma = s.alpha_sigma(t)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(3, dtype=torch.float64))
    tau = (20 * torch.sin(math.pi * t / 2) ** 2) ** 2 / 2  # sigma_B(t) = 20 sin^2(pi t / 2)
    no_noise = s.noised(x0, t, torch.zeros_like(x0))
    for i in range(3):
        torch.testing.assert_close(no_noise[i] / alpha[i], heat(x0[i:i + 1], float(tau[i]))[0], atol=1e-10, rtol=0)
    d = BlurringSchedule().dissipation(torch.tensor([0.0, 1.0], dtype=torch.float64), 16, 16)
    assert float(d[0].min()) == pytest.approx(1.0) and float(d[1, -1, -1]) == pytest.approx(0.001, rel=1e-3)
    assert float(d[1, 0, 0]) == pytest.approx(1.0)  # the mean never blurs away


def test_blurring_posterior_step_is_exact_in_distribution():
    """u_t ~ q(u_t | u0), then u_s ~ q(u_s | u_t, u0) (the ancestral step with a perfect x0 estimate) has the
    marginal q(u_s | u0) = N(a_s u0, sigma_s^2) at every frequency, for a large step t -> s."""
    H, n = 8, 20000
    s = BlurringSchedule(blur_max=8.0)
    g = torch.Generator().manual_seed(0)
    u0 = torch.randn(1, H, H, dtype=torch.float64, generator=g).expand(n, H, H)
    t, s_ = 0.7, 0.2
    a_t, sig_t = s.coefficients(t, H, H)
    a_s, sig_s = s.coefficients(s_, H, H)
    u_t = a_t * u0 + sig_t * torch.randn(n, H, H, dtype=torch.float64, generator=g)
    mean, std = s.posterior(u_t, u0, t, s_)
    u_s = mean + std * torch.randn(n, H, H, dtype=torch.float64, generator=g)
    se = float(sig_s) / n**0.5
    assert float((u_s.mean(0) - a_s * u0[0]).abs().max()) < 5 * se
    assert float((u_s.std(0) / sig_s - 1).abs().max()) < 0.04


@pytest.mark.slow
def test_blurring_ancestral_sampler_recovers_gaussian_data_with_the_exact_eps():
    """Data with independent DCT coefficients u0 ~ N(0, v_kl): the exact eps-predictor is sigma u_t /
    (a_t^2 v + sigma^2) per frequency; the per-frequency variance of the samples converges to v_kl as the
    steps grow (first order: the ancestral step's own bias; about 24% off at 100 steps, 9% at 300)."""
    H = 8
    s = BlurringSchedule(blur_max=4.0)
    kk = torch.arange(H, dtype=torch.float64)
    v = 0.25 / (1 + 0.1 * (kk[:, None] ** 2 + kk[None] ** 2))

    def exact_eps(x, c):
        t = c.to(torch.float64) / 1000
        a, sig = s.coefficients(t, H, H)
        u = dct2(x.to(torch.float64))
        return idct2(sig[:, None] * u / (a[:, None] ** 2 * v + sig[:, None] ** 2))

    errors = []
    for steps in (100, 300):
        noise = torch.randn(2000, 1, H, H, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        out = blurring_sample(exact_eps, noise, s, steps=steps, generator=torch.Generator().manual_seed(1),
                              clip=False)
        errors.append(float((dct2(out).pow(2).mean((0, 1)) / v - 1).abs().mean()))
    assert errors[1] < 0.12 and errors[1] < errors[0] / 2, errors


def test_blurring_u0_bounds_clip_the_x0_estimate_per_frequency():
    """``u0_bounds`` keeps every DCT coefficient of the x0 estimate inside the bounds (the last step returns it),
    where a wild eps network puts it far outside; infinite bounds change nothing; ``dct_bounds`` is mean -+ 3 std."""
    H = 8
    s = BlurringSchedule(blur_max=4.0)
    images = torch.rand(64, 1, H, H, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    lo, hi = dct_bounds(images)
    u = dct2(images).flatten(0, 1)
    torch.testing.assert_close(hi, u.mean(0) + 3 * u.std(0))
    torch.testing.assert_close(lo, u.mean(0) - 3 * u.std(0))

    def wild(x, c):  # an eps far from right: the x0 estimate (u_t - sigma eps) / a_t is huge
        return 30 * x + 5

    noise = torch.randn(16, 1, H, H, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def run(**kw):
        return blurring_sample(wild, noise, s, steps=10, generator=torch.Generator().manual_seed(1), clip=False, **kw)

    free = run()
    inf = torch.full((H, H), math.inf, dtype=torch.float64)
    torch.testing.assert_close(run(u0_bounds=(-inf, inf)), free, atol=0, rtol=0)
    bounded = dct2(run(u0_bounds=(lo, hi)))
    assert bool(((bounded >= lo - 1e-9) & (bounded <= hi + 1e-9)).all())
    assert not bool(((dct2(free) >= lo) & (dct2(free) <= hi)).all())
