"""What every text encoder returns and promises; shared input checks."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class TextEmbedding:
    """Encoded captions: ``tokens`` (B, L, C) float, ``mask`` (B, L) bool (True = real token),
    ``pooled`` (B, P) float. Padding rows of ``tokens`` are zero, every mask row has at least one
    True, and L is the encoder's fixed ``max_length``, so batches from separate calls concatenate."""

    tokens: Tensor
    mask: Tensor
    pooled: Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, *args, **kwargs) -> TextEmbedding:
        """Move (and for ``tokens``/``pooled``, cast) like ``Tensor.to``; the mask stays bool."""
        mask_args = [a for a in args if not isinstance(a, torch.dtype)]
        mask_kwargs = {k: v for k, v in kwargs.items() if k != "dtype"}
        return TextEmbedding(self.tokens.to(*args, **kwargs), self.mask.to(*mask_args, **mask_kwargs),
                             self.pooled.to(*args, **kwargs))

    @staticmethod
    def cat(embeddings: list[TextEmbedding]) -> TextEmbedding:
        """Concatenate along the batch dimension."""
        return TextEmbedding(torch.cat([e.tokens for e in embeddings]), torch.cat([e.mask for e in embeddings]),
                             torch.cat([e.pooled for e in embeddings]))


class TextEncoder(nn.Module):
    """Base class: ``encode(texts) -> TextEmbedding`` plus the attributes a network is built from.

    Subclasses set ``name`` (the registry key), ``dim`` (C), ``pooled_dim`` (P), ``max_length`` (L)
    and ``trainable``; ``config()`` returns a JSON dict that ``get_text_encoder`` rebuilds from.
    """

    name: str = "?"
    dim: int
    pooled_dim: int
    max_length: int
    trainable: bool

    def encode(self, texts: list[str]) -> TextEmbedding:
        raise NotImplementedError

    def config(self) -> dict:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def empty_embedding(encoder: TextEncoder) -> TextEmbedding:
    """A batch of zero captions, with the encoder's shapes and device."""
    device, L = encoder.device, encoder.max_length
    return TextEmbedding(torch.zeros(0, L, encoder.dim, device=device),
                         torch.zeros(0, L, dtype=torch.bool, device=device),
                         torch.zeros(0, encoder.pooled_dim, device=device))


def check_texts(texts) -> list[str]:
    """A list of captions; a bare string is refused (iterating it would encode single characters)."""
    if isinstance(texts, str):
        raise ValueError(f"encode takes a list of captions, got the string {texts!r}; wrap it: [{texts!r}]")
    texts = list(texts)
    bad = [t for t in texts if not isinstance(t, str)]
    if bad:
        raise ValueError(f"captions must be str, got {type(bad[0]).__name__}: {bad[0]!r}")
    return texts


def warn_truncated(lengths: list[int], max_length: int, unit: str, stacklevel: int = 3) -> None:
    """One warning per call naming how many ``unit`` (words or tokens) were cut, if any; ``lengths``
    and ``max_length`` count the same things (MiniLM: tokens with CLS/SEP; scratch: words)."""
    over = [n - max_length for n in lengths if n > max_length]
    if over:
        warnings.warn(f"{len(over)} prompt(s) longer than the {max_length} {unit} that fit were truncated: "
                      f"dropped {sum(over)} {unit} in all, at most {max(over)} from one prompt",
                      UserWarning, stacklevel=stacklevel)
