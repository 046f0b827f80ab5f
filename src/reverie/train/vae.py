"""Training the KL autoencoder of latent diffusion, on HF accelerate like the diffusion trainer.

Each optimizer step encodes a batch, decodes a posterior sample z ~ q(z | x) and minimizes, per
image of D = C * H * W values,

    loss = mean_pixels(rec(x, x_hat)) + kl_weight * KL(q(z | x) || N(0, I)) / D,   rec = |.| (l1) or (.)^2 (l2)

which is Rombach et al.'s (sum_pixels rec + kl_weight * KL) (LDM, App. G) divided by D: Adam does
not see the scale, so ``kl_weight`` keeps LDM's meaning (1e-6: latents stay close to deterministic
codes, with just enough pull to keep them bounded) while the logged loss is a per-pixel error.
LDM's perceptual (LPIPS) term and patch-GAN discriminator are not implemented: reconstructions are
trained with the pixel loss alone, which suffices for flat synthetic data (``shapes``) and gives
blurrier textures than LDM on photographs.

After the last step the latent scaling (shift = mean, scale = 1 / std of the posterior means) is
measured on ``train.scaling_batches`` training batches per process (moments summed over processes),
stored in the autoencoder's config, and the model directory is written::

    out_dir/model/config.json          {"format": "reverie-model", "version": 1, "kind": "vae",
                                        "network": {"arch": "vae", ..., "scaling_factor", "shift_factor"},
                                        "train_config": {...}, "data": {...}, "metrics": {"psnr_db", ...}}
    out_dir/model/model.safetensors    the weights
    out_dir/reconstructions.png        held-out images (top) over their reconstructions (bottom)

The run itself (accelerator, checkpoints, exact resume, logging, the non-finite guard) is the shared
skeleton of ``reverie.train.run``; this module is the VAE's step and its config. No EMA: the
autoencoder is used as trained (EMA weights for VAEs are a possible later addition).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ..build import build_autoencoder, build_dataset, dataset_info, save_autoencoder
from ..images import save_grid
from ..nets.autoencoder import (
    AUTOENCODER_PRESETS,
    AutoencoderKL,
    DiagonalGaussian,
    latent_moments,
    scaling_from_moments,
)
from .config import RunConfig, RunSection
from .data import Batches, DataState
from .run import Run, Trainer, fit

__all__ = ["VAETrainConfig", "VAETrainResult", "train_vae", "vae_loss", "reconstruction_psnr",
           "save_reconstruction_grid"]


@dataclass
class VAEModelSection:
    preset: str = "vae-f4"              # a preset of reverie.nets.AUTOENCODER_PRESETS
    overrides: dict = field(default_factory=dict)   # e.g. {base_channels: 64, latent_channels: 8}


@dataclass
class VAELossSection:
    recon: Literal["l1", "l2"] = "l1"
    kl_weight: float = 1e-6             # on KL summed over latent dims vs recon summed over pixels (LDM)
    sample_posterior: bool = True       # decode z ~ q(z|x) (LDM) rather than its mean


@dataclass
class VAEEvalSection:
    num_images: int = 256               # held-out images for the final PSNR (0: skip)
    options: dict = field(default_factory=dict)     # dataset options over data.options for held-out
    batch_size: int = 32                #   images, e.g. {seed: 1} for shapes, {split: test} for mnist


@dataclass
class VAETrainSection(RunSection):
    out_dir: str = "runs/vae"
    scaling_batches: int = 16           # training batches per process for the latent scaling


@dataclass
class VAETrainConfig(RunConfig):
    kind: Literal["vae"] = "vae"
    model: VAEModelSection = field(default_factory=VAEModelSection)
    loss: VAELossSection = field(default_factory=VAELossSection)
    eval: VAEEvalSection = field(default_factory=VAEEvalSection)
    train: VAETrainSection = field(default_factory=VAETrainSection)

    def checks(self) -> list[tuple[bool, str]]:
        presets = ", ".join(AUTOENCODER_PRESETS)
        return [
            (self.model.preset in AUTOENCODER_PRESETS, f"model.preset {self.model.preset!r} is not one of {presets}"),
            (self.loss.kl_weight >= 0, "loss.kl_weight must be >= 0"),
            (self.train.scaling_batches >= 1, "train.scaling_batches must be >= 1"),
            (self.eval.num_images >= 0, "eval.num_images must be >= 0"),
            (self.eval.batch_size >= 1, "eval.batch_size must be >= 1"),
        ]


@dataclass
class VAETrainResult:
    export_dir: Path                    # config.json + model.safetensors (written by rank 0)
    model: AutoencoderKL                # with the measured latent scaling in its config
    step: int
    psnr_db: float | None               # held-out PSNR (rank 0, when eval.num_images > 0)


def vae_loss(x: torch.Tensor, recon: torch.Tensor, posterior: DiagonalGaussian, recon_kind: str = "l1",
             kl_weight: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample [B] (loss, reconstruction term, KL) in float32 (module docstring)."""
    if recon_kind not in ("l1", "l2"):
        raise ValueError(f"recon must be l1 or l2, got {recon_kind!r}")
    diff = recon.float() - x.float()
    rec = (diff.abs() if recon_kind == "l1" else diff.square()).flatten(1).mean(dim=1)
    kl = posterior.kl()
    return rec + kl_weight * kl / x[0].numel(), rec, kl


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, dataset, n: int, batch_size: int = 32) -> float:
    """Mean over the first ``n`` images of ``dataset`` of PSNR = 10 log10(1 / MSE) in dB, with images
    in [-1, 1] mapped to [0, 1]; reconstructions decode the posterior mean, clamped to the range."""
    if not 1 <= n <= len(dataset):
        raise ValueError(f"n must be between 1 and the dataset size {len(dataset)}, got {n}")
    was_training = vae.training
    vae.eval()
    device = next(vae.parameters()).device
    psnrs = []
    for start in range(0, n, batch_size):
        x = torch.stack([dataset[i]["image"] for i in range(start, min(n, start + batch_size))]).to(device)
        recon = vae.decode(vae.encode(x).mode()).float().clamp(-1, 1)
        mse = ((recon - x.float()) / 2).square().flatten(1).mean(dim=1)  # on [0, 1]: (a - b) / 2
        psnrs.append(-10 * torch.log10(mse.clamp_min(1e-10)))
    vae.train(was_training)
    return float(torch.cat(psnrs).mean())


@torch.no_grad()
def save_reconstruction_grid(vae: AutoencoderKL, dataset, path: str | Path, n: int = 8) -> Path:
    """A PNG of the first ``n`` images of ``dataset`` (top row) over their reconstructions (bottom row)."""
    was_training = vae.training
    vae.eval()
    x = torch.stack([dataset[i]["image"] for i in range(min(n, len(dataset)))])
    recon = vae.decode(vae.encode(x.to(next(vae.parameters()).device)).mode()).float().cpu()
    vae.train(was_training)
    return save_grid(torch.cat([x, recon]), path, ncols=len(x))


class VAETrainer(Trainer):
    name = "train-vae"

    def __init__(self, cfg: VAETrainConfig, dataset=None, eval_dataset=None):
        super().__init__(cfg, dataset)
        self.eval_dataset = eval_dataset

    def setup(self, run: Run):
        self.dataset = self.dataset if self.dataset is not None else build_dataset(self.cfg)
        run.info = dataset_info(self.dataset)
        return self.dataset

    def build(self, run: Run, resuming: bool) -> torch.nn.Module:
        return build_autoencoder(self.cfg, run.info)

    def loss(self, model, batch: dict, g: torch.Generator) -> tuple[torch.Tensor, dict]:
        x = batch["image"].to(next(model.parameters()).device)
        recon, posterior = model(x, generator=g, sample_posterior=self.cfg.loss.sample_posterior)
        per_sample, rec, kl = vae_loss(x, recon, posterior, self.cfg.loss.recon, self.cfg.loss.kl_weight)
        return per_sample.mean(), {"recon": float(rec.detach().mean()), "kl": float(kl.detach().mean())}

    def finish(self, model, step: int, run: Run) -> VAETrainResult:
        """Measure the latent scaling on every rank, then (main process) the held-out PSNR, and export."""
        cfg, vae = self.cfg, run.acc.unwrap_model(model)
        # The same first batches of epoch 0 whether or not the run was resumed: exact resume holds for the scaling.
        stats = Batches(self.dataset, cfg, run.rank, run.world, DataState())
        moments = latent_moments(vae, (stats.next() for _ in range(cfg.train.scaling_batches)))
        if run.world > 1:
            moments = run.acc.reduce(moments.to(run.device), reduction="sum").cpu()
        vae.set_latent_scaling(*scaling_from_moments(moments))
        psnr, export = None, run.out / "model"
        if run.main:
            scaling_images = int(cfg.train.scaling_batches * cfg.data.batch_size * run.world)
            metrics = {"steps": step, "scaling_images": scaling_images}
            if cfg.eval.num_images > 0:
                held_out = self.eval_dataset if self.eval_dataset is not None else \
                    build_dataset(cfg, **cfg.eval.options)
                n = min(cfg.eval.num_images, len(held_out))
                psnr = reconstruction_psnr(vae, held_out, n, cfg.eval.batch_size)
                metrics.update(psnr_db=psnr, eval_images=n)
                save_reconstruction_grid(vae, held_out, run.out / "reconstructions.png")
                print(f"held-out reconstruction PSNR over {n} images: {psnr:.2f} dB")
            save_autoencoder(export, vae, cfg, run.info, metrics)
        return VAETrainResult(export, vae, step, psnr)


def train_vae(cfg: VAETrainConfig, resume: str | bool = "auto", dataset=None, eval_dataset=None) -> VAETrainResult:
    """Train per ``cfg`` (see :func:`reverie.train.run.fit` for ``resume``); ``eval_dataset`` (default: the
    config's data with ``eval.options``) gives the held-out images of the final PSNR."""
    return fit(VAETrainer(cfg, dataset, eval_dataset), resume)
