"""From a config to the parts of a model: schedule, network, text encoder, denoiser, data, autoencoder.

Every place that turns a configuration into objects goes through here: the trainers, ``Pipeline``,
evaluation and the benchmarks, so that a choice (which denoiser an EDM model gets, how a text model's
network is wrapped) is written once. ``cfg`` is a training config (``reverie.train.config``); the
functions read its fields and import nothing from the training layer. :class:`DiffusionModel` is what
sampling needs of a diffusion model, trained or loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import modeldir
from .conditioning import TextConditionedNet
from .configs import ConfigError, from_dict, to_dict
from .data import get_dataset
from .denoisers import ConsistencyFunction, Denoiser, make_denoiser
from .latent import image_shape
from .mulan import MuLANNet
from .nets import PRESETS, AutoencoderKL, create_autoencoder, create_network
from .schedules import DiscreteVPSchedule
from .sde import SDES, TIME_SCALE, get_sde, is_sde
from .text import get_text_encoder
from .vdm import VDMNet, make_gamma


def build_schedule(cfg) -> DiscreteVPSchedule:
    """The config's schedule: a discrete VP table, or a score SDE (``reverie.sde``, also a schedule)."""
    if cfg.schedule.name in SDES:
        return get_sde(cfg.schedule.name)
    return DiscreteVPSchedule.from_name(cfg.schedule.name, cfg.schedule.num_timesteps,
                                        zero_terminal_snr=cfg.schedule.zero_terminal_snr)


EDM_SIGMA_MIN = 0.002  # Karras et al. 2022: the bottom of an EDM model's noise levels


def build_denoiser(cfg, net: torch.nn.Module, schedule: DiscreteVPSchedule) -> Denoiser:
    """``D(x, sigma, **cond) -> x0_hat`` for the config's prediction type (EDM models need no schedule; an
    SDE model's network takes the continuous time as 999 t). A distilled model (``distill.teacher`` set) is a
    consistency function over that denoiser (``reverie.denoisers.ConsistencyFunction``). A network with its own
    view (``reverie.mulan.MuLANNet``: a per-pixel process) gives that."""
    if hasattr(net, "denoiser_view"):
        return net.denoiser_view()
    if cfg.model.prediction == "edm":
        denoiser = make_denoiser("edm", net, sigma_data=cfg.model.sigma_data)
    elif is_sde(schedule):
        denoiser = make_denoiser(cfg.model.prediction, net, schedule, time_scale=TIME_SCALE)
    else:
        denoiser = make_denoiser(cfg.model.prediction, net, schedule)
    if getattr(getattr(cfg, "distill", None), "teacher", ""):
        sigma_min = EDM_SIGMA_MIN if cfg.model.prediction == "edm" else float(schedule.sigma_min)
        denoiser = ConsistencyFunction(denoiser, sigma_min, cfg.distill.boundary_width)
    return denoiser


def build_text_encoder(cfg):
    if cfg.model.text_encoder_options:
        return get_text_encoder({"name": cfg.model.text_encoder, **cfg.model.text_encoder_options})
    return get_text_encoder(cfg.model.text_encoder)


def build_dataset(cfg, **extra_options):
    """The config's dataset (``data.name`` with ``data.options``, updated by ``extra_options``)."""
    return get_dataset(cfg.data.name, resolution=cfg.data.resolution, **{**cfg.data.options, **extra_options})


def dataset_info(dataset) -> dict:
    """Channels, resolution and number of classes of a dataset (from its first item); ``frames`` for a video
    dataset, whose items are clips ``[C, T, H, W]``."""
    first = dataset[0]
    num_classes = int(getattr(dataset, "num_classes", 0) or 0)
    info = {"in_channels": int(first["image"].shape[0]), "resolution": int(first["image"].shape[-1]),
            "num_classes": num_classes}
    if hasattr(dataset, "audio_info"):  # spectrogram images: what turns them back into sound (reverie.audio)
        info["audio"] = dataset.audio_info()
    if first["image"].ndim == 4:
        info["frames"] = int(first["image"].shape[1])
    return info


def check_info(info: dict) -> dict:
    """A model's data description (``dataset_info``, stored in ``config.json``), checked for what sampling uses."""
    for key in ("in_channels", "resolution"):
        if not isinstance(info[key], int) or isinstance(info[key], bool) or info[key] < 1:
            raise ValueError(f"data.{key} must be a positive integer, got {info[key]!r}")
    if not isinstance(info.get("num_classes", 0), int):
        raise ValueError(f"data.num_classes must be an integer, got {info['num_classes']!r}")
    return info


def build_network(cfg, info: dict) -> torch.nn.Module:
    """The config's network for data described by ``info`` (see :func:`dataset_info`), wrapped with
    its text encoder for text models."""
    if cfg.model.network not in PRESETS:
        raise ConfigError(f"unknown model.network {cfg.model.network!r}; presets: {', '.join(PRESETS)}")
    overrides = dict(cfg.model.network_overrides)
    overrides.setdefault("in_channels", info["in_channels"])
    overrides.setdefault("out_channels", info["in_channels"])
    size_field = "input_size" if PRESETS[cfg.model.network].arch == "dit" else "sample_size"
    overrides.setdefault(size_field, info["resolution"])
    if cfg.model.inpainting:  # the masked image and the mask (reverie.conditioning.inpaint_condition)
        overrides["inpaint_channels"] = info["in_channels"] + 1
    encoder = None
    if cfg.model.conditioning == "class":
        if not info["num_classes"]:
            raise ConfigError(f"model.conditioning=class but dataset {cfg.data.name!r} has no class labels")
        overrides["num_classes"] = info["num_classes"] + 1  # the last class is "no class" (CFG)
    elif cfg.model.conditioning == "text":
        encoder = build_text_encoder(cfg)
        overrides["context_dim"] = encoder.dim
        overrides["pooled_dim"] = encoder.pooled_dim
        if cfg.model.layout_channels:
            if PRESETS[cfg.model.network].arch not in ("unet", "video-unet"):
                raise ConfigError("model.layout_channels needs a U-Net (the DiT takes no spatial condition yet)")
            overrides["spatial_channels"] = cfg.model.layout_channels
    net = create_network(cfg.model.network, **overrides)
    if encoder is not None:
        net = TextConditionedNet(net, encoder, layout_channels=cfg.model.layout_channels)
    return net


def network_from_config(config: dict, layout_channels: int = 0) -> torch.nn.Module:
    """A diffusion model directory's network, as its ``config.json`` describes it (fresh weights)."""
    net = create_network(config["network"])
    if config.get("vdm"):  # a model that learned its noise schedule (reverie.vdm) carries it
        net = VDMNet(net, make_gamma(config["vdm"]))
    if config.get("mulan"):  # an input-adaptive schedule with its latent encoder (reverie.mulan)
        net = MuLANNet(net, **config["mulan"])
    if config.get("text_encoder"):
        net = TextConditionedNet(net, get_text_encoder(config["text_encoder"]), layout_channels=layout_channels)
    return net


def read_diffusion(path: str | Path, config_cls, use_ema: bool = True):
    """A diffusion model directory's ``(ModelDir, cfg, net, info, weights file)``: its training config as
    ``config_cls``, its network with the weights (EMA if present and ``use_ema``), checked by name and shape."""
    path = Path(path)
    found = modeldir.read(path)
    if found.kind != "diffusion":
        raise ValueError(f"{path} is a {found.kind} model, not a diffusion model"
                         + (": use it as model.autoencoder in a training config" if found.kind == "vae" else ""))
    with modeldir.parsing(path / "config.json"):
        cfg = from_dict(config_cls, found.config["train_config"])
        net = network_from_config(found.config, layout_channels=cfg.model.layout_channels)
        info = check_info(found.config["data"])
    weights = found.weights_file(use_ema)
    modeldir.load_module_weights(net, found.load_weights(use_ema), source=str(weights))
    return found, cfg, net, info, weights


def build_autoencoder(cfg, info: dict) -> AutoencoderKL:
    """A VAE training config's autoencoder for a dataset (``in_channels`` from the data unless overridden)."""
    overrides = dict(cfg.model.overrides)
    overrides.setdefault("in_channels", info["in_channels"])
    vae = create_autoencoder(cfg.model.preset, **overrides)
    factor = vae.config.downsample_factor
    if info["resolution"] % factor:
        raise ConfigError(f"image size {info['resolution']} is not divisible by the autoencoder's downsampling "
                          f"factor {factor} (model.preset {cfg.model.preset}); pick a resolution divisible by it")
    return vae


def load_autoencoder(path: str | Path, device: str | torch.device = "cpu") -> AutoencoderKL:
    """A frozen autoencoder (eval mode, no gradients) from a model directory written by ``reverie
    train-vae``; every tensor's name and shape is checked against its ``config.json``."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} is not an autoencoder directory (no config.json); train one "
                                f"with `reverie train-vae configs/vae-shapes-f4.yaml`")
    found = modeldir.read(path, kind="vae")
    with modeldir.parsing(path / "config.json"):
        vae = create_autoencoder(found.config["network"])
    modeldir.load_module_weights(vae, found.load_weights(use_ema=False), source=str(found.weights_file(use_ema=False)))
    return vae.to(device).eval().requires_grad_(False)


def save_diffusion(path: str | Path, cfg, info: dict, net, ema_net=None, autoencoder: str | Path = "") -> Path:
    """Write a diffusion model directory: ``config.json`` + ``model.safetensors`` (+ ``ema.safetensors``); a
    latent model's ``autoencoder`` directory is copied into ``path/autoencoder``."""
    encoder = getattr(net, "encoder", None)
    if autoencoder:
        modeldir.copy_model(autoencoder, Path(path) / modeldir.AUTOENCODER_DIR)
    config = {"train_config": to_dict(cfg), "network": net.config.to_dict(),
              "text_encoder": encoder.config() if encoder else None, "data": dict(info),
              "autoencoder": modeldir.AUTOENCODER_DIR if autoencoder else None}
    if hasattr(net, "schedule_config"):  # reverie.vdm.VDMNet: its schedule
        config["vdm"] = net.schedule_config()
    if hasattr(net, "mulan_config"):  # reverie.mulan.MuLANNet: its schedule and latent encoder
        config["mulan"] = net.mulan_config()
    weights = {"model": modeldir.module_weights(net)}
    if ema_net is not None:
        weights["ema"] = modeldir.module_weights(ema_net)
    return modeldir.write(path, "diffusion", config, weights)


def save_autoencoder(path: str | Path, vae: AutoencoderKL, train_config=None, data: dict | None = None,
                     metrics: dict | None = None) -> Path:
    """Write an autoencoder model directory (``"kind": "vae"``)."""
    config = {"network": vae.config.to_dict(), "train_config": to_dict(train_config) if train_config else None,
              "data": dict(data or {}), "metrics": dict(metrics or {})}
    return modeldir.write(path, "vae", config, {"model": vae.state_dict()})


@dataclass
class DiffusionModel:
    """A diffusion network with what sampling needs: its training config, data shape (``info``; latent
    for a latent model), schedule and, for a latent model, the autoencoder that decodes its samples."""

    net: torch.nn.Module
    cfg: object
    info: dict
    vae: AutoencoderKL | None = None
    schedule: DiscreteVPSchedule = field(init=False)

    def __post_init__(self):
        own = getattr(self.net, "schedule_view", None)  # a learned schedule (reverie.vdm) travels with its network
        self.schedule = own if own is not None else build_schedule(self.cfg)

    @property
    def denoiser(self) -> Denoiser:
        """The network wrapped as ``D(x, sigma, **cond) -> x0_hat`` for its prediction type."""
        return build_denoiser(self.cfg, self.net, self.schedule)

    @property
    def conditioning(self) -> str:
        return self.cfg.model.conditioning

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images this model generates (decoded, for a latent model)."""
        return image_shape(self.info)

    @property
    def takes_masks(self) -> bool:
        """Whether the model is a mask-aware inpainting model (the masked image and the mask as extra inputs)."""
        return bool(getattr(self.net.config, "inpaint_channels", 0))

    @property
    def takes_layouts(self) -> bool:
        """Whether the model is conditioned on object layouts as well as the prompt."""
        return getattr(self.net, "layout", None) is not None
