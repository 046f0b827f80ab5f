"""Per-caption memo of a frozen text encoder, so a training loop over a finite caption set encodes
each caption once.

Entries live on the CPU, keyed by the exact caption string, least recently used evicted first.
An entry keeps only its real-token rows when the rest are zero padding (the ``TextEmbedding``
contract): a shapes caption (~13 MiniLM tokens) costs ~22 KB instead of ~50 KB for L = 32, so the
default 8192 entries hold at most ~180 MB. The zeros are put back on the way out, so results equal
the encoder's own: bit for bit when the encoder's per-caption output does not depend on what else
is in the batch (MiniLM on the CPU, checked in the tests; a GPU matmul may pick another kernel per
batch size and differ in the last bit).

The wrapper is a plain object, not an ``nn.Module``: held by a module (``TextConditionedNet``), it
must not register the encoder's weights a second time.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor

from .base import TextEmbedding, TextEncoder, check_texts, empty_embedding

_FORWARDED = frozenset({"name", "dim", "pooled_dim", "max_length", "trainable", "config", "device"})


class CachedTextEncoder:
    """``encode`` like ``encoder.encode``, but each distinct caption is encoded only once."""

    def __init__(self, encoder: TextEncoder, max_items: int = 8192):
        if encoder.trainable:
            raise ValueError(f"only frozen text encoders can be cached; {encoder.name!r} is trainable "
                             "(its embedding of a caption changes as it learns)")
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        self.encoder, self.max_items = encoder, max_items
        self._entries: OrderedDict[str, tuple[Tensor, Tensor, Tensor]] = OrderedDict()
        self.hits = self.misses = 0  # captions served from the cache / captions encoded

    def __getattr__(self, name):
        # Only the encoder's public contract is forwarded: a blanket forward would also hand out
        # e.g. the encoder's __deepcopy__, and copying the cache would copy the encoder instead.
        if name in _FORWARDED:
            return getattr(self.encoder, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def encode(self, texts: list[str]) -> TextEmbedding:
        texts = check_texts(texts)
        if not texts:
            return empty_embedding(self.encoder)
        unique = list(dict.fromkeys(texts))  # first-seen order
        rows = {t: self._entries[t] for t in unique if t in self._entries}
        missing = [t for t in unique if t not in rows]
        self.hits += sum(t in rows for t in texts)
        self.misses += len(missing)
        if missing:
            fresh = self.encoder.encode(missing)
            for i, t in enumerate(missing):
                rows[t] = _pack(fresh.tokens[i], fresh.mask[i], fresh.pooled[i])
        for t in rows:
            self._remember(t, rows[t])
        out = [_unpack(*rows[t], self.encoder.max_length) for t in texts]
        tokens, mask, pooled = (torch.stack(parts) for parts in zip(*out))
        return TextEmbedding(tokens, mask, pooled).to(self.encoder.device)

    def _remember(self, text: str, entry: tuple[Tensor, Tensor, Tensor]) -> None:
        self._entries[text] = entry
        self._entries.move_to_end(text)
        while len(self._entries) > self.max_items:
            self._entries.popitem(last=False)


def _pack(tokens: Tensor, mask: Tensor, pooled: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One caption's embedding as a compact CPU entry (own storage, not a view into the batch)."""
    n = int(mask.sum())
    prefix = bool(mask[:n].all()) and not bool(tokens[n:].any())
    kept = tokens[:n] if prefix else tokens
    return tuple(x.detach().to("cpu", copy=True) for x in (kept, mask, pooled))


def _unpack(kept: Tensor, mask: Tensor, pooled: Tensor, max_length: int) -> tuple[Tensor, Tensor, Tensor]:
    if kept.shape[0] < max_length:
        kept = torch.cat([kept, kept.new_zeros(max_length - kept.shape[0], kept.shape[1])])
    return kept, mask, pooled
