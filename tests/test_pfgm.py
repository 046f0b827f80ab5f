"""PFGM++ perturbation kernel (reverie.pfgm): the radius law, the r = sigma sqrt(D) alignment, and the
D -> infinity limit, EDM's Gaussian."""

import math

import pytest
import scipy.stats
import torch

from reverie.pfgm import pfgm_noise, radial_beta, radius_from_sigma, sigma_from_radius

N = 64  # dimensions of one sample (8 x 8)


def _noise(D, n=8000, seed=0):
    return pfgm_noise((n, 1, 8, 8), D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("D", [4, 128, 2048])
def test_radius_is_beta_distributed(D):
    """R1 = R^2 / (R^2 + r^2) ~ Beta(N/2, D/2) (Xu et al. 2023, eq. 4): Kolmogorov-Smirnov against scipy."""
    r1 = radial_beta(_noise(D), D).numpy()
    assert scipy.stats.kstest(r1, scipy.stats.beta(N / 2, D / 2).cdf).pvalue > 1e-3
    # and not against a neighbouring D
    assert scipy.stats.kstest(r1, scipy.stats.beta(N / 2, D / 1.5).cdf).pvalue < 1e-6


def test_direction_is_uniform_and_independent_of_the_radius():
    x = _noise(128).reshape(8000, N)
    unit = x / x.norm(dim=1, keepdim=True)
    assert float(unit.mean(0).abs().max()) < 5 / math.sqrt(8000 * N)
    torch.testing.assert_close(unit.T @ unit / 8000, torch.eye(N, dtype=torch.float64) / N, atol=3e-3, rtol=0)
    # radius uncorrelated with the first direction coordinate's square
    corr = torch.corrcoef(torch.stack([x.norm(dim=1), unit[:, 0] ** 2]))[0, 1]
    assert abs(float(corr)) < 0.03


@pytest.mark.parametrize("D", [8, 128, 2048])
def test_coordinate_variance_is_d_over_d_minus_2(D):
    """E[R^2] / N at r = sqrt(D): r^2 E[R1 / (1 - R1)] / N = D N/(D-2) / N (a Beta(a, b) odds ratio has mean
    a / (b - 1))."""
    var = float(_noise(D).pow(2).mean())
    assert var == pytest.approx(D / (D - 2), rel=0.02)


def test_large_d_tends_to_edm_gaussian():
    """Kolmogorov-Smirnov distance of the coordinates (200k values) to N(0, 1) falls with D: clearly off at
    D = 8, at the sample floor (~0.003) at D = 128 and 2048; D = 0 is the Gaussian itself."""
    def ks(D):
        return scipy.stats.kstest(_noise(D, seed=3).reshape(-1)[:200_000].numpy(), "norm").statistic

    small, mid, large = ks(8), ks(128), ks(2048)
    assert small > 0.015 and small > 3 * mid and mid < 0.006 and large < 0.006, (small, mid, large)
    # kurtosis of a t_D coordinate: excess 6 / (D - 4), which is 0.0029 at D = 2048 (Gaussian: 0)
    x = _noise(2048).reshape(-1)
    assert float((x**4).mean() / (x**2).mean() ** 2) - 3 == pytest.approx(0.0, abs=0.03)
    g = torch.Generator().manual_seed(5)
    torch.testing.assert_close(pfgm_noise((3, 4), 0, generator=g), torch.randn(3, 4, generator=torch.Generator()
                                                                                 .manual_seed(5)))


def test_alignment_and_errors():
    assert radius_from_sigma(2.0, 2048) == pytest.approx(2.0 * math.sqrt(2048))
    assert sigma_from_radius(radius_from_sigma(0.3, 128), 128) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="non-negative integer"):
        pfgm_noise((2, 3), -1)
    a = pfgm_noise((4, 3), 128, generator=torch.Generator().manual_seed(1))
    b = pfgm_noise((4, 3), 128, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
