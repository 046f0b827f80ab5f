"""Stable Diffusion's KL autoencoder (Rombach et al. 2022, Sec. 3.1; f = 8, 4 latent channels) as a reverie
:class:`~reverie.nets.autoencoder.AutoencoderKL`, with tiled and sliced decoding for large images.

SD's VAE has the block layout of reverie's (res blocks, one mid self-attention, nearest + conv upsampling,
``num_res_blocks + 1`` blocks per decoder level) and differs in three details, added here:

- downsampling pads the right and bottom by one and convolves without padding (:class:`PadDownsample`);
- 1x1 ``quant_conv`` / ``post_quant_conv`` between the encoder / decoder and the latent;
- every GroupNorm has eps 1e-6.

``scaling_factor`` (0.18215 for SD 1.x / 2.x) lives in the config, so ``to_latent`` / ``from_latent`` give and
take the diffusion model's latents, as for reverie's own autoencoders.

Large images: ``from_latent`` decodes one image at a time (slicing: a batch costs one image's activation
memory) and, above ``tile_latent`` latent pixels on a side, in overlapping tiles blended linearly across
the overlap (tiling: memory independent of the image size). A tile sees only its own neighbourhood, so its
GroupNorm statistics are local: tiled output differs slightly from an untiled decode (tests bound it), which
is why images up to ``tile_latent`` (default 96, i.e. 768 px) are decoded whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .autoencoder import AutoencoderConfig, AutoencoderKL, DiagonalGaussian
from .layers import Downsample

__all__ = ["SDAutoencoderKL", "PadDownsample", "SD_VAE_CONFIG"]

VAE_NORM_EPS = 1e-6

SD_VAE_CONFIG = AutoencoderConfig(in_channels=3, latent_channels=4, base_channels=128, channel_mult=(1, 2, 4, 4),
                                  num_res_blocks=2, num_heads=1, norm_groups=32, scaling_factor=0.18215)


class PadDownsample(nn.Module):
    """Halve the resolution: pad right and bottom by one, 3x3 conv with stride 2 and no padding (LDM's layout)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(F.pad(x, (0, 1, 0, 1)))


class SDAutoencoderKL(AutoencoderKL):
    """reverie's AutoencoderKL with SD's downsampling, quant convs and norm eps (module docstring)."""

    def __init__(self, config: AutoencoderConfig = SD_VAE_CONFIG, tile_latent: int = 96, tile_overlap: int = 16):
        if config.dims != 2:
            raise ValueError("the SD autoencoder is 2-D")
        super().__init__(config)
        down = self.encoder.down
        for i, block in enumerate(down):
            if isinstance(block, Downsample):
                down[i] = PadDownsample(block.op.in_channels)
        lc = config.latent_channels
        self.quant_conv = nn.Conv2d(2 * lc, 2 * lc, 1)
        self.post_quant_conv = nn.Conv2d(lc, lc, 1)
        for m in self.modules():
            if isinstance(m, nn.GroupNorm):
                m.eps = VAE_NORM_EPS
        self.tile_latent, self.tile_overlap = tile_latent, tile_overlap

    def encode(self, x: Tensor) -> DiagonalGaussian:
        self._check(x, self.config.in_channels, "input", factor_check=False)
        mean, logvar = self.encoder(x.to(self.encoder.conv_in.weight.dtype))
        return DiagonalGaussian(*self.quant_conv(torch.cat([mean, logvar], dim=1)).chunk(2, dim=1))

    def decode(self, z: Tensor) -> Tensor:
        """Images from raw latents; one image at a time, in tiles when a side exceeds ``tile_latent``."""
        self._check(z, self.config.latent_channels, "latent", factor_check=False)
        z = z.to(self.decoder.conv_in.weight.dtype)
        return torch.cat([self._decode_one(z[i:i + 1]) for i in range(z.shape[0])])

    def _decode_whole(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z))

    def _decode_one(self, z: Tensor) -> Tensor:
        if max(z.shape[-2:]) <= self.tile_latent:
            return self._decode_whole(z)
        return self.decode_tiled(z)

    def decode_tiled(self, z: Tensor, tile: int | None = None, overlap: int | None = None) -> Tensor:
        """Decode ``z`` (B, C, h, w) in ``tile``-sided latent tiles overlapping by ``overlap``, each tile's
        image weighted by a ramp that falls linearly to 0 across the overlap (weights renormalized)."""
        tile, overlap = tile or self.tile_latent, overlap or self.tile_overlap
        if not 0 <= overlap < tile:
            raise ValueError(f"tile overlap {overlap} must be in [0, {tile})")
        f = 2 ** (len(self.config.channel_mult) - 1)
        h, w = z.shape[-2:]
        out = weight = None
        for y0 in _starts(h, tile, overlap):
            for x0 in _starts(w, tile, overlap):
                part = self._decode_whole(z[..., y0:y0 + tile, x0:x0 + tile])
                ramp = _ramp(part.shape[-2], overlap * f, y0 > 0, y0 + tile < h, part)[:, None] * \
                    _ramp(part.shape[-1], overlap * f, x0 > 0, x0 + tile < w, part)[None, :]
                if out is None:
                    out = part.new_zeros(*part.shape[:2], h * f, w * f)
                    weight = part.new_zeros(h * f, w * f)
                ys, xs = slice(y0 * f, y0 * f + part.shape[-2]), slice(x0 * f, x0 * f + part.shape[-1])
                out[..., ys, xs] += part * ramp
                weight[ys, xs] += ramp
        return out / weight


def _starts(n: int, tile: int, overlap: int) -> list[int]:
    """Tile origins covering [0, n) with ``tile``-sized windows overlapping by at least ``overlap``."""
    if n <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, n - tile, stride)) + [n - tile]
    return sorted(set(starts))


def _ramp(n: int, width: int, fade_start: bool, fade_end: bool, like: Tensor) -> Tensor:
    """Weights 1 inside, rising linearly over ``width`` pixels at a faded start and falling at a faded end."""
    r = torch.ones(n, dtype=like.dtype, device=like.device)
    if width:
        edge = (torch.arange(width, dtype=like.dtype, device=like.device) + 0.5) / width
        if fade_start:
            r[:width] = torch.minimum(r[:width], edge)
        if fade_end:
            r[n - width:] = torch.minimum(r[n - width:], edge.flip(0))
    return r
