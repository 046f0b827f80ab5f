"""``scratch``: a small transformer text encoder trained with the diffusion model, no dependencies.

Choices (the "why" that the code cannot show):

- Tokenizer: NFKC-normalized, lower-cased words (runs of letters, runs of digits, single
  punctuation marks), each hashed to one of ``num_buckets`` ids by CRC-32 (the hashing trick,
  Weinberger et al. 2009). No vocabulary file to ship or build, and the ids are stable across
  processes and Python versions (``hash()`` is salted per process, so it would break saved models).
  Colliding words share an embedding; with 4096 buckets a caption vocabulary of a few hundred words
  rarely collides. Id 0 is PAD, id 1 is BOS; every sequence starts with BOS, so the empty
  (unconditional) prompt is one real token and no mask row is ever all False.
- Network: learned token + position embeddings, pre-LN transformer blocks (Xiong et al. 2020) using
  reverie's SDPA ``Attention`` with the padding mask, a final LayerNorm. Padding positions are
  masked as keys and their outputs zeroed, so padding content never reaches real tokens or pooled.
- Pooled = masked mean over the real tokens (BOS included) through a Linear: every token gets a
  gradient from the pooled path, and it matches MiniLM's mean pooling in kind.
- Init as GPT-2 (Radford et al. 2019): N(0, 0.02) weights, zero biases, residual output
  projections scaled by 1/sqrt(2 * depth) so the residual stream's variance does not grow with depth.
"""

from __future__ import annotations

import math
import re
import unicodedata
import zlib

import torch
from torch import Tensor, nn

from ..nets.layers import Attention
from .base import TextEmbedding, TextEncoder, check_texts, empty_embedding, warn_truncated

PAD_ID = 0
BOS_ID = 1
NUM_SPECIAL = 2

_WORD_RE = re.compile(r"[^\W\d_]+|\d+|[^\w\s]|_")


def split_words(text: str) -> list[str]:
    """Lower-cased words: runs of letters, runs of digits, and single punctuation marks."""
    return _WORD_RE.findall(unicodedata.normalize("NFKC", text).lower())


def word_id(word: str, num_buckets: int) -> int:
    """The id of one word: a stable CRC-32 hash into ``num_buckets``, after the special ids."""
    return NUM_SPECIAL + zlib.crc32(word.encode("utf-8")) % num_buckets


class HashTokenizer:
    """Captions -> ``(ids (B, L) long, mask (B, L) bool)``: BOS, up to L - 1 word ids, PAD."""

    def __init__(self, num_buckets: int = 4096, max_length: int = 32):
        if num_buckets < 1 or max_length < 2:
            raise ValueError(f"need num_buckets >= 1 and max_length >= 2, got {num_buckets}, {max_length}")
        self.num_buckets, self.max_length = num_buckets, max_length

    @property
    def vocab_size(self) -> int:
        return self.num_buckets + NUM_SPECIAL

    def __call__(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        words = [split_words(t) for t in check_texts(texts)]
        warn_truncated([len(w) for w in words], self.max_length - 1, "words", stacklevel=4)
        ids = torch.full((len(words), self.max_length), PAD_ID, dtype=torch.long)
        ids[:, 0] = BOS_ID
        for row, ws in enumerate(words):
            ws = ws[: self.max_length - 1]
            ids[row, 1 : 1 + len(ws)] = torch.tensor([word_id(w, self.num_buckets) for w in ws], dtype=torch.long)
        return ids, ids != PAD_ID


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, num_heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.mlp(self.norm2(x))


class ScratchTextEncoder(TextEncoder):
    """A small trainable transformer over hashed words (see the module docstring)."""

    name = "scratch"
    trainable = True

    def __init__(self, num_buckets: int = 4096, max_length: int = 32, width: int = 256, depth: int = 4,
                 num_heads: int = 4, mlp_ratio: float = 4.0, pooled_dim: int = 256):
        super().__init__()
        self.tokenizer = HashTokenizer(num_buckets, max_length)
        self.num_buckets, self.max_length, self.width, self.depth = num_buckets, max_length, width, depth
        self.num_heads, self.mlp_ratio = num_heads, mlp_ratio
        self.dim, self.pooled_dim = width, pooled_dim
        self.token_embed = nn.Embedding(self.tokenizer.vocab_size, width)
        self.pos_embed = nn.Parameter(torch.empty(max_length, width))
        self.blocks = nn.ModuleList(Block(width, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.pool_proj = nn.Linear(width, pooled_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)
        for block in self.blocks:  # the two projections that write into the residual stream
            for out in (block.attn.proj, block.mlp[-1]):
                nn.init.normal_(out.weight, std=0.02 / math.sqrt(2 * self.depth))

    def forward(self, ids: Tensor, mask: Tensor) -> TextEmbedding:
        """Token ids (B, L) and mask (B, L) -> embedding; the mask must mark BOS real in every row."""
        L = ids.shape[1]
        if L > self.max_length:
            raise ValueError(f"got {L} token ids but max_length is {self.max_length}")
        x = self.token_embed(ids) + self.pos_embed[:L]  # (B, L, C)
        for block in self.blocks:
            x = block(x, mask)
        keep = mask[..., None]  # (B, L, 1)
        x = self.norm(x).masked_fill(~keep, 0.0)  # zero the padding rows
        pooled = self.pool_proj(x.sum(dim=1) / keep.sum(dim=1))  # masked mean -> (B, P)
        return TextEmbedding(x, mask, pooled)

    def encode(self, texts: list[str]) -> TextEmbedding:
        """Captions -> ``TextEmbedding`` on the encoder's device ("" = BOS only, the unconditional prompt)."""
        ids, mask = self.tokenizer(texts)
        if ids.shape[0] == 0:
            return empty_embedding(self)
        return self(ids.to(self.device), mask.to(self.device))

    def config(self) -> dict:
        return {"name": self.name, "num_buckets": self.num_buckets, "max_length": self.max_length,
                "width": self.width, "depth": self.depth, "num_heads": self.num_heads,
                "mlp_ratio": self.mlp_ratio, "pooled_dim": self.pooled_dim}
