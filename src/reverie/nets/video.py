"""A factorized space-time U-Net for video: reverie's 2-D U-Net per frame plus temporal layers across frames.

Ho et al. 2022 ("Video Diffusion Models", Sec. 3): keep the image U-Net's spatial convolutions and attention
per frame and add layers that mix information across frames only. :class:`VideoUNet` *is* a
:class:`reverie.nets.unet.UNet` (same modules, same parameter names), whose blocks are replaced by
:class:`TemporalUNetBlock` s: after each block's res block and spatial attention, a residual temporal
block at every pixel,

    h <- h + Conv1d_T(SiLU(GN(h)))                       (``temporal`` "conv" or "both": every block)
    h <- h + proj(Attention_T(GN(h) + frame code))       ("attention": every block; "both": the blocks
                                                          that have spatial attention)

where the 1-D convolution (kernel ``temporal_kernel``) and the attention run over the frame axis only, and
the frame code is a fixed sine-cosine code of the frame index (``sincos_position_embedding``), so attention
knows frame order. ("both" keeps temporal attention off the full-resolution level: there it cost 40 % of a
training step, measured on this CPU at 32x32, while the kernel-3 convolutions of the 11 blocks already see
every frame of an 8-frame clip.) Both output projections are zero-initialized: a fresh VideoUNet is exactly the image
U-Net applied to each frame, so a model fine-tuned from an image model draws that model's frames from
the first step (the test pins it). Frames are never resampled (the U-Net's 3-D path is not used: every
layer here is the 2-D network's own).

``net(x, c_noise, **cond)``: ``x`` is a clip ``(B, C, T, H, W)``; ``c_noise`` ``[B]``; conditions hold one
row per clip (``context``, ``context_mask``, ``pooled``: repeated over frames) or one per frame (``B * T``
rows, clip-major); ``spatial`` may be ``(B, S, H, W)`` (the same map for every frame) or ``(B, S, T, H, W)``
(a per-frame layout map). A 4-D ``x`` is a batch of images: the temporal layers are skipped, which is the
image model (Ho et al.'s joint image-video training masks temporal attention to the frame itself).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Attention, GroupNorm, check_choice, sincos_position_embedding, zero_module
from .unet import UNet, UNetBlock, UNetConfig

__all__ = ["VideoUNetConfig", "VideoUNet", "TemporalBlock", "TemporalUNetBlock"]

TEMPORAL_KINDS = ("attention", "conv", "both")


@dataclass(frozen=True)
class VideoUNetConfig(UNetConfig):
    """A :class:`UNetConfig` (the per-frame network) plus the temporal layers: ``temporal`` (attention, conv
    or both), ``temporal_kernel`` (the conv's frames), ``temporal_head_channels`` (attention head width)."""

    arch = "video-unet"

    temporal: str = "both"
    temporal_kernel: int = 3
    temporal_head_channels: int = 32

    def __post_init__(self):
        super().__post_init__()
        check_choice("temporal", self.temporal, TEMPORAL_KINDS)
        check_choice("dims", self.dims, (2,))
        if self.temporal_kernel < 1 or self.temporal_kernel % 2 == 0:
            raise ValueError(f"temporal_kernel must be an odd number >= 1, got {self.temporal_kernel}")

    def image_config(self) -> UNetConfig:
        """The per-frame network's config (the image model this video model can start from)."""
        d = self.to_dict()
        for name in ("arch", "temporal", "temporal_kernel", "temporal_head_channels"):
            d.pop(name)
        return UNetConfig.from_dict(d)


class TemporalBlock(nn.Module):
    """Residual mixing across frames at every pixel: a temporal conv and/or temporal self-attention, each with a
    zero-initialized output (module docstring)."""

    def __init__(self, channels: int, kind: str, kernel: int, head_channels: int, norm_groups: int):
        super().__init__()
        self.conv = self.attn = None
        if kind in ("conv", "both"):
            self.conv_norm = GroupNorm(norm_groups, channels)
            self.conv = zero_module(nn.Conv1d(channels, channels, kernel, padding=kernel // 2))
        if kind in ("attention", "both"):
            self.attn_norm = GroupNorm(norm_groups, channels)
            self.attn = Attention(channels, max(1, channels // head_channels))
            zero_module(self.attn.proj)

    def forward(self, h: Tensor, frames: int) -> Tensor:
        """``h`` (B*T, C, H, W), frames of a clip adjacent -> same shape."""
        BT, C, H, W = h.shape
        B = BT // frames

        def to_sequences(x: Tensor) -> Tensor:  # (B*T, C, H, W) -> (B*H*W, C, T)
            return x.view(B, frames, C, H, W).permute(0, 3, 4, 2, 1).reshape(B * H * W, C, frames)

        def from_sequences(x: Tensor) -> Tensor:
            return x.view(B, H, W, C, frames).permute(0, 4, 3, 1, 2).reshape(BT, C, H, W)

        if self.conv is not None:
            h = h + from_sequences(self.conv(F.silu(to_sequences(self.conv_norm(h)))))
        if self.attn is not None:
            tokens = to_sequences(self.attn_norm(h)).transpose(1, 2)  # (B*H*W, T, C)
            code = sincos_position_embedding((frames,), C, device=h.device, dtype=tokens.dtype)
            h = h + from_sequences(self.attn(tokens + code).transpose(1, 2))
        return h


class TemporalUNetBlock(UNetBlock):
    """A U-Net block (res block, spatial attention: the image network's own modules and names) followed by a
    :class:`TemporalBlock`; ``frames`` is set by :class:`VideoUNet` for each forward (None: images)."""

    def __init__(self, block: UNetBlock, temporal: TemporalBlock):
        super().__init__(block.res, block.attn)
        self.temporal = temporal
        self.frames: int | None = None

    def forward(self, h: Tensor, emb: Tensor, context: Tensor | None, context_mask: Tensor | None) -> Tensor:
        h = super().forward(h, emb, context, context_mask)
        return h if self.frames is None else self.temporal(h, self.frames)


class VideoUNet(UNet):
    """The space-time U-Net (module docstring); ``VideoUNet(VideoUNetConfig(...))`` or
    ``create_network("video-unet-tiny", ...)``. Its state dict is the image U-Net's plus ``*.temporal.*``."""

    display_name = "video U-Net"

    def __init__(self, config: VideoUNetConfig):
        super().__init__(config)
        for blocks in (self.down, self.mid, self.up):
            for i, block in enumerate(blocks):
                if isinstance(block, UNetBlock):
                    width = block.res.conv2.out_channels
                    kind = config.temporal
                    if kind == "both" and block.attn is None:
                        kind = "conv"
                    temporal = TemporalBlock(width, kind, config.temporal_kernel,
                                             config.temporal_head_channels, config.norm_groups)
                    blocks[i] = TemporalUNetBlock(block, temporal)
        self.temporal_blocks = [b for b in self.modules() if isinstance(b, TemporalUNetBlock)]

    def temporal_parameters(self) -> list[nn.Parameter]:
        """The temporal layers' parameters (what a temporal-only fine-tune trains)."""
        return [p for b in self.temporal_blocks for p in b.temporal.parameters()]

    def forward(self, x: Tensor, c_noise: Tensor, context: Tensor | None = None,
                context_mask: Tensor | None = None, class_labels: Tensor | None = None,
                pooled: Tensor | None = None, spatial: Tensor | None = None) -> Tensor:
        if x.ndim == 4:  # images: the per-frame network alone
            return self._run(x, c_noise, None, context, context_mask, class_labels, pooled, spatial)
        if x.ndim != 5:
            raise ValueError(f"expected a video (B, C, T, H, W) or images (B, C, H, W), got shape {tuple(x.shape)}")
        B, C, T, H, W = x.shape
        frames = x.transpose(1, 2).reshape(B * T, C, H, W)

        def per_frame(v: Tensor | None) -> Tensor | None:
            if v is None or v.shape[0] == B * T != B:
                return v
            if v.shape[0] != B:
                raise ValueError(f"a condition has {v.shape[0]} rows; expected {B} (per clip) or {B * T} (per frame)")
            return v.repeat_interleave(T, dim=0)

        if spatial is not None and spatial.ndim == 5:  # (B, S, T, H, W) -> (B*T, S, H, W)
            spatial = spatial.transpose(1, 2).reshape(B * T, *spatial.shape[1:2], H, W)
        out = self._run(frames, per_frame(c_noise), T, per_frame(context), per_frame(context_mask),
                        per_frame(class_labels), per_frame(pooled), per_frame(spatial))
        return out.view(B, T, -1, H, W).transpose(1, 2)

    def _run(self, x, c_noise, frames, context, context_mask, class_labels, pooled, spatial) -> Tensor:
        for block in self.temporal_blocks:
            block.frames = frames
        try:
            return super().forward(x, c_noise, context=context, context_mask=context_mask, class_labels=class_labels,
                                   pooled=pooled, spatial=spatial)
        finally:
            for block in self.temporal_blocks:
                block.frames = None
