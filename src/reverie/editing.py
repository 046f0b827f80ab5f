"""Image editing with any reverie diffusion model: inversion, img2img, inpainting and prompt edits.

Everything works in the sampler's view (``D(x, sigma, **cond)``, VE coordinates), so it holds for pixel
and latent models (a latent model encodes the image with its autoencoder's posterior mode first and
decodes at the end), with or without text, and for every parameterization (eps, v, x0, EDM).

* **Inversion** (:func:`invert`). ``method="ddim"``: the deterministic DDIM / probability-flow ODE run
  backwards (Song et al. 2021, DDIM Sec. 4.3; Dhariwal & Nichol 2021, App. F): a step from sigma_a up to
  sigma_b takes the noise direction ``eps = (x - D(x_a, sigma_b)) / sigma_b`` at the current state and
  the next level, ``x_b = x_a + (sigma_b - sigma_a) eps``. The model is evaluated at the state it has,
  not the one it is going to, which is why plain inversion drifts, more so with few steps and with
  guidance. ``method="exact"`` also stores the per-step residual: the sampler is run forward from the
  inverted noise and, after each step, the difference between the inverted trajectory and the
  sampler's state is recorded and the state reset to the trajectory. Re-running the sampler with
  those residuals added (:meth:`Inversion.callback`) retraces the trajectory to float precision
  (``a + (b - a)`` is ``b`` within one rounding), for any deterministic sampler, under any guidance.
  The residuals are the "edit-friendly" noise of Huberman-Spiegelglas et al. 2024 in ODE form: reused
  under a new prompt they keep the image's structure.

  ``Inversion.noise`` is unit-variance start noise in the convention of
  ``reverie.sampling.start_noise`` before scaling, so ``sample_images(model, n, inv.options,
  prompts=inv.prompts, noise=inv.noise)`` regenerates the image (exactly, with
  ``callback=inv.callback()`` for the exact method).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .build import DiffusionModel
from .samplers.base import denoise
from .sampling import (
    SamplingOptions,
    conditions,
    guided_denoiser,
    noise_scale,
    resolve_layouts,
    sample_images,
    sigma_grid,
)

INVERSION_METHODS = ("ddim", "exact")


@dataclass
class Inversion:
    """An image inverted to start noise (see the module docstring).

    ``noise``: ``[B, C, h, w]`` unit-variance start noise (latent shape for a latent model).
    ``options``: the resolved sampling options to regenerate with (explicit layouts for a layout model).
    ``prompts``: one per image. ``residuals``: the exact method's per-step corrections (after sampler
    step i, in VE coordinates), else None. ``trajectory``: the inverted states from the image (or its
    latent) at sigma 0 up to the top of the grid, lowest first."""

    noise: Tensor
    options: SamplingOptions
    prompts: list[str]
    method: str = "ddim"
    residuals: list[Tensor] | None = None
    trajectory: list[Tensor] = field(default_factory=list, repr=False)

    def callback(self, scale: float = 1.0):
        """A sampler callback that adds the stored residuals (times ``scale``) after each step; None for
        plain inversion. ``sample_images(..., noise=self.noise, callback=self.callback())`` reconstructs."""
        if self.residuals is None:
            return None
        residuals = self.residuals

        def add_residual(step):
            return step.x + scale * residuals[step.i].to(step.x.device, step.x.dtype)

        return add_residual


def check_images(model: DiffusionModel, images: Tensor, what: str = "images") -> Tensor:
    """``images`` as float32 ``[B, C, H, W]`` in [-1, 1] of the model's image shape; else a one-line ValueError."""
    shape = tuple(model.image_shape)
    if not isinstance(images, Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != shape:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{what} must be a [B, {shape[0]}, {shape[1]}, {shape[2]}] tensor for this model, got {got}")
    if images.shape[0] < 1:
        raise ValueError(f"{what}: the batch is empty")
    if not bool(torch.isfinite(images).all()) or float(images.abs().max()) > 1 + 1e-6:
        raise ValueError(f"{what} must be finite values in [-1, 1]")
    return images.detach().float()


def encode(model: DiffusionModel, images: Tensor) -> Tensor:
    """The images in the network's space: unchanged for a pixel model, the autoencoder's latents (posterior
    mode) for a latent model; on the network's device."""
    device = next(model.net.parameters()).device
    if model.vae is None:
        return images.to(device)
    vae_device = next(model.vae.parameters()).device
    with torch.no_grad():
        return model.vae.to_latent(images.to(vae_device)).float().to(device)


def prompt_list(prompt, num_images: int) -> list[str]:
    """One prompt per image from a string or a list (a list of one is repeated)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be strings")
    if len(prompts) == 1:
        prompts = prompts * num_images
    if len(prompts) != num_images:
        raise ValueError(f"got {len(prompts)} prompts for {num_images} images")
    return prompts


def fixed_layouts(model: DiffusionModel, options: SamplingOptions, prompts: list[str]) -> SamplingOptions:
    """``options`` with the layouts made explicit (one per image) for a layout model, so that every pass of an
    edit (inversion, regeneration) sees the same boxes."""
    if not model.takes_layouts:
        return options
    layouts = resolve_layouts(model, prompts, options.layouts, options.seed)
    return dataclasses.replace(options, layouts=layouts if layouts is not None else "none")


def _model_kind(model: DiffusionModel, prompts: list[str]) -> list[str] | None:
    if model.conditioning == "text":
        return prompts
    if any(prompts):
        raise ValueError(f"this model is not text-conditioned (conditioning={model.conditioning}); give no prompt")
    return None


def input_norm(model: DiffusionModel, sigma: float) -> float:
    """The std of a noisy state at ``sigma`` (VE coordinates), by which the network's input is divided:
    sqrt(1 + sigma^2) for a VP model (its input is x_vp), sqrt(sigma^2 + sigma_data^2) for EDM (c_in)."""
    if model.cfg.model.prediction == "edm":
        return (sigma**2 + model.cfg.model.sigma_data**2) ** 0.5
    return (1 + sigma**2) ** 0.5


@torch.no_grad()
def ddim_inversion(denoiser, x: Tensor, sigmas: Tensor, cond: dict, norm=lambda sigma: (1 + sigma**2) ** 0.5
                   ) -> list[Tensor]:
    """The DDIM inversion trajectory of ``x`` (at sigma 0) up a decreasing grid ``sigmas`` that ends at 0:
    states at ``sigmas[-1], sigmas[-2], ..., sigmas[0]``.

    A step from sigma_a to sigma_b is ``x_b = x_a + (sigma_b - sigma_a) eps`` with eps the denoiser's noise
    estimate at the next level sigma_b for the current state, given to the network at the same normalized
    input (``x_a norm(sigma_b) / norm(sigma_a)``; for a VP model: the network sees x_vp at timestep t_b, as
    in Song et al. 2021 Sec. 4.3 and diffusers' DDIMInverseScheduler)."""
    levels = [float(s) for s in reversed(sigmas.tolist())]
    states = [x]
    for sigma_a, sigma_b in zip(levels[:-1], levels[1:]):
        x_in = x * (norm(sigma_b) / norm(sigma_a))
        eps = (x_in - denoise(denoiser, x_in, sigma_b, cond)) / sigma_b
        x = x + (sigma_b - sigma_a) * eps
        states.append(x)
    return states


def invert(model: DiffusionModel, images: Tensor, prompt: str | list[str] = "", options: SamplingOptions | None = None,
           method: str = "ddim", class_labels: Tensor | None = None, progress: bool = False,
           **settings) -> Inversion:
    """Invert ``images`` (``[B, C, H, W]`` in [-1, 1]) to start noise under ``prompt`` (one string, or one per
    image). ``options`` / ``settings``: :class:`SamplingOptions` (steps, grid, guidance_scale, layouts, ...);
    the sampler defaults to ddim, the one plain inversion inverts (the exact method takes any deterministic
    sampler). Layout models: give the image's layout in ``layouts`` if it is known; the default plans one
    from the prompt."""
    if method not in INVERSION_METHODS:
        raise ValueError(f"unknown inversion method {method!r}; choose one of {', '.join(INVERSION_METHODS)}")
    options = SamplingOptions.make(options, **settings)
    if options.sampler is None:
        options = dataclasses.replace(options, sampler="ddim")
    if method == "ddim" and options.sampler != "ddim":
        raise ValueError(f"plain inversion inverts the ddim sampler, not {options.sampler!r}; use method='exact' "
                         f"for other samplers")
    images = check_images(model, images)
    n = images.shape[0]
    prompts = prompt_list(prompt, n)
    options = fixed_layouts(model, options.resolve(model.cfg), prompts)
    sigmas = sigma_grid(model, options.steps, options.grid)
    text = _model_kind(model, prompts)
    cond, uncond = conditions(model, n, options, text, class_labels)
    was_training = model.net.training
    model.net.eval()
    try:
        trajectory = ddim_inversion(guided_denoiser(model, options, uncond), encode(model, images),
                                    sigmas.to(next(model.net.parameters()).device), cond,
                                    norm=lambda sigma: input_norm(model, sigma))
    finally:
        model.net.train(was_training)
    noise = (trajectory[-1] / noise_scale(model, float(sigmas[0]))).float().cpu()
    inversion = Inversion(noise, options, prompts, method, None, trajectory)
    if method == "exact":
        inversion.residuals = _residuals(model, inversion, class_labels, progress)
    return inversion


def _residuals(model: DiffusionModel, inversion: Inversion, class_labels, progress: bool) -> list[Tensor]:
    """Run the sampler from the inverted noise exactly as :func:`sample_images` does, resetting the state to
    the trajectory after each step and recording the difference."""
    targets = inversion.trajectory[::-1][1:]  # the states after sampler steps 0, 1, ..., last (sigma 0)
    residuals = []

    def record(step):
        target = targets[step.i].to(step.x.device, step.x.dtype)
        residuals.append(target - step.x)
        return step.x + residuals[-1]  # what reconstruction computes, bit for bit

    sample_images(model, len(inversion.prompts), inversion.options, prompts=_model_kind(model, inversion.prompts),
                  class_labels=class_labels, callback=record, progress=progress, noise=inversion.noise)
    return residuals
