"""Sample grids during training, from the EMA weights."""

from __future__ import annotations

from pathlib import Path

import torch

from ..denoisers import make_denoiser
from ..images import save_grid
from ..samplers import get_sigmas, sample


@torch.no_grad()
def sample_images(net, cfg, schedule, info: dict, num_images: int, seed: int = 0,
                  class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """``num_images`` samples in [-1, 1] from ``net`` with the config's sampler and grid."""
    if cfg.model.prediction == "edm":
        denoiser = make_denoiser("edm", net, sigma_data=cfg.model.sigma_data)
        sigmas = get_sigmas(cfg.sample.grid if cfg.sample.grid in ("karras", "exponential") else "karras",
                            cfg.sample.steps, sigma_min=0.002, sigma_max=80.0)
    else:
        denoiser = make_denoiser(cfg.model.prediction, net, schedule)
        sigmas = get_sigmas(cfg.sample.grid, cfg.sample.steps, schedule=schedule)
    device = next(net.parameters()).device
    g = torch.Generator().manual_seed(seed)
    shape = (num_images, info["in_channels"], info["resolution"], info["resolution"])
    x = (torch.randn(shape, generator=g, dtype=torch.float32) * float(sigmas[0])).to(device)
    cond = {}
    if cfg.model.conditioning == "class":
        if class_labels is None:
            class_labels = torch.arange(num_images) % info["num_classes"]
        cond["class_labels"] = class_labels.to(device)
    was_training = net.training
    net.eval()
    out = sample(cfg.sample.sampler, denoiser, x, sigmas.to(device), generator=g, cond=cond)
    net.train(was_training)
    return out.clamp(-1, 1)


def save_sample_grid(net, cfg, schedule, info: dict, path: Path) -> Path:
    images = sample_images(net, cfg, schedule, info, cfg.sample.num_images)
    return save_grid(images, path)
