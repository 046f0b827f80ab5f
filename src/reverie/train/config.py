"""The training configuration: nested typed dataclasses, stored as ``config.json`` beside weights.

Presets live as YAML files under ``configs/``; ``reverie train CONFIG --train.lr=2e-4`` overrides
any field. Every field has a default, so an empty file is a valid (tiny, CPU-sized) run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..configs import ConfigError
from ..data.masks import MASK_KINDS
from ..nets import PRESETS
from ..samplers import SIGMA_GRIDS
from ..sampling import SamplingOptions
from ..sde import SDES


@dataclass
class ModelSection:
    network: str = "unet-tiny"          # a preset of reverie.nets.PRESETS
    network_overrides: dict = field(default_factory=dict)  # e.g. {model_channels: 64}
    prediction: Literal["eps", "v", "x0", "edm"] = "eps"
    sigma_data: float = 0.5             # EDM preconditioning only
    conditioning: Literal["none", "class", "text"] = "none"
    text_encoder: str = "scratch"       # text conditioning: scratch (trained) | minilm (frozen)
    text_encoder_options: dict = field(default_factory=dict)
    layout_channels: int = 0            # text models: >0 also conditions on object boxes (reverie.layout)
    inpainting: bool = False            # mask-aware inpainting: the masked image and the mask as extra inputs
    autoencoder: str = ""               # latent diffusion: a VAE model directory ("" = pixel space)
    latent_sample: bool = True          # train on posterior samples (LDM) rather than posterior means
    # gaussian: x = x0 + sigma * noise (every schedule, the score SDEs included); ihdm / blurring: heat-equation
    # processes with their own loss and sampler (reverie.heat, settings in the heat section)
    process: Literal["gaussian", "ihdm", "blurring"] = "gaussian"
    pfgm_d: int = 0                     # PFGM++ (reverie.pfgm): D extra dimensions of the training noise; 0: Gaussian
    # video: share of each frame's training and sampling noise common to its clip (reverie.process.frame_noise)
    frame_noise_correlation: float = 0.0


@dataclass
class ScheduleSection:
    name: str = "linear"                # linear | scaled_linear | cosine | sigmoid; vp-sde | subvp-sde | ve-sde
    num_timesteps: int = 1000
    zero_terminal_snr: bool = False


@dataclass
class DataSection:
    name: str = "shapes"                # shapes | mnist | digits | imagefolder
    resolution: int = 32
    options: dict = field(default_factory=dict)   # passed to the dataset, e.g. {root: ./pics}
    batch_size: int = 32                # per process, per micro-batch
    num_workers: int = 0
    shuffle: bool = True
    cache_latents: bool = False         # latent models: encode a finite dataset once before training


@dataclass
class OptimSection:
    lr: float = 2e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 100
    # constant; cosine (to lr * min_lr_ratio at train.steps); wsd: warmup-stable-decay, constant until the
    # last decay_fraction of train.steps, then down to lr * min_lr_ratio (a run can be extended and cooled
    # down later: raise train.steps and resume).
    lr_schedule: Literal["constant", "cosine", "wsd"] = "constant"
    min_lr_ratio: float = 0.0
    decay_fraction: float = 0.2         # wsd: share of train.steps spent decaying
    # wsd's cooldown: linear, or 1-sqrt (multiplier 1 - sqrt(progress); Haegele et al. 2024 find it beats linear)
    decay_shape: Literal["linear", "1-sqrt"] = "linear"
    grad_clip: float = 1.0              # max global grad norm; 0 disables


@dataclass
class EMASection:
    max_decay: float = 0.999
    power: float = 0.75
    inv_gamma: float = 1.0
    half_life_images: float | None = None   # if set, replaces the warmup/power schedule


@dataclass
class LossSection:
    weighting: Literal["simple", "min_snr", "edm"] = "simple"
    min_snr_gamma: float = 5.0
    noise_levels: Literal["uniform", "loss_aware", "lognormal", "continuous"] = "uniform"  # continuous: SDE t~U
    p_mean: float = -1.2                # lognormal (EDM) only
    p_std: float = 1.2


@dataclass
class HeatSection:
    """Heat-equation processes (``model.process``: ihdm, blurring; reverie.heat)."""

    num_levels: int = 100               # IHDM: K blur levels
    blur_min: float = 0.5               # IHDM: smallest blur width sigma_B
    blur_max: float = 20.0              # IHDM: largest blur width; blurring diffusion: sigma_B,max
    noise: float = 0.01                 # IHDM: training (and prior) noise delta
    d_min: float = 0.001                # blurring diffusion: floor of the per-frequency dissipation


@dataclass
class SampleSection:
    every: int = 500                    # steps between sample grids (0: never)
    num_images: int = 16
    sampler: str = "dpmpp_2m"
    steps: int = 20
    grid: str = "karras"
    guidance_scale: float = 4.0         # classifier-free guidance for class/text models (1: none)
    prompts: list[str] = field(default_factory=list)  # text models: prompts of the sample grid
    regional: bool = False              # layout models: regional prompts by default (reverie.guidance)

    def check(self) -> None:
        """The sampling settings are checked when the config is read, not when training first samples."""
        try:
            SamplingOptions(sampler=self.sampler, steps=self.steps, grid=self.grid, guidance_scale=self.guidance_scale,
                            regional=self.regional)
        except ValueError as e:
            raise ConfigError(f"in the sample section: {e}") from None


@dataclass
class DistillSection:
    """Consistency distillation (``reverie.train.distill``): the student, started from ``train.init_from``
    (the teacher's weights), learns the teacher's guided probability-flow ODE, and samples with the
    ``consistency`` sampler. ``teacher`` left empty: an ordinary diffusion run."""

    teacher: str = ""                   # the teacher's model directory
    guidance_scale: float = 4.0         # the teacher's CFG scale, folded into the student (one call per step)
    solver: Literal["ddim", "heun"] = "ddim"   # the teacher's ODE step from sigma_{n+1} to sigma_n
    solver_steps: int = 40              # N: levels of the teacher's grid (sample.grid kind); k = T / N timesteps
    boundary_width: float = 0.005       # width of c_skip / c_out around sigma_min (reverie.denoisers)
    huber_c: float = 0.0                # pseudo-Huber c (0: 0.00054 sqrt(d), Song & Dhariwal 2023)

    def checks(self) -> list[tuple[bool, str]]:
        return [(self.guidance_scale >= 1, "distill.guidance_scale must be >= 1"),
                (self.solver_steps >= 1, "distill.solver_steps must be >= 1"),
                (self.boundary_width > 0, "distill.boundary_width must be > 0"),
                (self.huber_c >= 0, "distill.huber_c must be >= 0 (0: the default of improved CT)")]


@dataclass
class RunSection:
    """What every training run has, whatever it trains (``reverie.train.run``)."""

    steps: int = 1000
    grad_accum: int = 1
    # auto: bf16 autocast on CPUs with bf16 matrix units (AMX / AVX512-BF16), else no (reverie.precision)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    seed: int = 0
    out_dir: str = "runs/default"
    checkpoint_every: int = 250
    keep_last: int = 3
    log_every: int = 10
    max_nonfinite: int = 5              # consecutive non-finite losses before stopping
    tensorboard: bool = False
    progress: bool = True
    threads: int = 0                    # CPU intra-op threads (0: torch's default); 1 on a busy machine
    time_limit_min: float = 0.0         # stop (checkpoint + export) after this many minutes of this invocation

    def checks(self) -> list[tuple[bool, str]]:
        return [
            (self.steps >= 1, "train.steps must be >= 1"),
            (self.grad_accum >= 1, "train.grad_accum must be >= 1"),
            (bool(self.out_dir.strip()), "train.out_dir must name a directory (it is empty)"),
            (self.checkpoint_every >= 0, "train.checkpoint_every must be >= 0"),
            (self.keep_last >= 1, "train.keep_last must be >= 1"),
            (self.log_every >= 1, "train.log_every must be >= 1"),
            (self.max_nonfinite >= 1, "train.max_nonfinite must be >= 1"),
            (self.threads >= 0, "train.threads must be >= 0 (0: torch's default)"),
            (self.time_limit_min >= 0, "train.time_limit_min must be >= 0 (0: no limit)"),
        ]


def common_checks(cfg) -> list[tuple[bool, str]]:
    """Checks of the sections every training config shares (run, data, optimizer)."""
    return cfg.train.checks() + [
        (cfg.data.batch_size >= 1, "data.batch_size must be >= 1"),
        (cfg.data.resolution >= 8, "data.resolution must be >= 8"),
        (cfg.data.num_workers >= 0, "data.num_workers must be >= 0"),
        (cfg.optim.lr > 0, "optim.lr must be > 0"),
        (0 <= cfg.optim.min_lr_ratio <= 1, "optim.min_lr_ratio must be in [0, 1]"),
        (0 < cfg.optim.decay_fraction <= 1, "optim.decay_fraction must be in (0, 1]"),
        (cfg.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
        (cfg.optim.grad_clip >= 0, "optim.grad_clip must be >= 0 (0: no clipping)"),
    ]


def raise_first(checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


@dataclass
class TrainSection(RunSection):
    cond_dropout: float = 0.1           # probability of dropping the condition (for CFG)
    layout_dropout: float = 0.2         # layout models: probability of dropping the layout, keeping the caption
    layout_only: float = 0.0            # layout models: probability of dropping the caption, keeping the layout
    # inpainting models (model.inpainting): the share of each kind of random training mask (reverie.data.masks):
    # one object's silhouette or box, a random box, brush strokes, everything (keeps plain generation)
    mask_kinds: dict = field(default_factory=lambda: {"object": 0.5, "box": 0.2, "strokes": 0.2, "full": 0.1})
    init_from: str = ""                 # a model directory whose weights start a new run (fine-tuning)
    trainable_only: str = ""            # train only parameters whose name contains this (".temporal."); "": all
    channels_last: bool | None = None   # None: channels_last exactly when training in bf16 on the CPU
    gradient_checkpointing: bool = False
    compile: bool = False               # torch.compile the network (not the text encoder); meant for GPUs


@dataclass
class RunConfig:
    """The sections every training config has; a trainer's config adds its own and its :meth:`checks`."""

    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: RunSection = field(default_factory=RunSection)

    def checks(self) -> list[tuple[bool, str]]:
        return []

    def validate(self) -> None:
        raise_first(common_checks(self) + self.checks())


@dataclass
class TrainConfig(RunConfig):
    """A diffusion model's training config (``reverie.train.diffusion``)."""

    model: ModelSection = field(default_factory=ModelSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    ema: EMASection = field(default_factory=EMASection)
    loss: LossSection = field(default_factory=LossSection)
    sample: SampleSection = field(default_factory=SampleSection)
    train: TrainSection = field(default_factory=TrainSection)
    heat: HeatSection = field(default_factory=HeatSection)
    distill: DistillSection = field(default_factory=DistillSection)

    def checks(self) -> list[tuple[bool, str]]:
        return self.distill.checks() + [
            (self.model.network in PRESETS,
             f"model.network {self.model.network!r} is not a preset; choose one of {', '.join(PRESETS)}"),
            (0 <= self.train.cond_dropout <= 1, "train.cond_dropout must be in [0, 1]"),
            (0 <= self.train.layout_dropout <= 1, "train.layout_dropout must be in [0, 1]"),
            (0 <= self.train.layout_only <= 1, "train.layout_only must be in [0, 1]"),
            (self.model.layout_channels >= 0, "model.layout_channels must be >= 0"),
            (set(self.train.mask_kinds) <= set(MASK_KINDS) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                for v in self.train.mask_kinds.values()) and sum(self.train.mask_kinds.values()) > 0,
             f"train.mask_kinds must map some of {', '.join(MASK_KINDS)} to shares >= 0 (not all 0)"),
            (not self.model.layout_channels or self.model.conditioning == "text",
             "model.layout_channels needs model.conditioning=text (layouts pair phrases with boxes)"),
            (not self.model.inpainting or self.model.network not in PRESETS
             or PRESETS[self.model.network].arch == "unet",
             "model.inpainting needs a U-Net (the masked image enters beside its input)"),
            (not self.model.inpainting or (not self.model.autoencoder and self.model.process == "gaussian"),
             "model.inpainting trains pixel-space Gaussian diffusion models (no autoencoder, no heat process)"),
            (self.schedule.num_timesteps >= 2, "schedule.num_timesteps must be >= 2"),
            (self.sample.every >= 0, "sample.every must be >= 0 (0: never)"),
            (self.sample.num_images >= 1, "sample.num_images must be >= 1"),
            (0 <= self.ema.max_decay < 1, "ema.max_decay must be in [0, 1)"),
            (self.model.pfgm_d >= 0, "model.pfgm_d must be >= 0 (0: Gaussian noise, D = infinity)"),
            (0 <= self.model.frame_noise_correlation < 1, "model.frame_noise_correlation must be in [0, 1)"),
            (self.heat.num_levels >= 1, "heat.num_levels must be >= 1"),
            (0 < self.heat.blur_min <= self.heat.blur_max, "heat: need 0 < blur_min <= blur_max"),
            (self.heat.noise >= 0 and 0 < self.heat.d_min < 1, "heat: need noise >= 0 and 0 < d_min < 1"),
        ]

    def validate(self) -> None:
        super().validate()
        if self.data.cache_latents and not self.model.autoencoder:
            raise ConfigError("data.cache_latents needs model.autoencoder (a VAE model directory)")
        sde = self.schedule.name in SDES
        if sde != (self.loss.noise_levels == "continuous") and self.model.process == "gaussian":
            raise ConfigError(f"schedule.name={self.schedule.name} trains with loss.noise_levels="
                              f"{'continuous' if sde else 'uniform, loss_aware or lognormal'}")
        if self.model.pfgm_d and self.model.prediction != "edm":
            raise ConfigError("model.pfgm_d (PFGM++) carries EDM's recipe over: use model.prediction=edm")
        if self.model.process != "gaussian" and (self.model.conditioning != "none" or self.model.autoencoder):
            raise ConfigError(f"model.process={self.model.process} trains unconditional pixel-space models")
        if self.model.prediction == "edm" and self.loss.noise_levels != "lognormal":
            raise ConfigError("model.prediction=edm trains with loss.noise_levels=lognormal")
        if self.model.prediction == "edm" and self.sample.grid not in SIGMA_GRIDS:
            raise ConfigError(f"model.prediction=edm samples on sample.grid=karras or exponential, "
                              f"not {self.sample.grid!r}")
        if self.distill.teacher and not self.train.init_from:
            raise ConfigError("distill.teacher: set train.init_from too (normally the teacher: the student starts "
                              "from its weights)")
        self.sample.check()
