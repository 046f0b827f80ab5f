"""Exponential moving average of model weights, with a warmup or half-life schedule.

Warmup (Tarvainen & Valpola 2017; the "power" form used by Karras et al. and diffusers):
``decay(step) = min(max_decay, 1 - (1 + step / inv_gamma) ** -power)``, so early weights are
forgotten quickly. Half-life (Karras et al. 2022, EDM Sec. 5): ``decay = 0.5 ** (batch /
half_life_images)``, independent of the batch size. The EMA copy is kept in float32.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """An EMA copy of ``model``; ``update(model, step, batch_size)`` after each optimizer step."""

    def __init__(self, model: nn.Module, max_decay: float = 0.9999, power: float = 2 / 3,
                 inv_gamma: float = 1.0, half_life_images: float | None = None):
        if not 0.0 <= max_decay < 1.0:
            raise ValueError(f"EMA max_decay must be in [0, 1), got {max_decay}")
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)
        self.max_decay, self.power, self.inv_gamma = max_decay, power, inv_gamma
        self.half_life_images = half_life_images

    def decay(self, step: int, batch_size: int = 1) -> float:
        if self.half_life_images is not None:
            return 0.5 ** (batch_size / max(self.half_life_images, 1e-8))
        d = 1 - (1 + step / self.inv_gamma) ** -self.power
        return float(min(self.max_decay, max(d, 0.0)))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, batch_size: int = 1) -> None:
        d = self.decay(step, batch_size)
        # Frozen parameters (a pretrained text encoder) never change: skip them.
        pairs = [(e, p) for e, p in zip(self.model.parameters(), model.parameters(), strict=True) if p.requires_grad]
        if pairs:
            torch._foreach_lerp_([e for e, _ in pairs], [p.detach().to(e.dtype) for e, p in pairs], 1 - d)
        for e, b in zip(self.model.buffers(), model.buffers(), strict=True):
            e.copy_(b)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
