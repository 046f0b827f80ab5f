"""Evaluating text models: test-split bits per character and generative quality of samples.

- ``nelbo``: bits per character on the Shakespeare test plays (``reverie.data.shakespeare.TEST_PLAYS``), as
  the windows of the model's context the text is cut into: an MDLM's NELBO (an upper bound; with ``steps``
  T, the T-step discrete-time bound) or an AR model's exact -log p. Characters, not tokens, are the unit:
  a byte-fallback character costs all of its bytes.
- ``genppl``: samples' perplexity per character under a separately trained AR judge, with the samples'
  unigram character entropy (bits) and distinct word 4-grams (share of unique 4-grams of whitespace words
  over all of them): low perplexity with collapsed entropy is degenerate, so the three go together.
"""

from __future__ import annotations

import math

import torch

from ..data.shakespeare import ShakespeareChunks
from ..language import TextLM

__all__ = ["TEXT_METRICS", "test_windows", "bits_per_char", "unigram_entropy", "distinct_ngrams",
           "generative_metrics"]

TEXT_METRICS = ("nelbo", "genppl")


def test_windows(lm: TextLM, n: int | None = None, split: str = "test") -> torch.Tensor:
    """The first ``n`` (all if None) non-overlapping context-length windows of a split, (N, L)."""
    data = ShakespeareChunks(lm.tokenizer, split, lm.max_len)
    count = len(data) if n is None else min(n, len(data))
    return torch.stack([data[i]["tokens"] for i in range(count)])


def bits_per_char(lm: TextLM, x: torch.Tensor, draws: int = 4, steps: int = 0, seed: int = 0,
                  batch_size: int = 64) -> float:
    """Total nats of ``x`` (AR exact, MDLM NELBO averaged over ``draws``) per decoded character, in bits."""
    g = torch.Generator().manual_seed(seed)
    nats = 0.0
    for chunk in x.split(batch_size):
        if lm.objective == "ar":
            nats += float(-lm.log_likelihood(chunk).sum())
        else:
            nats += float(lm.nelbo(chunk, g, draws=draws, steps=steps).sum())
    chars = sum(len(lm.decode(row.tolist())) for row in x)
    return nats / chars / math.log(2)


def unigram_entropy(texts: list[str]) -> float:
    """Entropy in bits of the pooled character frequencies of ``texts``."""
    counts = torch.bincount(torch.tensor([ord(c) for t in texts for c in t], dtype=torch.long))
    p = counts[counts > 0].double() / counts.sum()
    return float(-(p * p.log2()).sum())


def distinct_ngrams(texts: list[str], n: int = 4) -> float:
    """Unique word n-grams over all word n-grams of ``texts`` (each text on its own)."""
    grams = [tuple(words[i:i + n]) for t in texts for words in [t.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


def generative_metrics(tokens: torch.Tensor, judge: TextLM, lm: TextLM, bootstrap: int = 1000) -> dict:
    """gen-ppl per character under ``judge`` (an AR model over the same tokens), with its standard error over
    the samples (``bootstrap`` resamplings of the samples, seeded), entropy and distinct-4."""
    if judge.objective != "ar" or judge.tokenizer.chars != lm.tokenizer.chars:
        raise ValueError(f"{judge.path} is not an AR judge over {lm.path}'s tokens")
    texts = [lm.decode(row.tolist()) for row in tokens]
    nats = -judge.log_likelihood(tokens).double()
    chars = torch.tensor([len(t) for t in texts], dtype=torch.float64)
    idx = torch.randint(0, len(texts), (bootstrap, len(texts)), generator=torch.Generator().manual_seed(0))
    resampled = (nats[idx].sum(1) / chars[idx].sum(1)).exp()
    return {"gen_ppl": math.exp(float(nats.sum() / chars.sum())), "gen_ppl_se": float(resampled.std()),
            "entropy_bits": unigram_entropy(texts), "distinct4": distinct_ngrams(texts), "samples": len(texts)}
