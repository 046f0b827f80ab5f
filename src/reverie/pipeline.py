"""A trained model as one directory, and the :class:`Pipeline` that samples from it.

Directory format (for sharing; loading never executes code)::

    config.json          {"format": "reverie-model", "version": 1, "train_config": {...},
                          "network": {"arch": ..., ...}, "data": {in_channels, resolution, num_classes}}
    model.safetensors    the trained weights
    ema.safetensors      the EMA weights (used by default when present)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .configs import from_dict, to_dict

FORMAT = "reverie-model"


def _state_for_saving(module) -> dict:
    return {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}


def save_model_dir(path: str | Path, cfg, info: dict, net, ema_net=None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ ``ema.safetensors``) into ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, "version": 1, "train_config": to_dict(cfg),
              "network": net.config.to_dict(), "data": dict(info)}
    save_file(_state_for_saving(net), str(path / "model.safetensors"))
    if ema_net is not None:
        save_file(_state_for_saving(ema_net), str(path / "ema.safetensors"))
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

    def __init__(self, net, cfg, info: dict, name: str = "model", weights_hash: str = ""):
        from .train.loop import build_schedule

        self.cfg, self.info, self.name, self.weights_hash = cfg, info, name, weights_hash
        self.schedule = build_schedule(cfg)
        self.net = net.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(cls, path: str | Path, use_ema: bool = True, device: str = "cpu") -> Pipeline:
        """Load a model directory (see module docstring); validates names and shapes."""
        from .nets import create_network
        from .train.config import TrainConfig

        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path} is not a reverie model directory (no config.json)")
        config = json.loads(cfg_file.read_text())
        if config.get("format") != FORMAT:
            raise ValueError(f"{cfg_file} is not a reverie model config (format={config.get('format')!r})")
        cfg = from_dict(TrainConfig, config["train_config"])
        net = create_network(config["network"])
        weights = path / "ema.safetensors" if use_ema and (path / "ema.safetensors").is_file() \
            else path / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{path} has no model.safetensors")
        state = load_file(str(weights))
        check_state_dict(net.state_dict(), state, str(weights))
        net.load_state_dict(state)
        return cls(net.to(device), cfg, config["data"], name=path.name, weights_hash=file_hash(weights))

    def save_pretrained(self, path: str | Path) -> Path:
        return save_model_dir(path, self.cfg, self.info, self.net)

    @torch.no_grad()
    def sample(self, num_images: int = 16, steps: int | None = None, sampler: str | None = None,
               seed: int = 0, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """``[num_images, C, H, W]`` samples in [-1, 1]."""
        from .train.sampling import sample_images

        cfg = from_dict(type(self.cfg), to_dict(self.cfg))
        cfg.sample.steps = steps or cfg.sample.steps
        cfg.sample.sampler = sampler or cfg.sample.sampler
        return sample_images(self.net, cfg, self.schedule, self.info, num_images, seed, class_labels)
