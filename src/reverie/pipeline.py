"""The :class:`Pipeline`: a trained diffusion model loaded from disk, ready to generate.

``Pipeline.from_pretrained`` reads a model directory (``reverie.modeldir``: ``config.json`` +
safetensors, never pickle), a training checkpoint or a run directory (its latest checkpoint), or a Stable
Diffusion checkpoint (``reverie.sd``). Sampling
settings are one :class:`reverie.sampling.SamplingOptions`; ``sample`` and ``generate`` also take its
fields by name (``steps=20, guidance_scale=4.0, ...``). Settings left out are the model's own (the
``sample`` section of its training config).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from . import editing, modeldir
from .build import DiffusionModel, load_autoencoder, read_diffusion, save_autoencoder, save_diffusion
from .configs import from_dict, to_dict
from .images import to_pil
from .nets.packing import unpack_weights
from .precision import precision_dtype, resolve_precision
from .samplers import TunedGrid
from .sampling import SamplingOptions, sample_images, tune_grid
from .sd import FAMILY as SD_FAMILY
from .sd import is_stable_diffusion, load_stable_diffusion
from .train.checkpoint import find_checkpoint
from .train.config import TrainConfig
from .train.diffusion import export_checkpoint


class Pipeline(DiffusionModel):
    """A loaded model with its schedule, the defaults it was trained with, and its name and weights hash."""

    def __init__(self, net, cfg, info: dict, name: str = "model", weights_hash: str = "", vae=None):
        super().__init__(net.eval().requires_grad_(False), cfg, info, vae=vae)
        self.name, self.weights_hash = name, weights_hash
        self.precision = "fp32"
        self.compiled = ""  # the torch.compile backend (:meth:`compile`), "" when eager

    @classmethod
    def from_pretrained(cls, path: str | Path, use_ema: bool = True, device: str = "cpu", precision: str = "auto",
                        compile: bool = False, **sd_options) -> Pipeline:
        """Load a model directory, a checkpoint or run directory (exported on the fly), or a Stable Diffusion
        1.x / 2.x checkpoint (a diffusers folder or one CompVis / A1111 ``.safetensors`` file, ``reverie.sd``;
        ``sd_options`` go to ``load_stable_diffusion``: ``dtype``, ``channels_last``, ``prediction``,
        ``tokenizer``); validates names and shapes of every tensor.

        ``precision`` ("auto", "fp32", "bf16"; ``reverie.precision``): the denoising network's weights and
        activations. "auto" is bf16 with channels_last on CPUs with bf16 matrix units and float32 elsewhere;
        text encoders, layout encoders and samplers' states stay float32. An SD ``dtype`` option overrides it.
        ``compile``: :meth:`compile` the denoising network."""
        if compile:
            pipe = cls.from_pretrained(path, use_ema, device, precision, **sd_options)
            return pipe.compile()
        path = Path(path)
        resolved = resolve_precision(precision, device)
        if path.is_file() and (path.parent / "config.json").is_file() and not is_stable_diffusion(path.parent):
            raise ValueError(f"{path} is a file of the model directory {path.parent}: pass the directory")
        if is_stable_diffusion(path):
            if "dtype" not in sd_options and resolved != "fp32":
                sd_options = {"dtype": precision_dtype(resolved), "channels_last": resolved == "bf16", **sd_options}
            sd = load_stable_diffusion(path, device=device, **sd_options)
            cfg = from_dict(TrainConfig, to_dict(sd.cfg))  # a full config: every field sampling reads, defaulted
            pipe = cls(sd.net, cfg, sd.info, name=path.stem, weights_hash=sd.weights_hash, vae=sd.vae)
            pipe.schedule = sd.schedule
            dtype = next(sd.net.net.parameters()).dtype  # what the U-Net runs in (an SD dtype option wins)
            pipe.precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
            return pipe
        if sd_options:
            raise ValueError(f"{', '.join(sd_options)}: options of Stable Diffusion checkpoints, and {path} is not one")
        if (path / "state.json").is_file() or (path / "checkpoints").is_dir():
            with tempfile.TemporaryDirectory() as tmp:
                export_checkpoint(find_checkpoint(path), Path(tmp) / "model", use_ema=use_ema)
                pipe = cls.from_pretrained(Path(tmp) / "model", device=device, precision=precision)
            pipe.name = path.resolve().name
            return pipe
        found, cfg, net, info, weights = read_diffusion(path, TrainConfig, use_ema)
        own_vae = found.config.get("autoencoder")
        own_vae = path / str(own_vae) if own_vae else None
        if own_vae is not None and not (own_vae / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a latent model whose autoencoder ({own_vae}) is missing")
        vae = load_autoencoder(own_vae, device) if own_vae is not None else None
        pipe = cls(net.to(device), cfg, info, name=path.name, weights_hash=modeldir.file_hash(weights), vae=vae)
        pipe.set_precision(resolved)
        return pipe

    def set_precision(self, precision: str) -> None:
        """Run the denoising network in ``precision`` ("fp32", "bf16", "fp16"; bf16 also channels_last for 2-D
        data), if it is one that runs in its weights' dtype (reverie's U-Net); other networks stay float32."""
        target = getattr(self.net, "net", self.net)  # a text-conditioned model: only its image network
        if not getattr(target, "runs_in_weight_dtype", False):
            return
        target.to(dtype=precision_dtype(precision))
        if precision == "bf16" and getattr(target.config, "dims", 2) == 2:
            target.to(memory_format=torch.channels_last)
        self.precision = precision

    def compile(self, backend="inductor", **options) -> Pipeline:
        """``torch.compile`` the denoising network in place (``nn.Module.compile``: parameter names, weights and
        their hash unchanged; the text encoder stays eager) and return this pipeline.

        The first call at each batch shape compiles (about 40 s for the shipped 32x32 model on the CPU, which
        needs a C++ compiler; cached on disk by PyTorch for later processes), then sampling runs faster:
        ``benchmarks/generate_speed.py`` measured the shipped model's ``generate`` (4 images, 20 steps, bf16)
        at 1.5x the eager time on one CPU thread. Worth it for a server, a real-time page or a long batch,
        not for one image. ``options`` go to ``torch.compile`` (``mode``, ``dynamic``, ...)."""
        import shutil

        device = next(self.net.parameters()).device.type
        if backend == "inductor" and device == "cpu" and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
            raise ValueError("compiling for the CPU needs a C++ compiler (c++, g++ or clang++ on the PATH); none "
                             "was found: install one, or run without compile")
        target = getattr(self.net, "net", self.net)  # a text-conditioned model: only its image network
        unpack_weights(target)  # inductor traces plain layers (an SD model on the CPU comes packed)
        target.compile(backend=backend, **options)
        self.compiled = backend if isinstance(backend, str) else getattr(backend, "__name__", "custom")
        return self

    def save_pretrained(self, path: str | Path) -> Path:
        if self.info.get("family") == SD_FAMILY:  # its U-Net/CLIP are not reverie's model-directory networks
            raise ValueError(f"{self.name} is a Stable Diffusion checkpoint: copy its folder or file; reverie's "
                             "model directory format does not hold it")
        if self.vae is not None:
            save_autoencoder(Path(path) / modeldir.AUTOENCODER_DIR, self.vae)
        own_vae = Path(path) / modeldir.AUTOENCODER_DIR if self.vae is not None else ""
        return save_diffusion(path, self.cfg, self.info, self.net, autoencoder=own_vae)

    def sample(self, num_images: int = 16, options: SamplingOptions | None = None, *,
               prompts: list[str] | None = None, class_labels: torch.Tensor | None = None,
               callback=None, progress: bool = False, noise: torch.Tensor | None = None,
               **settings) -> torch.Tensor:
        """``[num_images, C, H, W]`` samples in [-1, 1]. ``settings``: fields of :class:`SamplingOptions`
        (``sampler``, ``steps``, ``grid``, ``guidance_scale``, ``guidance_rescale``, ``negative_prompt``,
        ``layouts``, ``seed``, ``clip_denoised``, ...) over ``options``; what is left out is the model's own.
        ``noise``: unit-variance start noise to use instead of the seed's draw (``reverie.sampling.sample_images``;
        e.g. a watermarked one from ``reverie.provenance.watermark_noise``)."""
        options = SamplingOptions.make(options, **settings)
        return sample_images(self, num_images, options, prompts=prompts, class_labels=class_labels,
                             callback=callback, progress=progress, noise=noise)

    def generate(self, prompt: str = "", num_images: int = 1, options: SamplingOptions | None = None, *,
                 progress: bool = False, noise: torch.Tensor | None = None, **settings) -> list:
        """Images (PIL) for a text prompt; "" gives unconditional samples. ``noise``, ``settings``: see
        :meth:`sample`."""
        if self.info.get("frames"):
            raise ValueError(f"{self.name} is a video model: use reverie generate-video (reverie.video.generate_video)")
        if self.conditioning != "text" and prompt:
            raise ValueError(f"model {self.name!r} is not text-conditioned (conditioning={self.conditioning})")
        return to_pil(self.sample(num_images, options, prompts=[prompt], progress=progress, noise=noise, **settings))

    def tune_grid(self, sampler: str = "dpmpp_2m", steps: int = 8, pilot: int = 16, seed: int = 10_000,
                  prompts: list[str] | None = None, teacher_steps: int = 100, teacher_grid: str | None = None,
                  progress: bool = False, options: SamplingOptions | None = None, **settings) -> TunedGrid:
        """A sigma grid of ``steps`` levels for ``sampler``, tuned to this model on ``pilot`` noise draws from
        ``seed`` (``reverie.sampling.tune_grid``); pass its ``.sigmas`` as ``grid=`` to :meth:`sample`, or
        ``.save(path)`` it for ``--grid path``. Text models tune under ``prompts`` (default: the config's
        sample prompts). ``settings``: guidance and other :class:`SamplingOptions` fields to tune under;
        other keywords go to ``reverie.samplers.tune_sigmas``."""
        fields = set(SamplingOptions.__dataclass_fields__)
        tuning = {k: settings.pop(k) for k in list(settings) if k not in fields}
        options = SamplingOptions.make(options, sampler=sampler, steps=steps, seed=seed, **settings)
        if prompts is None and self.conditioning == "text":
            prompts = list(self.cfg.sample.prompts) or [""]
        return tune_grid(self, options, pilot=pilot, prompts=prompts, teacher_steps=teacher_steps,
                         teacher_grid=teacher_grid, progress=progress, **tuning)

    # --- editing (reverie.editing): images are [B, C, H, W] tensors in [-1, 1] or PIL images; results are tensors

    def _images(self, image) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            return image if image.ndim == 4 else image[None]
        import numpy as np

        images = image if isinstance(image, (list, tuple)) else [image]
        mode = "L" if self.image_shape[0] == 1 else "RGB"
        arrays = [torch.from_numpy(np.asarray(im.convert(mode), dtype=np.float32).copy()) for im in images]
        return torch.stack([a[None] if a.ndim == 2 else a.permute(2, 0, 1) for a in arrays]) / 127.5 - 1

    def img2img(self, image, prompt: str | list[str] = "", strength: float = 0.8,
                options: SamplingOptions | None = None, **settings) -> torch.Tensor:
        """SDEdit (``reverie.editing.img2img``): diffusers' ``strength``; ``settings``: see :meth:`sample`."""
        return editing.img2img(self, self._images(image), prompt, strength, options, **settings)

    def inpaint(self, image, mask_image, prompt: str | list[str] = "", options: SamplingOptions | None = None,
                **settings) -> torch.Tensor:
        """Inpainting (``reverie.editing.inpaint``; white = repaint): a mask-aware model (``takes_masks``, e.g. one
        trained with configs/shapes-inpaint.yaml) uses its mask channels, any other model training-free RePaint
        (``method="repaint"`` forces it). Keywords: ``method``, ``strength``, ``jump_length``, ``resample``,
        ``eta`` and :class:`SamplingOptions` fields."""
        mask = mask_image if isinstance(mask_image, torch.Tensor) else (self._images(mask_image)[:, :1] + 1) / 2
        return editing.inpaint(self, self._images(image), mask, prompt, options, **settings)

    def invert(self, image, prompt: str | list[str] = "", options: SamplingOptions | None = None,
               method: str = "ddim", **settings) -> editing.Inversion:
        """Start noise of ``image`` (``reverie.editing.invert``); ``sample(noise=inv.noise, ...)`` regenerates."""
        return editing.invert(self, self._images(image), prompt, options, method=method, **settings)

    def edit(self, image, source_prompt: str | list[str], target_prompt: str | list[str],
             options: SamplingOptions | None = None, method: str = "exact", local_blend: bool | str = "auto",
             fresh_noise: float = editing.FRESH_NOISE, **settings) -> torch.Tensor:
        """A prompt edit (``reverie.editing.edit``): invert under ``source_prompt``, regenerate under the target
        (``local_blend``: only the layout boxes the edit changes, on a layout model, with ``fresh_noise`` of
        the start noise's variance there drawn anew)."""
        return editing.edit(self, self._images(image), source_prompt, target_prompt, options, method=method,
                            local_blend=local_blend, fresh_noise=fresh_noise, **settings)
