"""The training loop (Ho et al. 2020, Algorithm 1, with what practitioners add), on HF accelerate.

Each optimizer step: draw a batch, a noise level per sample and noise, form x = x0 + sigma * noise,
let the network predict its target, take the weighted MSE, backpropagate, clip, step, update EMA.

Exact resume: every random draw of step ``k`` on rank ``r`` (noise levels, noise, condition
dropout, the network's dropout) comes from generators seeded by ``(seed, r, k)``, and the data
order is a pure function of ``(seed, epoch)``; the checkpoint stores weights, EMA, optimizer, LR
scheduler, step and data position, so ``N/2 + resume + N/2`` steps reproduce ``N`` straight steps.
Data are sharded by the loop itself (rank r takes every world-th index of the epoch's order), so
no sample is seen twice in an epoch across ranks. Only the main process writes files.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from ..configs import to_dict
from ..denoisers import make_denoiser
from ..losses import LogNormalSigmas, LossAwareTimesteps, UniformTimesteps, denoising_loss
from ..schedules import DiscreteVPSchedule
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .ema import EMA


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. repeated non-finite losses); the message says why."""


class ShardedSampler(Sampler):
    """Indices of one rank for one epoch, starting at a given batch; a pure function of its args.

    Datasets larger than 2**24 (procedural ones) are read in order: each index is already a fresh
    random sample, and a permutation of them would not fit in memory.
    """

    def __init__(self, size: int, rank: int, world: int, seed: int, epoch: int, shuffle: bool,
                 start: int = 0):
        self.size, self.rank, self.world = size, rank, world
        self.seed, self.epoch, self.shuffle, self.start = seed, epoch, shuffle, start

    def __len__(self) -> int:
        return max(0, (self.size - self.rank + self.world - 1) // self.world - self.start)

    def __iter__(self):
        first = self.rank + self.start * self.world
        if self.shuffle and self.size <= 2**24:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            return iter(torch.randperm(self.size, generator=g)[first::self.world].tolist())
        return iter(range(first, self.size, self.world))


def collate(items: list[dict]) -> dict:
    """Stack images (or cached latent moments) and labels; keep captions as a list of strings."""
    batch = {
        "label": torch.tensor([int(it.get("label", -1)) for it in items]),
        "text": [it.get("text", "") for it in items],
    }
    for key in ("image", "moments"):  # moments: cached VAE posteriors (reverie.latent.LatentCache)
        if key in items[0]:
            batch[key] = torch.stack([it[key] for it in items])
    if "layout" in items[0]:  # per-image lists of (phrase, box): reverie.layout
        batch["layout"] = [it["layout"] for it in items]
    return batch


@dataclass
class DataState:
    epoch: int = 0
    batch: int = 0  # batches consumed in this epoch (per rank)


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + rank) * 10_000_019 + step)


def build_dataset(cfg: TrainConfig):
    from ..data import get_dataset

    return get_dataset(cfg.data.name, resolution=cfg.data.resolution, **cfg.data.options)


def dataset_info(dataset) -> dict:
    """Channels, resolution and number of classes of a dataset (from its first item)."""
    first = dataset[0]
    num_classes = int(getattr(dataset, "num_classes", 0) or 0)
    return {"in_channels": int(first["image"].shape[0]), "resolution": int(first["image"].shape[-1]),
            "num_classes": num_classes}


def build_text_encoder(cfg: TrainConfig):
    from ..text import get_text_encoder

    if cfg.model.text_encoder_options:
        return get_text_encoder({"name": cfg.model.text_encoder, **cfg.model.text_encoder_options})
    return get_text_encoder(cfg.model.text_encoder)


def model_state(module: torch.nn.Module) -> dict:
    """The weights a checkpoint or model file stores (a frozen text encoder is left out)."""
    if hasattr(module, "trainable_state_dict"):
        return module.trainable_state_dict()
    return module.state_dict()


def load_model_state(module: torch.nn.Module, state: dict) -> None:
    if hasattr(module, "load_trainable_state_dict"):
        module.load_trainable_state_dict(state)
    else:
        module.load_state_dict(state)


def init_weights(net: torch.nn.Module, model_dir: str | Path) -> list[str]:
    """Start ``net`` from a model directory's weights (EMA if present) for fine-tuning. Tensors the
    directory lacks (a module the new config adds, e.g. a layout encoder) keep their initialization,
    which for reverie's new input paths is zero, so the run starts as the old model; a tensor of another
    shape, or one the new network lacks, is an error. Returns the new tensors' module names."""
    from safetensors.torch import load_file

    path = Path(model_dir)
    weights = next((path / f for f in ("ema.safetensors", "model.safetensors") if (path / f).is_file()), None)
    if weights is None:
        raise TrainingError(f"train.init_from={model_dir!r} is not a model directory (no model.safetensors)")
    found, state = load_file(str(weights)), model_state(net)
    unexpected = sorted(set(found) - set(state))
    shapes = [k for k in set(found) & set(state) if found[k].shape != state[k].shape]
    if unexpected or shapes:
        raise TrainingError(f"{weights} does not fit this network: unexpected {unexpected[:5]}, "
                            f"other shapes {sorted(shapes)[:5]}")
    added = sorted({k.rsplit(".", 1)[0] for k in set(state) - set(found)})
    load_model_state(net, {**state, **found})
    return added


def build_schedule(cfg: TrainConfig) -> DiscreteVPSchedule:
    return DiscreteVPSchedule.from_name(cfg.schedule.name, cfg.schedule.num_timesteps,
                                        zero_terminal_snr=cfg.schedule.zero_terminal_snr)


def build_model(cfg: TrainConfig, info: dict):
    """Network, schedule and denoiser for a config and dataset info (see :func:`dataset_info`)."""
    from ..nets import PRESETS, create_network

    if cfg.model.network not in PRESETS:
        raise TrainingError(f"unknown model.network {cfg.model.network!r}; presets: {', '.join(PRESETS)}")
    overrides = dict(cfg.model.network_overrides)
    overrides.setdefault("in_channels", info["in_channels"])
    overrides.setdefault("out_channels", info["in_channels"])
    size_field = "input_size" if PRESETS[cfg.model.network].arch == "dit" else "sample_size"
    overrides.setdefault(size_field, info["resolution"])
    encoder = None
    if cfg.model.conditioning == "class":
        if not info["num_classes"]:
            raise TrainingError(f"model.conditioning=class but dataset {cfg.data.name!r} has no class labels")
        overrides["num_classes"] = info["num_classes"] + 1  # the last class is "no class" (CFG)
    elif cfg.model.conditioning == "text":
        encoder = build_text_encoder(cfg)
        overrides["context_dim"] = encoder.dim
        overrides["pooled_dim"] = encoder.pooled_dim
        if cfg.model.layout_channels:
            if PRESETS[cfg.model.network].arch != "unet":
                raise TrainingError("model.layout_channels needs a U-Net (the DiT takes no spatial condition yet)")
            overrides["spatial_channels"] = cfg.model.layout_channels
    net = create_network(cfg.model.network, **overrides)
    if encoder is not None:
        from ..conditioning import TextConditionedNet

        net = TextConditionedNet(net, encoder, layout_channels=cfg.model.layout_channels)
    schedule = build_schedule(cfg)
    if cfg.model.prediction == "edm":
        denoiser = make_denoiser("edm", net, sigma_data=cfg.model.sigma_data)
    else:
        denoiser = make_denoiser(cfg.model.prediction, net, schedule)
    return net, schedule, denoiser


def _noise_levels(cfg: TrainConfig, schedule):
    if cfg.loss.noise_levels == "lognormal":
        return LogNormalSigmas(cfg.loss.p_mean, cfg.loss.p_std)
    if cfg.loss.noise_levels == "loss_aware":
        return LossAwareTimesteps(schedule)
    return UniformTimesteps(schedule)


def lr_lambda(cfg: TrainConfig):
    warm, total, floor = cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.min_lr_ratio

    def f(step: int) -> float:
        if warm > 0 and step < warm:
            return (step + 1) / warm
        if cfg.optim.lr_schedule == "cosine":
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.optim.lr_schedule == "wsd":  # Hu et al. 2024 (MiniCPM); Haegele et al. 2024
            decay = max(1, round(cfg.optim.decay_fraction * total))
            progress = min(1.0, max(0.0, (step - (total - decay)) / decay))
            return 1.0 - (1 - floor) * progress
        return 1.0

    return f


class Batches:
    """Endless per-rank batches with a resumable position (epoch, batch)."""

    def __init__(self, dataset, cfg: TrainConfig, rank: int, world: int, state: DataState):
        self.dataset, self.cfg, self.rank, self.world, self.state = dataset, cfg, rank, world, state
        self._it = None

    def _loader(self):
        cfg, state = self.cfg, self.state
        if hasattr(self.dataset, "set_epoch"):  # e.g. imagefolder's per-epoch random flips
            self.dataset.set_epoch(state.epoch)
        sampler = ShardedSampler(len(self.dataset), self.rank, self.world, cfg.train.seed,
                                 state.epoch, cfg.data.shuffle, state.batch * cfg.data.batch_size)
        return DataLoader(self.dataset, batch_size=self.cfg.data.batch_size, sampler=sampler,
                          num_workers=self.cfg.data.num_workers, collate_fn=collate, drop_last=True,
                          persistent_workers=False)

    def next(self) -> dict:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self._loader())
            try:
                batch = next(self._it)
                self.state.batch += 1
                return batch
            except StopIteration:
                self._it = None
                self.state.epoch += 1
                self.state.batch = 0
        raise TrainingError(f"dataset {self.cfg.data.name!r} is smaller than one batch per process")


def _condition(cfg: TrainConfig, batch: dict, info: dict, g: torch.Generator, device) -> dict:
    if cfg.model.conditioning == "text":
        drop = (torch.rand(len(batch["text"]), generator=g) < cfg.train.cond_dropout).tolist()
        cond = {"text": ["" if d else t for d, t in zip(drop, batch["text"])]}
        if cfg.model.layout_channels:  # no layout without the caption: guidance's null condition has neither
            keep = (torch.rand(len(drop), generator=g) >= cfg.train.layout_dropout).tolist()
            cond["layout"] = [lay if k and not d else None for lay, k, d in zip(batch["layout"], keep, drop)]
            if cfg.train.layout_only > 0:  # caption-less layouts: the map alone must say what goes where
                alone = (torch.rand(len(drop), generator=g) < cfg.train.layout_only).tolist()
                cond["text"] = ["" if a and lay is not None else t
                                for a, lay, t in zip(alone, cond["layout"], cond["text"])]
        return cond
    if cfg.model.conditioning != "class":
        return {}
    labels = batch["label"].to(device)
    drop = torch.rand(labels.shape, generator=g) < cfg.train.cond_dropout
    labels = torch.where(drop.to(device), torch.full_like(labels, info["num_classes"]), labels)
    return {"class_labels": labels}


def _tensorboard(out: Path):
    """A TensorBoard writer if the tensorboard package is installed (else a warning and None)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn("train.tensorboard=true but tensorboard is not installed (pip install tensorboard); "
                      "logging to log.jsonl only", stacklevel=2)
        return None
    return SummaryWriter(str(out / "tensorboard"))


@dataclass
class TrainResult:
    export_dir: Path   # config.json + model.safetensors + ema.safetensors (written by rank 0)
    model: torch.nn.Module
    ema_model: torch.nn.Module
    step: int


def train(cfg: TrainConfig, resume: str | bool = "auto", dataset=None) -> TrainResult:
    """Train per ``cfg``; ``resume="auto"`` continues from ``out_dir``'s latest checkpoint if any,
    a path resumes from that checkpoint, False starts fresh."""
    from accelerate import Accelerator

    from ..pipeline import file_hash, save_model_dir
    from .sampling import save_sample_grid

    if cfg.train.threads > 0:
        # OpenMP threads spin-wait: on a machine shared with other jobs, more threads than free cores
        # make every op wait for a descheduled thread (measured here: 5x slower with 2 than with 1).
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.compile and cfg.train.mixed_precision != "no" and not torch.cuda.is_available():
        # Measured with torch 2.13 on the CPU: the compiled shapes U-Net under bf16 autocast gave a finite
        # first loss, then non-finite losses from the second step on; eager bf16 and compiled fp32 train fine.
        raise TrainingError("train.compile with mixed precision on the CPU gave non-finite losses here "
                            "(torch 2.13); use --train.mixed_precision=no with compile, or compile on a GPU")
    acc = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=not torch.cuda.is_available())
    rank, world, main = acc.process_index, acc.num_processes, acc.is_main_process
    out = Path(cfg.train.out_dir)
    dataset = dataset if dataset is not None else build_dataset(cfg)
    info = dataset_info(dataset)
    if cfg.model.layout_channels and "layout" not in dataset[0]:
        raise TrainingError(f"model.layout_channels needs a dataset with object layouts; {cfg.data.name!r} has none")
    vae = None
    if cfg.model.autoencoder:  # latent diffusion: a frozen VAE between the data and the network
        from ..latent import LatentCache, encode_batch, latent_info, load_vae

        vae = load_vae(cfg.model.autoencoder, acc.device)
        info = latent_info(info, vae)
        info["autoencoder_hash"] = file_hash(Path(cfg.model.autoencoder) / "model.safetensors")
        if cfg.data.cache_latents:
            dataset = LatentCache(dataset, vae, progress=main and cfg.train.progress)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    net, schedule, denoiser = build_model(cfg, info)
    ckpt_dir = out / "checkpoints"
    source = latest_checkpoint(ckpt_dir) if resume == "auto" else (Path(resume) if resume else None)
    if cfg.train.init_from and source is None:  # a resumed run's checkpoint already holds the weights
        added = init_weights(net, cfg.train.init_from)
        if main:
            print(f"initialized from {cfg.train.init_from}" + (f"; new: {', '.join(added)}" if added else ""))
    if cfg.train.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if cfg.train.gradient_checkpointing and hasattr(net, "set_gradient_checkpointing"):
        net.set_gradient_checkpointing(True)
    ema = EMA(net, cfg.ema.max_decay, cfg.ema.power, cfg.ema.inv_gamma, cfg.ema.half_life_images)
    if cfg.train.compile:
        # In place (nn.Module.compile): parameter names, checkpoints and the EMA copy (made above, so
        # sampling stays eager) are unchanged. Only the image network: a text encoder takes strings.
        (net.net if hasattr(net, "encoder") else net).compile()
    trainable = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                            eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    levels = _noise_levels(cfg, schedule)
    step, data_state, nonfinite_total = 0, DataState(), 0

    if source is not None:
        state = load_checkpoint(source)
        trained_with = (state.get("info") or {}).get("autoencoder_hash")
        if trained_with and trained_with != info.get("autoencoder_hash"):
            raise TrainingError(f"{cfg.model.autoencoder} is not the autoencoder {source} was trained with "
                                f"(weights hash {info.get('autoencoder_hash')} vs {trained_with})")
        load_model_state(net, state["model"])
        load_model_state(ema.model, state["ema"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["lr_scheduler"])
        step, nonfinite_total = state["step"], state.get("nonfinite_total", 0)
        data_state = DataState(**state["data"])
        if "noise_levels" in state and hasattr(levels, "load_state_dict"):
            levels.load_state_dict(state["noise_levels"])
        if main:
            print(f"resumed from {source} at step {step}")

    model, opt = acc.prepare(net, opt)
    denoiser.model = model
    batches = Batches(dataset, cfg, rank, world, data_state)

    def checkpoint(path_step: int) -> Path | None:
        if not main:
            return None
        state = {"step": path_step, "model": model_state(acc.unwrap_model(model)), "ema": model_state(ema.model),
                 "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(),
                 "data": vars(data_state).copy(), "nonfinite_total": nonfinite_total,
                 "rng": {"torch": torch.get_rng_state()}, "config": to_dict(cfg), "info": dict(info)}
        if hasattr(levels, "state_dict"):
            state["noise_levels"] = levels.state_dict()
        return save_checkpoint(ckpt_dir, path_step, state, keep_last=cfg.train.keep_last)

    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    log = (out / "log.jsonl").open("a" if source is not None else "w") if main else None
    tb = _tensorboard(out) if main and cfg.train.tensorboard else None
    bar = tqdm(total=cfg.train.steps, initial=step, disable=not (main and cfg.train.progress),
               desc="train", dynamic_ncols=True)
    consecutive_bad, t_last, imgs_since = 0, time.perf_counter(), 0
    t_start = t_last
    last_good = latest_checkpoint(ckpt_dir)
    model.train()
    while step < cfg.train.steps:
        g = step_generator(cfg.train.seed, rank, step)
        torch.manual_seed(g.initial_seed() % 2**63)  # the network's dropout
        opt.zero_grad(set_to_none=True)
        total_loss, bad = 0.0, False
        for micro in range(cfg.train.grad_accum):
            batch = batches.next()
            if vae is not None:
                x0 = encode_batch(vae, batch, g, cfg.model.latent_sample).to(acc.device)
            else:
                x0 = batch["image"].to(acc.device)
            if cfg.train.channels_last and x0.ndim == 4:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            lv = levels(x0.shape[0], g)
            noise = torch.randn(x0.shape, generator=g).to(acc.device, x0.dtype)
            cond = _condition(cfg, batch, info, g, acc.device)
            with acc.autocast():
                per_sample = denoising_loss(
                    denoiser, x0, lv.sigma.to(acc.device), noise, weighting=cfg.loss.weighting,
                    min_snr_gamma=cfg.loss.min_snr_gamma, cond=cond, sigma_data=cfg.model.sigma_data)
            loss = (per_sample.float() * lv.weight.to(per_sample.device, torch.float32)).mean()
            if isinstance(levels, LossAwareTimesteps):
                levels.update(lv.t, per_sample)
            bad = bad or not bool(torch.isfinite(loss))
            if bad:
                break
            total_loss += float(loss.detach()) / cfg.train.grad_accum
            sync = micro == cfg.train.grad_accum - 1
            ctx = acc.no_sync(model) if (not sync and world > 1) else nullcontext()
            with ctx:
                acc.backward(loss / cfg.train.grad_accum)
        # Every rank must agree on skipping, or DDP's collectives would hang.
        flag = acc.reduce(torch.tensor([float(bad)], device=acc.device), reduction="sum")
        if float(flag) > 0:
            consecutive_bad += 1
            nonfinite_total += 1
            opt.zero_grad(set_to_none=True)
            if consecutive_bad >= cfg.train.max_nonfinite:
                bar.close()
                raise TrainingError(
                    f"{consecutive_bad} non-finite losses in a row at step {step}: the learning rate "
                    f"({cfg.optim.lr:g}) is likely too high, or fp16 overflowed (try bf16 or no), or "
                    f"the data contain NaN. Last good checkpoint: {last_good or 'none'}")
            step += 1  # a skipped step still advances, keeping the (seed, rank, step) stream aligned
            with warnings.catch_warnings():  # stepping the LR without an optimizer step is intended
                warnings.simplefilter("ignore", UserWarning)
                sched.step()
            continue
        consecutive_bad = 0
        grad_norm = None
        if cfg.optim.grad_clip > 0:
            grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
        step += 1
        global_batch = cfg.data.batch_size * cfg.train.grad_accum * world
        ema.update(acc.unwrap_model(model), step, global_batch)
        imgs_since += global_batch
        bar.update(1)
        out_of_time = False
        if cfg.train.time_limit_min > 0:  # every rank must stop at the same step: rank 0's clock decides
            over = torch.tensor([float(main and time.perf_counter() - t_start > 60 * cfg.train.time_limit_min)],
                                device=acc.device)
            out_of_time = float(acc.reduce(over, reduction="sum")) > 0
        if main and (step % cfg.train.log_every == 0 or step == cfg.train.steps or out_of_time):
            now = time.perf_counter()
            rate = imgs_since / max(now - t_last, 1e-9)
            t_last, imgs_since = now, 0
            record = {"step": step, "loss": total_loss, "lr": sched.get_last_lr()[0], "images_per_s": rate,
                      "grad_norm": float(grad_norm) if grad_norm is not None else None,
                      "nonfinite_skipped": nonfinite_total, "epoch": data_state.epoch,
                      "elapsed_s": now - t_start}
            log.write(json.dumps(record) + "\n")
            log.flush()
            if tb is not None:
                for key in ("loss", "lr", "images_per_s", "grad_norm"):
                    if record[key] is not None:
                        tb.add_scalar(f"train/{key}", record[key], step)
            bar.set_postfix(loss=f"{total_loss:.4f}", img_s=f"{rate:.1f}")
        if main and cfg.sample.every and step % cfg.sample.every == 0:
            save_sample_grid(ema.model, cfg, schedule, info, out / "samples" / f"step-{step:08d}.png", vae=vae)
        if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
            last_good = checkpoint(step) or last_good
            acc.wait_for_everyone()
        if out_of_time:
            if main:
                bar.write(f"time limit of {cfg.train.time_limit_min:g} min reached at step {step}")
            break
    bar.close()
    if main and cfg.sample.every and step % cfg.sample.every:  # the last weights' samples (time limit, odd steps)
        save_sample_grid(ema.model, cfg, schedule, info, out / "samples" / f"step-{step:08d}.png", vae=vae)
    if log:
        log.close()
    if tb is not None:
        tb.close()
    export = out / "model"
    if main:
        if not cfg.train.checkpoint_every or step % cfg.train.checkpoint_every:
            checkpoint(step)
        save_model_dir(export, cfg, info, acc.unwrap_model(model), ema.model, autoencoder=cfg.model.autoencoder)
    acc.wait_for_everyone()
    return TrainResult(export, acc.unwrap_model(model), ema.model, step)
