"""What several test files share: the tiny networks' config overrides and a builder for their weights.

The model-directory factory built on these is the ``make_model_dir`` fixture in ``conftest.py``.
"""

from __future__ import annotations

import torch

from reverie.build import build_network
from reverie.configs import load_config
from reverie.train.config import TrainConfig

# A two-level U-Net with attention at 8x8 (16x16 images) and a small scratch text encoder.
NET = "{model_channels: 8, channel_mult: [1, 2], attention_resolutions: [8], head_channels: 8}"
TEXT = "{width: 32, depth: 1, num_heads: 2, pooled_dim: 32, max_length: 8, num_buckets: 64}"
# The overrides of a tiny text-to-image model on 16x16 RGB images.
TEXT_MODEL = (f"--model.network_overrides={NET}", "--model.conditioning=text",
              f"--model.text_encoder_options={TEXT}", "--data.resolution=16")
RGB16 = {"in_channels": 3, "resolution": 16, "num_classes": 0}


def tiny_config(*overrides: str) -> TrainConfig:
    """A training config from the library defaults and ``overrides`` (``--section.key=value``)."""
    return load_config(TrainConfig, None, list(overrides))


def tiny_network(cfg: TrainConfig, info: dict, seed: int = 0, perturb: float = 0.05) -> torch.nn.Module:
    """The config's network for ``info`` built after ``torch.manual_seed(seed)``, every parameter then moved
    by ``perturb`` standard normal noise (from the same global stream) so that zero-initialized outputs vary."""
    torch.manual_seed(seed)
    net = build_network(cfg, info)
    if perturb:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * perturb)
    return net


def cli(argv: list[str]) -> int:
    """``reverie ARGV`` in-process; its exit status also when the argument parser exits (status 2 for a bad
    option value: argparse raises SystemExit from ``main``)."""
    from reverie.cli import main

    try:
        return main(argv)
    except SystemExit as e:
        return e.code
