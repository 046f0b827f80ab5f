"""Stable Diffusion's U-Net (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models", Sec. 3.3 and App. E), written with reverie's blocks so that SD 1.x / 2.x checkpoints run here.

    z (B, 4, h, w) --conv_in--> per level: [ResBlock (+ SpatialTransformer)] x layers_per_block, Downsample
      --> mid: ResBlock, SpatialTransformer, ResBlock
      --> per level, deepest first: [concat skip, ResBlock (+ SpatialTransformer)] x (layers_per_block + 1), Upsample
      --> GN-SiLU-conv --> eps or v

A SpatialTransformer is GroupNorm -> proj_in -> [self-attention, cross-attention to the text tokens, GEGLU
feed-forward (Shazeer 2020), each pre-LayerNorm and residual] x depth -> proj_out, plus the input. The time
embedding (sinusoidal, 320 -> 1280 -> 1280) conditions every ResBlock through its own Linear.

Choices (why the code looks the way it does):

- The residual blocks are reverie's ``ResBlock`` (same GN-SiLU-conv body, the time embedding added before the
  second norm, a 1x1 skip), with SD's per-block time projection on top (:class:`SDResBlock`); the time
  embedding is reverie's ``TimeEmbedding`` (its sinusoid is SD's cos-then-sin layout).
- Attention is reverie's ``Attention`` (one fused QKV Linear for self-attention, one fused KV Linear for
  cross-attention, SDPA); SD's q/k/v have no bias, its output projection has one. Fusing three GEMMs into one
  is also faster than running them apart.
- proj_in / proj_out are Linears on (B, N, C) tokens in both SD 1 (1x1 convs in the checkpoint) and SD 2
  (Linears): a 1x1 conv is that Linear, and with channels_last activations the token view is free.
- The heads are per level (``num_heads``): SD 1 has 8 everywhere, SD 2 has width / 64 (5, 10, 20, 20).
- Upsampling interpolates to the size of the skip it meets (exact doublings, in inference, through the sub-pixel
  conv of ``layers.upsample_conv``), so latents whose sides are not multiples of
  2^(levels - 1) (images not a multiple of 64 px) still line up.
- The network runs in its weights' dtype and memory format (bf16 + channels_last is the fast path on CPUs with
  AMX) and answers in the input's dtype, so samplers keep their state in float32.
- Norm epsilons as in the checkpoints: 1e-5 in res blocks and at the output, 1e-6 in the transformers' GroupNorm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import (
    Attention,
    Downsample,
    GroupNorm,
    NetConfig,
    ResBlock,
    TimeEmbedding,
    Upsample,
    subpixel_applies,
    upsample_conv,
)
from .packing import geglu, linear

__all__ = ["SDUNetConfig", "SDUNet", "SDResBlock", "SpatialTransformer", "SD_UNET_PRESETS"]

TRANSFORMER_NORM_EPS = 1e-6


@dataclass(frozen=True)
class SDUNetConfig(NetConfig):
    """Every knob of :class:`SDUNet`. Level ``i`` has ``block_channels[i]`` channels, ``num_heads[i]`` attention
    heads and a SpatialTransformer after each ResBlock when ``cross_attention[i]``."""

    arch = "sd-unet"

    in_channels: int = 4
    out_channels: int = 4
    block_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    cross_attention: tuple[bool, ...] = (True, True, True, False)
    num_heads: tuple[int, ...] = (8, 8, 8, 8)
    layers_per_block: int = 2
    transformer_depth: int = 1
    context_dim: int = 768
    norm_groups: int = 32
    sample_size: int = 64   # the latent side it was trained at (512 px / 8)

    def __post_init__(self):
        for name in ("block_channels", "cross_attention", "num_heads"):
            object.__setattr__(self, name, tuple(getattr(self, name)))  # JSON gives lists
        n = len(self.block_channels)
        if not n or len(self.cross_attention) != n or len(self.num_heads) != n:
            raise ValueError(f"block_channels, cross_attention and num_heads need one entry per level, got "
                             f"{len(self.block_channels)}, {len(self.cross_attention)} and {len(self.num_heads)}")
        for ch, heads in zip(self.block_channels, self.num_heads):
            if ch % self.norm_groups or heads < 1 or ch % heads:
                raise ValueError(f"level width {ch} must be divisible by norm_groups={self.norm_groups} and by "
                                 f"its num_heads={heads}")
        for name in ("in_channels", "out_channels", "layers_per_block", "transformer_depth", "context_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_channels[0]


class SDResBlock(ResBlock):
    """reverie's ResBlock with SD's own time projection: ``emb`` is the SiLU of the shared time embedding."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, norm_groups: int):
        super().__init__(2, in_ch, out_ch, 0.0, norm_groups)
        self.time_emb_proj = nn.Linear(emb_dim, out_ch)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return super().forward(x, self.time_emb_proj(emb))


class GEGLU(nn.Module):
    """Feed-forward with a GELU-gated linear unit (Shazeer 2020, eq. 6): out(a * gelu(b)), [a, b] = proj(x)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)
        self.out = nn.Linear(inner, dim)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """``residual``: added to the output (in the output GEMM when packed, ``reverie.nets.packing``)."""
        return linear(self.out, geglu(self.proj, x), add=residual)


def _sd_attention(dim: int, heads: int, context_dim: int | None = None) -> Attention:
    attn = Attention(dim, heads, context_dim=context_dim, bias=False)
    attn.proj = nn.Linear(dim, dim)  # SD's output projection has a bias, its q / k / v do not
    return attn


class TransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention to ``context``, GEGLU feed-forward; each residual."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = _sd_attention(dim, heads)
        self.attn2 = _sd_attention(dim, heads, context_dim)
        self.ff = GEGLU(dim, 4 * dim)

    def forward(self, x: Tensor, context: Tensor, twins: bool = False) -> Tensor:
        """``twins``: ``x`` is the shared first half of a batch of two identical halves (SDUNet.forward), made
        whole after the self-attention, before the text enters through the cross-attention."""
        # residuals added into each branch's fresh output: no extra full-size buffer per add
        x = self.attn1(self.norm1(x)).add_(x)
        if twins:
            x = torch.cat([x, x])
        x = self.attn2(self.norm2(x), context).add_(x)
        return self.ff(self.norm3(x), residual=x)


class SpatialTransformer(nn.Module):
    """x + proj_out(blocks(proj_in(GroupNorm(x) as tokens))), on (B, C, H, W) feature maps."""

    def __init__(self, channels: int, heads: int, context_dim: int, depth: int, norm_groups: int):
        super().__init__()
        self.norm = GroupNorm(norm_groups, channels, eps=TRANSFORMER_NORM_EPS)
        self.proj_in = nn.Linear(channels, channels)
        self.blocks = nn.ModuleList(TransformerBlock(channels, heads, context_dim) for _ in range(depth))
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: Tensor, context: Tensor, twins: bool = False) -> Tensor:
        """``twins``: ``x`` is the shared half of a batch of twin halves; the output is the whole batch."""
        B, C, H, W = x.shape
        tokens = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C))  # a view when channels_last
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, context, twins=twins and i == 0)
        skip = x.permute(0, 2, 3, 1).reshape(B, H * W, C)  # a view when channels_last, else a copy
        if twins:
            skip, B = torch.cat([skip, skip]), 2 * B
        return linear(self.proj_out, tokens, add=skip).view(B, H, W, C).permute(0, 3, 1, 2)


class Level(nn.Module):
    """One resolution of the U-Net: res blocks, their transformers (or none) and a resampler (or none)."""

    def __init__(self, resnets: list[SDResBlock], attentions: list[SpatialTransformer], resample: nn.Module | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)
        self.resample = resample


class SDUNet(nn.Module):
    """Stable Diffusion 1.x / 2.x denoising U-Net: ``forward(x, c_noise, context=...)`` with c_noise the
    (fractional) DDPM timestep and ``context`` the text encoder's tokens (B, L, context_dim)."""

    display_name = "SD U-Net"

    def __init__(self, config: SDUNetConfig):
        super().__init__()
        self.config = cfg = config
        chans, emb_dim = cfg.block_channels, cfg.time_embed_dim
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        self.time_embed = TimeEmbedding("sinusoidal", chans[0], emb_dim)

        def transformer(ch, level):
            return SpatialTransformer(ch, cfg.num_heads[level], cfg.context_dim, cfg.transformer_depth, cfg.norm_groups)

        skips, ch, down = [chans[0]], chans[0], []
        for level, width in enumerate(chans):
            resnets, attns = [], []
            for _ in range(cfg.layers_per_block):
                resnets.append(SDResBlock(ch, width, emb_dim, cfg.norm_groups))
                attns += [transformer(width, level)] if cfg.cross_attention[level] else []
                ch = width
                skips.append(ch)
            last = level == len(chans) - 1
            down.append(Level(resnets, attns, None if last else Downsample(2, ch, use_conv=True)))
            skips += [] if last else [ch]
        self.down = nn.ModuleList(down)
        self.mid = Level([SDResBlock(ch, ch, emb_dim, cfg.norm_groups) for _ in range(2)],
                         [transformer(ch, len(chans) - 1)], None)
        up = []
        for level in reversed(range(len(chans))):
            resnets, attns = [], []
            for _ in range(cfg.layers_per_block + 1):
                resnets.append(SDResBlock(ch + skips.pop(), chans[level], emb_dim, cfg.norm_groups))
                attns += [transformer(chans[level], level)] if cfg.cross_attention[level] else []
                ch = chans[level]
            up.append(Level(resnets, attns, Upsample(2, ch, use_conv=True) if level else None))
        self.up = nn.ModuleList(up)
        self.norm_out = GroupNorm(cfg.norm_groups, ch)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)

    @staticmethod
    def _run(level: Level, j: int, h: Tensor, emb: Tensor, context: Tensor, twins: bool = False) -> Tensor:
        h = level.resnets[j](h, emb)
        return level.attentions[j](h, context, twins=twins) if len(level.attentions) else h

    @staticmethod
    def twin_halves(x: Tensor, c_noise: Tensor) -> int:
        """n when the batch is two identical halves of n (inputs and noise levels: classifier-free guidance's
        [x, x], ``reverie.guidance``), else 0. Text enters the SD U-Net only through cross-attention, so up to the
        first one both halves compute the same: once is enough (in inference, outside torch.compile)."""
        B = x.shape[0]
        if B < 2 or B % 2 or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return 0
        n, t = B // 2, c_noise.reshape(-1).expand(B)
        return n if torch.equal(t[:n], t[n:]) and torch.equal(x[:n], x[n:]) else 0

    def forward(self, x: Tensor, c_noise: Tensor, context: Tensor | None = None, **unused) -> Tensor:
        """``unused``: conditioning SD does not read (the text mask and pooled embedding of reverie's encoders)."""
        if context is None:
            raise ValueError("the SD U-Net needs `context`, the text encoder's tokens (B, L, context_dim)")
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"input must be (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        weight = self.conv_in.weight  # run in the weights' dtype and memory format; answer in x's dtype
        emb = F.silu(self.time_embed(c_noise.reshape(-1).expand(x.shape[0])).to(weight.dtype))
        context = context.to(weight.dtype)
        channels_last = weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
        n = self.twin_halves(x, c_noise)  # > 0: run the shared half alone up to the first cross-attention
        h = self.conv_in((x[:n] if n else x).to(weight.dtype, memory_format=torch.channels_last if channels_last
                                                else torch.contiguous_format))
        skips = [h]
        for level in self.down:
            for j in range(len(level.resnets)):
                twins = bool(n) and len(level.attentions) > 0
                h = self._run(level, j, h, emb[:n] if n else emb, context, twins)
                if twins:  # whole from here on; the skips kept so far were the shared half's
                    skips, n = [torch.cat([s, s]) for s in skips], 0
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)
        if n:  # no cross-attention on the way down (no such SD config): the mid block's makes it whole
            h, skips = torch.cat([h, h]), [torch.cat([s, s]) for s in skips]
        h = self.mid.resnets[1](self.mid.attentions[0](self.mid.resnets[0](h, emb), context), emb)
        for level in self.up:
            for j in range(len(level.resnets)):
                h = self._run(level, j, torch.cat([h, skips.pop()], dim=1), emb, context)
            if level.resample is not None:  # nearest to the next skip's size, then the conv
                size = tuple(skips[-1].shape[-2:])
                if size == tuple(2 * n for n in h.shape[-2:]) and subpixel_applies(level.resample.conv, h):
                    h = upsample_conv(level.resample.conv, h)  # the same map, 2.25x fewer FLOPs
                else:
                    h = level.resample.conv(F.interpolate(h, size=size, mode="nearest"))
        return self.conv_out(self.norm_out.silu(h)).to(x.dtype)


SD_UNET_PRESETS: dict[str, SDUNetConfig] = {
    "sd1": SDUNetConfig(),
    "sd2": SDUNetConfig(num_heads=(5, 10, 20, 20), context_dim=1024, sample_size=96),
}
