"""A trained model as one directory, and the :class:`Pipeline` that generates from it.

Directory format (for sharing; loading never executes code)::

    config.json          {"format": "reverie-model", "version": 1, "train_config": {...},
                          "network": {"arch": ..., ...}, "text_encoder": {...} or null,
                          "data": {in_channels, resolution, num_classes}}
    model.safetensors    the trained weights (network, plus a trained text encoder)
    ema.safetensors      the EMA weights (used by default when present)

A frozen pretrained text encoder (MiniLM) is not stored: it comes from its own package.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .configs import from_dict, to_dict

FORMAT = "reverie-model"


def _weights(module) -> dict:
    from .train.loop import model_state

    return {k: v.detach().cpu().clone().contiguous() for k, v in model_state(module).items()}


def export_checkpoint(checkpoint: str | Path, out: str | Path, use_ema: bool = True,
                      dtype: torch.dtype = torch.float32) -> Path:
    """Turn a training checkpoint (or a run directory's latest) into a shareable model directory
    holding one set of weights (the EMA ones by default), optionally stored in half precision."""
    from .train.checkpoint import latest_checkpoint, load_checkpoint
    from .train.config import TrainConfig
    from .train.loop import build_dataset, build_model, dataset_info, load_model_state

    checkpoint = Path(checkpoint)
    if not (checkpoint / "state.json").is_file():
        found = latest_checkpoint(checkpoint / "checkpoints") or latest_checkpoint(checkpoint)
        if found is None:
            raise FileNotFoundError(f"no checkpoint found in {checkpoint}")
        checkpoint = found
    state = load_checkpoint(checkpoint)
    cfg = from_dict(TrainConfig, state["config"])
    info = state.get("info") or dataset_info(build_dataset(cfg))
    net, _, _ = build_model(cfg, info)
    load_model_state(net, state["ema" if use_ema else "model"])
    if dtype != torch.float32:
        net = net.to(dtype)
    if cfg.model.autoencoder:
        trained_with = info.get("autoencoder_hash")
        weights = Path(cfg.model.autoencoder) / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"the autoencoder of {checkpoint} ({cfg.model.autoencoder}) is missing; run from "
                                    f"the directory training ran in, or restore it")
        if trained_with and file_hash(weights) != trained_with:
            raise ValueError(f"{cfg.model.autoencoder} is not the autoencoder {checkpoint} was trained with "
                             f"(weights hash {file_hash(weights)} vs {trained_with})")
    return save_model_dir(out, cfg, info, net, autoencoder=cfg.model.autoencoder)


def save_model_dir(path: str | Path, cfg, info: dict, net, ema_net=None, autoencoder: str | Path = "") -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ ``ema.safetensors``) into ``path``; a latent
    model's ``autoencoder`` directory is copied into ``path/autoencoder``."""
    from .latent import copy_autoencoder

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    encoder = getattr(net, "encoder", None)
    config = {"format": FORMAT, "version": 1, "train_config": to_dict(cfg),
              "network": net.config.to_dict(), "text_encoder": encoder.config() if encoder else None,
              "data": dict(info), "autoencoder": copy_autoencoder(autoencoder, path) if autoencoder else None}
    save_file(_weights(net), str(path / "model.safetensors"))
    if ema_net is not None:
        save_file(_weights(ema_net), str(path / "ema.safetensors"))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def check_state_dict(expected: dict, found: dict, source: str) -> None:
    """Raise a ValueError naming missing, unexpected and mis-shaped tensors."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [f"{k}: file {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(found)) if found[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{label}: {', '.join(items[:5])}{more}")
        raise ValueError(f"{source} does not match its config.json: " + "; ".join(parts))


def file_hash(path: str | Path) -> str:
    """Short SHA-256 of a weights file (recorded in generated images' metadata)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


class Pipeline:
    """A loaded model with its schedule and the defaults it was trained with."""

    def __init__(self, net, cfg, info: dict, name: str = "model", weights_hash: str = "", vae=None):
        from .train.loop import build_schedule

        self.cfg, self.info, self.name, self.weights_hash, self.vae = cfg, info, name, weights_hash, vae
        self.schedule = build_schedule(cfg)
        self.net = net.eval().requires_grad_(False)

    @property
    def conditioning(self) -> str:
        return self.cfg.model.conditioning

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images this model generates (decoded, for a latent model)."""
        from .latent import image_shape

        return image_shape(self.info)

    @property
    def takes_layouts(self) -> bool:
        """Whether the model is conditioned on object layouts as well as the prompt."""
        return getattr(self.net, "layout", None) is not None

    @property
    def denoiser(self):
        """The network wrapped as ``D(x, sigma, **cond) -> x0_hat`` for its prediction type."""
        from .denoisers import make_denoiser

        if self.cfg.model.prediction == "edm":
            return make_denoiser("edm", self.net, sigma_data=self.cfg.model.sigma_data)
        return make_denoiser(self.cfg.model.prediction, self.net, self.schedule)

    @classmethod
    def from_pretrained(cls, path: str | Path, use_ema: bool = True, device: str = "cpu") -> Pipeline:
        """Load a model directory (see module docstring); validates names and shapes."""
        from .nets import create_network
        from .train.config import TrainConfig
        from .train.loop import load_model_state, model_state

        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path} is not a reverie model directory (no config.json)")
        config = json.loads(cfg_file.read_text())
        if config.get("kind") == "vae":
            raise ValueError(f"{path} is an autoencoder, not a diffusion model: use it as model.autoencoder in a "
                             f"training config")
        if config.get("format") != FORMAT:
            raise ValueError(f"{cfg_file} is not a reverie model config (format={config.get('format')!r})")
        cfg = from_dict(TrainConfig, config["train_config"])
        net = create_network(config["network"])
        if config.get("text_encoder"):
            from .conditioning import TextConditionedNet
            from .text import get_text_encoder

            net = TextConditionedNet(net, get_text_encoder(config["text_encoder"]),
                                     layout_channels=cfg.model.layout_channels)
        weights = path / "ema.safetensors" if use_ema and (path / "ema.safetensors").is_file() \
            else path / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{path} has no model.safetensors")
        state = load_file(str(weights))
        check_state_dict(model_state(net), state, str(weights))
        load_model_state(net, state)
        vae = None
        if config.get("autoencoder"):
            from .latent import load_vae

            vae = load_vae(path / config["autoencoder"], device)
        return cls(net.to(device), cfg, config["data"], name=path.name, weights_hash=file_hash(weights), vae=vae)

    def save_pretrained(self, path: str | Path) -> Path:
        if self.vae is not None:
            from .train.vae import save_autoencoder

            save_autoencoder(Path(path) / "autoencoder", self.vae)
        config_ae = "autoencoder" if self.vae is not None else ""
        return save_model_dir(path, self.cfg, self.info, self.net, autoencoder=config_ae and Path(path) / config_ae)

    @torch.no_grad()
    def sample(self, num_images: int = 16, steps: int | None = None, sampler: str | None = None,
               seed: int = 0, class_labels: torch.Tensor | None = None, prompts: list[str] | None = None,
               negative_prompt: str = "", guidance_scale: float | None = None,
               guidance_rescale: float = 0.0, progress: bool = False, grid=None,
               layouts="auto") -> torch.Tensor:
        """``[num_images, C, H, W]`` samples in [-1, 1]; ``steps``, ``sampler`` and the sigma ``grid``
        (a name in ``reverie.samplers.GRIDS``, or explicit sigmas such as :meth:`tune_grid`'s, which fix the
        steps) default to the model's config. ``layouts`` (layout models only):
        ``"auto"`` plans object boxes from each prompt, ``"none"`` uses the prompt alone, or a list of
        per-image ``[(phrase, (x0, y0, x1, y1)), ...]`` (see ``reverie.layout``)."""
        from .train.sampling import sample_images

        return sample_images(self.net, self.cfg, self.schedule, self.info, num_images, seed=seed,
                             class_labels=class_labels, prompts=prompts, negative_prompt=negative_prompt,
                             guidance_scale=guidance_scale, steps=steps, sampler=sampler,
                             guidance_rescale=guidance_rescale, progress=progress, vae=self.vae, grid=grid,
                             layouts=layouts)

    def tune_grid(self, sampler: str = "dpmpp_2m", steps: int = 8, pilot: int = 16, seed: int = 10_000,
                  prompts: list[str] | None = None, guidance_scale: float | None = None, teacher_steps: int = 100,
                  teacher_grid: str | None = None, progress: bool = False, **opts):
        """A sigma grid of ``steps`` levels for ``sampler``, tuned to this model on ``pilot`` noise draws
        (``reverie.samplers.tune_sigmas``); pass its ``.sigmas`` as ``grid=`` to :meth:`sample`, or
        ``.save(path)`` it for ``reverie sample/eval --grid path``. Text models tune under ``prompts`` (default:
        the config's sample prompts) and the guidance they will sample with. The reference is a
        ``teacher_steps`` dpmpp_2m solve on ``teacher_grid`` (a grid kind, default: the model's own)."""
        from .train.sampling import tune_grid

        if prompts is None and self.conditioning == "text":
            prompts = list(self.cfg.sample.prompts) or [""]
        return tune_grid(self.net, self.cfg, self.schedule, self.info, sampler, steps, pilot=pilot, seed=seed,
                         prompts=prompts, guidance_scale=guidance_scale, teacher_steps=teacher_steps,
                         teacher_grid=teacher_grid, progress=progress, **opts)

    def generate(self, prompt: str = "", num_images: int = 1, steps: int | None = None, sampler: str = "dpmpp_2m",
                 guidance_scale: float = 4.0, negative_prompt: str = "", seed: int = 0,
                 guidance_rescale: float = 0.0, progress: bool = False, grid=None,
                 layouts="auto") -> list:
        """Images (PIL) for a text prompt; "" gives unconditional samples. ``steps``: 20, or an explicit
        ``grid``'s length. ``grid``, ``layouts``: see :meth:`sample`."""
        from .images import to_pil

        if self.conditioning != "text" and prompt:
            raise ValueError(f"model {self.name!r} is not text-conditioned (conditioning={self.conditioning})")
        if steps is None and (grid is None or isinstance(grid, str)):
            steps = 20
        x = self.sample(num_images, steps=steps, sampler=sampler, seed=seed, prompts=[prompt],
                        negative_prompt=negative_prompt, guidance_scale=guidance_scale,
                        guidance_rescale=guidance_rescale, progress=progress, grid=grid, layouts=layouts)
        return to_pil(x)
