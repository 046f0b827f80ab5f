"""Denoiser networks: U-Net (1-D/2-D/3-D) and DiT, their typed configs, presets and a factory; and the
KL autoencoder of latent diffusion (``autoencoder.py``: ``create_autoencoder("vae-f4")``).

Networks know nothing about schedules: ``net(x, c_noise, **cond)`` with ``c_noise`` a float [B]
tensor and optional ``context`` (B, L, C), ``context_mask`` (B, L) bool (True = real token),
``class_labels`` (B,) long, ``pooled`` (B, C).

    net = create_network("unet-ddpm-cifar10", in_channels=3)          # preset + overrides
    net = create_network(net.config.to_dict())                        # from config.json
    net = create_network(UNetConfig(model_channels=64, dims=1))       # from a config

Preset parameter counts (pinned in tests/test_nets.py; "diffusers" is UNet2DModel built by
``unet.diffusers_unet2d_kwargs`` for the same config):

==================  ===========  ===========  ================================================
preset              parameters   diffusers    notes
==================  ===========  ===========  ================================================
unet-tiny             1,192,387    1,192,259  CPU tests/demos: 32-64 ch, 3 levels, attn at 8x8
unet-small            9,593,539    9,593,283  ADM-style (AdaGN, 64-channel heads), 32x32
unet-ddpm-cifar10    35,746,307   35,746,307  Ho et al. 2020 CIFAR-10 (paper: 35.7M)
video-unet-tiny       1,368,803               unet-tiny per frame + temporal conv/attention (nets/video.py)
dit-tiny                706,672               CPU tests/demos: width 96, 4 blocks, 32x32x4
dit-s-2              32,865,056               DiT-S/2 at 32x32x4 latents (paper: 33M)
dit-b-2             130,315,808               DiT-B/2 (paper: 130M)
dit-xl-2            674,834,720               DiT-XL/2 (paper: 675M)
==================  ===========  ===========  ================================================

The AdaGN presets differ from UNet2DModel by one GroupNorm (2 x its channels): with scale-shift
conditioning UNet2DModel leaves the norm out of its bottleneck attention. DiT counts exclude the fixed
sin-cos positional table (a buffer, 256 x width at 32x32 with p=2); with it they are the
paper's 33.0M / 130.5M / 675.1M.

Autoencoder presets live in ``AUTOENCODER_PRESETS``, apart from ``PRESETS`` (the denoisers a
diffusion config may name); ``create_network`` accepts their names and ``{"arch": "vae", ...}`` too.

==================  ===========  ================================================
autoencoder preset  parameters   notes
==================  ===========  ================================================
vae-f4                  954,475  32-64 ch, 16x16x4 latents for 64x64 images
vae-f8                2,998,187  32-128 ch, 8x8x4 latents for 64x64 images
==================  ===========  ================================================
"""

from __future__ import annotations

from torch import nn

from .autoencoder import AUTOENCODER_PRESETS, AutoencoderConfig, AutoencoderKL, create_autoencoder
from .dit import DiT, DiTConfig
from .layers import NetConfig
from .unet import UNet, UNetConfig
from .video import VideoUNet, VideoUNetConfig

__all__ = ["UNet", "UNetConfig", "VideoUNet", "VideoUNetConfig", "DiT", "DiTConfig", "PRESETS", "ARCHS",
           "create_network", "count_parameters",
           "AutoencoderConfig", "AutoencoderKL", "AUTOENCODER_PRESETS", "create_autoencoder"]

ARCHS: dict[str, tuple[type[NetConfig], type[nn.Module]]] = {
    "unet": (UNetConfig, UNet),
    "dit": (DiTConfig, DiT),
    "vae": (AutoencoderConfig, AutoencoderKL),
    "video-unet": (VideoUNetConfig, VideoUNet),
}

_DIT_IMAGENET = dict(input_size=32, patch_size=2, in_channels=4, learned_variance=True, num_classes=1001)

PRESETS: dict[str, NetConfig] = {
    "unet-tiny": UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                            attention_resolutions=(8,), norm_groups=8, head_channels=32),
    "unet-small": UNetConfig(model_channels=64, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                             attention_resolutions=(16,), head_channels=64, dropout=0.1),
    "unet-ddpm-cifar10": UNetConfig(model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                                    attention_resolutions=(16,), num_heads=1, dropout=0.1,
                                    scale_shift=False),
    # unet-tiny per frame plus temporal conv + attention after every block (reverie.nets.video)
    "video-unet-tiny": VideoUNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                                       attention_resolutions=(8,), norm_groups=8, head_channels=32),
    "dit-tiny": DiTConfig(hidden_size=96, depth=4, num_heads=3, freq_dim=64, input_size=32, in_channels=4),
    "dit-s-2": DiTConfig(hidden_size=384, depth=12, num_heads=6, **_DIT_IMAGENET),
    "dit-b-2": DiTConfig(hidden_size=768, depth=12, num_heads=12, **_DIT_IMAGENET),
    "dit-xl-2": DiTConfig(hidden_size=1152, depth=28, num_heads=16, **_DIT_IMAGENET),
}


def _resolve_config(name_or_config) -> NetConfig:
    if isinstance(name_or_config, NetConfig):
        return name_or_config
    if isinstance(name_or_config, str):
        presets = {**PRESETS, **AUTOENCODER_PRESETS}
        if name_or_config not in presets:
            valid = ", ".join(presets)
            raise ValueError(f"unknown network preset {name_or_config!r}; valid presets: {valid}")
        return presets[name_or_config]
    if isinstance(name_or_config, dict):
        arch = name_or_config.get("arch")
        if arch not in ARCHS:
            raise ValueError(f"config dict needs 'arch' in {', '.join(ARCHS)}; got {arch!r}")
        return ARCHS[arch][0].from_dict(name_or_config)
    kind = type(name_or_config).__name__
    raise ValueError(f"expected a preset name, a config dict or a NetConfig; got {kind}")


def create_network(name_or_config, **overrides) -> nn.Module:
    """Build a network from a preset name, a plain dict (``config.to_dict()``) or a config, with
    field overrides; unknown presets or fields raise a ValueError that lists the valid ones."""
    config = _resolve_config(name_or_config)
    if overrides:
        config = config.replace(**overrides)
    return ARCHS[config.arch][1](config)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (works on ``meta``-device modules too)."""
    return sum(p.numel() for p in module.parameters())
