"""Consistency distillation: a few-step student of a guided diffusion model, on the shared skeleton.

Latent consistency distillation (Luo et al. 2023, Algorithm 1), itself consistency distillation (Song et
al. 2023, Algorithm 2) with the guidance folded in; in reverie's VE sigma coordinates:

- the teacher's grid: ``distill.solver_steps`` = N levels of its own grid kind (``sample.grid``, e.g.
  ``ddim-trailing``: the skipping step is k = T / N timesteps) plus the boundary ``sigma_min``;
- each sample draws an interval n, noise z, and ``x_{n+1} = x0 + sigma_{n+1} z`` from a training image;
- the teacher takes one guided ODE step down to ``sigma_n``: DDIM (an Euler step of the probability-flow
  ODE in VE coordinates) or Heun, on ``D_w = D_u + w (D_c - D_u)`` at the fixed scale
  ``distill.guidance_scale``: the student learns the guided ODE, so it needs one call per step;
- the loss is the pseudo-Huber distance (improved CT; LPIPS would need torchvision's backbones, which are
  not available offline) between the student ``f(x_{n+1}, sigma_{n+1})`` and the target
  ``f_ema(x_n, sigma_n)``, where ``f_ema`` is the EMA copy of the student (``ema`` section: LCM's decay
  0.95) and ``f(x, sigma_min) = x`` (``reverie.denoisers.ConsistencyFunction``); uniform weighting over n.

The student starts from the teacher's weights (``train.init_from``), so its consistency function begins as
the teacher's unguided x0 estimate. The model directory it writes is an ordinary one whose ``distill``
section makes ``build_denoiser`` wrap it, and whose ``sample`` section (sampler ``consistency``, a few steps,
guidance 1) is what ``reverie generate`` uses. Why distillation and not consistency *training*: with a good
teacher the target is the teacher's ODE, not a one-sample estimate of it; reproductions of consistency
training from scratch often stall (the issue's anchors).
"""

from __future__ import annotations

import torch

from ..build import DiffusionModel, build_denoiser, read_diffusion
from ..guidance import CFGDenoiser
from ..losses import pseudo_huber
from ..sampling import sigma_grid
from ..utils import append_dims
from .config import TrainConfig
from .diffusion import DiffusionTrainer, TrainResult, text_condition
from .errors import TrainingError
from .run import Run, fit, use_channels_last


def distill(cfg: TrainConfig, resume: str | bool = "auto", dataset=None) -> TrainResult:
    """Distil ``cfg.distill.teacher`` into a consistency model per ``cfg`` (``resume``: see ``reverie.train.fit``)."""
    return fit(ConsistencyDistillTrainer(cfg, dataset), resume)


def teacher_levels(teacher: DiffusionModel, solver_steps: int, grid: str) -> torch.Tensor:
    """The increasing float64 levels ``sigma_min = s_0 < s_1 < ... < s_N = sigma_max`` of the teacher's ODE
    steps: its ``grid`` of ``solver_steps`` levels with the final 0 replaced by the boundary sigma_min."""
    sigmas = sigma_grid(teacher, solver_steps, grid)[:-1].flip(0)
    sigma_min = float(teacher.schedule.sigma_min)
    if float(sigmas[0]) > sigma_min * (1 + 1e-6):
        sigmas = torch.cat([sigmas.new_tensor([sigma_min]), sigmas])
    return sigmas


def teacher_step(denoiser, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, solver: str = "ddim",
                 **cond) -> torch.Tensor:
    """One probability-flow ODE step of ``denoiser`` from per-sample ``sigma`` to ``sigma_next`` (``[B]``):
    DDIM, ``x0 + (sigma_next / sigma) (x - x0)`` (Song et al. 2021, eq. 12 with eta 0, in VE coordinates), or
    Heun's second-order step (Karras et al. 2022, Algorithm 1)."""
    s, s_next = (append_dims(v.to(x.dtype), x.ndim) for v in (sigma, sigma_next))
    d = (x - denoiser(x, sigma, **cond)) / s
    x_euler = x + (s_next - s) * d
    if solver == "ddim":
        return x_euler
    d_next = (x_euler - denoiser(x_euler, sigma_next, **cond)) / s_next
    return x + (s_next - s) * (d + d_next) / 2


class ConsistencyDistillTrainer(DiffusionTrainer):
    name = "distill"

    def check(self) -> None:
        super().check()
        if not self.cfg.distill.teacher:
            raise TrainingError("consistency distillation needs distill.teacher (a model directory)")
        if self.cfg.model.conditioning == "class":
            raise TrainingError("distillation of class-conditional models is not supported yet (text or none)")

    def build(self, run: Run, resuming: bool) -> torch.nn.Module:
        cfg = self.cfg
        _, tcfg, tnet, tinfo, _ = read_diffusion(cfg.distill.teacher, TrainConfig)
        if tinfo["in_channels"] != run.info["in_channels"] or tinfo["resolution"] != run.info["resolution"]:
            raise TrainingError(f"the teacher {cfg.distill.teacher} makes {tinfo['in_channels']}x{tinfo['resolution']}"
                                f" images; this config's data are {run.info['in_channels']}x{run.info['resolution']}")
        tnet = tnet.to(run.device).eval().requires_grad_(False)
        if cfg.train.channels_last:
            tnet = tnet.to(memory_format=torch.channels_last)
        self.teacher = DiffusionModel(tnet, tcfg, tinfo)
        self.solver_levels = teacher_levels(self.teacher, cfg.distill.solver_steps, cfg.sample.grid)
        net = super().build(run, resuming)  # the student (init_from: the teacher's weights), its EMA target
        self.target = build_denoiser(cfg, self.ema.model, self.sampled.schedule)
        return net

    def prepared(self, model) -> None:
        self.denoiser = build_denoiser(self.cfg, model, self.sampled.schedule)
        self.device = next(model.parameters()).device

    def loss(self, model, batch: dict, g: torch.Generator) -> tuple[torch.Tensor, dict]:
        cfg, dist = self.cfg, self.cfg.distill
        x0 = batch["image"].to(self.device)
        if use_channels_last(cfg):  # train.channels_last, or on when training bf16 on the CPU
            x0 = x0.contiguous(memory_format=torch.channels_last)
        cond, uncond = self._conditions(batch, g)
        n = torch.randint(0, len(self.solver_levels) - 1, (x0.shape[0],), generator=g)
        levels = self.solver_levels
        sigma, sigma_next = levels[n + 1].to(self.device), levels[n].to(self.device)
        noise = torch.randn(x0.shape, generator=g).to(self.device, x0.dtype)
        x = x0 + append_dims(sigma.to(x0.dtype), x0.ndim) * noise
        with torch.no_grad():
            guided = self.teacher.denoiser
            if uncond is not None and dist.guidance_scale != 1:
                guided = CFGDenoiser(guided, uncond, guidance_scale=dist.guidance_scale)
            x_next = teacher_step(guided, x, sigma, sigma_next, dist.solver, **cond)
            target = self.target(x_next, sigma_next, **cond)
        pred = self.denoiser(x, sigma, **cond)
        per_sample = pseudo_huber(pred, target, dist.huber_c or None)
        return per_sample.mean(), {}

    def _conditions(self, batch: dict, g: torch.Generator) -> tuple[dict, dict | None]:
        """Encoded conditions of the batch (captions and layouts, with the config's dropouts) and the teacher's
        unconditional side (empty captions, no layouts), once for the student, its target and the teacher."""
        if self.cfg.model.conditioning != "text":
            return {}, None
        layouts = bool(self.cfg.model.layout_channels)
        raw = text_condition(self.cfg.train, batch, g, layouts=layouts)
        net = self.teacher.net
        empty = [""] * len(raw["text"])
        # in float32, as sampling encodes prompts: the student must not learn bf16 embeddings
        with torch.autocast(self.device.type, enabled=False):
            return (net.encode(raw["text"], raw.get("layout")),
                    net.encode(empty, [None] * len(empty) if layouts else None))

