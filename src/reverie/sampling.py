"""Sampling a diffusion model for inference: one :class:`SamplingOptions`, used by every caller.

``Pipeline``, the trainer's sample grids, evaluation, grid tuning and the PNG metadata of ``reverie
generate`` all describe how to sample with :class:`SamplingOptions`, one name per setting. A field left
at None means "the model's own setting": :meth:`SamplingOptions.resolve` fills it from the ``sample``
section of the model's training config, the one place where defaults live (the library-wide defaults
are that section's field defaults, ``reverie.train.config.SampleSection``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .audio import MelSpec
from .build import DiffusionModel, build_dataset
from .conditioning import inpaint_condition
from .guidance import CFGDenoiser, RegionalDenoiser
from .heat import IHDM, BlurringSchedule, blurring_sample, dct_bounds, ihdm_sample
from .images import save_grid
from .layout import check_layout, get_planner, is_clip_layout, object_regions, plan_layouts, region_weights
from .limits import MAX_GUIDANCE, MAX_STEPS
from .pfgm import pfgm_noise
from .process import frame_noise
from .samplers import GRIDS, SIGMA_GRIDS, TunedGrid, check_grid, check_sampler, get_sigmas, sample, tune_sigmas

EDM_SIGMA_RANGE = (0.002, 80.0)  # EDM's sampling range (Karras et al. 2022)


@dataclass
class SamplingOptions:
    """How to sample. None: the model's own setting (see :meth:`resolve`).

    ``grid`` is a grid kind (``reverie.samplers.GRIDS``) or explicit decreasing sigmas ending at 0 (a
    tuned grid's), whose length fixes the steps. ``layouts`` (layout models): ``"auto"`` plans object
    boxes from each prompt, ``"none"`` uses the prompt alone, or a list of per-image layouts
    ``[(phrase, (x0, y0, x1, y1)), ...]`` (one entry: the same for every image; see ``reverie.layout``).
    """

    sampler: str | None = None
    steps: int | None = None
    grid: str | torch.Tensor | None = None
    guidance_scale: float | None = None
    guidance_rescale: float = 0.0
    negative_prompt: str = ""
    layouts: str | list = "auto"
    seed: int = 0
    corrector_steps: int | None = None  # pc sampler: Langevin steps per level (None: the sampler's 1)
    snr: float | None = None            # pc sampler: the corrector's signal-to-noise ratio (None: 0.16)
    # clamp every x0 estimate to [-1, 1] (DDPM's clip_denoised, diffusers' clip_sample); pixel-space models only
    clip_denoised: bool = False
    # layout models: each object's box denoised under its own phrase (reverie.guidance.RegionalDenoiser); None: the
    # model's sample.regional, where layouts are given
    regional: bool | None = None

    def __post_init__(self):
        self.validate()

    @classmethod
    def make(cls, options: SamplingOptions | None = None, **settings) -> SamplingOptions:
        """``options`` (default: all the model's settings) with the named ``settings`` replaced; an unknown
        name is a ValueError listing the valid ones."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise ValueError(f"unknown sampling option(s) {', '.join(unknown)}; valid: {', '.join(names)}")
        return dataclasses.replace(options or cls(), **settings)

    def validate(self) -> None:
        """Raise a ValueError naming the first invalid setting and what is valid."""
        if self.sampler is not None:
            check_sampler(self.sampler)
        _check_number("steps", self.steps, int, 1, MAX_STEPS, optional=True)
        _check_number("guidance_scale", self.guidance_scale, float, 0, MAX_GUIDANCE, optional=True)
        _check_number("guidance_rescale", self.guidance_rescale, float, 0, 1)
        _check_number("seed", self.seed, int, 0, 2**63 - 1)
        _check_number("corrector_steps", self.corrector_steps, int, 0, MAX_STEPS, optional=True)
        _check_number("snr", self.snr, float, 1e-6, 10.0, optional=True)
        if (self.corrector_steps is not None or self.snr is not None) and self.sampler not in (None, "pc"):
            raise ValueError(f"corrector_steps and snr are options of the pc sampler, not {self.sampler}")
        for flag in ("clip_denoised", "regional"):
            if not isinstance(getattr(self, flag), bool) and not (flag == "regional" and self.regional is None):
                raise ValueError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        if self.regional and self.layouts == "none":
            raise ValueError("regional prompts need layouts: use layouts 'auto' or give them")
        if not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string, got {self.negative_prompt!r}")
        if isinstance(self.grid, str):
            if self.grid not in GRIDS:
                raise ValueError(f"unknown sigma grid {self.grid!r}; choose one of {', '.join(GRIDS)}")
        elif self.grid is not None:
            self.grid = check_grid(self.grid)
            if self.steps is not None and self.steps != len(self.grid) - 1:
                raise ValueError(f"the grid has {len(self.grid) - 1} steps, not {self.steps}; leave the steps out")
        if isinstance(self.layouts, str) and self.layouts not in ("auto", "none"):
            raise ValueError(f"layouts must be 'auto', 'none' or a list of layouts, got {self.layouts!r}")

    def resolve(self, cfg) -> SamplingOptions:
        """A copy with every None filled from the model config's ``sample`` section."""
        sample = cfg.sample
        grid = sample.grid if self.grid is None else self.grid
        steps = self.steps if self.steps is not None else (
            sample.steps if isinstance(grid, str) else len(grid) - 1)
        regional = self.regional
        if regional is None:  # the model's default holds where it can: a text model with layouts given
            regional = bool(getattr(sample, "regional", False) and self.layouts != "none"
                            and cfg.model.conditioning == "text" and cfg.model.layout_channels)
        return dataclasses.replace(
            self, sampler=self.sampler or sample.sampler, grid=grid, steps=steps, regional=regional,
            guidance_scale=sample.guidance_scale if self.guidance_scale is None else self.guidance_scale)

    def sampler_options(self) -> dict:
        """Keyword options for the sampler function (the pc sampler's corrector settings, where given)."""
        opts = {"corrector_steps": self.corrector_steps, "snr": self.snr}
        return {k: v for k, v in opts.items() if v is not None} if self.sampler == "pc" else {}

    def to_metadata(self) -> dict:
        """The settings as PNG metadata (JSON). The PNG format's key names predate this class and are kept,
        so that files made by earlier versions reproduce: ``guidance`` and ``layout`` (one layout for every
        image; ``layouts`` when they differ per image)."""
        grid = self.grid if self.grid is None or isinstance(self.grid, str) else [float(v) for v in self.grid]
        meta = {"sampler": self.sampler, "steps": self.steps, "grid": grid, "guidance": self.guidance_scale,
                "guidance_rescale": self.guidance_rescale, "negative_prompt": self.negative_prompt, "seed": self.seed}
        if isinstance(self.layouts, str):
            meta["layout"] = self.layouts
        elif len(self.layouts) == 1:
            meta["layout"] = _layout_json(self.layouts[0])
        else:
            meta["layouts"] = [_layout_json(lay) for lay in self.layouts]
        meta.update({k: v for k, v in (("corrector_steps", self.corrector_steps), ("snr", self.snr)) if v is not None})
        for flag in ("clip_denoised", "regional"):  # only when on: files written without them stay as they were
            if getattr(self, flag):
                meta[flag] = True
        return meta

    @classmethod
    def from_metadata(cls, meta: dict, source: str = "the metadata") -> SamplingOptions:
        """Inverse of :meth:`to_metadata`; a missing or ill-typed value is a ValueError naming ``source``."""
        try:
            grid = meta.get("grid")  # PNGs from before --grid have none
            layouts = meta["layouts"] if "layouts" in meta else meta.get("layout", "auto")
            if not isinstance(layouts, str) and "layouts" not in meta:
                layouts = [layouts]
            if not isinstance(layouts, str):
                layouts = [None if lay is None else check_layout(lay, "layout") for lay in layouts]
            return cls(sampler=meta["sampler"], steps=meta["steps"], guidance_scale=meta["guidance"],
                       guidance_rescale=meta.get("guidance_rescale", 0.0), seed=meta.get("seed", 0),
                       negative_prompt=meta.get("negative_prompt", ""), layouts=layouts,
                       corrector_steps=meta.get("corrector_steps"), snr=meta.get("snr"),
                       clip_denoised=meta.get("clip_denoised", False), regional=meta.get("regional", False),
                       grid=torch.tensor(grid, dtype=torch.float64) if isinstance(grid, list) else grid)
        except KeyError as e:
            raise ValueError(f"{source} lacks the generation parameter {e.args[0]!r}") from None
        except (ValueError, TypeError) as e:
            raise ValueError(f"{source}: {e}") from None


def _layout_json(layout):
    return None if layout is None else [[phrase, [float(v) for v in box]] for phrase, box in layout]


def _check_number(name: str, value, kind: type, lo: float, hi: float, optional: bool = False) -> None:
    if value is None and optional:
        return
    ok_type = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    if not ok_type or isinstance(value, bool) or (kind is float and not math.isfinite(value)):
        raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be between {lo} and {hi}, got {value}")


def sigma_range(model: DiffusionModel) -> tuple[float, float]:
    """The noise levels a model samples over: EDM's (0.002, 80), or a VP schedule's own range."""
    if model.cfg.model.prediction == "edm":
        return EDM_SIGMA_RANGE
    return float(model.schedule.sigma_min), float(model.schedule.sigma_max)


def sigma_grid(model: DiffusionModel, steps: int, grid) -> torch.Tensor:
    """The sigma grid of ``steps`` steps: ``grid`` names a kind, or is explicit sigmas inside the model's range."""
    lo, hi = sigma_range(model)
    if not isinstance(grid, str):
        sigmas = check_grid(grid)
        if float(sigmas[0]) > hi * (1 + 1e-6) or float(sigmas[-2]) < lo * (1 - 1e-6):
            raise ValueError(f"the grid spans sigma {float(sigmas[-2]):.4g} .. {float(sigmas[0]):.4g}, outside "
                             f"this model's range {lo:.4g} .. {hi:.4g}")
        return sigmas
    if model.cfg.model.prediction == "edm":
        if grid not in SIGMA_GRIDS:
            raise ValueError(f"an EDM model samples on a sigma grid ({', '.join(SIGMA_GRIDS)}), not {grid!r}, "
                             f"which needs a VP model's timestep table")
        return get_sigmas(grid, steps, *EDM_SIGMA_RANGE)
    return get_sigmas(grid, steps, schedule=model.schedule)


def resolve_layouts(model: DiffusionModel, prompts: list[str], layouts="auto", seed: int = 0) -> list | None:
    """Per-image layouts for a layout model: ``"auto"`` plans them from the prompts with the training
    data's planner (``reverie.layout``), ``"none"`` or None gives none, a list holds one per image (or
    one for all). Models without layout conditioning take only ``"auto"`` / ``"none"`` / None."""
    if layouts is None or isinstance(layouts, str):  # "auto" or "none" (SamplingOptions checks the spelling)
        if layouts != "auto" or not model.takes_layouts:
            return None
        planner = get_planner(model.cfg.data.name)
        if planner is not None and model.info.get("frames"):  # a video planner: per-frame layouts
            planner = functools.partial(planner, frames=model.info["frames"])
        elif planner is not None and model.info.get("audio"):  # a sound planner: the model's spectrogram rows
            planner = functools.partial(planner, mel=MelSpec.from_dict(model.info["audio"]["mel"]))
        return plan_layouts(planner, prompts, seed)
    if not model.takes_layouts:
        raise ValueError("this model takes no layouts (it was trained without model.layout_channels)")
    layouts = list(layouts)
    if len(layouts) == 1:
        layouts = layouts * len(prompts)
    if len(layouts) != len(prompts):
        raise ValueError(f"got {len(layouts)} layouts for {len(prompts)} images")
    return layouts


def conditions(model: DiffusionModel, num_images: int, options: SamplingOptions, prompts: list[str] | None = None,
               class_labels: torch.Tensor | None = None, inpaint: torch.Tensor | None = None) -> tuple[dict, dict]:
    """``(cond, uncond)`` keyword arguments for the network; empty dicts for unconditional models.
    Layouts (layout models): see :func:`resolve_layouts`; the unconditional side has none. A mask-aware
    inpainting model gets ``inpaint`` (``reverie.conditioning.inpaint_condition``) on both sides of guidance
    (guidance contrasts the prompts, not what is known); without it, an all-ones mask: plain generation."""
    cond, uncond = _prompt_conditions(model, num_images, options, prompts, class_labels)
    prior = getattr(model.net, "prior_condition", None)  # reverie.mulan: each image's latent from its prior
    if prior is not None:
        cond = {**cond, **prior(num_images, options.seed)}
    if model.takes_masks:
        if inpaint is None:
            size = noise_shape(model, num_images)
            inpaint = inpaint_condition(torch.zeros(size), torch.ones(size[0], 1, *size[2:]))
        inpaint = inpaint.to(next(model.net.parameters()).device)
        cond = {**cond, "inpaint": inpaint}
        uncond = {**uncond, "inpaint": inpaint} if uncond else uncond
    return cond, uncond


def _prompt_conditions(model: DiffusionModel, num_images: int, options: SamplingOptions, prompts, class_labels
                       ) -> tuple[dict, dict]:
    net = model.net
    device = next(net.parameters()).device
    if model.conditioning == "class":
        if class_labels is None:
            class_labels = torch.arange(num_images) % model.info["num_classes"]
        null = torch.full((num_images,), model.info["num_classes"], dtype=torch.long)
        return {"class_labels": class_labels.to(device)}, {"class_labels": null.to(device)}
    if model.conditioning == "text":
        prompts = list(prompts) if prompts else [""]
        prompts = (prompts * num_images)[:num_images]
        layouts = resolve_layouts(model, prompts, options.layouts, options.seed)
        negative = [options.negative_prompt] * num_images
        if layouts is None:
            return net.encode(prompts), net.encode(negative)
        frames = model.info.get("frames")
        if frames:  # a video's layouts are per frame: none, or one image layout, holds in every frame
            layouts = [lay if is_clip_layout(lay) else [lay or None] * frames for lay in layouts]
        return net.encode(prompts, layouts), net.encode(negative, [[None] * frames if frames else None] * num_images)
    return {}, {}


def regional_conditions(model: DiffusionModel, shape: tuple, options: SamplingOptions, prompts: list[str] | None,
                        cond: dict) -> tuple[list[dict], torch.Tensor]:
    """Regional prompting's ``(regions, weights)`` (``reverie.guidance.RegionalDenoiser``): per object slot j,
    the condition of each image's j-th layout object alone (its phrase as the caption, or the prompt where a clip's
    frames name it differently; its boxes as the layout; the whole prompt's condition where an image has no such
    object, with weight 0), and the objects' box weights."""
    if model.conditioning != "text" or not model.takes_layouts:
        raise ValueError("regional prompts need a text model trained with layouts (model.layout_channels)")
    num_images = shape[0]
    prompts = (list(prompts) if prompts else [""]) * num_images
    prompts = prompts[:num_images]
    layouts = resolve_layouts(model, prompts, options.layouts, options.seed)
    if layouts is None:
        raise ValueError("regional prompts need layouts: use layouts 'auto' or give them")
    frames = model.info.get("frames")
    if frames:
        layouts = [lay if is_clip_layout(lay) else [lay or None] * frames for lay in layouts]
    regions = object_regions(layouts)
    conds = []
    for row in regions:
        texts = [item[0] if item and item[0] else p for item, p in zip(row, prompts)]
        lays = [item[1] if item else lay for item, lay in zip(row, layouts)]
        conds.append({**cond, **model.net.encode(texts, lays)})
    return conds, region_weights(regions, shape)


def noise_shape(model: DiffusionModel, num_images: int) -> tuple[int, ...]:
    """Shape of the start noise: the network's input (the latent shape for a latent model). Square at
    ``info["resolution"]`` unless ``info`` names ``latent_height``/``latent_width`` (a Stable Diffusion model
    after ``reverie.sd.set_image_size``); a video model's (``info["frames"]``) is ``(B, C, T, H, W)``."""
    size = model.info["resolution"]
    frames = (model.info["frames"],) if model.info.get("frames") else ()
    return (num_images, model.info["in_channels"], *frames, model.info.get("latent_height", size),
            model.info.get("latent_width", size))


def noise_scale(model: DiffusionModel, sigma_top: float) -> float:
    """Factor from unit-variance noise n to the sampler's start x = n * scale at ``sigma_top`` (VE
    coordinates): sigma for an EDM model; sqrt(1 + sigma^2) for a VP model, whose start is pure noise in VP
    coordinates (x_vp = n)."""
    return sigma_top if model.cfg.model.prediction == "edm" else (1 + sigma_top**2) ** 0.5


def start_noise(model: DiffusionModel, num_images: int, sigma_top: float, generator: torch.Generator) -> torch.Tensor:
    """Pure noise at the top of the grid, in the sampler's (VE) coordinates, drawn on the CPU (see
    :func:`noise_scale`)."""
    if model.cfg.model.pfgm_d:  # PFGM++: the prior is the perturbation kernel at sigma_top (reverie.pfgm)
        noise = pfgm_noise(noise_shape(model, num_images), model.cfg.model.pfgm_d, generator=generator)
    else:
        # a video model's frames may share part of their noise (model.frame_noise_correlation; rho = 0: plain randn)
        noise = frame_noise(noise_shape(model, num_images), model.cfg.model.frame_noise_correlation, generator)
    return noise * noise_scale(model, sigma_top)


def check_noise(model: DiffusionModel, num_images: int, noise: torch.Tensor) -> torch.Tensor:
    """``noise`` as float32 if it is a finite tensor of :func:`noise_shape`; otherwise a one-line ValueError."""
    shape = noise_shape(model, num_images)
    if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != shape:
        got = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"the start noise must have shape {shape} for {num_images} image(s), got {got}")
    if not bool(torch.isfinite(noise).all()):
        raise ValueError("the start noise holds non-finite values")
    return noise.detach().float().cpu()


def guided_denoiser(model: DiffusionModel, options: SamplingOptions, uncond: dict, regional: tuple | None = None):
    """The model's denoiser, under classifier-free guidance when it is conditioned and the scale is not 1, with
    its x0 estimate clamped to [-1, 1] after guidance under ``options.clip_denoised``. ``regional``: the
    ``(regions, weights)`` of :func:`regional_conditions` (regional prompting with its own guidance)."""
    denoiser = model.denoiser
    if regional is not None:
        denoiser = RegionalDenoiser(denoiser, *regional, uncond=uncond, guidance_scale=options.guidance_scale,
                                    guidance_rescale=options.guidance_rescale)
    elif uncond and options.guidance_scale != 1.0:
        denoiser = CFGDenoiser(denoiser, uncond, guidance_scale=options.guidance_scale,
                               guidance_rescale=options.guidance_rescale)
    if options.clip_denoised:
        if model.vae is not None:
            raise ValueError("clip_denoised clamps x0 estimates to the pixel range [-1, 1]; this is a latent model, "
                             "whose x0 lives in its autoencoder's latent space")
        wrap = ClippedVarianceDenoiser if hasattr(denoiser, "forward_with_variance") else ClippedDenoiser
        denoiser = wrap(denoiser)
    return denoiser


def sampling_denoiser(model: DiffusionModel, options: SamplingOptions, cond: dict, uncond: dict, shape: tuple,
                      prompts: list[str] | None = None):
    """:func:`guided_denoiser` for samples of ``shape`` (the network's space), with ``options.regional``'s regions
    built from ``cond`` and ``prompts``: what every sampling path (and inversion) calls the network through."""
    regional = regional_conditions(model, shape, options, prompts, cond) if options.regional else None
    return guided_denoiser(model, options, uncond, regional)


class ClippedDenoiser:
    """D'(x, sigma) = clamp(D(x, sigma), -1, 1): DDPM's ``clip_denoised`` for any sampler that calls a denoiser.
    An eps network's x0 estimate x - sigma eps_hat carries sigma times its eps error, which at a large sigma (VE:
    up to 80-380) can leave the data range by far on an undertrained model; every sampler then steps toward it."""

    def __init__(self, denoiser):
        self.inner = denoiser

    def __call__(self, x, sigma, **cond):
        return self.inner(x, sigma, **cond).clamp(-1, 1)

    def __getattr__(self, name):  # samplers may read attributes of the model's denoiser (e.g. its prediction)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


class ClippedVarianceDenoiser(ClippedDenoiser):
    """``ClippedDenoiser`` of a denoiser that also predicts its variance (``ddpm`` with ``variance="learned"``)."""

    def forward_with_variance(self, x, sigma, **cond):
        denoised, frac = self.inner.forward_with_variance(x, sigma, **cond)
        return denoised.clamp(-1, 1), frac


@torch.no_grad()
def sample_images(model: DiffusionModel, num_images: int, options: SamplingOptions | None = None,
                  prompts: list[str] | None = None, class_labels: torch.Tensor | None = None,
                  callback=None, progress: bool = False, noise: torch.Tensor | None = None) -> torch.Tensor:
    """``num_images`` samples in [-1, 1] (decoded by the model's autoencoder for a latent model). The
    initial noise is drawn on the CPU, so a seed starts from the same noise on every device; ancestral
    samplers' per-step noise uses the device's own generator, so their images match across devices only
    in distribution.

    ``noise``: start from this unit-variance noise of :func:`noise_shape` instead of drawing it (scaled by
    :func:`noise_scale`, exactly as a drawn one; e.g. ``reverie.editing.invert``'s ``Inversion.noise``).
    The seed still drives the per-step noise of ancestral samplers, as it would after drawing the noise."""
    options = (options or SamplingOptions()).resolve(model.cfg)
    if model.cfg.model.process != "gaussian":
        if options.clip_denoised:
            raise ValueError(f"clip_denoised is an option of Gaussian diffusion models; this {model.cfg.model.process} "
                             f"model's sampler bounds its own estimates")
        return heat_images(model, num_images, options, callback=callback)
    sigmas = sigma_grid(model, options.steps, options.grid)
    device = next(model.net.parameters()).device
    g = torch.Generator().manual_seed(options.seed)
    x = start_noise(model, num_images, float(sigmas[0]), g)  # drawn either way: the same per-step noise follows
    if noise is not None:
        x = check_noise(model, num_images, noise) * noise_scale(model, float(sigmas[0]))
    x = x.to(device)
    g_steps = g if device.type == "cpu" else torch.Generator(device).manual_seed(options.seed)
    out = run_sampler(model, x, sigmas, options, prompts, class_labels, g_steps, callback, progress)
    return decode(model, out)


@torch.no_grad()
def run_sampler(model: DiffusionModel, x: torch.Tensor, sigmas: torch.Tensor, options: SamplingOptions,
                prompts: list[str] | None = None, class_labels: torch.Tensor | None = None,
                generator: torch.Generator | None = None, callback=None, progress: bool = False,
                inpaint: torch.Tensor | None = None) -> torch.Tensor:
    """Run ``options.sampler`` (resolved options) from ``x`` at ``sigmas[0]`` down ``sigmas`` under the prompts'
    conditioning and guidance, the network in eval mode; the result in the network's space. ``inpaint``: a
    mask-aware model's masked image and mask (see :func:`conditions`)."""
    cond, uncond = conditions(model, x.shape[0], options, prompts, class_labels, inpaint)
    denoiser = sampling_denoiser(model, options, cond, uncond, x.shape, prompts)
    # switching a few hundred modules' modes costs ~2 ms a call: a loaded Pipeline is already in eval mode
    toggle = any(m.training for m in model.net.modules())
    was_training = model.net.training
    if toggle:
        model.net.eval()
    try:
        return sample(options.sampler, denoiser, x, sigmas.to(x.device), generator=generator, cond=cond,
                      callback=callback, progress=progress, **options.sampler_options())
    finally:
        if toggle:
            model.net.train(was_training)


def decode(model: DiffusionModel, out: torch.Tensor) -> torch.Tensor:
    """Network-space samples as images in [-1, 1] (decoded by the autoencoder for a latent model)."""
    if model.vae is not None:
        out = model.vae.from_latent(out.to(next(model.vae.parameters()).device))
    return out.clamp(-1, 1)


@torch.no_grad()
def blurring_bounds(model: DiffusionModel, n: int = 2000):
    """Per-DCT-coefficient bounds of the x0 estimate for blurring diffusion (``reverie.heat.dct_bounds``: mean -+ 3
    std of the first ``n`` training images' coefficients), computed once per loaded model."""
    bounds = getattr(model, "_blurring_bounds", None)
    if bounds is None:
        data = build_dataset(model.cfg)
        bounds = dct_bounds(torch.stack([data[i]["image"] for i in range(min(n, len(data)))]))
        model._blurring_bounds = bounds
    return bounds


def heat_images(model: DiffusionModel, num_images: int, options: SamplingOptions, callback=None) -> torch.Tensor:
    """Samples of a heat-equation model (``model.process``; ``reverie.heat``): blurring diffusion's ancestral
    sampler over ``options.steps`` steps, or IHDM's K-step noisy sampler from training images blurred to the
    top level plus noise (``options.steps`` and the grid do not apply). The sampler's name is not used."""
    h, net = model.cfg.heat, model.net
    device = next(net.parameters()).device
    g = torch.Generator().manual_seed(options.seed)
    was_training = net.training
    net.eval()
    try:
        if model.cfg.model.process == "blurring":
            schedule = BlurringSchedule(blur_max=h.blur_max, d_min=h.d_min)
            noise = torch.randn(noise_shape(model, num_images), generator=g).to(device)
            return blurring_sample(net, noise, schedule, options.steps, generator=g, callback=callback,
                                   u0_bounds=blurring_bounds(model)).clamp(-1, 1)
        process = IHDM(h.num_levels, h.blur_min, h.blur_max, h.noise)
        data = build_dataset(model.cfg)
        idx = torch.randint(0, len(data), (num_images,), generator=g)
        images = torch.stack([data[int(i)]["image"] for i in idx]).to(device)
        return ihdm_sample(net, process.prior(images, g), process, generator=g, callback=callback).clamp(-1, 1)
    finally:
        net.train(was_training)


@torch.no_grad()
def tune_grid(model: DiffusionModel, options: SamplingOptions, pilot: int = 16, prompts: list[str] | None = None,
              teacher_steps: int = 100, teacher_grid: str | None = None, progress: bool = False, **tuning) -> TunedGrid:
    """A grid of ``options.steps`` levels for ``options.sampler`` tuned to this model
    (``reverie.samplers.tune_sigmas``), on ``pilot`` start states from noise seed ``options.seed`` (keep it
    apart from the seeds you will sample with), under the same conditioning and guidance as
    :func:`sample_images`. The teacher is dpmpp_2m on ``teacher_grid`` (a grid kind; default: the model's
    own) at ``teacher_steps``; ``tuning`` goes to ``tune_sigmas``."""
    options = options.resolve(model.cfg)
    lo, hi = sigma_range(model)
    own_kind = model.cfg.sample.grid
    default = sigma_grid(model, options.steps, own_kind)
    # the model's own grid is scored beside the tuned one (and may be the best start)
    starts = {own_kind: default} if abs(float(default[0]) / hi - 1) < 1e-9 and float(default[-2]) >= lo else {}
    # the teacher: the model's own grid kind at many steps (a model may be poor at sigmas its own grid never
    # visits, e.g. an eps model below its trailing grid's last level)
    teacher_kind = teacher_grid or own_kind
    teacher_sigmas = sigma_grid(model, teacher_steps, teacher_kind)
    if abs(float(teacher_sigmas[0]) / hi - 1) > 1e-9:
        raise ValueError(f"a {teacher_kind} grid starts at sigma {float(teacher_sigmas[0]):.4g}, below this model's "
                         f"top {hi:.4g} where tuning starts; pick a teacher grid that starts there "
                         f"(e.g. ddim-trailing)")
    device = next(model.net.parameters()).device
    x = start_noise(model, pilot, hi, torch.Generator().manual_seed(options.seed)).to(device)
    cond, uncond = conditions(model, pilot, options, prompts)
    denoiser = guided_denoiser(model, options, uncond)
    was_training = model.net.training
    model.net.eval()
    try:
        tuned = tune_sigmas(denoiser, x, options.sampler, options.steps, lo, hi, cond=cond,
                            teacher_grid=teacher_sigmas, seed=options.seed, starts=starts, progress=progress, **tuning)
    finally:
        model.net.train(was_training)
    tuned.teacher_grid = teacher_kind
    return tuned


def save_sample_grid(model: DiffusionModel, path: Path) -> Path:
    """A PNG grid of the config's sample images (``sample`` section: count, prompts, settings)."""
    sample_cfg = model.cfg.sample
    prompts = sample_cfg.prompts or None
    images = sample_images(model, sample_cfg.num_images, SamplingOptions(), prompts=prompts)
    # prompts repeat cyclically over the images: one column per prompt when they tile the grid exactly
    ncols = len(prompts) if prompts and len(images) % len(prompts) == 0 and len(prompts) <= 16 else None
    if images.ndim == 5:  # clips (B, C, T, H, W): one row of frames per clip
        ncols = images.shape[2]
        images = images.transpose(1, 2).flatten(0, 1)
    return save_grid(images, path, ncols=ncols)


def available_memory(device: torch.device | None = None) -> int:
    """Bytes of memory this process may use: ``REVERIE_MEMORY_GB`` if set; else on a GPU its free memory, on
    the CPU the system's available memory (``MemAvailable``; 4 GB where it cannot be read) shared by the local
    processes of a multi-process run."""
    if os.environ.get("REVERIE_MEMORY_GB"):
        try:
            return int(float(os.environ["REVERIE_MEMORY_GB"]) * 2**30)
        except ValueError:
            raise ValueError(f"REVERIE_MEMORY_GB must be a number of GB, got {os.environ['REVERIE_MEMORY_GB']!r}") \
                from None
    if device is not None and device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // local
    except OSError:
        pass
    return 4 * 2**30 // local


@torch.no_grad()
def bytes_per_image(model: DiffusionModel, guided: bool = True) -> int:
    """An upper bound on the memory one image of a sampling batch needs: every module's output of one
    denoiser call on one image, as if all were alive at once (they are not: the true peak is lower), twice
    under guidance, plus the sampler's copies of the state and, for a latent model, the decoded image."""
    sizes = []

    def hook(module, args, out):
        if isinstance(out, torch.Tensor):
            sizes.append(out.numel() * out.element_size())

    handles = [m.register_forward_hook(hook) for m in model.net.modules() if not list(m.children())]
    try:
        options = SamplingOptions(layouts="none")
        cond, _ = conditions(model, 1, options, [""])
        x = torch.zeros(noise_shape(model, 1))
        device = next(model.net.parameters()).device
        model.denoiser(x.to(device), torch.ones(1, device=device), **cond)
    finally:
        for h in handles:
            h.remove()
    state = x.numel() * 4 * 8  # x, denoised, and a multistep sampler's history, in float32
    decoded = math.prod(model.image_shape) * 4 * 4 if model.vae is not None else 0
    return sum(sizes) * (2 if guided else 1) + state + decoded


def check_batch(model: DiffusionModel, batch: int, option: str = "--batch-size", guided: bool = True,
                factor: float = 1.0, what: str = "sample", device: torch.device | None = None) -> None:
    """Refuse a batch whose estimated memory (:func:`bytes_per_image`, times ``factor``: about 2 for training,
    which keeps activations for the backward pass) exceeds half of :func:`available_memory` on ``device``
    (default: the model's), naming a batch size that fits."""
    per_image = int(bytes_per_image(model, guided) * factor)
    budget = available_memory(device or next(model.net.parameters()).device) // 2
    if batch * per_image > budget:
        fits = budget // per_image
        advice = f"use {option} {fits} or less" if fits else "even one image does not fit: free memory, or use a " \
                                                             "smaller model"
        raise ValueError(f"{option} {batch} would need about {_size(batch * per_image)} to {what} "
                         f"({_size(per_image)} per image), more than the {_size(budget)} available; {advice}")


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"
