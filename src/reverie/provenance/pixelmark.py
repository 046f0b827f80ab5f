"""A pixel-space watermark for images of at least 256 px: a keyed periodic pattern, found by phase correlation.

Embedding adds to the luminance a ``PERIOD`` x ``PERIOD`` tile, repeated over the image, of keyed Gaussian
noise band-limited to ``BAND`` cycles per tile (wavelengths of 5 to 16 px: below JPEG's and blur's losses,
above the image's own low-frequency content), at ``STRENGTH`` grey levels RMS (about 42 dB PSNR).
Repetition is what makes it survive geometry: a crop only shifts the tile (a cyclic shift), and a resize
changes its period, which the autocorrelation of the image reveals.

Detection (:func:`detect`): take the high-pass residual of the luminance; estimate the tile period from its
autocorrelation along both axes and resize to bring it back to ``PERIOD`` (the original scale is tried
too); fold the residual into one tile by averaging all tiles; then correlate the folded tile's Fourier
phases with the key tile's over the band, at every cyclic shift (symmetric phase-only matched filtering).
For an image without the mark the phases are unrelated to the key's, so each shift's score is close to
N(0, 1); the reported p-value is Bonferroni-corrected over the shifts and scales searched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .keys import key_id, seed_for, watermark_key

SCHEME = "tiled-phase-v1"
MIN_SIZE = 256
PERIOD = 32
BAND = (2.0, 6.5)
STRENGTH = 2.0


def fits(image) -> bool:
    """Whether ``image`` (PIL) is large enough to carry the mark."""
    return min(image.size) >= MIN_SIZE


def default_key() -> bytes:
    return watermark_key()


def _band_mask() -> np.ndarray:
    f = np.fft.fftfreq(PERIOD, d=1.0 / PERIOD)
    radius = np.hypot(f[:, None], f[None, :])
    return (radius >= BAND[0]) & (radius <= BAND[1])


def tile(key: bytes) -> np.ndarray:
    """The key's ``PERIOD`` x ``PERIOD`` tile: band-limited, zero mean, unit RMS."""
    rng = np.random.default_rng(seed_for(key, SCHEME))
    spectrum = np.fft.fft2(rng.standard_normal((PERIOD, PERIOD))) * _band_mask()
    t = np.fft.ifft2(spectrum).real
    return t / t.std()


def _luma(arr: np.ndarray) -> np.ndarray:
    return arr if arr.ndim == 2 else arr[..., :3] @ np.array([0.299, 0.587, 0.114])


def embed(image, key: bytes, strength: float = STRENGTH):
    """``image`` (PIL, L or RGB) with the mark added to its luminance."""
    from PIL import Image

    mode = image.mode
    arr = np.asarray(image.convert("RGB" if mode not in ("L", "RGB") else mode), dtype=np.float64)
    h, w = arr.shape[:2]
    pattern = np.tile(tile(key), (h // PERIOD + 1, w // PERIOD + 1))[:h, :w] * strength
    arr = arr + (pattern if arr.ndim == 2 else pattern[..., None])
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), arr.ndim == 2 and "L" or "RGB")


def _residual(y: np.ndarray) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return y - gaussian_filter(y, 4.0, mode="wrap")


def candidate_periods(residual: np.ndarray, count: int = 3, lo: int = 12, hi: int = 80) -> list[float]:
    """The ``count`` strongest peaks of ``residual``'s autocorrelation along both axes (lags ``lo`` to ``hi``,
    refined to sub-pixel): where a resized tile's period shows."""
    spec = np.fft.fft2(residual - residual.mean())
    ac = np.fft.ifft2(np.abs(spec) ** 2).real
    hi = min(hi, min(residual.shape) // 2 - 1)
    profile = ac[0, :hi + 1] + ac[:hi + 1, 0]
    peaks = [k for k in range(lo, hi) if profile[k] >= profile[k - 1] and profile[k] >= profile[k + 1]]
    periods = []
    for k in sorted(peaks, key=lambda k: -profile[k])[:count]:
        a, b, c = profile[k - 1], profile[k], profile[k + 1]
        curve = a - 2 * b + c
        periods.append(float(k + (np.clip(0.5 * (a - c) / curve, -0.5, 0.5) if curve else 0.0)))
    return periods


def _fold(residual: np.ndarray) -> np.ndarray:
    h, w = (residual.shape[0] // PERIOD) * PERIOD, (residual.shape[1] // PERIOD) * PERIOD
    return residual[:h, :w].reshape(h // PERIOD, PERIOD, w // PERIOD, PERIOD).mean(axis=(0, 2))


def _phase_scores(folded: np.ndarray, key_tile: np.ndarray) -> np.ndarray:
    """Per cyclic shift: the phase-only correlation over the band, in null standard deviations."""
    band = _band_mask()
    a, b = np.fft.fft2(folded), np.fft.fft2(key_tile)
    cross = a * np.conj(b)
    cross = np.where(band, cross / np.maximum(np.abs(cross), 1e-12), 0)
    corr = np.fft.ifft2(cross).real * PERIOD * PERIOD  # = sum over the band of cos(phase difference + shift)
    # f and -f give the same cosine: |band| / 2 independent uniform phases for a key unrelated to the image,
    # so the variance is 4 * (|band| / 2) * (1 / 2) = |band|
    return corr / np.sqrt(band.sum())


@dataclass
class PixelDetection:
    score: float        # the best shift's score, in null standard deviations
    p_value: float      # Bonferroni over shifts and scales
    scale: float        # the resize applied before folding (1: none)
    tests: int

    def detected(self, false_positive_rate: float = 0.01) -> bool:
        return self.p_value < false_positive_rate


def detect(image, key: bytes) -> PixelDetection:
    """Look for the mark of ``key`` in ``image`` (PIL, any size of at least 2 tiles); see the module docstring."""
    from PIL import Image
    from scipy.stats import norm

    rgb = image.convert("L" if image.mode in ("L", "1", "I", "I;16") else "RGB")
    y = _luma(np.asarray(rgb, dtype=np.float64))
    if min(y.shape) < 2 * PERIOD:
        return PixelDetection(0.0, 1.0, 1.0, 0)
    residual = _residual(y)
    scales = [1.0] + [PERIOD / p for p in candidate_periods(residual) if abs(p / PERIOD - 1) > 0.01]
    key_tile = tile(key)
    best = (-np.inf, 1.0)
    for s in scales:
        r = residual
        if s != 1.0:
            size = (max(PERIOD, round(y.shape[1] * s)), max(PERIOD, round(y.shape[0] * s)))
            r = _residual(np.asarray(Image.fromarray(y.astype(np.float32), "F").resize(size, Image.BICUBIC),
                                     dtype=np.float64))
        score = float(_phase_scores(_fold(r), key_tile).max())
        if score > best[0]:
            best = (score, s)
    tests = PERIOD * PERIOD * len(scales)
    return PixelDetection(best[0], float(min(1.0, tests * norm.sf(best[0]))), best[1], tests)


def record(key: bytes) -> dict:
    return {"scheme": SCHEME, "key_id": key_id(key)}
