"""The MuLAN trainer: an eps network, its latent encoder and its per-pixel, input-adaptive noise schedule trained
jointly on MuLAN's negative ELBO in bits per dimension (Sahoo et al. 2024; the math is in ``reverie.mulan``).

Each micro-batch: t per image (VDM's low-discrepancy draw), the latent c ~ q(c | x0) (reparameterized), the
per-pixel gamma(c, t) and gamma'(c, t), the VP latent, eps_hat conditioned on c and the gamma map, and the loss
latent KL + prior KL + decoder + 0.5 sum_i gamma_i' (eps_i - eps_hat_i)^2. Everything else (data, EMA, which
keeps the schedule in float64, checkpoints, exact resume, the model directory) is the VDM trainer's and, through
it, the diffusion trainer's. The U-Net gets ``spatial_channels`` = image channels (the gamma map) and
``pooled_dim`` = the latent size, set here.

Run it with ``reverie train CONFIG`` (a config with a ``mulan:`` section; configs/mnist-mulan.yaml) or
``python -m reverie.train.mulan CONFIG [--section.key=value ...] [--resume=no]``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

from ..build import DiffusionModel, build_network
from ..configs import from_dict, to_dict
from ..mulan import MuLANNet, negative_elbo
from ..vdm import GAMMA_REF
from .config import TrainConfig
from .diffusion import TrainResult
from .ema import EMA
from .run import Run, fit, use_channels_last
from .vdm import VDMTrainer, pixel_eps_checks, run_main


@dataclass
class MuLANSection:
    latent_dim: int = 8                 # size of the auxiliary latent c (prior N(0, I))
    hidden: int = 64                    # features of the schedule MLP (latent -> per-pixel polynomial)
    encoder_width: int = 16             # channels of the latent encoder's first convolution
    gamma_min: float = GAMMA_REF[0]     # shared, fixed gamma(c, 0) of every pixel
    gamma_max: float = GAMMA_REF[1]     # shared, fixed gamma(c, 1)
    antithetic: bool = True             # low-discrepancy t: t_i = (u + i / B) mod 1
    speed: float = 1.0                  # learning-rate multiplier of the schedule (as vdm.speed)

    def net_kwargs(self) -> dict:
        return {"latent_dim": self.latent_dim, "hidden": self.hidden, "encoder_width": self.encoder_width,
                "gamma_min": self.gamma_min, "gamma_max": self.gamma_max, "speed": self.speed}


@dataclass
class MuLANTrainConfig(TrainConfig):
    """A diffusion config with a ``mulan`` section; the model predicts eps."""

    mulan: MuLANSection = field(default_factory=MuLANSection)

    def checks(self) -> list[tuple[bool, str]]:
        return super().checks() + pixel_eps_checks(self, "MuLAN") + [
            (self.mulan.gamma_min < self.mulan.gamma_max, "mulan.gamma_min must be below mulan.gamma_max"),
            (self.mulan.latent_dim >= 1 and self.mulan.hidden >= 1 and self.mulan.encoder_width >= 1,
             "mulan.latent_dim, mulan.hidden and mulan.encoder_width must be >= 1"),
            (self.model.conditioning != "class", "the MuLAN trainer takes unconditional models"),
            (self.mulan.speed > 0, "mulan.speed must be > 0"),
        ]

    def base(self) -> TrainConfig:
        """The config without the mulan section: what a model directory stores as ``train_config``."""
        return from_dict(TrainConfig, {k: v for k, v in to_dict(self).items() if k != "mulan"})


def train_mulan(cfg: MuLANTrainConfig, resume: str | bool = "auto", dataset=None) -> TrainResult:
    """Train a MuLAN model per ``cfg`` (see :func:`reverie.train.run.fit` for ``resume``)."""
    return fit(MuLANTrainer(cfg, dataset), resume)


class MuLANTrainer(VDMTrainer):
    name = "train-mulan"
    network_fields = ("model.", "data.resolution", "mulan.latent_dim", "mulan.hidden", "mulan.encoder_width",
                      "mulan.speed")

    def build(self, run: Run, resuming: bool) -> torch.nn.Module:
        cfg = self.cfg
        channels, size = run.info["in_channels"], run.info["resolution"]
        wide = copy.deepcopy(cfg)  # the run's config stays as written (resume compares it)
        wide.model.network_overrides = {**cfg.model.network_overrides, "spatial_channels": channels,
                                        "pooled_dim": cfg.mulan.latent_dim}
        net = MuLANNet(build_network(wide, run.info), (channels, size, size), **cfg.mulan.net_kwargs())
        if use_channels_last(cfg):
            net.net = net.net.to(memory_format=torch.channels_last)
        self.ema = EMA(net, cfg.ema.max_decay, cfg.ema.power, cfg.ema.inv_gamma, cfg.ema.half_life_images)
        self.ema.model.gamma.double()  # EMA copies are float32; schedule arithmetic stays float64
        self.sampled = DiffusionModel(self.ema.model, cfg.base(), run.info)
        self.vae, self.levels = None, None
        return net

    def loss(self, model, batch: dict, g: torch.Generator) -> tuple[torch.Tensor, dict]:
        x0 = batch["image"].to(self.device)
        if use_channels_last(self.cfg) and x0.ndim == 4:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        terms = negative_elbo(getattr(model, "module", model), x0, g, self.cfg.mulan.antithetic)
        to_bpd = 1.0 / (terms.num_dims * math.log(2.0))
        logged = {f"bpd_{k}": float(getattr(terms, k).detach().mean()) * to_bpd
                  for k in ("diffusion", "prior", "reconstruction", "latent")}
        return (terms.total.mean() * to_bpd).float(), logged


def main(argv: list[str] | None = None) -> int:
    return run_main(argv, "mulan", MuLANTrainConfig, train_mulan)


if __name__ == "__main__":
    raise SystemExit(main())
