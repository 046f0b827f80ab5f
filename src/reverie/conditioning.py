"""A network plus its text encoder, seen by denoisers as one network.

``TextConditionedNet(net, encoder)(x, c_noise, text=[...])`` encodes the captions (so a trainable
encoder learns with the network, also under DDP) and calls ``net(x, c_noise, context=...,
context_mask=..., pooled=...)``. Precomputed embeddings can be passed instead of ``text``, which
is what sampling does: the prompt is encoded once, not at every step. A frozen encoder's outputs
are memoized per caption (training over a finite caption set encodes each caption once), and
its weights are never saved with the model: they come from their own package.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TextConditionedNet(nn.Module):
    def __init__(self, net: nn.Module, encoder: nn.Module):
        super().__init__()
        from .text import CachedTextEncoder

        self.net = net
        self.encoder = encoder
        self._cached = None if encoder.trainable else CachedTextEncoder(encoder)

    @property
    def config(self):
        return self.net.config

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.net.set_gradient_checkpointing(enabled)

    def encode(self, texts: list[str]) -> dict:
        """``{context, context_mask, pooled}`` for a list of captions ("" = unconditional)."""
        emb = self._cached.encode(texts) if self._cached is not None else self.encoder.encode(texts)
        device = next(self.net.parameters()).device
        return {"context": emb.tokens.to(device), "context_mask": emb.mask.to(device),
                "pooled": emb.pooled.to(device)}

    def forward(self, x: Tensor, c_noise: Tensor, text: list[str] | None = None, **cond) -> Tensor:
        if text is not None:
            if len(text) != x.shape[0]:
                raise ValueError(f"got {len(text)} captions for a batch of {x.shape[0]}")
            cond = {**cond, **self.encode(list(text))}
        if "context" in cond:  # the network may run in a lower precision than the encoder
            cond["context"] = cond["context"].to(x.dtype)
            cond["pooled"] = cond["pooled"].to(x.dtype)
        return self.net(x, c_noise, **cond)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a model file stores: the network, plus the encoder only if it is trained."""
        state = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        if self.encoder.trainable:
            state.update({f"encoder.{k}": v for k, v in self.encoder.state_dict().items()})
        return state

    def load_trainable_state_dict(self, state: dict) -> None:
        self.net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
        if self.encoder.trainable:
            self.encoder.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("encoder.")})
