"""A small transformer over token sequences, bidirectional (masked diffusion, MDLM) or causal (AR).

    tokens (B, L) --embed--> (B, L, D) (+ learned positions, with ``positions="learned"``)
    depth x block: pre-LayerNorm self-attention (causal or not) + MLP (GPT-2 / nanoGPT layout), or, with
                   ``time_conditioning``, DiT's adaLN-Zero block (``reverie.nets.dit.DiTBlock``) fed by
                   the embedding of c_noise (MDLM's time-conditioned backbone)
    final LayerNorm -> Linear(D, vocab_size)  (logits over the data vocabulary only)

The input table has ``vocab_size + 2`` rows: the data tokens, then [MASK] (``mask_id``, the absorbing
state) and [BOS] (``bos_id``, the AR model's start token). The output head has no row for either, which
is half of MDLM's SUBS parameterization (zero mass on [MASK]); ``reverie.discrete`` does the other half.

Positions: ``rotary`` (RoFormer, what MDLM's backbone uses) turns queries and keys by position in every
attention layer, so attention scores see relative offsets from the first step; ``learned`` adds a trained
table to the input (GPT-2; the default only so that model directories written before rotary load as they
were). Measured here, and why rotary is the trainer's default: with learned positions a bidirectional
model sat at the unigram entropy of Shakespeare for hundreds of steps (the shipped MDLM of 9062e3c, 579
steps at width 128: 4.74 bits per character, 4.75 bits on a masked character at 15% masking, where a
bigram already gives about 3.3). A masked position holds no token of its own; everything it predicts must
come through attention from its neighbours, and a table of absolute positions has to learn "look one to the
left" separately for every position. A causal model escapes at once because its input at position l *is*
token l - 1 (a bigram needs no attention). With rotary, the same network and data left the plateau within
about 200 steps. ``tests/test_text_lm.py`` checks it on a Markov chain whose optimal denoiser is known.

Initialization follows DiT: Xavier-uniform Linear weights, zero biases, N(0, 0.02) token and position
embeddings (one scale for both), zero output head (every model starts at the uniform prediction).
Two pitfalls, both measured on a bidirectional model, which unlike a causal one gets no position
from its attention mask: token embeddings at std 1 beside positions at 0.02 (pre-LayerNorm) train into a
bag of characters (ANCHORS); and GPT-2's N(0, 0.02) Linear weights leave the attention logits so
small that, in 150 steps on ``tests/test_text_lm.py``'s periodic sequences, masked tokens cost 2.0 bits
against 0.015 with Xavier weights (a width-128, depth-4 Shakespeare MDLM sat at the unigram entropy, 4.8 bits,
after 350 steps with them). ``tests/test_text_lm.py`` checks positions are used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .dit import DiTBlock, DiTConfig
from .layers import Attention, NetConfig, TimeEmbedding, check_choice, rotary_tables

__all__ = ["TextTransformerConfig", "TextTransformer"]


@dataclass(frozen=True)
class TextTransformerConfig(NetConfig):
    arch = "text-transformer"

    vocab_size: int = 337               # data tokens (the tokenizer's size)
    max_len: int = 256
    hidden_size: int = 192
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    causal: bool = False
    time_conditioning: bool = False     # adaLN-Zero DiT blocks on c_noise (bidirectional models only)
    freq_dim: int = 128
    positions: Literal["learned", "rotary"] = "learned"   # module docstring (trainers default to rotary)

    def __post_init__(self):
        check_choice("positions", self.positions, ("learned", "rotary"))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.causal and self.time_conditioning:
            raise ValueError("a causal (AR) text model takes no time conditioning")
        if self.vocab_size < 2 or self.max_len < 1 or self.depth < 1:
            raise ValueError("vocab_size >= 2, max_len >= 1 and depth >= 1 are required")

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    @property
    def bos_id(self) -> int:
        return self.vocab_size + 1


class TextBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(LN(x)), then x + MLP(LN(x)); with ``dropout`` p, each branch's
    output is dropped (GPT-2's residual dropout) in training mode."""

    def __init__(self, cfg: TextTransformerConfig, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        D = cfg.hidden_size
        self.norm1 = nn.LayerNorm(D)
        self.attn = Attention(D, cfg.num_heads)
        self.norm2 = nn.LayerNorm(D)
        hidden = int(D * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(D, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, D))
        self.causal = cfg.causal

    def forward(self, x: Tensor, rotary: tuple[Tensor, Tensor] | None = None) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), is_causal=self.causal, rotary=rotary))
        return x + self.drop(self.mlp(self.norm2(x)))


class TextTransformer(nn.Module):
    """``net(tokens (B, L) long, c_noise (B,) or None) -> logits (B, L, vocab_size)`` (module docstring).

    ``dropout`` p (training only, GPT-2's places: the input embedding and each block's two residual branches) is
    a regularizer, not part of the network: it adds no weights, is not in ``config`` and so not in a model
    directory, and does nothing in eval mode. Not with ``time_conditioning`` (DiT blocks have none)."""

    def __init__(self, config: TextTransformerConfig, dropout: float = 0.0):
        super().__init__()
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if dropout and config.time_conditioning:
            raise ValueError("dropout is not supported with time_conditioning (DiT blocks)")
        self.config = cfg = config
        self.drop = nn.Dropout(dropout)
        D = cfg.hidden_size
        self.tok_embed = nn.Embedding(cfg.vocab_size + 2, D)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.max_len, D)) if cfg.positions == "learned" else None
        if cfg.positions == "rotary":  # not weights: recomputed from the config, never saved
            cos, sin = rotary_tables(cfg.max_len, D // cfg.num_heads)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)
        if cfg.time_conditioning:
            dit = DiTConfig(hidden_size=D, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio)
            self.time_embed = TimeEmbedding("sinusoidal", cfg.freq_dim, D)
            self.blocks = nn.ModuleList([DiTBlock(dit) for _ in range(cfg.depth)])
        else:
            self.time_embed = None
            self.blocks = nn.ModuleList([TextBlock(cfg, dropout) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, cfg.vocab_size)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's recipe (module docstring): Xavier Linear, zero biases, N(0, 0.02) embeddings, zero adaLN
        and output head."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.tok_embed.weight, std=0.02)
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed, std=0.02)
        for block in self.blocks:
            if isinstance(block, DiTBlock):
                nn.init.zeros_(block.adaLN[-1].weight)
                nn.init.zeros_(block.adaLN[-1].bias)
        nn.init.zeros_(self.head.weight)

    def forward(self, tokens: Tensor, c_noise: Tensor | None = None) -> Tensor:
        cfg = self.config
        if tokens.ndim != 2 or tokens.shape[1] > cfg.max_len:
            raise ValueError(f"expected tokens (B, L) with L <= max_len={cfg.max_len}, got {tuple(tokens.shape)}")
        x = self.tok_embed(tokens)  # (B, L, D)
        rotary = None
        if self.pos_embed is not None:
            x = x + self.pos_embed[: tokens.shape[1]]
        else:
            rotary = (self.rotary_cos, self.rotary_sin)
        x = self.drop(x)
        if self.time_embed is not None:
            if c_noise is None:
                raise ValueError("this text model is time-conditioned: pass c_noise")
            c = self.time_embed(c_noise.to(x.device))  # (B, D)
            for block in self.blocks:
                x = block(x, c, None, None, rotary=rotary)
        else:
            for block in self.blocks:
                x = block(x, rotary=rotary)
        return self.head(self.norm(x))  # (B, L, vocab_size)
