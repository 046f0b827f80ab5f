"""Text models from their model directories: scoring (AR log-likelihood, MDLM NELBO) and generation
(masked diffusion samplers with prompts and infills, AR continuation), for the CLI, eval and benchmarks.

    lm = TextLM.load("shakespeare-mdlm")           # a shipped name or a model directory (kind "text")
    energy = TextLM.load("shakespeare-ar")
    texts = generate_text(lm, "ROMEO:", length=128, steps=64, sampler="edlm", energy=energy, seed=0)
    texts = generate_text(lm, infill="To be, or [MASK*20] the question", seed=0)

A prompt is a fixed prefix; an infill template marks the span to write with ``[MASK]`` (one character)
or ``[MASK*N]`` (N characters), everything else fixed on both sides. Same seed, same text.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from . import modeldir
from .discrete import LogLinearSchedule, mask_tokens, nelbo_terms, sample_categorical, sample_masked, sample_times
from .discrete.sampling import EDLM_WINDOW, MASKED_SAMPLERS, SamplerStats
from .nets.text_transformer import TextTransformer, TextTransformerConfig
from .text.chars import CharTokenizer

__all__ = ["TextLM", "SHIPPED_TEXT_MODELS", "generate_text", "parse_infill", "resolve_text_model", "ar_sample"]

ASSETS = Path(__file__).resolve().parent / "assets"
SHIPPED_TEXT_MODELS = ("shakespeare-mdlm", "shakespeare-ar")
_MASK_SPAN = re.compile(r"\[MASK(?:\*(\d+))?\]")


def resolve_text_model(name: str | Path, relative_to: Path | None = None) -> Path:
    """A shipped model's name, or a path (relative paths first against ``relative_to``, if given)."""
    if str(name) in SHIPPED_TEXT_MODELS:
        return ASSETS / str(name)
    path = Path(name)
    if relative_to is not None and not path.is_absolute() and (relative_to / path).is_dir():
        return (relative_to / path).resolve()
    return path


@dataclass
class TextLM:
    """A trained text model: network, tokenizer and its config.json."""

    net: TextTransformer
    tokenizer: CharTokenizer
    config: dict
    path: Path

    @classmethod
    def load(cls, name: str | Path, device: str | torch.device = "cpu") -> TextLM:
        path = resolve_text_model(name)
        found = modeldir.read(path, kind="text")
        with modeldir.parsing(path / "config.json"):
            net_cfg = TextTransformerConfig.from_dict(found.config["network"])
            tokenizer = CharTokenizer.from_dict(found.config["tokenizer"])
            objective = found.config["objective"]
            if objective not in ("mdlm", "ar"):
                raise ValueError(f"objective must be mdlm or ar, got {objective!r}")
        net = TextTransformer(net_cfg)
        modeldir.load_module_weights(net, {k: v.float() for k, v in found.load_weights().items()},
                                     source=str(found.weights_file()))
        return cls(net.to(device).eval(), tokenizer, found.config, path)

    @property
    def objective(self) -> str:
        return self.config["objective"]

    @property
    def max_len(self) -> int:
        return self.net.config.max_len

    @property
    def mask_id(self) -> int:
        return self.net.config.mask_id

    @property
    def schedule(self) -> LogLinearSchedule:
        return LogLinearSchedule(0.0)  # likelihoods and sampling: the all-[MASK] prior holds at t = 1

    def encode(self, text: str) -> Tensor:
        return torch.tensor(self.tokenizer.encode(text), dtype=torch.long)

    def _device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def denoise(self, z: Tensor, t: Tensor) -> Tensor:
        """MDLM: logits of x_theta(z_t) over the data vocabulary (B, L, V)."""
        c_noise = LogLinearSchedule(self.config["schedule"]["eps"]).sigma(t).float() \
            if self.net.config.time_conditioning else None
        return self.net(z.to(self._device()), c_noise).float()

    @torch.no_grad()
    def log_likelihood(self, x: Tensor, batch_size: int = 64) -> Tensor:
        """AR: exact log p(x) per row in nats, float64 (N,)."""
        if self.objective != "ar":
            raise ValueError(f"{self.path} is a masked diffusion model; exact likelihoods need an AR model")
        from .train.text import ar_inputs

        out = []
        for chunk in x.split(batch_size):
            chunk = chunk.to(self._device())
            logp = torch.log_softmax(self.net(ar_inputs(chunk, self.net.config.bos_id)).double(), dim=-1)
            out.append(logp.gather(-1, chunk[..., None]).squeeze(-1).sum(dim=1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def nelbo(self, x: Tensor, g: torch.Generator, draws: int = 1, steps: int = 0) -> Tensor:
        """MDLM: the NELBO estimate per row in nats (N,), averaged over ``draws`` draws of (t, z_t); with
        ``steps`` T, the T-step discrete-time bound (looser as T shrinks)."""
        if self.objective != "mdlm":
            raise ValueError(f"{self.path} is an AR model; the NELBO is for masked diffusion models")
        total = torch.zeros(len(x), dtype=torch.float64)
        for _ in range(draws):
            t = sample_times(len(x), g, steps=steps)
            z, masked = mask_tokens(x, self.schedule.alpha(t), self.mask_id, g)
            logits = self.denoise(z, t)
            total += nelbo_terms(logits, x.to(logits.device), masked.to(logits.device), t, self.schedule,
                                 steps).cpu()
        return total / draws

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)


def parse_infill(template: str, tokenizer: CharTokenizer, mask_id: int) -> Tensor:
    """Token ids of ``template`` with each ``[MASK]`` / ``[MASK*N]`` replaced by 1 / N ``mask_id`` entries."""
    ids, last = [], 0
    for m in _MASK_SPAN.finditer(template):
        ids += tokenizer.encode(template[last:m.start()])
        n = int(m.group(1)) if m.group(1) else 1
        if n < 1:
            raise ValueError(f"{m.group(0)}: a masked span needs at least one character")
        ids += [mask_id] * n
        last = m.end()
    ids += tokenizer.encode(template[last:])
    if mask_id not in ids:
        raise ValueError("an infill template needs a masked span such as [MASK*20]")
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def ar_sample(lm: TextLM, prefix: Tensor, new_tokens: int, g: torch.Generator) -> Tensor:
    """Left-to-right continuation of ``prefix`` (B, P) by ``new_tokens`` tokens, float64 draws: (B, P + n)."""
    if lm.objective != "ar":
        raise ValueError(f"{lm.path} is not an AR model")
    x, bos = prefix.clone(), torch.full((len(prefix), 1), lm.net.config.bos_id, dtype=torch.long)
    for _ in range(new_tokens):
        inp = torch.cat([bos, x], dim=1)[:, -lm.max_len:]  # [BOS] while the text fits, then a sliding window
        logits = lm.net(inp.to(lm._device()))[:, -1].double().cpu()
        x = torch.cat([x, sample_categorical(torch.log_softmax(logits, -1), g)[:, None]], dim=1)
    return x


def generate_text(lm: TextLM, prompt: str = "", length: int | None = None, steps: int = 128, sampler: str = "caching",
                  energy: TextLM | None = None, k: int = 4, window: tuple[float, float] = EDLM_WINDOW,
                  seed: int = 0, num_samples: int = 1, infill: str | None = None,
                  callback=None, corrector: int = 0, corrector_block: int = 1) -> tuple[list[str], SamplerStats]:
    """Texts from a masked diffusion model: ``length`` tokens that start with ``prompt``, or ``infill``'s template with
    its masked spans filled (module docstring). ``callback(i, z)`` is called after each step and each corrector
    sweep (``sample_masked``'s; ``reverie serve`` uses it for progress and cancel). ``corrector`` sweeps in blocks
    of ``corrector_block`` tokens follow: Metropolis-Hastings towards ``energy``'s joint when an energy model is
    given, redraws from ``lm`` alone otherwise (Gibbs for block 1; ``reverie.discrete.sampling``)."""
    if lm.objective != "mdlm":
        raise ValueError(f"{lm.path} is an AR model; generate-text samples masked diffusion models")
    if sampler not in MASKED_SAMPLERS:
        raise ValueError(f"unknown text sampler {sampler!r}; choose one of {', '.join(MASKED_SAMPLERS)}")
    if sampler == "edlm" and energy is None:
        raise ValueError("the edlm sampler needs an AR energy model (--energy)")
    if energy is not None and (energy.objective != "ar" or energy.tokenizer.chars != lm.tokenizer.chars):
        raise ValueError(f"{energy.path} is not an AR model over {lm.path}'s tokens")
    if infill is not None:
        z = parse_infill(infill, lm.tokenizer, lm.mask_id)
    else:
        length = lm.max_len if length is None else length
        fixed = lm.encode(prompt)
        if len(fixed) >= length:
            raise ValueError(f"the prompt is {len(fixed)} tokens, not shorter than --length {length}")
        z = torch.cat([fixed, torch.full((length - len(fixed),), lm.mask_id, dtype=torch.long)])
    if len(z) > lm.max_len:
        raise ValueError(f"{len(z)} tokens do not fit the model's context of {lm.max_len}")
    g = torch.Generator().manual_seed(seed)
    energy_fn = None if energy is None else energy.log_likelihood
    tokens, stats = sample_masked(lm.denoise, z.repeat(num_samples, 1), steps, lm.mask_id, g, sampler=sampler,
                                  energy_model=energy_fn, k=k, window=window,
                                  time_conditioned=lm.net.config.time_conditioning, callback=callback,
                                  corrector=corrector, corrector_block=corrector_block)
    return [lm.decode(row.tolist()) for row in tokens], stats


def bits_per_char(nats: float, chars: int) -> float:
    return nats / chars / math.log(2)
