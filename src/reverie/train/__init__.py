"""Training: one run skeleton (``run.py``) and a trainer per kind of model on it.

- ``run.py``: :func:`fit` and the :class:`Trainer` base (read its docstring to add a trainer);
- ``diffusion.py``: :func:`train`, the denoising step, EMA, sample grids, :func:`export_checkpoint`;
- ``distill.py``: :func:`distill`, consistency distillation of a guided diffusion model into a few-step one;
- ``vae.py``: :func:`train_vae`, the KL autoencoder of latent diffusion;
- ``config.py``: the typed config sections (``RunSection`` is shared by every trainer);
- ``data.py``, ``checkpoint.py``, ``ema.py``: sharded resumable batches, crash-safe checkpoints, EMA.
"""

from .checkpoint import find_checkpoint, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .diffusion import TrainResult, export_checkpoint
from .diffusion import train as train_diffusion
from .distill import distill
from .ema import EMA
from .errors import TrainingError, TrainingInterrupted
from .run import Trainer, fit
from .vae import VAETrainConfig, train_vae


def train(cfg: TrainConfig, resume: str | bool = "auto", dataset=None) -> TrainResult:
    """Train a diffusion model per ``cfg`` (``reverie.train.diffusion``), or with ``distill.teacher`` set distil
    that model into a consistency model (``reverie.train.distill``); ``resume``: see :func:`fit`."""
    run = distill if cfg.distill.teacher else train_diffusion
    return run(cfg, resume=resume, dataset=dataset)


__all__ = ["EMA", "distill", "train_diffusion", "save_checkpoint", "load_checkpoint", "latest_checkpoint",
           "list_checkpoints", "find_checkpoint", "TrainConfig", "TrainResult", "TrainingError", "TrainingInterrupted",
           "Trainer", "fit", "train", "export_checkpoint", "VAETrainConfig", "train_vae"]
