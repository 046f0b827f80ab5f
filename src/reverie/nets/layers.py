"""Building blocks shared by reverie's U-Net, DiT and KL autoencoder, and the typed-config helper.

Everything here is written once for 1-D (audio), 2-D (images) and 3-D (video) data: ``dims``
picks the convolution and pooling class, resampling goes through ``F.interpolate`` with a
per-axis factor, and attention runs over flattened positions ``(B, N, C)``.

Choices (the "why" that the code cannot show):

- Attention uses one fused QKV projection and ``F.scaled_dot_product_attention``; with a
  ``channels_last`` activation the ``(B, C, *spatial) -> (B, N, C)`` flatten is a free view.
  Two explicit matmuls (float32 softmax) replace SDPA when training on the CPU at N x L <= 256^2,
  where the flash kernel's backward pass is slow (:func:`attention`); elsewhere SDPA.
- On the CPU, channels-last activations go through reverie's own GroupNorm (+ AdaGN) + SiLU
  (``_GroupNormSiLU``: PyTorch's channels-last GroupNorm kernels are several times slower than its
  NCHW ones), and dropout draws a quarter of the random numbers (:class:`Dropout`).
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
- In inference, 2-D nearest 2x upsampling + 3x3 conv runs as one 2x2 conv of the small map with four
  times the outputs, interleaved (:func:`upsample_conv`): the same map in 2.25x fewer FLOPs (with SiLU in
  place, SD's VAE decode at 512 px went 12.6 -> 10.8 s on one Zen 4 thread, ``benchmarks/sd_speed.py``).
  Training keeps the textbook order.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import weakref

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
    "Dropout",
    "attention",
    "rotary_tables",
    "apply_rotary",
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


def _channels_last_tokens(x: Tensor) -> Tensor | None:
    """``x`` (B, C, *S) stored channels-last as a (B, N, C) view, or None when it is not stored that way."""
    if x.ndim < 3 or x.stride(1) != 1 or x.is_contiguous():
        return None
    tokens = x.permute(0, *range(2, x.ndim), 1)
    return tokens.view(x.shape[0], -1, x.shape[1]) if tokens.is_contiguous() else None


def _group_stats(x3: Tensor, groups: int, eps: float) -> tuple[Tensor, Tensor]:
    """Mean and 1/std (B, G, 1) of (B, N, C) tokens, in float32 (float64 for float64 input)."""
    B, N, C = x3.shape
    xf = x3.to(torch.promote_types(x3.dtype, torch.float32))
    # Sums and sums of squares per channel, then per group (as PyTorch's own channels-last kernel does);
    # vecdot runs the squares as one fused reduction without a full-size temporary.
    sums = torch.stack((xf.sum(1), torch.linalg.vecdot(xf.mT, xf.mT))).view(2, B, groups, -1).sum(-1, keepdim=True)
    mean, square = sums.div_(N * (C // groups))
    return mean, (square - mean * mean).clamp_(min=0).add_(eps).rsqrt_()


def _group_affine(mean: Tensor, rstd: Tensor, weight: Tensor, bias: Tensor, scale: Tensor | None,
                  shift: Tensor | None) -> tuple[Tensor, ...]:
    """``a, b`` (B, G, C/G) with GN(x) [* (1 + scale) + shift] = a x + b per (sample, channel), and ``A, Bc``,
    the affine map after normalization ((G, C/G) without AdaGN), in the statistics' dtype."""
    B, G, _ = mean.shape
    A, Bc = weight.to(mean.dtype).view(G, -1), bias.to(mean.dtype).view(G, -1)
    if scale is not None:
        gain = scale.to(mean.dtype).view(B, G, -1) + 1
        A, Bc = A * gain, torch.addcmul(shift.to(mean.dtype).view(B, G, -1), Bc, gain)
    a = rstd * A
    return a, Bc - mean * a, A, Bc


def _affine_silu(x3: Tensor, a: Tensor, b: Tensor, act: bool) -> Tensor:
    B, N, C = x3.shape
    z = torch.addcmul(b.to(x3.dtype).view(B, 1, C), x3, a.to(x3.dtype).view(B, 1, C))
    return F.silu(z, inplace=True) if act else z


class _GroupNormSiLU(torch.autograd.Function):
    """GroupNorm [then AdaGN's ``* (1 + scale) + shift``] [then SiLU] on channels-last (B, N, C) tokens.

    PyTorch's channels-last GroupNorm kernels are 4-8x slower than its NCHW ones on the CPU (measured: 5.4
    vs 0.7 ms forward at 16x256x16x16 bf16), and a layout change costs more than the norm. Here the norm is
    per-(sample, channel) scale and shift from float32 statistics, applied in one ``addcmul`` along the
    contiguous channel axis, SiLU in place. Only the input and (B, G) statistics are kept (the
    pre-activation is recomputed), and the input gradient is again one affine map per (sample, group)
    plus ``a * dz``:

        dx = a dz + c1 x + c0,  c1 = -rstd^2 S2 / M,  c0 = -rstd S1 / M - c1 mean,
        S1 = sum_group A dBc,   S2 = sum_group A dA   (M elements per group)

    with dA = sum_n dz xhat and dBc = sum_n dz the gradients of the post-norm affine. For bf16/fp16 input
    those two sums are accumulated in float32 but rounded to the input's dtype, like autocast's own
    convolution weight gradients.
    """

    @staticmethod
    def forward(ctx, x3, groups, eps, weight, bias, scale, shift, act):
        mean, rstd = _group_stats(x3, groups, eps)
        a, b, _, _ = _group_affine(mean, rstd, weight, bias, scale, shift)
        ctx.save_for_backward(x3, mean, rstd, weight, bias, scale, shift)
        ctx.act = act
        return _affine_silu(x3, a, b, act)

    @staticmethod
    def backward(ctx, grad):
        x3, mean, rstd, weight, bias, scale, shift = ctx.saved_tensors
        B, N, C = x3.shape
        G = mean.shape[1]
        a, b, A, Bc = _group_affine(mean, rstd, weight, bias, scale, shift)
        dz = torch.ops.aten.silu_backward(grad, _affine_silu(x3, a, b, False)) if ctx.act else grad
        dBc = dz.sum(1).to(a.dtype).view(B, G, -1)
        dzx = torch.linalg.vecdot(dz.mT, x3.mT).to(a.dtype).view(B, G, -1)
        dA = (dzx - dBc * mean) * rstd  # sum_n dz xhat
        count = N * (C // G)
        c1 = rstd * rstd * (A * dA).sum(-1, keepdim=True) / -count
        c0 = (A * dBc).sum(-1, keepdim=True) * rstd / -count - c1 * mean
        dx = torch.addcmul(c0.to(x3.dtype).expand(B, G, C // G).reshape(B, 1, C), x3,
                           c1.to(x3.dtype).expand(B, G, C // G).reshape(B, 1, C))
        dx.addcmul_(dz, a.to(x3.dtype).view(B, 1, C))
        dscale = dshift = None
        if scale is not None:
            gain = scale.to(a.dtype).view(B, G, -1) + 1
            dscale = (dA * weight.to(a.dtype).view(G, -1) + dBc * bias.to(a.dtype).view(G, -1)).view(B, C)
            dscale, dshift = dscale.to(scale.dtype), dBc.view(B, C).to(shift.dtype)
            dA, dBc = dA * gain, dBc * gain
        return (dx, None, None, dA.sum(0).view(C).to(weight.dtype), dBc.sum(0).view(C).to(bias.dtype), dscale,
                dshift, None)


def group_norm_silu(x3: Tensor, groups: int, eps: float, weight: Tensor, bias: Tensor, scale: Tensor | None = None,
                    shift: Tensor | None = None, act: bool = True) -> Tensor:
    """``_GroupNormSiLU`` on (B, N, C) tokens; without autograd bookkeeping when no gradient is needed."""
    if any(t is not None and t.requires_grad for t in (x3, weight, bias, scale, shift)):
        return _GroupNormSiLU.apply(x3, groups, eps, weight, bias, scale, shift, act)
    mean, rstd = _group_stats(x3, groups, eps)
    return _affine_silu(x3, *_group_affine(mean, rstd, weight, bias, scale, shift)[:2], act)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that keeps a bf16/fp16 activation in its dtype under autocast, with a fast
    channels-last path and a fused GroupNorm [+ AdaGN] + SiLU (:meth:`silu`).

    Autocast runs group_norm in float32, so every norm would upcast its input, hand a float32
    tensor to SiLU and make the next conv cast it back. The native kernel already accumulates
    the statistics of a half-precision input in float32, so we call it on the input's dtype:
    same normalization, two fewer full-size casts per norm. A channels-last input goes through
    ``_GroupNormSiLU`` instead (several times faster on the CPU than PyTorch's channels-last kernel).
    """

    def forward(self, x: Tensor) -> Tensor:
        return self.silu(x, act=False)

    def silu(self, x: Tensor, scale: Tensor | None = None, shift: Tensor | None = None, act: bool = True) -> Tensor:
        """SiLU(GN(x) [* (1 + scale) + shift]) (``act=False``: without the SiLU); ``scale``, ``shift`` (B, C)."""
        tokens = _channels_last_tokens(x) if x.device.type == "cpu" else None
        # Only where gradients are needed: without them PyTorch's own kernel was as fast or faster in what was
        # measured (the shipped 32x32 model's sampling; the SD VAE decode at 512 px, where it is 1.2x diffusers').
        if tokens is not None and torch.is_grad_enabled():
            with torch.autocast(x.device.type, enabled=False):
                out = group_norm_silu(tokens, self.num_groups, self.eps, self.weight, self.bias, scale, shift, act)
            return out.view(x.shape[0], *x.shape[2:], x.shape[1]).permute(0, x.ndim - 1, *range(1, x.ndim - 1))
        h = self._native(x)
        if scale is not None:
            h = torch.addcmul(append_dims(shift, h.ndim), h, append_dims(1 + scale, h.ndim))
        if not act:
            return h
        return F.silu(h, inplace=not torch.is_grad_enabled())  # h is this call's own tensor

    def _native(self, x: Tensor) -> Tensor:
        if x.dtype not in (torch.float16, torch.bfloat16) or self.weight.dtype == x.dtype:
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask, scale):
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return x.mul(mask).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad.mul(mask).mul_(ctx.scale), None, None


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose CPU mask costs a quarter of the random draws.

    PyTorch's CPU dropout draws one Mersenne-Twister number per element (``bernoulli_``: 6-8 ms for 1M
    elements on one core, 7% of the DDPM U-Net's training step). Here each 64-bit draw gives four
    16-bit uniforms; an element is dropped with probability p' = round(65536 p) / 65536 (|p' - p| <=
    7.6e-6) and the kept ones are scaled by 1 / (1 - p'), so the layer stays unbiased. Draws come from
    the global generator, as ``nn.Dropout``'s do. Other devices, and code under ``torch.compile``, use
    ``nn.Dropout``.
    """

    def forward(self, x: Tensor) -> Tensor:
        if (not self.training or self.p == 0 or x.device.type != "cpu" or self.inplace
                or torch.compiler.is_compiling()):  # inductor draws its own (fast) random numbers
            return super().forward(x)
        threshold = round(self.p * 65536)
        if threshold >= 65536:
            return x * 0
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2**63, 2**63 - 1)
        keep = (words.view(torch.int16)[:n] >= threshold - 32768)  # four uniform 16-bit pieces per draw
        dense = x.is_contiguous() or x.is_contiguous(memory_format=memory_format_for(x.ndim - 2))
        keep = keep.as_strided(x.shape, x.stride()) if dense and x.ndim in (4, 5) else keep.view(x.shape)
        return _Dropout.apply(x, keep, 65536 / (65536 - threshold))


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
                is_causal: bool = False, rotary: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``is_causal``: token i attends to tokens <= i only (autoregressive text models; self-attention).
        ``rotary``: ``rotary_tables`` of at least N positions, applied to queries and keys (self-attention)."""
        B, N, C = x.shape
        H = self.num_heads
        if self.is_cross:
            if context is None:
                raise ValueError("cross-attention needs `context` (B, L, context_dim)")
            q = self.q(x).view(B, N, H, C // H).transpose(1, 2)  # (B, H, N, d)
            k, v = self.kv(context).view(B, -1, 2, H, C // H).permute(2, 0, 3, 1, 4)  # 2 x (B, H, L, d)
        else:
            q, k, v = self.qkv(x).view(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, d)
            if rotary is not None:
                q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        attn_mask, keep = key_padding_mask(mask)
        out = attention(q, k, v, attn_mask, is_causal)  # (B, H, N, d)
        out = self.proj(out.transpose(1, 2).reshape(B, N, C))
        return out if keep is None else out * keep


# Largest N x L (queries x keys) for which two plain matmuls beat the CPU's SDPA (flash) kernel, measured on
# one core with bf16: in training its backward pass is slow on small maps (forward + backward 30 vs 22 ms at
# 16 x 256 x 256 x 256, the DDPM U-Net's 16x16 attention); in inference SDPA was as fast or faster at every
# size measured (8 x 64 x 64 x 32: 0.13 vs 0.18 ms; N = 1024: 5x).
MATMUL_ATTENTION_MAX = {"train": 256 * 256, "inference": 0}


# bf16 inference on a CPU with AVX512-BF16 but no AMX (AMD Zen 4, Intel Cooper Lake): PyTorch's CPU flash
# kernel runs there at ~65 GFLOP/s (its bf16 path is no faster than its float32 one), while two oneDNN bf16
# matmuls per head and query chunk with a softmax between them (chunked_attention) run 1.5-1.95x faster from
# 256 x 256 up, one core of a Zen 4 EPYC: SD's 4,096-token maps 423 vs 653 ms (2 x 8 heads of 40), its 1,024-token
# maps 44 vs 67 ms, the SD VAE's one 512-wide head 185 vs 362 ms; at 128 x 128, 2.0 vs 1.4 ms. On AMX the flash
# kernel is the faster (214 ms for the 4,096-token maps; matmuls in query chunks 455-852 ms), so it stays there.
# REVERIE_CPU_ATTENTION=sdpa or chunked overrides the choice (benchmarks/sd_speed.py --cpu-attention-pair compares).
CHUNKED_ATTENTION_MIN = 256 * 256
CPU_ATTENTION_ENV = "REVERIE_CPU_ATTENTION"


def _cpu_attention_default() -> str:
    from ..precision import cpu_flags

    flags = cpu_flags()
    return "chunked" if "avx512_bf16" in flags and "amx_bf16" not in flags else "sdpa"


def cpu_attention_kind() -> str:
    """How bf16 inference attention over long maps runs on this CPU: ``"sdpa"`` or ``"chunked"`` (above)."""
    forced = os.environ.get(CPU_ATTENTION_ENV, "").strip().lower()
    if not forced:
        return _cpu_attention_default()
    if forced not in ("sdpa", "chunked"):
        raise ValueError(f"{CPU_ATTENTION_ENV} must be sdpa or chunked, got {forced!r}")
    return forced


def chunked_attention(q: Tensor, k: Tensor, v: Tensor, max_scores: int = 1 << 20) -> Tensor:
    """softmax(q k^T / sqrt(d)) v for (B, H, N, d) queries and (B, H, L, d) keys and values, no mask: per head and
    per chunk of queries (at most ``max_scores`` scores at a time, so that they stay in cache), two matmuls with a
    softmax between them. The values are zero-padded to a multiple of 16 channels, where oneDNN's bf16 matmul runs
    faster, and the padded outputs dropped. Exact up to rounding: the scores and probabilities are rounded to the
    inputs' dtype, where the flash kernel keeps float32. In bf16 that is one more rounding of each score on top of
    q's and k's own: relative error 4.8e-3 against float64 for unit-variance inputs (SDPA 2.3e-3), 1.3e-2 for
    scores three times larger (SDPA 1.8e-3); a guided SD 1.5 step (random weights) is 0.0353 from float32 in
    relative L2 (SDPA 0.0351); the shipped shapes-t2i's images differ from float32 by 0.70 of 255 levels on
    average (SDPA 0.65; 16 images, 20 steps; an exploratory script). ``REVERIE_CPU_ATTENTION=sdpa`` keeps the
    flash kernel."""
    B, H, N, d = q.shape
    L = k.shape[-2]
    pad = -d % 16
    chunk = max(64, min(1024, max_scores // max(L, 1)))
    qs = (q * d ** -0.5).reshape(B * H, N, d)
    ks = k.reshape(B * H, L, d)
    vs = (F.pad(v, (0, pad)) if pad else v).reshape(B * H, L, d + pad)
    out = torch.empty(B * H, N, d + pad, dtype=q.dtype, device=q.device)
    for j in range(B * H):
        kt, vj = ks[j].t(), vs[j]
        for i in range(0, N, chunk):
            torch.mm(torch.softmax(torch.mm(qs[j, i:i + chunk], kt), dim=-1), vj, out=out[j, i:i + chunk])
    return (out[..., :d] if pad else out).reshape(B, H, N, d)


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, H, N, d) heads; ``attn_mask`` bool, True = attend. SDPA, except on the
    CPU: for small maps plain matmuls with a float32 softmax are faster (MATMUL_ATTENTION_MAX), and for long
    unmasked maps in bf16 inference without AMX :func:`chunked_attention` (CHUNKED_ATTENTION_MIN)."""
    training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if (q.device.type == "cpu" and q.dtype == torch.bfloat16 and not training and attn_mask is None and not is_causal
            and q.shape[-2] * k.shape[-2] >= CHUNKED_ATTENTION_MIN and cpu_attention_kind() == "chunked"
            and not torch.compiler.is_compiling()):  # its Python loops would unroll into the graph
        return chunked_attention(q, k, v)
    limit = MATMUL_ATTENTION_MAX["train" if training else "inference"]
    if q.device.type != "cpu" or q.shape[-2] * k.shape[-2] > limit:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
    if is_causal:
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril_()
        attn_mask = causal if attn_mask is None else attn_mask & causal
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return torch.matmul(scores.softmax(-1, dtype=torch.float32).to(v.dtype), v)


def rotary_tables(n: int, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos and sin (n, head_dim / 2) of rotary position embedding (Su et al. 2021, RoFormer, eq. 34): position
    m turns channel pair i by the angle m * base^(-2i / head_dim). Float64 arithmetic, float32 tables."""
    if head_dim % 2:
        raise ValueError(f"rotary position embedding needs an even head width, got {head_dim}")
    half = head_dim // 2
    angles = torch.arange(n, dtype=torch.float64)[:, None] / base ** (torch.arange(half, dtype=torch.float64) / half)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate heads x (..., N, d) by position: the pairs (x_i, x_{i + d/2}) of token m by m's angles (the
    half-split pairing), in float32, returned in x's dtype. Then q_m . k_n depends on m - n only through the
    rotation: attention sees relative positions."""
    N, half = x.shape[-2], x.shape[-1] // 2
    cos, sin = cos[:N].to(x.device), sin[:N].to(x.device)
    a, b = x[..., :half].float(), x[..., half:].float()
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1).to(x.dtype)


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
        self.dropout = Dropout(dropout)
        self.conv2 = zero_module(conv_nd(dims, out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else conv_nd(dims, in_ch, out_ch, 1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        if (emb is None) != (self.emb_channels == 0):
            raise ValueError(f"this ResBlock takes {'an' if self.emb_channels else 'no'} `emb`")
        h = self.conv1(self.norm1.silu(x))
        h = self.conv2(self.dropout(self.conditioned_norm_silu(h, emb)))
        # In-place adds (also in conditioned_norm_silu) only touch conv outputs, which convolution backward
        # does not keep.
        return h.add_(self.skip(x))

    def conditioned_norm_silu(self, h: Tensor, emb: Tensor | None) -> Tensor:
        """SiLU of the second norm: AdaGN, the embedding added before it, or (no ``emb``) the plain norm."""
        if emb is None:
            return self.norm2.silu(h)
        emb = emb.to(h.dtype)  # (B, E)
        if self.scale_shift:
            scale, shift = emb.chunk(2, dim=1)
            return self.norm2.silu(h, scale, shift)
        return self.norm2.silu(h.add_(append_dims(emb, h.ndim)))


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
    """Double the resolution by nearest-neighbour interpolation, then a 3x3 conv if ``use_conv`` (2-D, in
    inference: both at once, :func:`upsample_conv`)."""

    def __init__(self, dims: int, channels: int, use_conv: bool):
        super().__init__()
        self.factor = tuple(float(f) for f in resample_factor(dims))
        self.conv = conv_nd(dims, channels, channels, 3, padding=1) if use_conv else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if subpixel_applies(self.conv, x):
            return upsample_conv(self.conv, x)
        return self.conv(F.interpolate(x, scale_factor=self.factor, mode="nearest"))


# conv -> (key of the weights it was made from, the 2x2 convolution of upsample_conv)
_SUBPIXEL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def subpixel_applies(conv: nn.Module, x: Tensor) -> bool:
    """Whether :func:`upsample_conv` runs ``conv`` after a 2-D nearest 2x upsampling of ``x``: a plain 3x3 conv
    with padding 1, in inference (no gradient wanted; training keeps the textbook ops), not under torch.compile."""
    return (x.ndim == 4 and type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and subpixel_enabled()
            and not (torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad))
            and not torch.compiler.is_compiling())


SUBPIXEL_ENV = "REVERIE_SUBPIXEL_UPSAMPLE"  # "0": upsample, then convolve (the textbook order)


def subpixel_enabled() -> bool:
    """Whether inference may use :func:`upsample_conv` (``REVERIE_SUBPIXEL_UPSAMPLE`` is not "0")."""
    return os.environ.get(SUBPIXEL_ENV, "1") != "0"


def subpixel_weights(weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The (4 O, I, 2, 2) kernels and 4 O biases of :func:`upsample_conv` from a (O, I, 3, 3) kernel: phase
    (a, b) = (output row parity, column parity), channel block 2 a + b. Along one axis, output row 2i + a of
    the 3x3 conv over the upsampled map reads input rows i - 1 + a .. i + 1 + a of it, i.e. rows i - 1 and i of x
    (a = 0) with taps (w0, w1 + w2), or rows i and i + 1 (a = 1) with (w0 + w1, w2). Sums in float64, rounded
    once to the weight's dtype."""
    w = weight.detach().double()

    def fold(w: Tensor, dim: int, a: int) -> Tensor:
        t = w.unbind(dim)
        return torch.stack((t[0], t[1] + t[2]) if a == 0 else (t[0] + t[1], t[2]), dim)

    kernels = torch.cat([fold(fold(w, 2, a), 3, b) for a in (0, 1) for b in (0, 1)])
    return kernels.to(weight.dtype), None if bias is None else bias.detach().repeat(4)


def upsample_conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv(nearest_2x(x))`` for a 3x3, padding-1 ``conv``, computed as one 2x2 convolution of ``x`` itself with
    4 O outputs (:func:`subpixel_weights`; padding 1, so its (H + 1) x (W + 1) map holds every phase's outputs
    at an offset of the phase), interleaved into the 2H x 2W result by one strided copy. The same linear map
    (equal in float64 to 1e-13), computed with 16 multiply-adds per input pixel and channel pair instead of
    36: 2.25x fewer FLOPs, and no upsampled copy of ``x``. Rounding differs from the textbook order only by the
    folded kernels' one rounding. The 2x2 convolution is built at the first call and again when ``conv``'s
    weights change; it runs packed (:mod:`reverie.nets.packing`) when ``conv`` does."""
    from .packing import _key, is_packed, pack_weights

    key = (_key(conv.weight), None if conv.bias is None else _key(conv.bias), conv.weight.device)
    found = _SUBPIXEL.get(conv)
    if found is None or found[0] != key:
        weight, bias = subpixel_weights(conv.weight, conv.bias)
        sub = nn.Conv2d(conv.in_channels, 4 * conv.out_channels, 2, padding=1, bias=bias is not None,
                        device=weight.device, dtype=weight.dtype).requires_grad_(False)
        fmt = torch.channels_last if conv.weight.is_contiguous(memory_format=torch.channels_last) \
            and not conv.weight.is_contiguous() else torch.contiguous_format
        sub.weight.data = weight.contiguous(memory_format=fmt)
        if bias is not None:
            sub.bias.data = bias
        if is_packed(conv):
            pack_weights(sub, (weight.dtype,))
        found = _SUBPIXEL[conv] = (key, sub)
    y = found[1](x)  # (B, 4 O, H + 1, W + 1)
    B, O, H, W = y.shape[0], conv.out_channels, x.shape[-2], x.shape[-1]
    # out[n, o, 2i + a, 2j + b] = y[n, (2a + b) O + o, i + a, j + b]: a view of y (any strides), copied once into
    # an output laid out as y is
    sB, sC, sH, sW = y.stride()
    z = y.as_strided((B, O, H, 2, W, 2), (sB, sC, sH, sH + 2 * O * sC, sW, sW + O * sC), y.storage_offset())
    if sC == 1:  # y channels_last (4 O channels over an (H + 1) x (W + 1) map: no other layout has unit channel stride)
        out = y.new_empty(B, 2 * H, 2 * W, O).permute(0, 3, 1, 2)
    else:
        out = y.new_empty(B, O, 2 * H, 2 * W)
    out.view(B, O, H, 2, W, 2).copy_(z)
    return out
