"""The VDM trainer: a noise-prediction network and its log-SNR schedule trained jointly on the continuous-time
ELBO (Kingma et al. 2021, "Variational Diffusion Models"; the math is in ``reverie.vdm``).

Each micro-batch: t per sample (VDM's low-discrepancy draw), gamma(t) and gamma'(t) from the schedule, the VP
latent z_t = alpha x0 + sigma eps, the network's eps_hat conditioned on gamma, and the loss in bits per
dimension: prior KL at gamma_1 + the discrete decoder at gamma_0 + 0.5 gamma'(t) |eps - eps_hat|^2. The
endpoints (when ``vdm.learn_endpoints``) follow the ELBO's gradient; the shape of a learned schedule follows
the gradient of the squared diffusion loss, i.e. of the estimator's variance (``vdm.variance_gradient``).

The rest is the diffusion trainer's (``reverie.train.diffusion``): data, class conditions, EMA (which keeps
the schedule too, in float64), checkpoints and exact resume. The model directory is a diffusion model whose
``config.json`` also holds the schedule (``"vdm"``) and whose weights hold ``net.*`` and ``gamma.*``;
``Pipeline`` and every sampler see the learned schedule through ``reverie.vdm.VDMScheduleView``.

Run it with ``python -m reverie.train.vdm CONFIG [--section.key=value ...]`` (configs/mnist-vdm.yaml).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..build import DiffusionModel, build_network, save_diffusion
from ..configs import from_dict, load_config, to_dict
from ..utils import append_dims
from ..vdm import (
    GAMMA_REF,
    VDMNet,
    diffusion_loss,
    gamma_with_derivative,
    make_gamma,
    prior_kl,
    reconstruction_nll,
    sample_times,
)
from .config import TrainConfig
from .diffusion import DiffusionTrainer, TrainResult
from .ema import EMA
from .run import Run, fit, use_channels_last


@dataclass
class VDMSection:
    schedule: Literal["learned", "linear", "cosine"] = "learned"   # learned: VDM's monotone network
    gamma_min: float = GAMMA_REF[0]     # initial gamma(0) = -log SNR_max
    gamma_max: float = GAMMA_REF[1]     # initial gamma(1) = -log SNR_min
    learn_endpoints: bool = True        # gamma_min / gamma_max trained on the ELBO (else fixed)
    hidden: int = 1024                  # features of the learned schedule's hidden layer
    speed: float = 1.0                  # learning-rate multiplier of the learned schedule's shape
    antithetic: bool = True             # low-discrepancy t: t_i = (u + i / B) mod 1
    variance_gradient: bool = True      # learned shape: minimize the loss estimator's variance (VDM Sec. 5.2)

    def gamma_config(self) -> dict:
        config = {"kind": self.schedule, "gamma_min": self.gamma_min, "gamma_max": self.gamma_max,
                  "learn_endpoints": self.learn_endpoints}
        return {**config, "hidden": self.hidden, "speed": self.speed} if self.schedule == "learned" else config


@dataclass
class VDMTrainConfig(TrainConfig):
    """A diffusion config with a ``vdm`` section; the model must predict eps (VDM's parameterization)."""

    vdm: VDMSection = field(default_factory=VDMSection)

    def checks(self) -> list[tuple[bool, str]]:
        return super().checks() + pixel_eps_checks(self, "VDM") + [
            (self.vdm.gamma_min < self.vdm.gamma_max, "vdm.gamma_min must be below vdm.gamma_max"),
            (self.vdm.hidden >= 1, "vdm.hidden must be >= 1"),
            (self.vdm.speed > 0, "vdm.speed must be > 0"),
        ]

    def base(self) -> TrainConfig:
        """The config without the vdm section: what a model directory stores as ``train_config``."""
        return from_dict(TrainConfig, {k: v for k, v in to_dict(self).items() if k != "vdm"})


def pixel_eps_checks(cfg: TrainConfig, what: str) -> list[tuple[bool, str]]:
    """What the continuous-ELBO trainers (VDM, MuLAN) need of the base config."""
    return [
        (cfg.model.prediction == "eps", f"a {what} model predicts eps: set model.prediction=eps"),
        (cfg.model.conditioning != "text", f"the {what} trainer takes unconditional or class models"),
        (not cfg.model.autoencoder, f"the {what} trainer works in pixel space (model.autoencoder must be empty)"),
        (not cfg.train.init_from, f"train.init_from is not supported by the {what} trainer"),
    ]


def train_vdm(cfg: VDMTrainConfig, resume: str | bool = "auto", dataset=None) -> TrainResult:
    """Train a VDM model per ``cfg`` (see :func:`reverie.train.run.fit` for ``resume``)."""
    return fit(VDMTrainer(cfg, dataset), resume)


class VDMTrainer(DiffusionTrainer):
    name = "train-vdm"
    network_fields = ("model.", "data.resolution", "vdm.schedule", "vdm.hidden", "vdm.speed")

    def build(self, run: Run, resuming: bool) -> torch.nn.Module:
        cfg = self.cfg
        net = VDMNet(build_network(cfg, run.info), make_gamma(cfg.vdm.gamma_config()))
        if use_channels_last(cfg):
            net.net = net.net.to(memory_format=torch.channels_last)
        self.ema = EMA(net, cfg.ema.max_decay, cfg.ema.power, cfg.ema.inv_gamma, cfg.ema.half_life_images)
        self.ema.model.gamma.double()  # EMA copies are float32; schedule arithmetic stays float64
        self.sampled = DiffusionModel(self.ema.model, cfg.base(), run.info)
        self.vae, self.levels = None, None  # the diffusion trainer's noise-level sampler: t is drawn here
        return net

    def prepared(self, model) -> None:
        self.model = model
        self.device = next(model.parameters()).device

    def loss(self, model, batch: dict, g: torch.Generator) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        x0 = batch["image"].to(self.device)
        if use_channels_last(cfg) and x0.ndim == 4:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        schedule = getattr(model, "module", model).gamma  # unwrapped (DDP); its parameters are the model's
        t = sample_times(x0.shape[0], g, cfg.vdm.antithetic).to(self.device)
        box = {} if cfg.vdm.schedule == "learned" and cfg.vdm.variance_gradient else None
        gamma, dgamma = gamma_with_derivative(schedule, t, create_graph=True, box=box)
        noise = torch.randn(x0.shape, generator=g).to(self.device, x0.dtype)
        noise_0 = torch.randn(x0.shape, generator=g, dtype=torch.float64).to(self.device)
        alpha = append_dims(torch.sigmoid(-gamma).sqrt().to(x0.dtype), x0.ndim)
        sigma = append_dims(torch.sigmoid(gamma).sqrt().to(x0.dtype), x0.ndim)
        eps_hat = model(alpha * x0 + sigma * noise, None, gamma=gamma, **self._condition(batch, g))
        to_bpd = 1.0 / (x0[0].numel() * math.log(2.0))
        diff = diffusion_loss(noise, eps_hat, dgamma) * to_bpd
        if box is not None:
            box["scale"] = 2 * diff.detach()  # d/d(shape) of mean(L^2), read in backward
        prior = prior_kl(x0, schedule.gamma_1) * to_bpd
        recon = reconstruction_nll(x0, schedule.gamma_0, noise_0) * to_bpd
        total = (prior + recon + diff).mean()
        logged = {"bpd_diffusion": float(diff.detach().mean()), "bpd_prior": float(prior.detach().mean()),
                  "bpd_recon": float(recon.detach().mean()), "gamma_min": schedule.gamma_min,
                  "gamma_max": schedule.gamma_max}
        return total.float(), logged

    def finish(self, model, step: int, run: Run) -> TrainResult:
        export = run.out / "model"
        net = run.acc.unwrap_model(model)
        if run.main:
            if self.cfg.sample.every and step % self.cfg.sample.every:
                from ..sampling import save_sample_grid
                save_sample_grid(self.sampled, run.out / "samples" / f"step-{step:08d}.png")
            save_diffusion(export, self.cfg.base(), run.info, net, self.ema.model)
        return TrainResult(export, net, self.ema.model, step)


def main(argv: list[str] | None = None) -> int:
    return run_main(argv, "vdm", VDMTrainConfig, train_vdm)


def run_main(argv: list[str] | None, module: str, config_cls, train_fn) -> int:
    """``python -m reverie.train.MODULE CONFIG [--section.key=value ...] [--resume=no]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        print(f"usage: python -m reverie.train.{module} CONFIG [--section.key=value ...] [--resume=no]",
              file=sys.stderr)
        return 2
    resume = "auto"
    for a in [a for a in argv if a.startswith("--resume=")]:
        argv.remove(a)
        resume = {"auto": "auto", "no": False}.get(a.split("=", 1)[1], a.split("=", 1)[1])
    cfg = load_config(config_cls, argv[0], argv[1:])
    print(f"model written to {train_fn(cfg, resume=resume).export_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
