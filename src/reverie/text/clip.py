"""``clip``: the frozen CLIP text encoder of a Stable Diffusion checkpoint (Radford et al. 2021; SD 1.x uses
OpenAI's ViT-L/14 text tower, SD 2.x OpenCLIP ViT-H/14's up to its penultimate layer).

The transformer and the tokenizer are ``transformers``' ``CLIPTextModel`` and ``CLIPTokenizer`` (the ``sd``
extra), built from the checkpoint's own files: a diffusers folder's ``text_encoder/`` (``config.json`` +
``model.safetensors``; pickled ``.bin`` weights are refused) and ``tokenizer/`` (``vocab.json`` +
``merges.txt``), or, for a single-file checkpoint, a config and state dict that ``reverie.sd`` converts.

As Stable Diffusion does: every prompt is padded to the tokenizer's 77 tokens, ``tokens`` are the last hidden
states after the final LayerNorm for all 77 positions (no mask: SD's U-Net attends to the padding too, so the
``mask`` is all True), and ``pooled`` is CLIP's pooled output (SD 1 / 2 do not use it).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..optional import require
from .base import TextEmbedding, TextEncoder, check_texts, empty_embedding, warn_truncated

__all__ = ["CLIPTextEncoder", "load_clip_tokenizer"]


def _transformers():
    return require("transformers", "Stable Diffusion's CLIP text encoder")


def load_clip_tokenizer(path: str | Path):
    """``CLIPTokenizer`` from a folder with ``vocab.json`` and ``merges.txt``, or ``tokenizer.json`` (local files)."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not all((path / n).is_file() for n in ("vocab.json", "merges.txt")):
        raise FileNotFoundError(f"{path} is not a CLIP tokenizer folder (no vocab.json and merges.txt, "
                                f"no tokenizer.json)")
    return _transformers().CLIPTokenizer.from_pretrained(str(path), local_files_only=True)


class CLIPTextEncoder(TextEncoder):
    """A frozen ``CLIPTextModel`` + ``CLIPTokenizer`` as a reverie text encoder (module docstring)."""

    name = "clip"
    trainable = False

    def __init__(self, model, tokenizer, source: str = ""):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.source = source
        self.dim = self.pooled_dim = int(model.config.hidden_size)
        self.max_length = min(int(tokenizer.model_max_length), int(model.config.max_position_embeddings))

    @classmethod
    def from_folders(cls, text_encoder: str | Path, tokenizer: str | Path,
                     dtype: torch.dtype = torch.float32) -> CLIPTextEncoder:
        """From a diffusers pipeline's ``text_encoder/`` (safetensors weights) and ``tokenizer/`` folders."""
        text_encoder = Path(text_encoder)
        if not any(text_encoder.glob("*.safetensors")):
            found = "pickled .bin weights, which reverie does not load (no code runs from a model file)" \
                if any(text_encoder.glob("*.bin")) else "no weights"
            raise FileNotFoundError(f"{text_encoder} holds {found}; it needs model.safetensors")
        transformers = _transformers()
        transformers.utils.logging.disable_progress_bar()  # reverie's own progress and --quiet decide what shows
        model = transformers.CLIPTextModel.from_pretrained(str(text_encoder), local_files_only=True,
                                                           use_safetensors=True, dtype=dtype)
        return cls(model, load_clip_tokenizer(tokenizer), source=str(text_encoder.parent))

    def config(self) -> dict:
        return {"name": self.name, "source": self.source}

    def token_ids(self, texts: list[str]) -> torch.Tensor:
        """(B, max_length) token ids, padded and truncated as Stable Diffusion does; warns on truncation."""
        full = self.tokenizer(texts, truncation=False).input_ids
        warn_truncated([len(ids) for ids in full], self.max_length, "tokens", stacklevel=4)
        return self.tokenizer(texts, padding="max_length", max_length=self.max_length, truncation=True,
                              return_tensors="pt").input_ids

    @torch.no_grad()
    def encode(self, texts: list[str]) -> TextEmbedding:
        texts = check_texts(texts)
        if not texts:
            return empty_embedding(self)
        ids = self.token_ids(texts).to(self.device)
        with torch.autocast(ids.device.type, enabled=False):
            out = self.model(ids)
        tokens = out.last_hidden_state
        return TextEmbedding(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device),
                             out.pooler_output)
