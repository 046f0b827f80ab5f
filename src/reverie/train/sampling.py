"""Sampling from a (possibly conditioned) network with a config's sampler, grid and guidance."""

from __future__ import annotations

from pathlib import Path

import torch

from ..denoisers import make_denoiser
from ..guidance import CFGDenoiser
from ..images import save_grid
from ..samplers import SIGMA_GRIDS, get_sigmas, sample
from ..samplers.base import check_grid

EDM_SIGMA_RANGE = (0.002, 80.0)  # EDM's sampling range (Karras et al. 2022)


def sigma_range(cfg, schedule) -> tuple[float, float]:
    """The noise levels a model samples over: EDM's (0.002, 80), or a VP schedule's own range."""
    if cfg.model.prediction == "edm":
        return EDM_SIGMA_RANGE
    return float(schedule.sigma_min), float(schedule.sigma_max)


def _denoiser_and_grid(net, cfg, schedule, steps: int | None, grid):
    """The model's denoiser and its sigma grid: ``grid`` names a kind (``reverie.samplers.GRIDS``) or is
    an explicit decreasing grid ending at 0 (e.g. ``TunedGrid.sigmas``), whose length fixes the steps."""
    if cfg.model.prediction == "edm":
        denoiser = make_denoiser("edm", net, sigma_data=cfg.model.sigma_data)
    else:
        denoiser = make_denoiser(cfg.model.prediction, net, schedule)
    if not isinstance(grid, str):
        sigmas = check_grid(grid)
        if steps is not None and steps != len(sigmas) - 1:
            raise ValueError(f"the grid has {len(sigmas) - 1} steps, not {steps}; leave the steps out")
        lo, hi = sigma_range(cfg, schedule)
        if float(sigmas[0]) > hi * (1 + 1e-6) or float(sigmas[-2]) < lo * (1 - 1e-6):
            raise ValueError(f"the grid spans sigma {float(sigmas[-2]):.4g} .. {float(sigmas[0]):.4g}, outside "
                             f"this model's range {lo:.4g} .. {hi:.4g}")
        return denoiser, sigmas
    steps = steps or cfg.sample.steps
    if cfg.model.prediction == "edm":
        if grid not in SIGMA_GRIDS:
            raise ValueError(f"an EDM model samples on a sigma grid ({', '.join(SIGMA_GRIDS)}), not {grid!r}, "
                             f"which needs a VP model's timestep table")
        return denoiser, get_sigmas(grid, steps, *EDM_SIGMA_RANGE)
    return denoiser, get_sigmas(grid, steps, schedule=schedule)


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


def start_noise(cfg, info: dict, num_images: int, sigma_top: float, generator: torch.Generator) -> torch.Tensor:
    """Pure noise at the top of the grid, in the sampler's (VE) coordinates, drawn on the CPU. VP models
    start from pure noise in VP coordinates, x_vp = n, i.e. x = n sqrt(1 + sigma^2)."""
    shape = (num_images, info["in_channels"], info["resolution"], info["resolution"])
    scale = sigma_top if cfg.model.prediction == "edm" else (1 + sigma_top**2) ** 0.5
    return torch.randn(shape, generator=generator, dtype=torch.float32) * scale


@torch.no_grad()
def sample_images(net, cfg, schedule, info: dict, num_images: int, seed: int = 0,
                  class_labels: torch.Tensor | None = None, prompts: list[str] | None = None,
                  negative_prompt: str = "", guidance_scale: float | None = None,
                  steps: int | None = None, sampler: str | None = None, grid=None,
                  guidance_rescale: float = 0.0, callback=None, progress: bool = False, vae=None,
                  layouts="auto") -> torch.Tensor:
    """``num_images`` samples in [-1, 1] (decoded by ``vae`` for a latent model, whose ``info`` describes
    the latent shape); ``layouts``: see :func:`resolve_layouts`. The initial noise is drawn on the CPU, so a seed starts
    from the same noise on every device; ancestral samplers' per-step noise uses the device's own
    generator, so their images match across devices only in distribution."""
    denoiser, sigmas = _denoiser_and_grid(net, cfg, schedule, steps, cfg.sample.grid if grid is None else grid)
    device = next(net.parameters()).device
    g = torch.Generator().manual_seed(seed)
    x = start_noise(cfg, info, num_images, float(sigmas[0]), g).to(device)
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


@torch.no_grad()
def tune_grid(net, cfg, schedule, info: dict, sampler: str, steps: int, pilot: int = 16, seed: int = 0,
              prompts: list[str] | None = None, negative_prompt: str = "", guidance_scale: float | None = None,
              guidance_rescale: float = 0.0, teacher_steps: int = 100, teacher_grid: str | None = None,
              progress: bool = False, **opts):
    """A ``steps``-level grid for ``sampler`` tuned to this model (``reverie.samplers.tune_sigmas``), on
    ``pilot`` start states from noise seed ``seed`` (keep it apart from the seeds you will sample with),
    with the same conditioning and guidance as :func:`sample_images`; the teacher is dpmpp_2m on
    ``teacher_grid`` (a grid kind; default: the model's own) at ``teacher_steps``. Returns a ``TunedGrid``."""
    from ..samplers import tune_sigmas

    lo, hi = sigma_range(cfg, schedule)
    denoiser, default = _denoiser_and_grid(net, cfg, schedule, steps, cfg.sample.grid)
    # the model's own grid is scored beside the tuned one (and may be the best start)
    starts = {cfg.sample.grid: default} if abs(float(default[0]) / hi - 1) < 1e-9 and float(default[-2]) >= lo else {}
    # the teacher: the same sampler setup as the model's own, at many steps (a model may be poor at sigmas its
    # own grid never visits, e.g. an eps model below its trailing grid's last level)
    teacher_kind = teacher_grid or cfg.sample.grid
    _, teacher_grid = _denoiser_and_grid(net, cfg, schedule, teacher_steps, teacher_kind)
    if abs(float(teacher_grid[0]) / hi - 1) > 1e-9:
        raise ValueError(f"a {teacher_kind} grid starts at sigma {float(teacher_grid[0]):.4g}, below this model's top "
                         f"{hi:.4g} where tuning starts; pick a teacher grid that starts there (e.g. ddim-trailing)")
    device = next(net.parameters()).device
    x = start_noise(cfg, info, pilot, hi, torch.Generator().manual_seed(seed)).to(device)
    cond, uncond = conditions(net, cfg, info, pilot, prompts, negative_prompt, None, "auto", seed)
    scale = cfg.sample.guidance_scale if guidance_scale is None else guidance_scale
    if cond and scale != 1.0:
        denoiser = CFGDenoiser(denoiser, uncond, scale=scale, rescale=guidance_rescale)
    was_training = net.training
    net.eval()
    try:
        tuned = tune_sigmas(denoiser, x, sampler, steps, lo, hi, cond=cond, teacher_grid=teacher_grid, seed=seed,
                            starts=starts, progress=progress, **opts)
        tuned.teacher_grid = teacher_kind
        return tuned
    finally:
        net.train(was_training)


def save_sample_grid(net, cfg, schedule, info: dict, path: Path, vae=None) -> Path:
    prompts = cfg.sample.prompts or None
    images = sample_images(net, cfg, schedule, info, cfg.sample.num_images, prompts=prompts, vae=vae)
    # prompts repeat cyclically over the images: one column per prompt when they tile the grid exactly
    ncols = len(prompts) if prompts and len(images) % len(prompts) == 0 and len(prompts) <= 16 else None
    return save_grid(images, path, ncols=ncols)
