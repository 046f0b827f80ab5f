"""Judging unconditional video without a video network: per-clip ink, motion and jerk (Moving MNIST).

No offline video feature network exists here (FVD needs an I3D trained on Kinetics), so a generated clip of
bright strokes on black (``moving_mnist``) is judged by what the data's physics fixes. Every figure is also
computed on real clips, which gives its reference value:

- **ink drift**: the coefficient of variation over the frames of a clip's total ink (the sum of its pixel
  values in [0, 1]). Real digits keep their ink, which changes only where two of them overlap; digits that
  fade, smear or appear mid-clip do not.
- **motion**: the mean absolute change between consecutive frames (pixel values in [0, 1]). Still digits
  give 0; frames drawn independently of each other give far more than the data.
- **jerk**: the ink centroid's second difference |c(t+1) - 2 c(t) + c(t-1)| in pixels, averaged over a
  clip. The data's digits move in straight lines at constant speed, so it is 0 except at bounces and
  overlaps; digits that jitter raise it.
"""

from __future__ import annotations

import torch


def clip_statistics(clips: torch.Tensor) -> dict[str, list[float]]:
    """``{"ink_drift", "motion", "jerk_px"}``, one value per clip of ``clips`` ``(B, 1, T, H, W)`` in [-1, 1]
    (module docstring); ``T`` >= 3."""
    if clips.ndim != 5 or clips.shape[1] != 1 or clips.shape[2] < 3:
        raise ValueError(f"expected one-channel clips (B, 1, T >= 3, H, W), got {tuple(clips.shape)}")
    x = (clips[:, 0].float().clamp(-1, 1) + 1) / 2  # (B, T, H, W) in [0, 1]
    ink = x.sum(dim=(-1, -2))  # (B, T)
    drift = ink.std(dim=1) / ink.mean(dim=1).clamp(min=1e-6)
    motion = (x[:, 1:] - x[:, :-1]).abs().mean(dim=(1, 2, 3))
    H, W = x.shape[-2:]
    ys = torch.arange(H, dtype=torch.float32)[:, None]
    xs = torch.arange(W, dtype=torch.float32)[None, :]
    mass = ink.clamp(min=1e-6)
    centroid = torch.stack([(x * xs).sum(dim=(-1, -2)) / mass, (x * ys).sum(dim=(-1, -2)) / mass], dim=-1)
    jerk = (centroid[:, 2:] - 2 * centroid[:, 1:-1] + centroid[:, :-2]).norm(dim=-1).mean(dim=1)
    return {"ink_drift": drift.tolist(), "motion": motion.tolist(), "jerk_px": jerk.tolist()}
