"""Sampling from a (possibly conditioned) network with a config's sampler, grid and guidance."""

from __future__ import annotations

from pathlib import Path

import torch

from ..denoisers import make_denoiser
from ..guidance import CFGDenoiser
from ..images import save_grid
from ..samplers import SIGMA_GRIDS, get_sigmas, sample


def _denoiser_and_grid(net, cfg, schedule, steps: int, grid: str):
    if cfg.model.prediction == "edm":
        denoiser = make_denoiser("edm", net, sigma_data=cfg.model.sigma_data)
        if grid not in SIGMA_GRIDS:
            raise ValueError(f"an EDM model samples on a sigma grid ({', '.join(SIGMA_GRIDS)}), not {grid!r}, "
                             f"which needs a VP model's timestep table")
        return denoiser, get_sigmas(grid, steps, sigma_min=0.002, sigma_max=80.0)
    return make_denoiser(cfg.model.prediction, net, schedule), get_sigmas(grid, steps, schedule=schedule)


def resolve_layouts(net, cfg, prompts: list[str], layouts="auto", seed: int = 0) -> list | None:
    """Per-image layouts for a layout model: ``"auto"`` plans them from the prompts with the training
    data's planner (``reverie.layout``), ``"none"`` or None gives none, a list holds one per image (or
    one for all). Models without layout conditioning take only ``"auto"`` / ``"none"`` / None."""
    has_layout = getattr(net, "layout", None) is not None
    if layouts is None or (isinstance(layouts, str) and layouts in ("auto", "none")):
        if layouts != "auto" or not has_layout:
            return None
        from ..layout import get_planner, plan_layouts

        return plan_layouts(get_planner(cfg.data.name), prompts, seed)
    if isinstance(layouts, str):
        raise ValueError(f"layouts must be 'auto', 'none' or a list of layouts, got {layouts!r}")
    if not has_layout:
        raise ValueError("this model takes no layouts (it was trained without model.layout_channels)")
    layouts = list(layouts)
    if len(layouts) == 1:
        layouts = layouts * len(prompts)
    if len(layouts) != len(prompts):
        raise ValueError(f"got {len(layouts)} layouts for {len(prompts)} images")
    return layouts


def conditions(net, cfg, info: dict, num_images: int, prompts: list[str] | None = None,
               negative_prompt: str = "", class_labels: torch.Tensor | None = None, layouts="auto",
               seed: int = 0) -> tuple[dict, dict]:
    """``(cond, uncond)`` keyword arguments for the network; empty dicts for unconditional models.
    ``layouts`` (layout models): see :func:`resolve_layouts`; the unconditional side has none."""
    device = next(net.parameters()).device
    if cfg.model.conditioning == "class":
        if class_labels is None:
            class_labels = torch.arange(num_images) % info["num_classes"]
        null = torch.full((num_images,), info["num_classes"], dtype=torch.long)
        return {"class_labels": class_labels.to(device)}, {"class_labels": null.to(device)}
    if cfg.model.conditioning == "text":
        prompts = list(prompts) if prompts else [""]
        prompts = (prompts * num_images)[:num_images]
        layouts = resolve_layouts(net, cfg, prompts, layouts, seed)
        if layouts is None:
            return net.encode(prompts), net.encode([negative_prompt] * num_images)
        return net.encode(prompts, layouts), net.encode([negative_prompt] * num_images, [None] * num_images)
    return {}, {}


@torch.no_grad()
def sample_images(net, cfg, schedule, info: dict, num_images: int, seed: int = 0,
                  class_labels: torch.Tensor | None = None, prompts: list[str] | None = None,
                  negative_prompt: str = "", guidance_scale: float | None = None,
                  steps: int | None = None, sampler: str | None = None, grid: str | None = None,
                  guidance_rescale: float = 0.0, callback=None, progress: bool = False, vae=None,
                  layouts="auto") -> torch.Tensor:
    """``num_images`` samples in [-1, 1] (decoded by ``vae`` for a latent model, whose ``info`` describes
    the latent shape); ``layouts``: see :func:`resolve_layouts`. The initial noise is drawn on the CPU, so a seed starts
    from the same noise on every device; ancestral samplers' per-step noise uses the device's own
    generator, so their images match across devices only in distribution."""
    denoiser, sigmas = _denoiser_and_grid(net, cfg, schedule, steps or cfg.sample.steps, grid or cfg.sample.grid)
    device = next(net.parameters()).device
    g = torch.Generator().manual_seed(seed)
    shape = (num_images, info["in_channels"], info["resolution"], info["resolution"])
    # VP models start from pure noise in VP coordinates, x_vp = n, i.e. x = n sqrt(1 + sigma^2).
    scale = float(sigmas[0]) if cfg.model.prediction == "edm" else (1 + float(sigmas[0]) ** 2) ** 0.5
    x = (torch.randn(shape, generator=g, dtype=torch.float32) * scale).to(device)
    cond, uncond = conditions(net, cfg, info, num_images, prompts, negative_prompt, class_labels, layouts, seed)
    scale = cfg.sample.guidance_scale if guidance_scale is None else guidance_scale
    if cond and scale != 1.0:
        denoiser = CFGDenoiser(denoiser, uncond, scale=scale, rescale=guidance_rescale)
    was_training = net.training
    net.eval()
    g_steps = g if device.type == "cpu" else torch.Generator(device).manual_seed(seed)
    out = sample(sampler or cfg.sample.sampler, denoiser, x, sigmas.to(device), generator=g_steps, cond=cond,
                 callback=callback, progress=progress)
    net.train(was_training)
    if vae is not None:
        out = vae.from_latent(out.to(next(vae.parameters()).device))
    return out.clamp(-1, 1)


def save_sample_grid(net, cfg, schedule, info: dict, path: Path, vae=None) -> Path:
    prompts = cfg.sample.prompts or None
    images = sample_images(net, cfg, schedule, info, cfg.sample.num_images, prompts=prompts, vae=vae)
    # prompts repeat cyclically over the images: one column per prompt when they tile the grid exactly
    ncols = len(prompts) if prompts and len(images) % len(prompts) == 0 and len(prompts) <= 16 else None
    return save_grid(images, path, ncols=ncols)
