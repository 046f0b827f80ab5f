"""The diffusion trainer: the denoising step on the shared skeleton (``reverie.train.run``).

Each micro-batch: a noise level per sample and noise (from the step's generator), x = x0 + sigma *
noise, the network's prediction through the denoiser's parameterization, and the weighted MSE
(``reverie.losses.denoising_loss``). Conditions are dropped with ``train.cond_dropout`` for
classifier-free guidance (text models also drop layouts and captions on their own). A mask-aware
inpainting model (``model.inpainting``) also gets a random mask per sample (``reverie.data.masks``, kinds
mixed by ``train.mask_kinds``) and the masked image, never dropped. A latent model
encodes each batch with its frozen VAE first (``reverie.latent``). Around the step: an EMA copy of the
weights, sample grids from it every ``sample.every`` steps, and at the end a model directory
(``out_dir/model``) with both sets of weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import modeldir
from ..build import (
    DiffusionModel,
    build_dataset,
    build_denoiser,
    build_network,
    dataset_info,
    load_autoencoder,
    save_diffusion,
)
from ..conditioning import inpaint_condition
from ..configs import from_dict
from ..data.masks import training_masks
from ..heat import IHDM, BlurringSchedule
from ..latent import LatentCache, encode_batch, latent_info
from ..losses import LogNormalSigmas, LossAwareTimesteps, UniformTimesteps, denoising_loss
from ..pfgm import pfgm_noise
from ..process import frame_noise
from ..sampling import check_batch, save_sample_grid
from ..sde import UniformTime
from .checkpoint import find_checkpoint, latest_checkpoint, load_checkpoint
from .config import TrainConfig
from .ema import EMA
from .errors import TrainingError
from .run import Run, Trainer, fit, run_precision, use_channels_last


@dataclass
class TrainResult:
    export_dir: Path   # config.json + model.safetensors + ema.safetensors (written by rank 0)
    model: torch.nn.Module
    ema_model: torch.nn.Module
    step: int


def train(cfg: TrainConfig, resume: str | bool = "auto", dataset=None) -> TrainResult:
    """Train a diffusion model per ``cfg`` (see :func:`reverie.train.run.fit` for ``resume``)."""
    return fit(DiffusionTrainer(cfg, dataset), resume)


def noise_levels(cfg: TrainConfig, schedule):
    if cfg.loss.noise_levels == "continuous":  # score SDEs: t ~ U(t_min, 1)
        return UniformTime(schedule)
    if cfg.loss.noise_levels == "lognormal":
        return LogNormalSigmas(cfg.loss.p_mean, cfg.loss.p_std)
    if cfg.loss.noise_levels == "loss_aware":
        return LossAwareTimesteps(schedule)
    return UniformTimesteps(schedule)


def heat_process(cfg: TrainConfig):
    """The config's heat-equation process (``reverie.heat``), or None for a Gaussian one."""
    h = cfg.heat
    if cfg.model.process == "ihdm":
        return IHDM(h.num_levels, h.blur_min, h.blur_max, h.noise)
    if cfg.model.process == "blurring":
        return BlurringSchedule(blur_max=h.blur_max, d_min=h.d_min)
    return None


def heat_loss(process, model, x0: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A heat-equation process's loss on the raw network: IHDM's level k ~ U{1..K}, or blurring diffusion's
    t ~ U(t_min, t_max), then unit noise (both drawn from the step's generator, in that order)."""
    levels = process.draw_levels(x0.shape[0], g) if isinstance(process, IHDM) else process.draw_times(x0.shape[0], g)
    noise = torch.randn(x0.shape, generator=g).to(x0.device, x0.dtype)
    return process.loss(model, x0, levels.to(x0.device), noise).float().mean()


def init_weights(net: torch.nn.Module, model_dir: str | Path) -> list[str]:
    """Start ``net`` from a model directory's weights (EMA if present) for fine-tuning. Tensors the
    directory lacks (a module the new config adds, e.g. a layout encoder) keep their initialization,
    which for reverie's new input paths is zero, so the run starts as the old model; a tensor of another
    shape, or one the new network lacks, is an error. Returns the new tensors' module names."""
    path = Path(model_dir)
    if not (path / "model.safetensors").is_file():
        raise TrainingError(f"train.init_from={str(model_dir)!r} is not a model directory (no model.safetensors)")
    source = modeldir.ModelDir(path, {}, "diffusion")
    found, state = source.load_weights(), modeldir.module_weights(net)
    unexpected = sorted(set(found) - set(state))
    shapes = [k for k in set(found) & set(state) if found[k].shape != state[k].shape]
    if unexpected or shapes:
        raise TrainingError(f"{source.weights_file()} does not fit this network: unexpected {unexpected[:5]}, "
                            f"other shapes {sorted(shapes)[:5]}")
    added = sorted({k.rsplit(".", 1)[0] for k in set(state) - set(found)})
    modeldir.load_module_weights(net, {**state, **found})
    return added


class DiffusionTrainer(Trainer):
    name = "train"
    network_fields = ("model.", "schedule.", "data.resolution")

    def check(self) -> None:
        cfg = self.cfg
        if cfg.distill.teacher and type(self) is DiffusionTrainer:
            raise TrainingError("a config with distill.teacher is a distillation run: use reverie.train.train (or "
                                "`reverie train`), which runs reverie.train.distill")
        if cfg.train.compile and run_precision(cfg) != "no" and not torch.cuda.is_available():
            # Measured with torch 2.13 on the CPU: the compiled shapes U-Net under bf16 autocast gave a finite
            # first loss, then non-finite losses from the second step on; eager bf16 and compiled fp32 train fine.
            raise TrainingError("train.compile with mixed precision on the CPU gave non-finite losses here "
                                "(torch 2.13); use --train.mixed_precision=no with compile, or compile on a GPU")
        resumable = latest_checkpoint(Path(cfg.train.out_dir) / "checkpoints") is not None  # holds the weights
        if cfg.train.init_from and not resumable and not (Path(cfg.train.init_from) / "model.safetensors").is_file():
            raise FileNotFoundError(f"train.init_from={cfg.train.init_from!r} is not a model directory "
                                    f"(no model.safetensors)")
        if cfg.model.autoencoder:
            modeldir.read(cfg.model.autoencoder, kind="vae")  # exists, and is an autoencoder

    def setup(self, run: Run):
        cfg = self.cfg
        dataset = self.dataset if self.dataset is not None else build_dataset(cfg)
        run.info = dataset_info(dataset)
        if cfg.model.layout_channels and "layout" not in dataset[0]:
            raise TrainingError(f"model.layout_channels needs a dataset with object layouts; {cfg.data.name!r} "
                                f"has none")
        self.vae = None
        if cfg.model.autoencoder:  # latent diffusion: a frozen VAE between the data and the network
            self.vae = load_autoencoder(cfg.model.autoencoder, run.device)
            run.info = latent_info(run.info, self.vae)
            run.info["autoencoder_hash"] = modeldir.file_hash(Path(cfg.model.autoencoder) / "model.safetensors")
            if cfg.data.cache_latents:
                dataset = LatentCache(dataset, self.vae, progress=run.main and cfg.train.progress)
        return dataset

    def build(self, run: Run, resuming: bool) -> torch.nn.Module:
        cfg = self.cfg
        net = build_network(cfg, run.info)
        if cfg.train.init_from and not resuming:  # a resumed run's checkpoint already holds the weights
            added = init_weights(net, cfg.train.init_from)
            run.say(f"initialized from {cfg.train.init_from}" + (f"; new: {', '.join(added)}" if added else ""))
        if cfg.train.trainable_only:  # e.g. a video model's temporal layers over a frozen image model
            names = [n for n, p in net.named_parameters() if cfg.train.trainable_only in n and p.requires_grad]
            if not names:
                raise TrainingError(f"train.trainable_only={cfg.train.trainable_only!r} names no parameter")
            for n, p in net.named_parameters():
                p.requires_grad_(n in names)
            run.say(f"training only {len(names)} tensors named *{cfg.train.trainable_only}* "
                    f"({sum(p.numel() for n, p in net.named_parameters() if n in names):,} parameters)")
        if use_channels_last(cfg):
            net = net.to(memory_format=torch.channels_last)
        if cfg.train.gradient_checkpointing and hasattr(net, "set_gradient_checkpointing"):
            net.set_gradient_checkpointing(True)
        self.ema = EMA(net, cfg.ema.max_decay, cfg.ema.power, cfg.ema.inv_gamma, cfg.ema.half_life_images)
        if cfg.train.compile:
            # In place (nn.Module.compile): parameter names, checkpoints and the EMA copy (made above, so
            # sampling stays eager) are unchanged. Only the image network: a text encoder takes strings.
            (net.net if hasattr(net, "encoder") else net).compile()
        self.sampled = DiffusionModel(self.ema.model, cfg, run.info, vae=self.vae)
        # activations are kept for the backward pass: refuse a batch that cannot fit, before any step (every
        # rank decides the same)
        check_batch(self.sampled, cfg.data.batch_size, "data.batch_size", guided=False, factor=2.0, what="train",
                    device=run.device)  # the EMA copy is measured on the CPU; the batch trains on run.device
        self.denoiser = build_denoiser(cfg, net, self.sampled.schedule)
        self.levels = noise_levels(cfg, self.sampled.schedule)
        self.heat = heat_process(cfg)
        return net

    def prepared(self, model) -> None:
        self.denoiser.model = model
        self.channels_last = use_channels_last(self.cfg)
        self.device = next(model.parameters()).device

    def loss(self, model, batch: dict, g: torch.Generator) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        if self.vae is not None:
            x0 = encode_batch(self.vae, batch, g, cfg.model.latent_sample).to(self.device)
        else:
            x0 = batch["image"].to(self.device)
        if self.channels_last and x0.ndim == 4:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        if cfg.model.process != "gaussian":
            return heat_loss(self.heat, model, x0, g), {}
        lv = self.levels(x0.shape[0], g)
        noise = pfgm_noise(x0.shape, cfg.model.pfgm_d, generator=g) if cfg.model.pfgm_d else \
            frame_noise(x0.shape, cfg.model.frame_noise_correlation, g)
        noise = noise.to(self.device, x0.dtype)
        cond = self._condition(batch, g)
        if cfg.model.inpainting:  # random masks; the masked image and the mask stay when the caption is dropped
            mask = training_masks(batch, x0.shape[-1], g, cfg.train.mask_kinds).to(self.device)
            cond["inpaint"] = inpaint_condition(x0, mask)
        per_sample = denoising_loss(self.denoiser, x0, lv.sigma.to(self.device), noise, weighting=cfg.loss.weighting,
                                    min_snr_gamma=cfg.loss.min_snr_gamma, cond=cond, sigma_data=cfg.model.sigma_data)
        if isinstance(self.levels, LossAwareTimesteps) and bool(torch.isfinite(per_sample).all()):
            self.levels.update(lv.t, per_sample)  # a non-finite loss (a skipped step) must not poison the history
        return (per_sample.float() * lv.weight.to(per_sample.device, torch.float32)).mean(), {}

    def _condition(self, batch: dict, g: torch.Generator) -> dict:
        cfg = self.cfg
        if cfg.model.conditioning == "text":
            return text_condition(cfg.train, batch, g, layouts=bool(cfg.model.layout_channels))
        if cfg.model.conditioning != "class":
            return {}
        labels = batch["label"].to(self.device)
        drop = torch.rand(labels.shape, generator=g) < cfg.train.cond_dropout
        null = self.sampled.info["num_classes"]
        return {"class_labels": torch.where(drop.to(self.device), torch.full_like(labels, null), labels)}

    def after_step(self, model, step: int, run: Run) -> None:
        self.ema.update(run.acc.unwrap_model(model), step, run.global_batch)

    def periodic(self, step: int, run: Run) -> None:
        if run.main and self.cfg.sample.every and step % self.cfg.sample.every == 0:
            save_sample_grid(self.sampled, run.out / "samples" / f"step-{step:08d}.png")

    def state_dict(self) -> dict:
        state = {"ema": modeldir.module_weights(self.ema.model)}
        if hasattr(self.levels, "state_dict"):
            state["noise_levels"] = self.levels.state_dict()
        return state

    def load_state_dict(self, state: dict, source: Path) -> None:
        trained_with = (state.get("info") or {}).get("autoencoder_hash")
        if trained_with and trained_with != self.sampled.info.get("autoencoder_hash"):
            raise TrainingError(f"{self.cfg.model.autoencoder} is not the autoencoder {source} was trained with "
                                f"(weights hash {self.sampled.info.get('autoencoder_hash')} vs {trained_with})")
        modeldir.load_module_weights(self.ema.model, state["ema"])
        if "noise_levels" in state and hasattr(self.levels, "load_state_dict"):
            self.levels.load_state_dict(state["noise_levels"])

    def finish(self, model, step: int, run: Run) -> TrainResult:
        export = run.out / "model"
        net = run.acc.unwrap_model(model)
        if run.main:
            if self.cfg.sample.every and step % self.cfg.sample.every:  # the last weights (time limit, odd steps)
                save_sample_grid(self.sampled, run.out / "samples" / f"step-{step:08d}.png")
            save_diffusion(export, self.cfg, run.info, net, self.ema.model, autoencoder=self.cfg.model.autoencoder)
        return TrainResult(export, net, self.ema.model, step)


def text_condition(train_cfg, batch: dict, g: torch.Generator, layouts: bool) -> dict:
    """A text model's condition with CFG dropout: captions, and per-image layouts for a layout model."""
    drop = (torch.rand(len(batch["text"]), generator=g) < train_cfg.cond_dropout).tolist()
    cond = {"text": ["" if d else t for d, t in zip(drop, batch["text"])]}
    if layouts:  # no layout without the caption: guidance's null condition has neither
        keep = (torch.rand(len(drop), generator=g) >= train_cfg.layout_dropout).tolist()
        cond["layout"] = [lay if k and not d else None for lay, k, d in zip(batch["layout"], keep, drop)]
        if train_cfg.layout_only > 0:  # caption-less layouts: the map alone must say what goes where
            alone = (torch.rand(len(drop), generator=g) < train_cfg.layout_only).tolist()
            cond["text"] = ["" if a and lay is not None else t
                            for a, lay, t in zip(alone, cond["layout"], cond["text"])]
    return cond


def export_checkpoint(checkpoint: str | Path, out: str | Path, use_ema: bool = True,
                      dtype: torch.dtype = torch.float32) -> Path:
    """Turn a training checkpoint (or a run directory's latest) into a shareable model directory
    holding one set of weights (the EMA ones by default), optionally stored in half precision."""
    source = find_checkpoint(checkpoint)
    state = load_checkpoint(source, ("model", "ema", "config"))
    with modeldir.parsing(source / "state.json"):
        cfg = from_dict(TrainConfig, state["config"])
    info = state.get("info") or dataset_info(build_dataset(cfg))
    net = build_network(cfg, info)
    modeldir.load_module_weights(net, state["ema" if use_ema else "model"], source=str(source))
    if dtype != torch.float32:
        net = net.to(dtype)
    if cfg.model.autoencoder:
        trained_with = info.get("autoencoder_hash")
        weights = Path(cfg.model.autoencoder) / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"the autoencoder of {source} ({cfg.model.autoencoder}) is missing; run from "
                                    f"the directory training ran in, or restore it")
        if trained_with and modeldir.file_hash(weights) != trained_with:
            raise ValueError(f"{cfg.model.autoencoder} is not the autoencoder {source} was trained with "
                             f"(weights hash {modeldir.file_hash(weights)} vs {trained_with})")
    return save_diffusion(out, cfg, info, net, autoencoder=cfg.model.autoencoder)
