"""A network plus its text encoder, seen by denoisers as one network.

``TextConditionedNet(net, encoder)(x, c_noise, text=[...])`` encodes the captions (so a trainable
encoder learns with the network, also under DDP) and calls ``net(x, c_noise, context=...,
context_mask=..., pooled=...)``. Precomputed embeddings can be passed instead of ``text``, which
is what sampling does: the prompt is encoded once, not at every step. A frozen encoder's outputs
are memoized per caption (training over a finite caption set encodes each caption once), and
its weights are never saved with the model: they come from their own package.

With ``layout_channels`` the wrapper also takes per-image layouts (``reverie.layout``): each object's
phrase is encoded by the same text encoder (its pooled embedding), and the painted map goes to the
network as ``spatial``. ``encode`` then always returns the layout tensors (an image without a layout
has an all-False ``layout_mask``), so conditional and unconditional batches concatenate for guidance.

A mask-aware inpainting model (``UNetConfig.inpaint_channels``) takes ``inpaint``: the masked image and the
mask (:func:`inpaint_condition`), passed through to the network unchanged, on both sides of guidance.
A video model's layouts are per clip a list of per-frame layouts (``reverie.layout.is_clip_layout``); its
layout tensors then have a frame axis, (B, T, N, ...), and the painted map is (B, channels, T, H, W).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .layout import LayoutEncoder, is_clip_layout, pad_clip_layouts, pad_layouts
from .text import CachedTextEncoder


def inpaint_condition(images: Tensor, mask: Tensor) -> Tensor:
    """The extra input of a mask-aware inpainting model: ``[images * (1 - mask), mask]`` along channels.
    ``images`` (B, C, H, W) in the network's space, ``mask`` (B, 1, H, W) with 1 (white) = repaint and 0 = keep,
    as in diffusers; the masked image is zero under the mask (as diffusers' Stable Diffusion inpainting
    pipeline builds it). An all-ones mask (nothing known) asks for a plain text-to-image sample."""
    mask = mask.to(images.dtype)
    return torch.cat([images * (1 - mask), mask], dim=1)


class TextConditionedNet(nn.Module):
    def __init__(self, net: nn.Module, encoder: nn.Module, layout_channels: int = 0, max_objects: int = 4):
        super().__init__()
        self.net = net
        self.encoder = encoder
        self._cached = None if encoder.trainable else CachedTextEncoder(encoder)
        self.max_objects = max_objects
        self.layout = None
        if layout_channels:
            if getattr(net.config, "spatial_channels", 0) != layout_channels:
                raise ValueError(f"layout_channels={layout_channels} needs a network with spatial_channels="
                                 f"{layout_channels}, got {getattr(net.config, 'spatial_channels', 0)}")
            self.layout = LayoutEncoder(encoder.pooled_dim, layout_channels)

    @property
    def config(self):
        return self.net.config

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.net.set_gradient_checkpointing(enabled)

    def _encode_texts(self, texts: list[str]):
        return self._cached.encode(texts) if self._cached is not None else self.encoder.encode(texts)

    def encode(self, texts: list[str], layouts=None) -> dict:
        """``{context, context_mask, pooled}`` for a list of captions ("" = unconditional), plus
        ``{layout_phrases, layout_boxes, layout_mask}`` for a layout model (``layouts``: one
        ``reverie.layout`` layout or None per caption)."""
        emb = self._encode_texts(texts)
        device = next(self.net.parameters()).device
        out = {"context": emb.tokens.to(device), "context_mask": emb.mask.to(device),
               "pooled": emb.pooled.to(device)}
        if self.layout is None:
            if layouts is not None and any(layouts):
                raise ValueError("this model takes no layouts (it was trained without layout_channels)")
            return out
        layouts = [None] * len(texts) if layouts is None else list(layouts)
        if len(layouts) != len(texts):
            raise ValueError(f"got {len(layouts)} layouts for {len(texts)} captions")
        if any(is_clip_layout(lay) for lay in layouts):  # videos: per-frame layouts, tensors (B, T, N, ...)
            phrases, boxes, mask = pad_clip_layouts(layouts, self.max_objects)
        else:
            phrases, boxes, mask = pad_layouts(layouts, self.max_objects)
        flat = [p for row in phrases for p in row]
        unique = list(dict.fromkeys(flat))  # a batch names few distinct phrases; most slots are "" padding
        row_of = {p: k for k, p in enumerate(unique)}
        pooled = self._encode_texts(unique).pooled[[row_of[p] for p in flat]].view(*mask.shape, -1)
        return {**out, "layout_phrases": pooled.to(device), "layout_boxes": boxes.to(device),
                "layout_mask": mask.to(device)}

    def forward(self, x: Tensor, c_noise: Tensor, text: list[str] | None = None, layout=None, **cond) -> Tensor:
        if text is not None:
            if len(text) != x.shape[0]:
                raise ValueError(f"got {len(text)} captions for a batch of {x.shape[0]}")
            cond = {**cond, **self.encode(list(text), layout)}
        if "context" in cond:  # the network may run in a lower precision than the encoder
            cond["context"] = cond["context"].to(x.dtype)
            cond["pooled"] = cond["pooled"].to(x.dtype)
        if self.layout is not None:
            phrases, boxes, mask = (cond.pop(k) for k in ("layout_phrases", "layout_boxes", "layout_mask"))
            cond["spatial"] = self.layout(phrases.to(x.dtype), boxes, mask, x.shape[-2:])  # (a clip's: per frame)
        return self.net(x, c_noise, **cond)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a model file stores: the network, plus the encoder only if it is trained."""
        state = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        if self.layout is not None:
            state.update({f"layout.{k}": v for k, v in self.layout.state_dict().items()})
        if self.encoder.trainable:
            state.update({f"encoder.{k}": v for k, v in self.encoder.state_dict().items()})
        return state

    def load_trainable_state_dict(self, state: dict) -> None:
        self.net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
        if self.layout is not None:
            self.layout.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("layout.")})
        if self.encoder.trainable:
            self.encoder.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("encoder.")})
