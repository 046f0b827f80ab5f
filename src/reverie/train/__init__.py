"""Training: configs, the accelerate training loop, EMA and crash-safe checkpoints."""

from .checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from .ema import EMA

__all__ = ["EMA", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints"]
