"""Training text models on the shared skeleton: a masked diffusion LM (MDLM) or an autoregressive (AR)
transformer of the same shape, over character tokens of a text corpus (``shakespeare``).

- ``objective: mdlm``: per sequence, t ~ U(t_min, 1] (low-discrepancy over the batch), z_t masks each
  token with probability 1 - alpha_t (log-linear schedule), and the loss is the continuous-time NELBO
  (MDLM eq. 11) divided by the sequence length: nats per token, an upper bound on the model's -log p.
- ``objective: ar``: the exact -log p(x) per token, predicting x_l from [BOS], x_1..x_{l-1}.

Both are trained on the same windows of the same tokens (``reverie.data.shakespeare``), so their
logged losses are comparable (divide by ln 2 for bits per character). The run ends by writing a model
directory of kind ``text``::

    out_dir/model/config.json        {"kind": "text", "objective", "network", "tokenizer", "schedule",
                                      "sample", "train_config", "metrics": {"steps", "validation_bpc"}}
    out_dir/model/model.safetensors
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from .. import modeldir
from ..configs import ConfigError, to_dict
from ..data.shakespeare import ShakespeareChunks, split_text
from ..discrete import LogLinearSchedule, mask_tokens, nelbo_terms, sample_times
from ..discrete.sampling import EDLM_WINDOW, MASKED_SAMPLERS
from ..nets.text_transformer import TextTransformer, TextTransformerConfig
from ..text.chars import CharTokenizer
from .checkpoint import latest_checkpoint
from .config import EMASection, RunConfig, RunSection
from .ema import EMA
from .errors import TrainingError
from .run import Run, Trainer, fit

__all__ = ["TextTrainConfig", "TextTrainResult", "TextTrainer", "train_text", "text_loss", "TEXT_DATASETS"]

TEXT_DATASETS = ("shakespeare",)


@dataclass
class TextModelSection:
    objective: Literal["mdlm", "ar"] = "mdlm"
    seq_len: int = 256
    hidden_size: int = 192
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    time_conditioning: bool = False     # MDLM only; without it the caching sampler applies
    # rotary: relative positions in attention (a bidirectional model with a learned table sat at the unigram
    # entropy for hundreds of steps: reverie.nets.text_transformer); learned: GPT-2's position table
    positions: Literal["learned", "rotary"] = "rotary"
    schedule_eps: float = 1e-3          # alpha_1 = eps in training (MDLM); likelihoods use eps = 0
    t_min: float = 1e-3                 # smallest training time (the weight 1/t is bounded by 1/t_min)
    # nelbo: the bound's own weight 1/t per masked token (MDLM eq. 11); masked_mean: the row's mean cross-entropy
    # over its masked tokens, the same expectation at each t up to E[1/#masked] vs 1/E[#masked], without the
    # 1/t spikes of nearly clean rows (module docstring)
    objective_weighting: Literal["nelbo", "masked_mean"] = "nelbo"
    # MDLM: the share of rows whose masked tokens form one contiguous run (same count as the i.i.d. draw, at a
    # uniform start): the inputs of infilling and prompting, which i.i.d. masks almost never produce (a run of
    # 24 masks among 104 clean tokens has probability ~1e-17). Same optimum, a wider input distribution.
    # Measured on Shakespeare (2,000-step fine-tunes of the shipped MDLM, 0.5 vs 0): no gain in infilling (judge
    # ppl 8.21 vs 8.08 caching, 6.70 vs 6.94 EDLM k = 8; noise ~0.2) nor in the MDLM's own likelihood of the true
    # span (benchmarks/diffusion_lm.py --infill-only: true_span): the i.i.d.-trained model generalizes to one run.
    span_masking: float = 0.0
    # Training-only regularizer (GPT-2's residual and embedding dropout; not saved with the network): the AR
    # model at this size overfits 4 M characters after ~6,000 steps, which dropout is meant to delay.
    dropout: float = 0.0


@dataclass
class TextSampleSection:
    """Defaults of ``reverie generate-text`` for the model (stored in its config.json)."""

    sampler: str = "caching"            # ancestral | caching | edlm
    steps: int = 128
    length: int = 256
    k: int = 4                          # edlm: candidates per step
    window: list[float] = field(default_factory=lambda: list(EDLM_WINDOW))   # edlm: t range of importance sampling
    energy: str = ""                    # edlm: AR model directory (relative paths: to the model directory)


@dataclass
class TextDataSection:
    name: str = "shakespeare"
    batch_size: int = 32
    num_workers: int = 0
    shuffle: bool = True
    resolution: int = 32                # unused by text models (the shared checks read it)
    min_char_count: int = 1             # characters seen fewer times go through the byte fallback


@dataclass
class TextTrainSection(RunSection):
    out_dir: str = "runs/text"
    eval_windows: int = 64              # validation windows for the final bits per character (0: skip)
    init_from: str = ""                 # a text model directory whose weights start a new run (fine-tuning)


@dataclass
class TextTrainConfig(RunConfig):
    kind: Literal["text"] = "text"
    model: TextModelSection = field(default_factory=TextModelSection)
    data: TextDataSection = field(default_factory=TextDataSection)
    sample: TextSampleSection = field(default_factory=TextSampleSection)
    train: TextTrainSection = field(default_factory=TextTrainSection)
    # An average of the weights, validated and exported in place of the last ones (MDLM trains with 0.9999).
    # max_decay 0, the default: no averaging, the exported weights are the last step's. Measured with the shipped
    # MDLM's config (6,000 steps, cosine to 0.1 x lr; diffusion_lm.py --pairs, 256 test windows): EMA 0.999 gave
    # 2.765 bits/char, the same run's last weights 2.771: the decayed learning rate already does the averaging.
    ema: EMASection = field(default_factory=lambda: EMASection(max_decay=0.0))

    def checks(self) -> list[tuple[bool, str]]:
        m = self.model
        return [
            (self.data.name in TEXT_DATASETS, f"data.name {self.data.name!r} is not a text dataset; "
                                              f"choose one of {', '.join(TEXT_DATASETS)}"),
            (m.seq_len >= 2, "model.seq_len must be >= 2"),
            (m.hidden_size % m.num_heads == 0, "model.hidden_size must be divisible by model.num_heads"),
            (not (m.objective == "ar" and m.time_conditioning), "an AR model takes no time conditioning"),
            (0 <= m.schedule_eps < 1, "model.schedule_eps must be in [0, 1)"),
            (0 < m.t_min < 1, "model.t_min must be in (0, 1)"),
            (0 <= m.span_masking <= 1, "model.span_masking must be in [0, 1]"),
            (m.span_masking == 0 or m.objective == "mdlm", "model.span_masking applies to MDLM models only"),
            (0 <= m.dropout < 1, "model.dropout must be in [0, 1)"),
            (m.dropout == 0 or not m.time_conditioning, "model.dropout does not apply to time-conditioned models"),
            (self.sample.sampler in MASKED_SAMPLERS, f"sample.sampler must be one of {', '.join(MASKED_SAMPLERS)}"),
            (self.sample.steps >= 1 and self.sample.k >= 1, "sample.steps and sample.k must be >= 1"),
            (len(self.sample.window) == 2, "sample.window must be [t_low, t_high]"),
            (self.train.eval_windows >= 0, "train.eval_windows must be >= 0"),
            (0 <= self.ema.max_decay < 1, "ema.max_decay must be in [0, 1)"),
        ]


@dataclass
class TextTrainResult:
    export_dir: Path
    model: TextTransformer
    step: int
    validation_bpc: float | None        # MDLM: the NELBO bound; AR: exact


def network_config(cfg: TextTrainConfig, vocab_size: int) -> TextTransformerConfig:
    m = cfg.model
    return TextTransformerConfig(vocab_size=vocab_size, max_len=m.seq_len, hidden_size=m.hidden_size,
                                 depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
                                 causal=m.objective == "ar", time_conditioning=m.time_conditioning,
                                 positions=m.positions)


def ar_inputs(x: torch.Tensor, bos_id: int) -> torch.Tensor:
    """[BOS], x_1..x_{L-1}: the AR model's input for predicting x (B, L)."""
    return torch.cat([torch.full_like(x[:, :1], bos_id), x[:, :-1]], dim=1)


def contiguous_masks(masked: torch.Tensor, rows: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``masked`` (B, L) with each row where ``rows`` [B] is true replaced by one run of as many masked
    positions, starting uniformly in [0, L - n]: the count distribution of the i.i.d. draw, placed as a span."""
    n = masked.sum(1, keepdim=True)
    L = masked.shape[1]
    start = (torch.rand(n.shape, generator=g, dtype=torch.float64) * (L - n.cpu() + 1)).floor().long().to(n.device)
    pos = torch.arange(L, device=masked.device)
    span = (pos >= start) & (pos < start + n)
    return torch.where(rows.to(masked.device)[:, None], span, masked)


def text_loss(net, x: torch.Tensor, objective: str, g: torch.Generator, schedule: LogLinearSchedule,
              t_min: float = 1e-3, weighting: str = "nelbo", span_masking: float = 0.0) -> torch.Tensor:
    """Per-sequence loss in nats per token [B]: MDLM's NELBO estimate (one t, z_t per row; with ``weighting``
    masked_mean, the mean cross-entropy over the row's masked tokens instead) or AR's -log p. With
    ``span_masking`` p, each row's masks form one contiguous run with probability p (:func:`contiguous_masks`);
    those rows' terms are the same weighted cross-entropy, no longer a bound term."""
    cfg = net.config
    if objective == "ar":
        logits = net(ar_inputs(x, cfg.bos_id))
        return torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), x, reduction="none").mean(1)
    t = sample_times(x.shape[0], g, low=t_min)
    z, masked = mask_tokens(x, schedule.alpha(t), cfg.mask_id, g)
    if span_masking > 0:
        rows = torch.rand(x.shape[0], generator=g, dtype=torch.float64) < span_masking
        masked = contiguous_masks(masked, rows, g)
        z = torch.where(masked, torch.full_like(x, cfg.mask_id), x)
    c_noise = schedule.sigma(t).float().to(x.device) if cfg.time_conditioning else None
    logits = net(z, c_noise)
    masked = masked.to(x.device)
    if weighting == "masked_mean":
        ce = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), x, reduction="none")
        return (ce * masked).sum(1) / masked.sum(1).clamp_min(1)
    return (nelbo_terms(logits, x, masked, t, schedule) / x.shape[1]).float()


class TextTrainer(Trainer):
    name = "train-text"
    network_fields = ("model.", "data.min_char_count")

    def check(self) -> None:
        """A fine-tune's source must be a text model of this config's network (before anything is written)."""
        init = self.cfg.train.init_from
        if not init or latest_checkpoint(Path(self.cfg.train.out_dir) / "checkpoints") is not None:
            return
        try:
            source = modeldir.read(init, kind="text")
            source.weights_file()
            network = source.config["network"]
            wanted = network_config(self.cfg, network["vocab_size"]).to_dict()
        except (OSError, KeyError, ValueError) as e:
            raise ConfigError(f"train.init_from: {e}") from None
        if network != wanted:
            diff = sorted(k for k in set(network) | set(wanted) if network.get(k) != wanted.get(k))
            raise ConfigError(f"train.init_from={init!r} is another network: its {', '.join(diff)} "
                              f"{'differs' if len(diff) == 1 else 'differ'} from this config's model section")

    def setup(self, run: Run):
        self.tokenizer = CharTokenizer.fit(split_text("train"), self.cfg.data.min_char_count)
        self.dataset = ShakespeareChunks(self.tokenizer, "train", self.cfg.model.seq_len)
        run.info = {"dataset": self.cfg.data.name, "vocab_size": len(self.tokenizer),
                    "train_tokens": len(self.dataset.ids)}
        self.schedule = LogLinearSchedule(self.cfg.model.schedule_eps)
        return self.dataset

    def build(self, run: Run, resuming: bool) -> torch.nn.Module:
        net = TextTransformer(network_config(self.cfg, len(self.tokenizer)), self.cfg.model.dropout)
        if self.cfg.train.init_from and not resuming:  # a resumed run's checkpoint already holds the weights
            init_text_weights(net, self.tokenizer, self.cfg.train.init_from)
            run.say(f"initialized from {self.cfg.train.init_from}")
        e = self.cfg.ema
        self.ema = EMA(net, e.max_decay, e.power, e.inv_gamma, e.half_life_images) if e.max_decay > 0 else None
        return net

    def loss(self, model, batch: dict, g: torch.Generator) -> tuple[torch.Tensor, dict]:
        x = batch["tokens"].to(next(model.parameters()).device)
        m = self.cfg.model
        per_seq = text_loss(model, x, m.objective, g, self.schedule, m.t_min, m.objective_weighting, m.span_masking)
        loss = per_seq.mean()
        return loss, {"bits_per_token": float(loss.detach()) / math.log(2)}

    def after_step(self, model, step: int, run: Run) -> None:
        if self.ema is not None:
            self.ema.update(run.acc.unwrap_model(model), step, run.global_batch)

    def state_dict(self) -> dict:
        return {} if self.ema is None else {"ema": modeldir.module_weights(self.ema.model)}

    def load_state_dict(self, state: dict, source: Path) -> None:
        if self.ema is None:
            return
        if "ema" not in state:  # a run that averaged nothing so far: the average starts at its weights
            state = {**state, "ema": state["model"]}
        modeldir.load_module_weights(self.ema.model, state["ema"], source=str(source))

    def finish(self, model, step: int, run: Run) -> TextTrainResult:
        net = run.acc.unwrap_model(model)
        if self.ema is not None:  # validate and export the average
            net = self.ema.model
        bpc, export = None, run.out / "model"
        if run.main:
            if self.cfg.train.eval_windows > 0:
                bpc = validation_bpc(net, self.tokenizer, self.cfg, self.cfg.train.eval_windows)
                what = "NELBO bound" if self.cfg.model.objective == "mdlm" else "exact"
                print(f"validation bits per character ({what}): {bpc:.3f}")
            save_text_model(export, net, self.tokenizer, self.cfg, {"steps": step, "validation_bpc": bpc,
                                                                     **run.info})
        return TextTrainResult(export, net, step, bpc)


def init_text_weights(net: TextTransformer, tokenizer: CharTokenizer, model_dir: str | Path) -> None:
    """Start ``net`` from a text model directory's weights (fine-tuning). The directory must hold the same
    network and the same tokenizer: anything else is one clear error."""
    try:
        source = modeldir.read(model_dir, kind="text")
    except (FileNotFoundError, ValueError) as e:
        raise TrainingError(f"train.init_from: {e}") from None
    if source.config.get("tokenizer") != tokenizer.to_dict():
        raise TrainingError(f"train.init_from={str(model_dir)!r} was trained with another tokenizer "
                            f"(data.min_char_count or the corpus differ)")
    if source.config.get("network") != net.config.to_dict():  # check() refuses this before the run starts
        raise TrainingError(f"train.init_from={str(model_dir)!r} is another network")
    net.load_state_dict(source.load_weights())


@torch.no_grad()
def validation_bpc(net, tokenizer, cfg: TextTrainConfig, windows: int) -> float:
    """Bits per token over the first ``windows`` validation windows: AR exact, MDLM's NELBO with 4 draws."""
    was = net.training
    net.eval()
    data = ShakespeareChunks(tokenizer, "validation", cfg.model.seq_len)
    x = torch.stack([data[i]["tokens"] for i in range(min(windows, len(data)))])
    g = torch.Generator().manual_seed(0)
    schedule = LogLinearSchedule(0.0)
    draws = 1 if cfg.model.objective == "ar" else 4
    total = sum(float(text_loss(net, x, cfg.model.objective, g, schedule, cfg.model.t_min).mean())
                for _ in range(draws)) / draws
    net.train(was)
    return total / math.log(2)


def save_text_model(path: Path, net: TextTransformer, tokenizer: CharTokenizer, cfg: TextTrainConfig,
                    metrics: dict, dtype: torch.dtype = torch.float32) -> Path:
    config = {"objective": cfg.model.objective, "network": net.config.to_dict(), "tokenizer": tokenizer.to_dict(),
              "schedule": {"name": "loglinear", "eps": cfg.model.schedule_eps},
              "sample": to_dict(cfg.sample), "train_config": to_dict(cfg), "metrics": metrics}
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    return modeldir.write(path, "text", config, {"model": weights})


def train_text(cfg: TextTrainConfig, resume: str | bool = "auto") -> TextTrainResult:
    """Train per ``cfg`` (see :func:`reverie.train.run.fit` for ``resume``)."""
    return fit(TextTrainer(cfg), resume)
