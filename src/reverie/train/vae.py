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

Exact resume works as in ``loop.py`` (the same helpers): the posterior noise and dropout of step k on
rank r come from generators seeded by (seed, r, k), the data order is a pure function of (seed,
epoch), and checkpoints hold weights, optimizer, LR scheduler, step and data position. No EMA: the
autoencoder is used as trained (EMA weights for VAEs are a possible later addition).
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..configs import ConfigError, to_dict
from ..nets.autoencoder import (
    AUTOENCODER_PRESETS,
    AutoencoderKL,
    DiagonalGaussian,
    create_autoencoder,
    latent_moments,
    scaling_from_moments,
)
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import DataSection, OptimSection
from .loop import Batches, DataState, TrainingError, build_dataset, dataset_info, lr_lambda, step_generator

__all__ = ["VAETrainConfig", "VAETrainResult", "train_vae", "vae_loss", "reconstruction_psnr",
           "save_reconstruction_grid", "save_autoencoder", "load_autoencoder"]

FORMAT = "reverie-model"


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
class VAETrainSection:
    steps: int = 1000
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = 0
    out_dir: str = "runs/vae"
    checkpoint_every: int = 250
    keep_last: int = 3
    log_every: int = 10
    max_nonfinite: int = 5              # consecutive non-finite losses before stopping
    progress: bool = True
    threads: int = 0                    # CPU intra-op threads (0: torch's default); 1 on a busy machine
    scaling_batches: int = 16           # training batches per process for the latent scaling


@dataclass
class VAETrainConfig:
    kind: Literal["vae"] = "vae"
    model: VAEModelSection = field(default_factory=VAEModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    loss: VAELossSection = field(default_factory=VAELossSection)
    eval: VAEEvalSection = field(default_factory=VAEEvalSection)
    train: VAETrainSection = field(default_factory=VAETrainSection)

    def validate(self) -> None:
        checks = [
            (self.model.preset in AUTOENCODER_PRESETS,
             f"model.preset {self.model.preset!r} is not one of {', '.join(AUTOENCODER_PRESETS)}"),
            (self.train.steps >= 1, "train.steps must be >= 1"),
            (self.data.batch_size >= 1, "data.batch_size must be >= 1"),
            (self.data.resolution >= 8, "data.resolution must be >= 8"),
            (self.optim.lr > 0, "optim.lr must be > 0"),
            (self.loss.kl_weight >= 0, "loss.kl_weight must be >= 0"),
            (self.train.checkpoint_every >= 0, "train.checkpoint_every must be >= 0"),
            (self.train.log_every >= 1, "train.log_every must be >= 1"),
            (self.train.scaling_batches >= 1, "train.scaling_batches must be >= 1"),
            (self.eval.num_images >= 0, "eval.num_images must be >= 0"),
            (self.eval.batch_size >= 1, "eval.batch_size must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@dataclass
class VAETrainResult:
    export_dir: Path                    # config.json + model.safetensors (written by rank 0)
    model: AutoencoderKL                # with the measured latent scaling in its config
    step: int
    psnr_db: float | None               # held-out PSNR (rank 0, when eval.num_images > 0)


def build_autoencoder(cfg: VAETrainConfig, info: dict) -> AutoencoderKL:
    """The autoencoder of a config for a dataset (``in_channels`` from the data unless overridden)."""
    overrides = dict(cfg.model.overrides)
    overrides.setdefault("in_channels", info["in_channels"])
    vae = create_autoencoder(cfg.model.preset, **overrides)
    factor = vae.config.downsample_factor
    if info["resolution"] % factor:
        raise ConfigError(f"image size {info['resolution']} is not divisible by the autoencoder's downsampling "
                          f"factor {factor} (model.preset {cfg.model.preset}); pick a resolution divisible by it")
    return vae


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
    from ..images import save_grid

    was_training = vae.training
    vae.eval()
    x = torch.stack([dataset[i]["image"] for i in range(min(n, len(dataset)))])
    recon = vae.decode(vae.encode(x.to(next(vae.parameters()).device)).mode()).float().cpu()
    vae.train(was_training)
    return save_grid(torch.cat([x, recon]), path, ncols=len(x))


def save_autoencoder(path: str | Path, vae: AutoencoderKL, train_config: VAETrainConfig | None = None,
                     data: dict | None = None, metrics: dict | None = None) -> Path:
    """Write ``config.json`` (``"kind": "vae"``) + ``model.safetensors`` into ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().clone().contiguous() for k, v in vae.state_dict().items()}
    save_file(weights, str(path / "model.safetensors"))
    config = {"format": FORMAT, "version": 1, "kind": "vae", "network": vae.config.to_dict(),
              "train_config": to_dict(train_config) if train_config is not None else None,
              "data": dict(data or {}), "metrics": dict(metrics or {})}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def load_autoencoder(path: str | Path, device: str | torch.device = "cpu") -> AutoencoderKL:
    """Load a model directory written by :func:`save_autoencoder` (eval mode); checks that it is a
    VAE and that every tensor's name and shape matches ``config.json``."""
    from ..pipeline import check_state_dict

    path = Path(path)
    cfg_file, weights = path / "config.json", path / "model.safetensors"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} is not a reverie model directory (no config.json)")
    config = json.loads(cfg_file.read_text())
    if config.get("format") != FORMAT or config.get("kind") != "vae":
        raise ValueError(f"{cfg_file} is not a reverie autoencoder (format={config.get('format')!r}, "
                         f"kind={config.get('kind')!r}; expected {FORMAT!r}, 'vae')")
    if not weights.is_file():
        raise FileNotFoundError(f"{path} has no model.safetensors")
    vae = create_autoencoder(config["network"])
    state = load_file(str(weights))
    check_state_dict(vae.state_dict(), state, str(weights))
    vae.load_state_dict(state)
    return vae.to(device).eval()


def _held_out(cfg: VAETrainConfig):
    from ..data import get_dataset

    options = {**cfg.data.options, **cfg.eval.options}
    return get_dataset(cfg.data.name, resolution=cfg.data.resolution, **options)


def _checkpoint_state(cfg, vae, opt, sched, step, data_state, nonfinite_total, elapsed, info) -> dict:
    return {"step": step, "model": vae.state_dict(), "optimizer": opt.state_dict(),
            "lr_scheduler": sched.state_dict(), "data": vars(data_state).copy(),
            "nonfinite_total": nonfinite_total, "elapsed_s": elapsed, "config": to_dict(cfg), "info": dict(info)}


def train_vae(cfg: VAETrainConfig, resume: str | bool = "auto", dataset=None,
              eval_dataset=None) -> VAETrainResult:
    """Train per ``cfg``; ``resume="auto"`` continues from ``out_dir``'s latest checkpoint if any, a path
    resumes from that checkpoint, False starts fresh. ``eval_dataset`` (default: the config's data with
    ``eval.options``) gives the held-out images of the final PSNR."""
    from accelerate import Accelerator

    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)  # see loop.py: extra threads only spin on a busy machine
    acc = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=not torch.cuda.is_available())
    rank, world, main = acc.process_index, acc.num_processes, acc.is_main_process
    out = Path(cfg.train.out_dir)
    dataset = dataset if dataset is not None else build_dataset(cfg)
    info = dataset_info(dataset)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    vae = build_autoencoder(cfg, info)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                            eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    step, data_state, nonfinite_total, elapsed_before = 0, DataState(), 0, 0.0

    ckpt_dir = out / "checkpoints"
    source = latest_checkpoint(ckpt_dir) if resume == "auto" else (Path(resume) if resume else None)
    if source is not None:
        state = load_checkpoint(source)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["lr_scheduler"])
        step, nonfinite_total = state["step"], state.get("nonfinite_total", 0)
        data_state, elapsed_before = DataState(**state["data"]), state.get("elapsed_s", 0.0)
        if main:
            print(f"resumed from {source} at step {step}")

    model, opt = acc.prepare(vae, opt)
    batches = Batches(dataset, cfg, rank, world, data_state)
    t_start = time.perf_counter()

    def checkpoint(at: int) -> Path | None:
        if not main:
            return None
        elapsed = elapsed_before + time.perf_counter() - t_start
        state = _checkpoint_state(cfg, acc.unwrap_model(model), opt, sched, at, data_state, nonfinite_total,
                                  elapsed, info)
        return save_checkpoint(ckpt_dir, at, state, keep_last=cfg.train.keep_last)

    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    log = (out / "log.jsonl").open("a" if source is not None else "w") if main else None
    bar = tqdm(total=cfg.train.steps, initial=step, disable=not (main and cfg.train.progress),
               desc="train-vae", dynamic_ncols=True)
    consecutive_bad, t_last, imgs_since = 0, time.perf_counter(), 0
    last_good = latest_checkpoint(ckpt_dir)
    model.train()
    while step < cfg.train.steps:
        g = step_generator(cfg.train.seed, rank, step)
        torch.manual_seed(g.initial_seed() % 2**63)  # dropout
        opt.zero_grad(set_to_none=True)
        x = batches.next()["image"].to(acc.device)
        with acc.autocast():
            recon, posterior = model(x, generator=g, sample_posterior=cfg.loss.sample_posterior)
        per_sample, rec, kl = vae_loss(x, recon, posterior, cfg.loss.recon, cfg.loss.kl_weight)
        loss = per_sample.mean()
        bad = not bool(torch.isfinite(loss))
        # Every rank must agree on skipping, or DDP's collectives would hang.
        if float(acc.reduce(torch.tensor([float(bad)], device=acc.device), reduction="sum")) > 0:
            consecutive_bad, nonfinite_total = consecutive_bad + 1, nonfinite_total + 1
            if consecutive_bad >= cfg.train.max_nonfinite:
                bar.close()
                raise TrainingError(
                    f"{consecutive_bad} non-finite losses in a row at step {step}: the learning rate "
                    f"({cfg.optim.lr:g}) is likely too high, or fp16 overflowed (try bf16 or no), or the "
                    f"data contain NaN. Last good checkpoint: {last_good or 'none'}")
            step += 1  # keeps the (seed, rank, step) streams aligned
            with warnings.catch_warnings():  # stepping the LR without an optimizer step is intended
                warnings.simplefilter("ignore", UserWarning)
                sched.step()
            continue
        consecutive_bad = 0
        acc.backward(loss)
        grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip) if cfg.optim.grad_clip > 0 else None
        opt.step()
        sched.step()
        step += 1
        imgs_since += x.shape[0] * world
        bar.update(1)
        if main and (step % cfg.train.log_every == 0 or step == cfg.train.steps):
            now = time.perf_counter()
            record = {"step": step, "loss": float(loss.detach()), "recon": float(rec.detach().mean()),
                      "kl": float(kl.detach().mean()), "lr": sched.get_last_lr()[0],
                      "images_per_s": imgs_since / max(now - t_last, 1e-9),
                      "grad_norm": float(grad_norm) if grad_norm is not None else None,
                      "nonfinite_skipped": nonfinite_total, "epoch": data_state.epoch,
                      "elapsed_s": elapsed_before + now - t_start}
            t_last, imgs_since = now, 0
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{record['loss']:.4f}", kl=f"{record['kl']:.3g}")
        if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
            last_good = checkpoint(step) or last_good
            acc.wait_for_everyone()
    bar.close()
    if log:
        log.close()
    if main and (not cfg.train.checkpoint_every or step % cfg.train.checkpoint_every):
        checkpoint(step)

    vae = acc.unwrap_model(model)
    # The same first batches of epoch 0 whether or not the run was resumed: exact resume holds for the scaling.
    stats = Batches(dataset, cfg, rank, world, DataState())
    moments = latent_moments(vae, (stats.next() for _ in range(cfg.train.scaling_batches)))
    if world > 1:
        moments = acc.reduce(moments.to(acc.device), reduction="sum").cpu()
    vae.set_latent_scaling(*scaling_from_moments(moments))
    psnr, export = None, out / "model"
    if main:
        metrics = {"steps": step, "scaling_images": int(cfg.train.scaling_batches * cfg.data.batch_size * world)}
        if cfg.eval.num_images > 0:
            held_out = eval_dataset if eval_dataset is not None else _held_out(cfg)
            n = min(cfg.eval.num_images, len(held_out))
            psnr = reconstruction_psnr(vae, held_out, n, cfg.eval.batch_size)
            metrics.update(psnr_db=psnr, eval_images=n)
            save_reconstruction_grid(vae, held_out, out / "reconstructions.png")
            print(f"held-out reconstruction PSNR over {n} images: {psnr:.2f} dB")
        save_autoencoder(export, vae, cfg, info, metrics)
    acc.wait_for_everyone()
    return VAETrainResult(export, vae, step, psnr)
