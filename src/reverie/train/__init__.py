"""Training: one run skeleton (``run.py``) and a trainer per kind of model on it.

- ``run.py``: :func:`fit` and the :class:`Trainer` base (read its docstring to add a trainer);
- ``diffusion.py``: :func:`train`, the denoising step, EMA, sample grids, :func:`export_checkpoint`;
- ``vae.py``: :func:`train_vae`, the KL autoencoder of latent diffusion;
- ``config.py``: the typed config sections (``RunSection`` is shared by every trainer);
- ``data.py``, ``checkpoint.py``, ``ema.py``: sharded resumable batches, crash-safe checkpoints, EMA.
"""

from .checkpoint import find_checkpoint, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .diffusion import TrainResult, export_checkpoint, train
from .ema import EMA
from .errors import TrainingError
from .run import Trainer, fit
from .vae import VAETrainConfig, train_vae

__all__ = ["EMA", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints", "find_checkpoint",
           "TrainConfig", "TrainResult", "TrainingError", "Trainer", "fit", "train", "export_checkpoint",
           "VAETrainConfig", "train_vae"]
