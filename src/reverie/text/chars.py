"""A character-level tokenizer with a byte fallback, for language models trained on one corpus.

The vocabulary is the characters seen in the training text (sorted, so it is a pure function of the
text's character set), then the 256 bytes: a character outside the vocabulary is encoded as the ids of
its UTF-8 bytes, so any string round-trips through encode/decode. The tokenizer is stored as JSON in
its model's ``config.json`` (``to_dict``/``from_dict``); there is no file of its own.
"""

from __future__ import annotations

from collections import Counter

__all__ = ["CharTokenizer"]


class CharTokenizer:
    """``encode(str) -> list[int]``, ``decode(list[int]) -> str``; ids ``0..len(chars)-1`` are characters,
    the next 256 are bytes (fallback)."""

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars):
            raise ValueError("tokenizer characters must be distinct")
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}
        self.byte_offset = len(chars)

    @classmethod
    def fit(cls, text: str, min_count: int = 1) -> CharTokenizer:
        """The characters of ``text`` seen at least ``min_count`` times."""
        counts = Counter(text)
        return cls("".join(sorted(c for c, n in counts.items() if n >= min_count)))

    def __len__(self) -> int:
        return self.byte_offset + 256

    def encode(self, text: str) -> list[int]:
        ids = []
        for c in text:
            i = self.index.get(c)
            if i is None:
                ids.extend(self.byte_offset + b for b in c.encode("utf-8"))
            else:
                ids.append(i)
        return ids

    def decode(self, ids) -> str:
        out, pending = [], bytearray()
        for i in (int(x) for x in ids):
            if self.byte_offset <= i < self.byte_offset + 256:
                pending.append(i - self.byte_offset)
                continue
            if pending:
                out.append(pending.decode("utf-8", errors="replace"))
                pending = bytearray()
            out.append(self.chars[i] if 0 <= i < self.byte_offset else "\ufffd")
        if pending:
            out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def to_dict(self) -> dict:
        return {"kind": "chars", "chars": self.chars}

    @classmethod
    def from_dict(cls, d: dict) -> CharTokenizer:
        if d.get("kind") != "chars" or not isinstance(d.get("chars"), str):
            raise ValueError("tokenizer config must be {kind: chars, chars: STRING}")
        return cls(d["chars"])
