"""FID / KID / precision-recall: the math against closed forms and scipy, and the real Inception network."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from reverie.eval.fid import (
    FeatureStats,
    dataset_reference,
    frechet_distance,
    get_inception,
    kid,
    precision_recall,
    preprocess,
    sample_features,
)


def _spd(d: int, seed: int, rank: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, rank or d, generator=g, dtype=torch.float64)
    return a @ a.T / (rank or d)


def test_frechet_distance_matches_scipy_sqrtm_formula():
    d = 20
    mu1, mu2 = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    s1, s2 = _spd(d, 1), _spd(d, 2)
    covmean = scipy.linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    ref = float(((mu1 - mu2) ** 2).sum()) + float(np.trace(s1.numpy() + s2.numpy() - 2 * covmean))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-9)


def test_frechet_distance_closed_forms():
    d = 16
    s = _spd(d, 3)
    mu = torch.randn(d, dtype=torch.float64)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9)
    # Isotropic Gaussians: |dm|^2 + d (s1 - s2)^2 with standard deviations s1, s2.
    eye = torch.eye(d, dtype=torch.float64)
    shift = torch.full((d,), 0.5, dtype=torch.float64)
    assert frechet_distance(mu, 4 * eye, mu + shift, 9 * eye) == pytest.approx(d * 0.25 + d * 1.0, rel=1e-12)
    # Rank-deficient covariances (fewer samples than dimensions) stay finite and exact at zero.
    low = _spd(d, 4, rank=3)
    assert frechet_distance(mu, low, mu, low) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="dimensions"):
        frechet_distance(mu, s, mu[:3], s[:3, :3])


def test_feature_stats_unbiased_covariance_and_roundtrip(tmp_path):
    feats = torch.randn(50, 6, dtype=torch.float64)
    stats = FeatureStats.from_features(feats)
    assert torch.allclose(stats.sigma, torch.from_numpy(np.cov(feats.numpy(), rowvar=False)))
    stats.save(tmp_path / "s.safetensors")
    back = FeatureStats.load(tmp_path / "s.safetensors")
    assert back.n == 50 and torch.equal(back.mu, stats.mu) and torch.equal(back.features, stats.features)


def test_kid_is_unbiased_zero_for_same_distribution_and_positive_for_shift():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g)
    same, std = kid(a, b, subsets=20, subset_size=200)
    assert abs(same) < 3 * std + 1e-3
    shifted, _ = kid(a, b + 1.0, subsets=20, subset_size=200)
    assert shifted > 10 * max(abs(same), std)


def test_kid_matches_a_direct_mmd_with_one_full_subset():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 5, generator=g, dtype=torch.float64), torch.randn(30, 5, generator=g, dtype=torch.float64)

    def k(p, q):
        return (p @ q.T / 5 + 1) ** 3

    m = 30
    ref = ((k(x, x).sum() - k(x, x).trace()) / (m * (m - 1)) + (k(y, y).sum() - k(y, y).trace()) / (m * (m - 1))
           - 2 * k(x, y).mean())
    # With subset_size = n every subset is a permutation of the whole set: MMD^2 is permutation invariant.
    assert kid(x, y, subsets=3, subset_size=30)[0] == pytest.approx(float(ref), rel=1e-10)


def test_precision_recall_limits():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 4, generator=g)
    p, r = precision_recall(real, real.clone())
    assert p == 1.0 and r == 1.0
    far = torch.randn(300, 4, generator=g) + 100.0
    assert precision_recall(real, far) == (0.0, 0.0)
    # Mode dropping: fakes cover half of a two-mode real set -> high precision, recall about one half.
    modes = torch.cat([torch.randn(200, 4, generator=g), torch.randn(200, 4, generator=g) + 20])
    half = torch.randn(200, 4, generator=g)
    p, r = precision_recall(modes, half)
    assert p > 0.9 and 0.35 < r < 0.6


def test_preprocess_quantizes_and_maps_to_the_tf_input_range():
    x = torch.tensor([-1.0, 1.0, 0.0]).view(1, 1, 1, 3).expand(1, 1, 299, 3)
    y = preprocess(torch.nn.functional.pad(x, (0, 296)))
    assert y.shape == (1, 3, 299, 299)
    assert y[0, :, 0, 0].tolist() == [-1.0] * 3  # uint8 0 -> -1
    assert y[0, 0, 0, 1].item() == pytest.approx(255 / 128 - 1)  # uint8 255 -> 0.9921875
    assert y[0, 0, 0, 2].item() == pytest.approx(128 / 128 - 1)  # 0.0 -> 127.5 -> rounds to 128
    with pytest.raises(ValueError, match="expected images"):
        preprocess(torch.zeros(2, 2, 8, 8))


@pytest.fixture(scope="module")
def mnist_images():
    from reverie.data import get_dataset

    ds = get_dataset("mnist", resolution=32, split="test")
    return torch.stack([ds[i]["image"] for i in range(48)])


def test_inception_fid_is_zero_on_itself_and_grows_with_noise(mnist_images):
    """The real network: FID(a, a) ~ 0, and FID rises monotonically as Gaussian noise is added."""
    inception = get_inception()
    base = inception(mnist_images)
    assert base.shape == (48, 2048) and torch.isfinite(base).all()
    ref = FeatureStats.from_features(base)
    assert frechet_distance(ref.mu, ref.sigma, ref.mu, ref.sigma) < 1e-6
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(mnist_images.shape, generator=g)
    fids = []
    for level in (0.05, 0.2, 0.6):
        feats = inception((mnist_images + level * noise).clamp(-1, 1))
        stats = FeatureStats.from_features(feats)
        fids.append(frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma))
    assert 0 < fids[0] < fids[1] < fids[2], fids
    assert math.isfinite(fids[2])


def test_bf16_inception_stays_close_to_float32(mnist_images):
    """The bf16 network (bfloat16 weights, channels-last input) gives features within a few percent of
    float32's, and the FID between two sets moves by a small fraction of itself."""
    ref32, refb = get_inception(), get_inception(precision="bf16")
    assert refb is get_inception("cpu", "bf16") and refb is not ref32
    a, b = mnist_images[:24], mnist_images[24:]
    f32 = [ref32(x) for x in (a, b)]
    fb = [refb(x) for x in (a, b)]
    for x32, xb in zip(f32, fb):
        assert xb.dtype == torch.float64
        assert float((xb - x32).norm() / x32.norm()) < 0.05
    d32 = frechet_distance(*(t for f in f32 for t in (f.mean(0), f.T.cov())))
    db = frechet_distance(*(t for f in fb for t in (f.mean(0), f.T.cov())))
    assert abs(db - d32) < 0.05 * d32, (db, d32)
    with pytest.raises(ValueError, match="precision"):
        get_inception(precision="fp16")


def test_dataset_reference_caches_and_sample_features_is_seeded(tmp_path, monkeypatch):
    monkeypatch.setenv("REVERIE_CACHE", str(tmp_path))
    calls = []

    def extractor(images):  # a cheap stand-in feature map: per-image mean and std of pixels
        calls.append(images.shape[0])
        return torch.stack([images.flatten(1).mean(1), images.flatten(1).std(1)], 1).double()

    import reverie.eval.fid as fid

    monkeypatch.setattr(fid, "get_inception", lambda *a, **k: extractor)
    stats = dataset_reference("digits", resolution=8, n=30, batch_size=8, progress=False)
    assert stats.n == 30 and sum(calls) == 30 and stats.features.shape == (30, 2)
    again = dataset_reference("digits", resolution=8, n=30, batch_size=8, progress=False)
    assert sum(calls) == 30 and torch.equal(again.sigma, stats.sigma)  # served from the cache
    assert len(list((tmp_path / "fid").glob("*.safetensors"))) == 1
    dataset_reference("digits", resolution=8, n=30, batch_size=8, progress=False, precision="bf16")
    assert sum(calls) == 60  # another precision is another cache entry, never served float32's
    assert len(list((tmp_path / "fid").glob("*-bf16.safetensors"))) == 1
    with pytest.raises(ValueError, match="precision"):
        dataset_reference("digits", resolution=8, n=30, precision="int8")

    def sampler(num, seed):
        return torch.randn(num, 1, 8, 8, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)

    a = sample_features(sampler, 10, batch_size=4, seed=3, extractor=extractor, progress=False)
    b = sample_features(sampler, 10, batch_size=4, seed=3, extractor=extractor, progress=False)
    c = sample_features(sampler, 10, batch_size=4, seed=4, extractor=extractor, progress=False)
    assert a.shape == (10, 2) and torch.equal(a, b) and not torch.equal(a, c)
