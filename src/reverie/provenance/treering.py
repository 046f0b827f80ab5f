"""Tree-Ring watermark (Wen et al. 2023, "Tree-Ring Watermarks: Fingerprints for Diffusion Images that are
Invisible and Robust"): a key pattern written into the Fourier transform of the initial noise, detected by
inverting an image back to its noise.

The key occupies the frequencies of a ring (radius ``r_lo`` to ``r_hi`` cycles per image, DC excluded so a
brightness change does not touch it) of every channel. With ``M`` that mask, symmetric under f -> -f, the
map ``P x = Re IFFT(M * FFT x)`` is an orthogonal projection onto a real subspace of dimension
``d = channels * |M|``. The watermarked noise is

    x = n - P n + P z_key,        n ~ N(0, I) (the seed's noise),  z_key ~ N(0, I) (drawn from the key),

i.e. the ring's Fourier coefficients are replaced by those of a Gaussian draw made from the key (Tree-Ring's
"random" key pattern). Averaged over keys, x ~ N(0, I) exactly; for one key, its ring is fixed while every
other coefficient stays random, so each image's noise still looks like a standard Gaussian draw.

Detection correlates the inverted noise x' with the key pattern inside the ring:
``rho = <P x', P z_key> / (|P x'| |P z_key|)``. When the key is independent of the image (any image that
was not made with it) ``P z_key`` is isotropic in the d-dimensional subspace, so whatever x' is,
``(rho + 1) / 2 ~ Beta((d - 1) / 2, (d - 1) / 2)``: the p-value and the threshold for a false-positive
rate are exact, not fit to data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .keys import key_id, seed_for

SCHEME = "tree-ring-v1"


@dataclass(frozen=True)
class TreeRing:
    """The ring: frequencies with ``r_lo <= |f| <= r_hi`` (cycles per image side) in every channel."""

    r_lo: float = 1.0
    r_hi: float = 5.0

    def mask(self, height: int, width: int) -> torch.Tensor:
        """Boolean ``[H, W]`` in FFT index order (DC at [0, 0]), symmetric under f -> -f."""
        fy = torch.fft.fftfreq(height, d=1.0 / height, dtype=torch.float64)
        fx = torch.fft.fftfreq(width, d=1.0 / width, dtype=torch.float64)
        radius = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt()
        return (radius >= self.r_lo) & (radius <= self.r_hi)

    def dim(self, shape) -> int:
        """d: the dimension of the ring's subspace for noise of ``shape`` ``[..., C, H, W]``."""
        return int(shape[-3]) * int(self.mask(shape[-2], shape[-1]).sum())

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``P x``: the part of ``x`` (``[..., H, W]``) inside the ring."""
        m = self.mask(x.shape[-2], x.shape[-1]).to(x.device)
        return torch.fft.ifft2(torch.fft.fft2(x.double()) * m).real

    def key_pattern(self, key: bytes, shape) -> torch.Tensor:
        """``P z_key`` for one image's noise of shape ``[C, H, W]`` (float64)."""
        g = torch.Generator().manual_seed(seed_for(key, f"{SCHEME} {tuple(shape)}"))
        return self.project(torch.randn(tuple(shape), generator=g, dtype=torch.float64))

    def watermark(self, noise: torch.Tensor, key: bytes) -> torch.Tensor:
        """``noise`` (``[B, C, H, W]``, unit variance) with its ring replaced by the key's."""
        pattern = self.key_pattern(key, noise.shape[1:]).to(noise.device)
        return (noise.double() - self.project(noise) + pattern).to(noise.dtype)

    def correlation(self, noise: torch.Tensor, key: bytes) -> torch.Tensor:
        """rho per image of ``noise`` ``[B, C, H, W]`` (float64 ``[B]``): the detection statistic."""
        pattern = self.key_pattern(key, noise.shape[1:]).to(noise.device).flatten()
        inside = self.project(noise).flatten(1)
        return inside @ pattern / (inside.norm(dim=1) * pattern.norm()).clamp_min(1e-300)

    def p_value(self, rho, shape) -> torch.Tensor:
        """P(rho_null >= rho) for images not made with the key (exact; see the module docstring)."""
        from scipy.stats import beta

        a = (self.dim(shape) - 1) / 2
        r = torch.as_tensor(rho, dtype=torch.float64)
        return torch.as_tensor(beta.sf((r.numpy() + 1) / 2, a, a), dtype=torch.float64)

    def threshold(self, shape, false_positive_rate: float = 0.01) -> float:
        """The rho above which an image is called watermarked, for the given false-positive rate."""
        from scipy.stats import beta

        a = (self.dim(shape) - 1) / 2
        return float(2 * beta.isf(false_positive_rate, a, a) - 1)


def watermarked_noise(shape, seed: int, key: bytes, ring: TreeRing | None = None) -> torch.Tensor:
    """Unit-variance start noise of ``shape`` ``[B, C, H, W]`` carrying the key: the seed's own draw (as
    ``torch.randn`` with ``Generator().manual_seed(seed)``, float32) with its ring replaced."""
    noise = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return (ring or TreeRing()).watermark(noise, key)


def record(key: bytes, ring: TreeRing | None = None) -> dict:
    """What a file's metadata says about this watermark."""
    ring = ring or TreeRing()
    return {"scheme": SCHEME, "key_id": key_id(key), "r_lo": ring.r_lo, "r_hi": ring.r_hi}


def z_score(rho: float, d: int) -> float:
    """rho in standard deviations of its null distribution (about rho * sqrt(d))."""
    return rho * math.sqrt(d)
