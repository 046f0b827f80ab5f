"""The U-Net denoiser of DDPM / ADM for 1-D, 2-D and 3-D data.

Ho et al. 2020 (DDPM, App. B) and Dhariwal & Nichol 2021 (ADM, Sec. 3): a conv stem, an encoder of
``num_res_blocks`` residual blocks per level with 2x downsampling between levels, a bottleneck
(res block, self-attention, res block), a mirrored decoder of ``num_res_blocks + 1`` blocks per level
that each take the concatenated skip activation, and a GN-SiLU-conv head. Self-attention sits at
``attention_resolutions``; with ``context_dim`` each attention block also cross-attends to text
tokens. The time embedding (plus a class or pooled-text embedding) conditions every res block.

``net(x, c_noise, **cond)``: ``x`` (B, C, *spatial), ``c_noise`` float [B] (a fractional timestep
or EDM's ln(sigma)/4), cond keys ``context`` (B, L, context_dim), ``context_mask`` (B, L) bool,
``class_labels`` (B,) long, ``pooled`` (B, pooled_dim). Output (B, out_channels, *spatial), with
twice the channels when the variance is learned.

Performance choices that keep the architecture's math (same layers and FLOPs as diffusers'
UNet2DModel for the same config; ``diffusers_unet2d_kwargs`` / ``convert_diffusers_unet2d`` below
map one onto the other, and tests check equal outputs): all res blocks' time projections are one
Linear (``emb_proj``) applied once to one SiLU; attention uses a fused QKV projection; under
autocast the GroupNorms keep bf16/fp16 activations in their dtype (layers.GroupNorm); residual
adds are in place. ``channels_last=True`` stores conv weights and activations NHWC, so cuDNN
convolutions need no layout conversion and attention's token view is free: worth it on GPUs; on
the CPU PyTorch's channels-last GroupNorm backward is several times slower than NCHW, so leave it
off there. ``gradient_checkpointing`` recomputes each block in the backward pass.

Spatial sizes must be divisible by 2^(levels - 1) (frames are never resampled for dims=3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import (
    TIME_EMBEDDINGS,
    AttentionBlock,
    Backbone,
    Downsample,
    GroupNorm,
    NetConfig,
    ResBlock,
    Upsample,
    check_choice,
    conv_nd,
    memory_format_for,
    resample_factor,
    zero_module,
)

__all__ = ["UNetConfig", "UNet"]


@dataclass(frozen=True)
class UNetConfig(NetConfig):
    """Every knob of :class:`UNet`; round-trips through ``to_dict`` / ``from_dict``.

    ``attention_resolutions`` are feature-map sizes for an input of ``sample_size`` (DDPM's
    "attention at 16x16" for 32x32 images); the network itself accepts other sizes and keeps
    attention at the same levels. ``head_channels`` (if set) overrides ``num_heads`` with
    ``channels // head_channels`` heads. ``out_channels`` (the prediction's channels) defaults to
    ``in_channels``; ``learned_variance`` appends as many variance channels (Nichol & Dhariwal 2021).
    ``attention_positions`` adds a fixed sine-cosine position code before every attention (see
    ``AttentionBlock``). ``spatial_channels`` accepts a per-pixel condition ``spatial`` (B, channels,
    *spatial) at the input resolution, added to the first feature map through a zero-initialized
    convolution (a layout map, ``reverie.layout``; without ``spatial`` the network is unchanged).
    ``inpaint_channels`` accepts ``inpaint`` (B, channels, *spatial): the masked image and the mask of a
    mask-aware inpainting model (``reverie.conditioning.inpaint_condition``), through its own zero-initialized
    convolution added to the first feature map. A sum of two 3x3 convolutions is one 3x3 convolution over the
    concatenated channels, so this *is* extra input channels of ``conv_in`` whose new weights start at zero:
    a model fine-tuned from one without them starts out exactly as that model.
    """

    arch = "unet"

    in_channels: int = 3
    out_channels: int | None = None
    learned_variance: bool = False
    dims: int = 2
    sample_size: int = 32
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    mid_attention: bool = True
    num_heads: int = 1
    head_channels: int | None = None
    dropout: float = 0.0
    norm_groups: int = 32
    scale_shift: bool = True
    resample_with_conv: bool = True
    time_embedding: str = "sinusoidal"
    time_embed_dim: int | None = None
    fourier_scale: float = 16.0
    context_dim: int | None = None
    attention_positions: bool = False
    spatial_channels: int = 0
    inpaint_channels: int = 0
    num_classes: int | None = None
    pooled_dim: int | None = None
    channels_last: bool = False
    gradient_checkpointing: bool = False

    def __post_init__(self):
        check_choice("dims", self.dims, (1, 2, 3))
        check_choice("time_embedding", self.time_embedding, TIME_EMBEDDINGS)
        for mult in self.channel_mult:
            if (mult * self.model_channels) % self.norm_groups:
                raise ValueError(f"channels {mult * self.model_channels} not divisible by norm_groups")
        levels = self.attention_levels
        for res in self.attention_resolutions:
            if res not in levels.values():
                valid = ", ".join(str(r) for r in levels.values())
                raise ValueError(f"attention resolution {res} is not a level of this U-Net; valid: {valid}")

    @property
    def attention_levels(self) -> dict[int, int]:
        """Level index -> feature-map size at ``sample_size``."""
        return {i: self.sample_size // 2**i for i in range(len(self.channel_mult))}

    @property
    def resolved_out_channels(self) -> int:
        """Channels the network returns: the prediction's, then as many variance channels if learned."""
        base = self.out_channels if self.out_channels is not None else self.in_channels
        return 2 * base if self.learned_variance else base

    def heads_for(self, channels: int) -> int:
        return channels // self.head_channels if self.head_channels else self.num_heads


class UNetBlock(nn.Module):
    """One encoder/decoder step: a res block, then optionally an attention block."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None = None):
        super().__init__()
        self.res, self.attn = res, attn

    def forward(self, h: Tensor, emb: Tensor, context: Tensor | None, context_mask: Tensor | None) -> Tensor:
        h = self.res(h, emb)
        return h if self.attn is None else self.attn(h, context, context_mask)


class UNet(Backbone):
    """DDPM/ADM U-Net (module docstring); build with ``UNet(UNetConfig(...))`` or ``create_network``."""

    display_name = "U-Net"
    runs_in_weight_dtype = True  # casts its input and conditions to its weights' dtype (reverie.precision)

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        mc, dims = cfg.model_channels, cfg.dims
        temb = cfg.time_embed_dim or 4 * mc
        self.build_embeddings(mc, temb)  # time_embed, class_embed, pooled_proj
        self.conv_in = conv_nd(dims, cfg.in_channels, mc, 3, padding=1)
        self.spatial_in = None
        if cfg.spatial_channels:
            self.spatial_in = zero_module(conv_nd(dims, cfg.spatial_channels, mc, 3, padding=1))
        self.inpaint_in = None
        if cfg.inpaint_channels:
            self.inpaint_in = zero_module(conv_nd(dims, cfg.inpaint_channels, mc, 3, padding=1))
        self.down, skip_chans = self._build_encoder()
        ch = mc * cfg.channel_mult[-1]
        self.mid = nn.ModuleList([self._block(ch, ch, cfg.mid_attention), self._block(ch, ch, False)])
        self.up = self._build_decoder(skip_chans)
        self.norm_out = GroupNorm(cfg.norm_groups, mc)
        self.conv_out = zero_module(conv_nd(dims, mc, cfg.resolved_out_channels, 3, padding=1))
        blocks = [b for b in (*self.down, *self.mid, *self.up) if isinstance(b, UNetBlock)]
        self.emb_sizes = [b.res.emb_channels for b in blocks]  # in the order forward uses them
        # The time projections of all res blocks, fused: one (temb -> sum of widths) Linear.
        self.emb_proj = nn.Linear(temb, sum(self.emb_sizes))
        self.memory_format = memory_format_for(dims) if cfg.channels_last else torch.contiguous_format
        self.gradient_checkpointing = cfg.gradient_checkpointing
        self.to(memory_format=self.memory_format)

    def _block(self, in_ch: int, out_ch: int, attention: bool) -> UNetBlock:
        cfg = self.config
        res = ResBlock(cfg.dims, in_ch, out_ch, cfg.dropout, cfg.norm_groups, cfg.scale_shift)
        attn = None
        if attention:
            attn = AttentionBlock(out_ch, cfg.heads_for(out_ch), cfg.norm_groups, cfg.context_dim,
                                  positions=cfg.attention_positions)
        return UNetBlock(res, attn)

    def _build_encoder(self) -> tuple[nn.ModuleList, list[int]]:
        cfg, down = self.config, nn.ModuleList()
        ch = cfg.model_channels
        skip_chans = [ch]
        for level, mult in enumerate(cfg.channel_mult):
            attention = cfg.attention_levels[level] in cfg.attention_resolutions
            for _ in range(cfg.num_res_blocks):
                down.append(self._block(ch, mult * cfg.model_channels, attention))
                ch = mult * cfg.model_channels
                skip_chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                down.append(Downsample(cfg.dims, ch, cfg.resample_with_conv))
                skip_chans.append(ch)
        return down, skip_chans

    def _build_decoder(self, skip_chans: list[int]) -> nn.ModuleList:
        cfg, up = self.config, nn.ModuleList()
        skip_chans = list(skip_chans)
        ch = cfg.model_channels * cfg.channel_mult[-1]
        for level in reversed(range(len(cfg.channel_mult))):
            attention = cfg.attention_levels[level] in cfg.attention_resolutions
            for _ in range(cfg.num_res_blocks + 1):
                out_ch = cfg.channel_mult[level] * cfg.model_channels
                up.append(self._block(ch + skip_chans.pop(), out_ch, attention))
                ch = out_ch
            if level != 0:
                up.append(Upsample(cfg.dims, ch, cfg.resample_with_conv))
        return up

    def _check_input(self, x: Tensor, context: Tensor | None, spatial: Tensor | None = None,
                     inpaint: Tensor | None = None) -> None:
        cfg = self.config
        if x.ndim != cfg.dims + 2:
            raise ValueError(f"expected a ({cfg.dims + 2})-D input (B, C, *spatial) for dims={cfg.dims}")
        factors = [f ** (len(cfg.channel_mult) - 1) for f in resample_factor(cfg.dims)]
        if any(s % f for s, f in zip(x.shape[2:], factors)):
            raise ValueError(f"spatial size {tuple(x.shape[2:])} must be divisible by {tuple(factors)}")
        if (context is None) != (cfg.context_dim is None):
            raise ValueError("`context` must be given exactly when UNetConfig.context_dim is set")
        if spatial is not None:
            expected = (x.shape[0], cfg.spatial_channels, *x.shape[2:])
            if not cfg.spatial_channels or tuple(spatial.shape) != expected:
                raise ValueError(f"`spatial` must be {expected} (UNetConfig.spatial_channels), "
                                 f"got {tuple(spatial.shape)}")
        if (inpaint is None) != (not cfg.inpaint_channels):
            raise ValueError("`inpaint` (masked image and mask) must be given exactly when "
                             "UNetConfig.inpaint_channels is set")
        if inpaint is not None and tuple(inpaint.shape) != (x.shape[0], cfg.inpaint_channels, *x.shape[2:]):
            raise ValueError(f"`inpaint` must be {(x.shape[0], cfg.inpaint_channels, *x.shape[2:])} "
                             f"(UNetConfig.inpaint_channels), got {tuple(inpaint.shape)}")

    def forward(self, x: Tensor, c_noise: Tensor, context: Tensor | None = None,
                context_mask: Tensor | None = None, class_labels: Tensor | None = None,
                pooled: Tensor | None = None, spatial: Tensor | None = None,
                inpaint: Tensor | None = None) -> Tensor:
        self._check_input(x, context, spatial, inpaint)
        # Run in the weights' dtype and layout (bf16 + channels_last for inference on AMX CPUs: see
        # reverie.precision), answer in x's dtype; under autocast the weights are float32 and nothing changes.
        weight = self.conv_in.weight
        fmt = self.memory_format if weight.is_contiguous() else memory_format_for(self.config.dims)
        if weight.dtype != x.dtype:
            context, pooled = (c if c is None else c.to(weight.dtype) for c in (context, pooled))
        emb = self.embed(c_noise, class_labels, pooled)
        embs = self.emb_proj(F.silu(emb)).split(self.emb_sizes, dim=1)  # one (B, E_i) slice per block
        h = self.conv_in(x.to(weight.dtype).contiguous(memory_format=fmt))
        if spatial is not None:
            h = h + self.spatial_in(spatial.to(h.dtype).contiguous(memory_format=fmt))
        if inpaint is not None:
            h = h + self.inpaint_in(inpaint.to(h.dtype).contiguous(memory_format=fmt))
        skips, i = [h], 0
        for block in self.down:
            if isinstance(block, UNetBlock):
                h, i = self.run_block(block, h, embs[i], context, context_mask), i + 1
            else:
                h = block(h)
            skips.append(h)
        for block in self.mid:
            h, i = self.run_block(block, h, embs[i], context, context_mask), i + 1
        for block in self.up:
            if isinstance(block, UNetBlock):
                h = torch.cat([h, skips.pop()], dim=1)
                h, i = self.run_block(block, h, embs[i], context, context_mask), i + 1
            else:
                h = block(h)
        out = self.conv_out(self.norm_out.silu(h)).contiguous()
        return out if weight.dtype == x.dtype else out.to(x.dtype)  # autocast's bf16 output stays bf16


# --------------------------------------------------------------------------- diffusers interoperability
# Published DDPM checkpoints (e.g. google/ddpm-cifar10-32) are stored as diffusers' UNet2DModel. These two
# functions only translate a config and state-dict keys; reverie never imports diffusers.

def diffusers_unet2d_kwargs(cfg: UNetConfig, strict: bool = True) -> dict:
    """UNet2DModel keyword arguments describing the same network as ``cfg`` (2-D, no text conditioning).

    With scale-shift conditioning UNet2DModel's bottleneck attention has no GroupNorm, so the two
    differ by that one norm; ``strict=False`` accepts this (closest equivalent, for benchmarks).
    """
    unsupported = {"scale_shift with mid_attention": strict and cfg.scale_shift and cfg.mid_attention,
                   "dims": cfg.dims != 2, "context_dim": cfg.context_dim is not None,
                   "pooled_dim": cfg.pooled_dim is not None,
                   "time_embedding": cfg.time_embedding != "sinusoidal",
                   "resample_with_conv": not cfg.resample_with_conv,
                   "attention_positions": cfg.attention_positions,
                   "spatial_channels": bool(cfg.spatial_channels), "inpaint_channels": bool(cfg.inpaint_channels)}
    if any(unsupported.values()):
        raise ValueError(f"no UNet2DModel equivalent for {[k for k, v in unsupported.items() if v]}")
    widths = [m * cfg.model_channels for m in cfg.channel_mult]
    attn = [cfg.attention_levels[i] in cfg.attention_resolutions for i in range(len(widths))]
    attn_widths = [w for w, a in zip(widths + [widths[-1]], attn + [cfg.mid_attention]) if a]
    head_dims = {w // cfg.heads_for(w) for w in attn_widths}
    if len(head_dims) > 1:
        raise ValueError("UNet2DModel needs one attention head width for all levels; set head_channels")
    head_dim = head_dims.pop() if head_dims else None
    return dict(
        sample_size=cfg.sample_size, in_channels=cfg.in_channels, out_channels=cfg.resolved_out_channels,
        block_out_channels=tuple(widths), layers_per_block=cfg.num_res_blocks, dropout=cfg.dropout,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        attention_head_dim=None if head_dim == widths[-1] and cfg.num_heads == 1 else head_dim,
        norm_num_groups=cfg.norm_groups, add_attention=cfg.mid_attention,
        resnet_time_scale_shift="scale_shift" if cfg.scale_shift else "default",
        time_embedding_dim=cfg.time_embed_dim, flip_sin_to_cos=True, freq_shift=0,
        num_class_embeds=cfg.num_classes,
    )


def _diffusers_module_names(cfg: UNetConfig) -> tuple[dict[str, str], list[str]]:
    """(reverie module -> UNet2DModel module, UNet2DModel res blocks in reverie's emb_proj order)."""
    names = {"conv_in": "conv_in", "time_embed.mlp.0": "time_embedding.linear_1",
             "time_embed.mlp.2": "time_embedding.linear_2", "norm_out": "conv_norm_out",
             "conv_out": "conv_out", "class_embed": "class_embedding"}
    resnets = []

    def block(ours: str, theirs_res: str, theirs_attn: str | None) -> None:
        for a, b in (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
                     ("skip", "conv_shortcut")):
            names[f"{ours}.res.{a}"] = f"{theirs_res}.{b}"
        resnets.append(theirs_res)
        if theirs_attn is not None:  # (absent from UNet2DModel's mid attention with scale-shift)
            names[f"{ours}.attn.norm"] = f"{theirs_attn}.group_norm"
            names[f"{ours}.attn.attn.proj"] = f"{theirs_attn}.to_out.0"
            names[f"{ours}.attn.attn.qkv"] = theirs_attn  # q, k, v are concatenated below

    k, n = 0, len(cfg.channel_mult)
    for level in range(n):
        attn = cfg.attention_levels[level] in cfg.attention_resolutions
        for j in range(cfg.num_res_blocks):
            theirs = f"down_blocks.{level}"
            block(f"down.{k}", f"{theirs}.resnets.{j}", f"{theirs}.attentions.{j}" if attn else None)
            k += 1
        if level != n - 1:
            names[f"down.{k}.op"], k = f"down_blocks.{level}.downsamplers.0.conv", k + 1
    block("mid.0", "mid_block.resnets.0", "mid_block.attentions.0" if cfg.mid_attention else None)
    block("mid.1", "mid_block.resnets.1", None)
    k = 0
    for i, level in enumerate(reversed(range(n))):
        attn = cfg.attention_levels[level] in cfg.attention_resolutions
        for j in range(cfg.num_res_blocks + 1):
            theirs = f"up_blocks.{i}"
            block(f"up.{k}", f"{theirs}.resnets.{j}", f"{theirs}.attentions.{j}" if attn else None)
            k += 1
        if level != 0:
            names[f"up.{k}.conv"], k = f"up_blocks.{i}.upsamplers.0.conv", k + 1
    return names, resnets


def convert_diffusers_unet2d(state_dict: dict, cfg: UNetConfig) -> dict:
    """Translate a UNet2DModel state dict (of ``diffusers_unet2d_kwargs(cfg)``) to :class:`UNet` keys."""
    names, resnets = _diffusers_module_names(cfg)
    out = {}
    for ours, theirs in names.items():
        for p in ("weight", "bias"):
            if ours.endswith("attn.qkv"):
                parts = [state_dict[f"{theirs}.to_{c}.{p}"] for c in "qkv"]
                out[f"{ours}.{p}"] = torch.cat(parts)
            elif f"{theirs}.{p}" in state_dict:
                out[f"{ours}.{p}"] = state_dict[f"{theirs}.{p}"]
    for p in ("weight", "bias"):
        out[f"emb_proj.{p}"] = torch.cat([state_dict[f"{r}.time_emb_proj.{p}"] for r in resnets])
    return out
