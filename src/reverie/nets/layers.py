"""Building blocks shared by reverie's U-Net, DiT and KL autoencoder, and the typed-config helper.

Everything here is written once for 1-D (audio), 2-D (images) and 3-D (video) data: ``dims``
picks the convolution and pooling class, resampling goes through ``F.interpolate`` with a
per-axis factor, and attention runs over flattened positions ``(B, N, C)``.

Choices (the "why" that the code cannot show):

- Attention uses one fused QKV projection and ``F.scaled_dot_product_attention``; with a
  ``channels_last`` activation the ``(B, C, *spatial) -> (B, N, C)`` flatten is a free view.
  (Two explicit matmuls were measured too: faster on the CPU only for bf16 training at N <= 256,
  up to 6x slower at N = 1024 and for inference, so SDPA everywhere.)
- Under autocast, :class:`GroupNorm` normalizes bf16/fp16 activations in their own dtype
  (float32 statistics) instead of round-tripping every activation through float32.
- A padding mask is ``True`` for real tokens. A sample whose mask has no real token attends
  uniformly and its cross-attention output is multiplied by 0, so it gets "no context" instead
  of NaNs (SDPA returns NaN on a fully masked row).
- Res blocks receive their time embedding already projected: the U-Net computes all blocks'
  projections in one matmul (same weights and FLOPs as one Linear per block). The autoencoder uses
  the same block with ``conditioned=False`` (no embedding), so its weight names are the same too.
- The U-Net and DiT share :class:`Backbone`: the conditioning vector (time + class + pooled text)
  and gradient checkpointing are written once.
- 3-D (video) resampling halves only the spatial axes and keeps the frame axis, as in
  Ho et al. 2022 ("Video Diffusion Models", Sec. 3).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..configs import from_dict as typed_config
from ..utils import append_dims

__all__ = [
    "NetConfig",
    "conv_nd",
    "memory_format_for",
    "zero_module",
    "sinusoidal_embedding",
    "TimeEmbedding",
    "Backbone",
    "GroupNorm",
    "Attention",
    "AttentionBlock",
    "ResBlock",
    "Downsample",
    "Upsample",
]

TIME_EMBEDDINGS = ("sinusoidal", "fourier")


class NetConfig:
    """Mixin for frozen config dataclasses: plain-dict round trip (for ``config.json``).

    ``to_dict`` adds ``"arch"`` so :func:`reverie.nets.create_network` knows which class to
    build; tuples become lists (JSON) and come back as tuples.
    """

    arch = "?"

    def to_dict(self) -> dict:
        out = {"arch": self.arch}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict):
        d = dict(d)
        arch = d.pop("arch", cls.arch)
        if arch != cls.arch:
            raise ValueError(f"config is for arch {arch!r}, not {cls.arch!r}")
        check_keys(cls, d)
        return typed_config(cls, d, "network")  # every value's type checked, named by its field

    def replace(self, **overrides):
        """A copy with some fields changed; unknown names raise a ValueError listing valid ones."""
        check_keys(type(self), overrides)
        return dataclasses.replace(self, **overrides)


def check_keys(cls, d: dict) -> None:
    unknown = sorted(set(d) - set(cls.field_names()))
    if unknown:
        valid = ", ".join(cls.field_names())
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; valid fields: {valid}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


# --------------------------------------------------------------------------- dims-generic helpers

def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d`` for ``dims`` = 1, 2, 3."""
    check_choice("dims", dims, (1, 2, 3))
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    check_choice("dims", dims, (1, 2, 3))
    return (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[dims - 1](*args, **kwargs)


def memory_format_for(dims: int) -> torch.memory_format:
    """The channels-last format for ``dims`` spatial axes (1-D data has none)."""
    return {2: torch.channels_last, 3: torch.channels_last_3d}.get(dims, torch.contiguous_format)


def resample_factor(dims: int) -> tuple[int, ...]:
    """Per-axis 2x resampling; video keeps its frame axis (first spatial axis)."""
    return (1, 2, 2) if dims == 3 else (2,) * dims


def zero_module(module: nn.Module) -> nn.Module:
    """Zero all parameters: residual branches and outputs start as the identity / zero."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that keeps a bf16/fp16 activation in its dtype under autocast.

    Autocast runs group_norm in float32, so every norm would upcast its input, hand a float32
    tensor to SiLU and make the next conv cast it back. The native kernel already accumulates
    the statistics of a half-precision input in float32, so we call it on the input's dtype:
    same normalization, two fewer full-size casts per norm.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype not in (torch.float16, torch.bfloat16) or self.weight.dtype == x.dtype:
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


# --------------------------------------------------------------------------- time embeddings

def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features [cos(t w_i), sin(t w_i)], w_i = max_period^(-i/half) (Vaswani 2017, Sec. 3.5)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) / half * torch.arange(half, device=t.device, dtype=torch.float32))
    args = t.float()[:, None] * freqs  # (B, half)
    emb = torch.cat([args.cos(), args.sin()], dim=-1)
    return F.pad(emb, (0, dim % 2))


class TimeEmbedding(nn.Module):
    """c_noise [B] -> [B, embed_dim]: sinusoidal or random Fourier features, then Linear-SiLU-Linear.

    Fourier features are [cos 2 pi f t, sin 2 pi f t] with fixed f ~ N(0, scale^2) (Tancik et al.
    2020; NCSN++ / EDM use them with c_noise = ln(sigma)/4). The frequencies are a persistent buffer
    drawn from a fixed seed, so the state dict fully defines the network.
    """

    def __init__(self, kind: str, freq_dim: int, embed_dim: int, fourier_scale: float = 16.0):
        super().__init__()
        check_choice("time_embedding", kind, TIME_EMBEDDINGS)
        self.kind, self.freq_dim = kind, freq_dim
        if kind == "fourier":
            g = torch.Generator().manual_seed(0)
            freqs = torch.randn(freq_dim // 2, generator=g, device="cpu") * fourier_scale
            # honour `with torch.device(...)` (e.g. "meta")
            self.register_buffer("freqs", freqs.to(torch.get_default_device()))
        self.mlp = nn.Sequential(nn.Linear(freq_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))

    def forward(self, c_noise: Tensor) -> Tensor:
        if self.kind == "fourier":
            args = 2 * math.pi * c_noise.float()[:, None] * self.freqs.float()
            feats = torch.cat([args.cos(), args.sin()], dim=-1)
        else:
            feats = sinusoidal_embedding(c_noise, self.freq_dim)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


class Backbone(nn.Module):
    """Base of the denoisers (U-Net, DiT): the conditioning vector and gradient checkpointing.

    ``build_embeddings`` creates ``time_embed``, ``class_embed`` and ``pooled_proj`` (None unless
    ``config.num_classes`` / ``config.pooled_dim``); ``embed`` adds them up. Subclasses set ``config``,
    ``gradient_checkpointing`` and ``display_name`` (the network's name in error messages).
    """

    display_name = "network"

    def build_embeddings(self, freq_dim: int, width: int) -> None:
        cfg = self.config
        self.time_embed = TimeEmbedding(cfg.time_embedding, freq_dim, width, cfg.fourier_scale)
        self.class_embed = nn.Embedding(cfg.num_classes, width) if cfg.num_classes else None
        self.pooled_proj = nn.Linear(cfg.pooled_dim, width) if cfg.pooled_dim else None

    def embed(self, c_noise: Tensor, class_labels: Tensor | None, pooled: Tensor | None) -> Tensor:
        """Time embedding [+ class embedding] [+ pooled-text projection]: (B, width)."""
        emb = self.time_embed(c_noise)
        for name, value, layer in (("class_labels", class_labels, self.class_embed),
                                   ("pooled", pooled, self.pooled_proj)):
            if (value is None) != (layer is None):
                need = "needs" if layer is not None else "was not configured for"
                raise ValueError(f"this {self.display_name} {need} `{name}` "
                                 f"(num_classes / pooled_dim in {type(self.config).__name__})")
            if layer is not None:
                emb = emb + layer(value)
        return emb

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block in the backward pass (less activation memory, ~1/3 more compute)."""
        self.gradient_checkpointing = enabled

    def run_block(self, block: nn.Module, *args) -> Tensor:
        """``block(*args)``, checkpointed when training with gradient checkpointing on."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


# --------------------------------------------------------------------------- attention

def key_padding_mask(mask: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """(B, L) bool mask -> (SDPA attn_mask (B, 1, 1, L), per-sample keep (B, 1, 1) or None)."""
    if mask is None:
        return None, None
    mask = mask.bool()
    has_token = mask.any(dim=-1, keepdim=True)  # (B, 1)
    attn_mask = (mask | ~has_token)[:, None, None, :]  # a token-less row attends to all, then is zeroed
    return attn_mask, has_token[:, :, None]


class Attention(nn.Module):
    """Multi-head scaled dot-product attention (Vaswani et al. 2017, eq. 1) on (B, N, C) tokens.

    Self-attention uses one fused QKV Linear; with ``context_dim`` it is cross-attention: queries
    from ``x``, keys and values from ``context`` (B, L, context_dim) through one fused KV Linear.
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None, bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.is_cross = context_dim is not None
        if self.is_cross:
            self.q = nn.Linear(dim, dim, bias=bias)
            self.kv = nn.Linear(context_dim, 2 * dim, bias=bias)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None,
                is_causal: bool = False) -> Tensor:
        """``is_causal``: token i attends to tokens <= i only (autoregressive text models; self-attention)."""
        B, N, C = x.shape
        H = self.num_heads
        if self.is_cross:
            if context is None:
                raise ValueError("cross-attention needs `context` (B, L, context_dim)")
            q = self.q(x).view(B, N, H, C // H).transpose(1, 2)  # (B, H, N, d)
            k, v = self.kv(context).view(B, -1, 2, H, C // H).permute(2, 0, 3, 1, 4)  # 2 x (B, H, L, d)
        else:
            q, k, v = self.qkv(x).view(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, d)
        attn_mask, keep = key_padding_mask(mask)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)  # (B, H, N, d)
        out = self.proj(out.transpose(1, 2).reshape(B, N, C))
        return out if keep is None else out * keep


def sincos_position_embedding(shape: tuple[int, ...], channels: int, extent: float | None = None,
                              device=None, dtype=None) -> Tensor:
    """Fixed sine-cosine code of every position of a grid of ``shape`` (1-3 axes): (N, channels),
    N = prod(shape), row-major (as ``flatten``). Each axis gets ``channels / ndim`` channels, sines then
    cosines of Vaswani et al. (2017, Sec. 3.5)'s frequencies, as in MAE / DiT. Positions are the integer
    indices, or with ``extent`` the fractional coordinate (i + 0.5) / size * extent, which gives the same
    point of an image the same code at every resolution. Computed in float64, returned in ``dtype``."""
    ndim = len(shape)
    if channels % (2 * ndim):
        raise ValueError(f"position embedding needs channels divisible by {2 * ndim}, got {channels}")
    f64 = dict(dtype=torch.float64, device=device)
    half = channels // ndim // 2
    omega = 1.0 / 10000 ** (torch.arange(half, **f64) / half)
    axes = [torch.arange(n, **f64) if extent is None else (torch.arange(n, **f64) + 0.5) / n * extent for n in shape]
    parts = []
    for grid in torch.meshgrid(*axes, indexing="ij"):
        angles = grid.reshape(-1, 1) * omega
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).to(dtype or torch.get_default_dtype())


@functools.lru_cache(maxsize=32)
def _grid_code(shape: tuple[int, ...], channels: int) -> Tensor:
    """``sincos_position_embedding`` of a feature map in image coordinates (extent 32), float64 on the CPU:
    computed once per map size, not in every forward."""
    return sincos_position_embedding(shape, channels, extent=32.0, device="cpu", dtype=torch.float64)


class AttentionBlock(nn.Module):
    """Residual self-attention over all positions, x + proj(attn(GroupNorm(x))) (Ho et al. 2020, App. B),
    then, with ``context_dim``, residual cross-attention to text tokens (Rombach et al. 2022, Sec. 3.3).

    ``positions=True`` adds a fixed sine-cosine code of each position (``sincos_position_embedding``) to
    the normalized tokens before both attentions, so that a query knows where it is: convolutions only
    see position through the zero padding at the borders, and "a red circle left of a blue square" needs
    the cross-attention to tell left from right."""

    def __init__(self, channels: int, num_heads: int, norm_groups: int, context_dim: int | None = None,
                 positions: bool = False):
        super().__init__()
        self.positions = positions
        self.norm = GroupNorm(norm_groups, channels)
        self.attn = Attention(channels, num_heads)
        zero_module(self.attn.proj)
        self.cross = None
        if context_dim is not None:
            self.cross_norm = GroupNorm(norm_groups, channels)
            self.cross = Attention(channels, num_heads, context_dim=context_dim)
            zero_module(self.cross.proj)

    @staticmethod
    def _tokens(h: Tensor) -> Tensor:
        return h.flatten(2).transpose(1, 2)  # (B, C, *S) -> (B, N, C); a view when channels_last

    def forward(self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        pos = None
        if self.positions:
            pos = _grid_code(tuple(x.shape[2:]), x.shape[1]).to(device=x.device, dtype=x.dtype)
        tokens = self._tokens(self.norm(x))
        x = x + self.attn(tokens if pos is None else tokens + pos).transpose(1, 2).reshape(x.shape)
        if self.cross is not None:
            tokens = self._tokens(self.cross_norm(x))
            tokens = tokens if pos is None else tokens + pos
            x = x + self.cross(tokens, context, context_mask).transpose(1, 2).reshape(x.shape)
        return x


# --------------------------------------------------------------------------- convolutional blocks

class ResBlock(nn.Module):
    """GN-SiLU-conv, time conditioning, GN-SiLU-dropout-conv, plus a (1x1-conv) skip (Ho et al. 2020, App. B).

    ``scale_shift=True`` is AdaGN, GN(h) * (1 + scale) + shift (Dhariwal & Nichol 2021, Sec. 3);
    ``False`` adds the embedding before the second norm, as DDPM does. ``emb`` is this block's
    slice of the U-Net's fused time projection: ``emb_channels`` wide. ``conditioned=False`` drops
    the conditioning (``emb_channels`` 0, no ``emb``): the autoencoder's block, same weights otherwise.
    """

    def __init__(self, dims: int, in_ch: int, out_ch: int, dropout: float, norm_groups: int,
                 scale_shift: bool = False, conditioned: bool = True):
        super().__init__()
        self.scale_shift = scale_shift
        self.emb_channels = (2 * out_ch if scale_shift else out_ch) if conditioned else 0
        self.norm1 = GroupNorm(norm_groups, in_ch)
        self.conv1 = conv_nd(dims, in_ch, out_ch, 3, padding=1)
        self.norm2 = GroupNorm(norm_groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(conv_nd(dims, out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else conv_nd(dims, in_ch, out_ch, 1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        if (emb is None) != (self.emb_channels == 0):
            raise ValueError(f"this ResBlock takes {'an' if self.emb_channels else 'no'} `emb`")
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.conditioned_norm(h, emb))))
        # In-place adds (also in conditioned_norm) only touch conv outputs, which convolution backward
        # does not keep.
        return h.add_(self.skip(x))

    def conditioned_norm(self, h: Tensor, emb: Tensor | None) -> Tensor:
        """The second norm: AdaGN, the embedding added before it, or (no ``emb``) the plain norm."""
        if emb is None:
            return self.norm2(h)
        emb = append_dims(emb.to(h.dtype), h.ndim)  # (B, E, 1, ...)
        if self.scale_shift:
            scale, shift = emb.chunk(2, dim=1)
            return torch.addcmul(shift, self.norm2(h), 1 + scale)
        return self.norm2(h.add_(emb))


class Downsample(nn.Module):
    """Halve the resolution: strided 3x3 conv, or average pooling when ``use_conv`` is False."""

    def __init__(self, dims: int, channels: int, use_conv: bool):
        super().__init__()
        stride = resample_factor(dims)
        if use_conv:
            self.op = conv_nd(dims, channels, channels, 3, stride=stride, padding=1)
        else:
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double the resolution by nearest-neighbour interpolation, then a 3x3 conv if ``use_conv``."""

    def __init__(self, dims: int, channels: int, use_conv: bool):
        super().__init__()
        self.factor = tuple(float(f) for f in resample_factor(dims))
        self.conv = conv_nd(dims, channels, channels, 3, padding=1) if use_conv else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.factor, mode="nearest"))
