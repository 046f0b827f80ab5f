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

* **img2img** (:func:`img2img`; SDEdit, Meng et al. 2022): the image is noised to the level that
  ``strength`` picks on the model's grid, ``x = x0 + sigma n`` in VE coordinates (x_vp = alpha x0 +
  sqrt(1 - alpha^2) n), and any sampler runs from there under the new prompt. diffusers' convention:
  ``min(int(steps * strength), steps)`` of the ``steps`` grid steps run, the last ones; strength 1 starts at
  the top of the grid. A strength that runs no step is refused (diffusers would fail later).

* **Inpainting** (:func:`inpaint`; training-free, RePaint, Lugmayr et al. 2022): masks are white (1) =
  repaint, black (0) = keep, as in diffusers. After every step down to sigma the known region is replaced
  by the input noised to sigma with fresh noise (x0 + sigma n); steps are ancestral (``eta`` 1: DDPM, as
  RePaint; 0: DDIM). RePaint's resampling: after ``jump_length`` steps down, the state is diffused back up
  those steps (``x + sqrt(sigma_hi^2 - sigma_lo^2) z``) and the block is run again, ``resample`` times in
  all, so the generated region harmonizes with the known one. A latent model blends in latent space
  (a latent cell is kept only where all its pixels are) and decodes. The known pixels are pasted back
  exactly at the end, for every model.

  A mask-aware model (``DiffusionModel.takes_masks``: fine-tuned with the masked image and the mask as extra
  input channels, ``model.inpainting``, e.g. ``configs/shapes-inpaint.yaml``) needs none of this: any sampler runs
  under its condition (``reverie.conditioning.inpaint_condition``, on both sides of guidance), and the known
  pixels are pasted back at the end as well. By default (``blend``) the known region is also put back at each
  step's noise level, as for RePaint without resampling, which keeps the fill's background continuous with it.
  ``inpaint(..., method="auto")`` uses the channels when the model has them; ``method="repaint"`` forces
  RePaint on any model. Plain generation with a mask-aware model works
  (``reverie.sampling.conditions`` gives it an all-ones mask: nothing known), as training kept 10 % of such
  masks. Measured on the shapes benchmark (``benchmarks/editing.py``, 104 scenes): the fine-tuned shapes model
  drew the new object right in 90.4 %, RePaint on the text-to-image model in 92.3 %, so none is shipped.

* **Prompt edits** (:func:`edit`): invert under the source prompt, then regenerate from that noise under the
  target prompt (with the exact method's residuals, which carry the image's structure). A layout model
  keeps the source layout's boxes, relabelled with the target's phrases, and by default blends locally
  (Prompt-to-Prompt's local blending, Hertz et al. 2022, with the layout boxes as the mask instead of
  attention maps): only the boxes whose phrase changed are regenerated, every other pixel follows the
  inverted source trajectory at each step and is the input exactly at the end. Inside those boxes the
  inverted noise still carries the old object (on the shapes model a colour edit drifted to a colour between
  the two), so ``fresh_noise`` of its variance is drawn anew from the seed there, ``sqrt(f) z + sqrt(1 - f)
  n_inv`` (unit variance kept); the box, the residuals and the rest of the image still hold position and
  size. Measured on 104 shapes scenes at guidance 4 (``benchmarks/editing.py``): f = 0 / 0.5 / 0.75 / 1
  gave 78.8 / 88.5 / 91.3 / 90.4 % successful edits.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .build import DiffusionModel
from .conditioning import inpaint_condition
from .samplers.base import SamplerStep, ancestral_step, denoise
from .sampling import (
    SamplingOptions,
    conditions,
    decode,
    noise_scale,
    noise_shape,
    resolve_layouts,
    run_sampler,
    sample_images,
    sampling_denoiser,
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


def _text_prompts(model: DiffusionModel, prompts: list[str]) -> list[str] | None:
    """The prompts for a text model; None for another (which refuses a non-empty prompt)."""
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
    text = _text_prompts(model, prompts)
    cond, uncond = conditions(model, n, options, text, class_labels)
    start = encode(model, images)
    was_training = model.net.training
    model.net.eval()
    try:
        trajectory = ddim_inversion(sampling_denoiser(model, options, cond, uncond, start.shape, text), start,
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

    sample_images(model, len(inversion.prompts), inversion.options, prompts=_text_prompts(model, inversion.prompts),
                  class_labels=class_labels, callback=record, progress=progress, noise=inversion.noise)
    return residuals


def _prepare(model: DiffusionModel, images: Tensor, prompt, options, settings) -> tuple:
    """Checked images, one prompt per image (None for a model without text), resolved options with
    explicit layouts, and the grid."""
    options = SamplingOptions.make(options, **settings)
    images = check_images(model, images)
    prompts = prompt_list(prompt, images.shape[0])
    options = fixed_layouts(model, options.resolve(model.cfg), prompts)
    return images, _text_prompts(model, prompts), options, sigma_grid(model, options.steps, options.grid)


def strength_steps(strength: float, steps: int) -> int:
    """How many of ``steps`` grid steps img2img runs at ``strength`` (diffusers: min(int(steps * strength),
    steps)); a ValueError for a strength outside (0, 1] or one that runs no step."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    run = min(int(steps * strength), steps)
    if run == 0:
        raise ValueError(f"strength {strength} of {steps} steps runs no step (int({steps} x {strength}) = 0); "
                         f"raise the strength to at least {1 / steps:.3g} or use more steps")
    return run


def _noise(model: DiffusionModel, num_images: int, seed: int) -> tuple[torch.Generator, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return g, torch.randn(noise_shape(model, num_images), generator=g, dtype=torch.float32)


def img2img(model: DiffusionModel, image: Tensor, prompt: str | list[str] = "", strength: float = 0.8,
            options: SamplingOptions | None = None, class_labels: Tensor | None = None, callback=None,
            progress: bool = False, **settings) -> Tensor:
    """SDEdit: ``image`` (``[B, C, H, W]`` in [-1, 1]) noised to the level ``strength`` picks, then sampled
    under ``prompt`` with ``options`` / ``settings`` (:class:`SamplingOptions`); images in [-1, 1]."""
    images, prompts, options, sigmas = _prepare(model, image, prompt, options, settings)
    sigmas = sigmas[len(sigmas) - 1 - strength_steps(strength, options.steps):]
    g, noise = _noise(model, images.shape[0], options.seed)
    x0 = encode(model, images)
    x = x0 + float(sigmas[0]) * noise.to(x0.device)
    out = run_sampler(model, x, sigmas, options, prompts, class_labels, g if x.device.type == "cpu" else None,
                      callback, progress)
    return decode(model, out)


def check_mask(model: DiffusionModel, mask: Tensor, num_images: int) -> Tensor:
    """``mask`` (``[H, W]``, ``[1 or B, 1, H, W]``; white/1 = repaint, black/0 = keep, values above 0.5 count
    as white) as a float 0/1 tensor ``[B, 1, H, W]`` at the image size; a one-line ValueError for a wrong size,
    an empty mask or one that repaints everything."""
    _, height, width = model.image_shape
    if not isinstance(mask, Tensor):
        raise ValueError(f"the mask must be a tensor, got {type(mask).__name__}")
    m = mask.detach().float()
    m = m.view(1, 1, *m.shape) if m.ndim == 2 else m
    if m.ndim != 4 or m.shape[1] != 1 or tuple(m.shape[2:]) != (height, width) or m.shape[0] not in (1, num_images):
        raise ValueError(f"the mask must be {height}x{width} (the image size) with one channel, got shape "
                         f"{tuple(mask.shape)}")
    m = (m > 0.5).float().expand(num_images, 1, height, width)
    counts = m.flatten(1).sum(1)
    if bool((counts == 0).any()):
        raise ValueError("the mask is empty (all black): nothing to repaint")
    if bool((counts == height * width).any()):
        raise ValueError("the mask is all white: nothing is kept; use img2img or generate instead")
    return m


def latent_mask(model: DiffusionModel, mask: Tensor) -> Tensor:
    """The mask in the network's space: a latent cell is repainted where any of its pixels is."""
    size = model.info["resolution"]
    if mask.shape[-1] == size:
        return mask
    return F.adaptive_max_pool2d(mask, size)


def repaint_path(steps: int, jump_length: int = 1, resample: int = 1) -> list[int]:
    """Grid indices RePaint visits (Lugmayr et al. 2022, Sec. 4.2): down ``jump_length`` steps, back up as
    many, ``resample`` passes per block in all; from 0 (the top) to ``steps`` (sigma 0)."""
    if jump_length < 1 or resample < 1:
        raise ValueError(f"jump_length and resample must be >= 1, got {jump_length} and {resample}")
    path, i = [0], 0
    while i < steps:
        stop = min(i + jump_length, steps)
        for k in range(resample):
            path += list(range(i + 1, stop + 1))
            if k < resample - 1:
                path += list(range(stop - 1, i - 1, -1))
        i = stop
    return path


@torch.no_grad()
def repaint(denoiser, x: Tensor, sigmas: Tensor, known: Tensor, mask: Tensor, path: list[int], cond: dict,
            generator: torch.Generator | None = None, eta: float = 1.0, callback=None) -> Tensor:
    """RePaint in VE coordinates: ``x`` at ``sigmas[path[0]]``; ``known`` the clean known content, ``mask`` 1
    where to generate. Down moves are ancestral steps (``eta``), each followed by the known region at the new
    level; up moves diffuse forward. ``callback`` sees each down move (``i`` counts moves)."""
    def noised_known(sigma):
        z = torch.randn(known.shape, generator=generator, dtype=known.dtype).to(known.device)
        return known + sigma * z

    for move, (a, b) in enumerate(zip(path[:-1], path[1:])):
        sigma, sigma_next = float(sigmas[a]), float(sigmas[b])
        if b < a:  # back up: forward diffusion sigma -> sigma_next
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            x = x + (sigma_next**2 - sigma**2) ** 0.5 * z
            continue
        denoised = denoise(denoiser, x, sigma, cond)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = denoised + (sigma_down / sigma) * (x - denoised)
        if sigma_up > 0:
            x = x + sigma_up * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        x = mask * x + (1 - mask) * noised_known(sigma_next)
        if callback is not None:
            out = callback(SamplerStep(move, sigma, sigma_next, x, denoised))
            x = x if out is None else out
    return x


INPAINT_METHODS = ("auto", "repaint", "model")


def inpaint_method(model: DiffusionModel, method: str = "auto") -> str:
    """The inpainting method ``method`` resolves to for ``model``: ``"model"`` (the mask-aware model's own mask
    channels) or ``"repaint"`` (training-free, any model); ``"auto"`` picks the model's channels when it has
    them. A ValueError for an unknown method, or ``"model"`` on a model without mask channels."""
    if method not in INPAINT_METHODS:
        raise ValueError(f"unknown inpainting method {method!r}; choose one of {', '.join(INPAINT_METHODS)}")
    if method == "model" and not model.takes_masks:
        raise ValueError("method 'model' needs a mask-aware inpainting model (trained with model.inpainting); "
                         "this one takes no mask: use 'repaint'")
    if method == "auto":
        return "model" if model.takes_masks else "repaint"
    return method


def keep_known(known: Tensor, mask: Tensor, generator: torch.Generator | None, callback=None):
    """A sampler callback that puts the known region (``mask`` 0) back after each step, noised to the step's new
    level with fresh noise (``known + sigma_next z``; exactly ``known`` at sigma 0), then calls ``callback``."""
    def step(s: SamplerStep):
        z = torch.randn(known.shape, generator=generator, dtype=known.dtype).to(known.device)
        x = mask * s.x + (1 - mask) * (known + s.sigma_next * z)
        if callback is None:
            return x
        out = callback(dataclasses.replace(s, x=x))
        return x if out is None else out

    return step


def inpaint(model: DiffusionModel, image: Tensor, mask_image: Tensor, prompt: str | list[str] = "",
            options: SamplingOptions | None = None, strength: float = 1.0, jump_length: int = 1, resample: int = 1,
            eta: float = 1.0, class_labels: Tensor | None = None, callback=None, method: str = "auto",
            blend: bool = True, progress: bool = False, **settings) -> Tensor:
    """Inpainting: repaint where ``mask_image`` is white under ``prompt``; images in [-1, 1] whose black-masked
    pixels equal the input's exactly. ``strength`` < 1 starts from the input noised partway (img2img's
    convention). ``method`` (:func:`inpaint_method`): ``"repaint"`` is training-free RePaint (``jump_length``,
    ``resample``, ``eta``; ``options.sampler`` is not used); ``"model"`` runs ``options.sampler`` on a mask-aware
    model given the masked image and the mask (RePaint's options are not used), with ``blend`` also putting the
    known region back at each step's noise level (:func:`keep_known`; measured in benchmarks/editing.py: the
    model alone leaves a faint box of other background under the mask on dark scenes)."""
    method = inpaint_method(model, method)
    images, prompts, options, sigmas = _prepare(model, image, prompt, options, settings)
    n = images.shape[0]
    mask = check_mask(model, mask_image, n)
    sigmas = sigmas[len(sigmas) - 1 - strength_steps(strength, options.steps):]
    g, noise = _noise(model, n, options.seed)
    known = encode(model, images)
    x = known + float(sigmas[0]) * noise.to(known.device)
    net_mask = latent_mask(model, mask).to(x.device)
    if method == "model":
        g_steps = g if x.device.type == "cpu" else None
        steps_callback = keep_known(known, net_mask, g, callback) if blend else callback
        out = run_sampler(model, x, sigmas, options, prompts, class_labels, g_steps, steps_callback, progress,
                          inpaint=inpaint_condition(known, net_mask))
    else:
        cond, uncond = conditions(model, n, options, prompts, class_labels)
        was_training = model.net.training
        model.net.eval()
        try:
            out = repaint(sampling_denoiser(model, options, cond, uncond, x.shape, prompts), x, sigmas, known, net_mask,
                          repaint_path(len(sigmas) - 1, jump_length, resample), cond, g, eta, callback)
        finally:
            model.net.train(was_training)
    out = decode(model, out).to(images.device)
    return mask.to(out.device) * out + (1 - mask.to(out.device)) * images


def target_layouts(model: DiffusionModel, source: SamplingOptions, targets: list[str]) -> SamplingOptions:
    """The source options for the target prompts: a layout model keeps each source box, relabelled with the
    phrase the target prompt's own plan gives that object (the boxes alone when the object counts differ)."""
    if not model.takes_layouts or isinstance(source.layouts, str):
        return source
    planned = resolve_layouts(model, targets, "auto", source.seed) or [None] * len(targets)
    layouts = []
    for old, new in zip(source.layouts, planned):
        if old and new and len(old) == len(new):
            old = [(phrase, box) for (_, box), (phrase, _) in zip(old, new)]
        layouts.append(old)
    return dataclasses.replace(source, layouts=layouts)


def changed_boxes_mask(model: DiffusionModel, source: SamplingOptions, target: SamplingOptions,
                       margin: float = 2.0) -> Tensor | None:
    """Local blending's mask (``[B, 1, H, W]`` 0/1 at the image size): the boxes whose phrase differs between the
    source and the target layouts (:func:`target_layouts`), grown by ``margin`` pixels; all ones for an image
    where no box changed (its edit is not local). None when the model takes no layouts or no box changed."""
    if not model.takes_layouts or isinstance(source.layouts, str) or isinstance(target.layouts, str):
        return None
    _, height, width = model.image_shape
    ys = (torch.arange(height) + 0.5).view(-1, 1)
    xs = (torch.arange(width) + 0.5).view(1, -1)
    masks, any_changed = [], False
    for old, new in zip(source.layouts, target.layouts):
        m = torch.zeros(height, width)
        for (phrase, box), (new_phrase, _) in zip(old or [], new or []):
            if phrase != new_phrase:
                x0, y0, x1, y1 = box[0] * width, box[1] * height, box[2] * width, box[3] * height
                inside = (xs > x0 - margin) & (xs < x1 + margin) & (ys > y0 - margin) & (ys < y1 + margin)
                m = torch.maximum(m, inside.float())
        any_changed |= bool(m.any())
        masks.append(m if m.any() else torch.ones(height, width))
    return torch.stack(masks)[:, None] if any_changed else None


def local_blend_step(trajectory: list[Tensor], mask: Tensor):
    """Prompt-to-Prompt's local blending (Hertz et al. 2022, Sec. 3.3) with a given mask: a sampler callback that
    keeps the region where ``mask`` is 0 on the source trajectory, ``x <- m x + (1 - m) x_src(sigma_next)``;
    ``trajectory`` is :attr:`Inversion.trajectory` (lowest first)."""
    targets = trajectory[::-1][1:]  # the source states after sampler steps 0, 1, ..., last (sigma 0)

    def step(s: SamplerStep):
        m = mask.to(s.x.device, s.x.dtype)
        return m * s.x + (1 - m) * targets[s.i].to(s.x.device, s.x.dtype)

    return step


FRESH_NOISE = 0.75  # edit()'s default share of fresh start noise in the changed boxes (module docstring)


def _chain(first, then):
    """A sampler callback running ``first`` and then ``then`` on its result (either may be None)."""
    if first is None or then is None:
        return first or then

    def both(step: SamplerStep):
        out = first(step)
        if out is not None:
            step = dataclasses.replace(step, x=out)
        out = then(step)
        return step.x if out is None else out

    return both


def edit(model: DiffusionModel, image: Tensor, source_prompt: str | list[str], target_prompt: str | list[str],
         options: SamplingOptions | None = None, method: str = "exact", class_labels: Tensor | None = None,
         progress: bool = False, local_blend: bool | str = "auto", blend_margin: float = 2.0,
         fresh_noise: float = FRESH_NOISE, callback=None, **settings) -> Tensor:
    """A prompt edit: invert ``image`` under ``source_prompt`` (``method``: see :func:`invert`), regenerate
    under ``target_prompt`` from the same noise (and residuals); images in [-1, 1].

    ``local_blend`` (layout models): the boxes whose phrase the edit changes, grown by ``blend_margin`` pixels,
    are the only region regenerated; elsewhere every step is put back on the inverted source trajectory
    (:func:`local_blend_step`), and the source pixels are pasted there at the end, so everything outside the
    changed boxes is the input exactly. ``"auto"``: on when the model takes layouts and some box changed;
    ``True`` refuses a model without layouts; ``False``: the whole image is regenerated. ``fresh_noise`` in
    [0, 1]: with local blending, the share of the start noise's variance drawn anew (from ``options.seed``)
    inside the regenerated boxes, so that the old object's colour does not leak into the new one (0: the
    inverted noise only; see the module docstring for what each gave). ``callback``: a sampler callback run
    after each step of the regeneration (progress, cancelling), after the residuals and the blend."""
    if local_blend not in (True, False, "auto"):
        raise ValueError(f"local_blend must be True, False or 'auto', got {local_blend!r}")
    if isinstance(fresh_noise, bool) or not isinstance(fresh_noise, (int, float)) or not 0 <= fresh_noise <= 1:
        raise ValueError(f"fresh_noise must be in [0, 1], got {fresh_noise!r}")
    if local_blend is True and not model.takes_layouts:
        raise ValueError("local blending needs a layout-conditioned model (its boxes are the mask); this one takes "
                         "no layouts")
    inv = invert(model, image, source_prompt, options, method=method, class_labels=class_labels,
                 progress=progress, **settings)
    targets = prompt_list(target_prompt, len(inv.prompts))
    options = target_layouts(model, inv.options, targets)
    outer, callback = callback, inv.callback()
    mask = changed_boxes_mask(model, inv.options, options, blend_margin) if local_blend else None
    noise = inv.noise
    if mask is not None:
        inside = latent_mask(model, mask)
        callback = _chain(callback, local_blend_step(inv.trajectory, inside))  # after the residuals
        if fresh_noise > 0:
            inside = inside.to(noise.device, noise.dtype)
            fresh = _noise(model, noise.shape[0], options.seed)[1].to(noise.device)
            noise = inside * (fresh_noise ** 0.5 * fresh + (1 - fresh_noise) ** 0.5 * noise) + (1 - inside) * noise
    out = sample_images(model, len(targets), options, prompts=_text_prompts(model, targets), class_labels=class_labels,
                        callback=_chain(callback, outer), progress=progress, noise=noise)
    if mask is None:
        return out
    images = check_images(model, image).to(out.device)
    mask = mask.to(out.device)
    return mask * out + (1 - mask) * images
