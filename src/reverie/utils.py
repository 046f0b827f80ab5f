"""Small shared helpers."""

from __future__ import annotations

import torch
from torch import Tensor


def append_dims(x: Tensor, target_ndim: int) -> Tensor:
    """Append trailing singleton dims to ``x`` until it has ``target_ndim`` dims (for broadcasting
    a per-sample ``[B]`` value over images, audio or video alike)."""
    missing = target_ndim - x.ndim
    if missing < 0:
        raise ValueError(f"input has {x.ndim} dims but target_ndim is {target_ndim}")
    return x.reshape(*x.shape, *([1] * missing))


def batch_sigma(sigma, x: Tensor) -> Tensor:
    """Turn a scalar or ``[B]`` sigma into a ``[B]`` tensor on ``x``'s device and dtype."""
    sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all but the batch dimension: ``[B, ...] -> [B]``."""
    return x.reshape(x.shape[0], -1).mean(dim=1)
