"""The watermark key: one secret per user, made on first use, shared by both watermarks.

It lives in ``reverie.provenance.credentials.home()`` ``/watermark.key`` (64 hex digits, mode 0600);
``REVERIE_WATERMARK_KEY`` (hex) overrides it. Each scheme derives its own seed from it (:func:`seed_for`),
and files record only :func:`key_id`, a hash that names the key without revealing it. Whoever holds the key
can detect the watermark, and also forge or remove it: keep it private, as a signing key.
"""

from __future__ import annotations

import hashlib
import os
import secrets

from .credentials import home, write_private


def watermark_key() -> bytes:
    """The user's watermark key (see the module docstring)."""
    text = os.environ.get("REVERIE_WATERMARK_KEY")
    if text is None:
        path = home() / "watermark.key"
        if not path.is_file():
            write_private(path, secrets.token_hex(32).encode())
        text = path.read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ValueError("the watermark key must be hex digits (REVERIE_WATERMARK_KEY or watermark.key)") from None
    if len(key) < 16:
        raise ValueError("the watermark key must hold at least 16 bytes (32 hex digits)")
    return key


def key_id(key: bytes) -> str:
    """A public name of ``key``: 16 hex digits of a hash."""
    return hashlib.sha256(b"reverie key id " + key).hexdigest()[:16]


def seed_for(key: bytes, purpose: str) -> int:
    """A 63-bit generator seed derived from ``key`` for one ``purpose`` (scheme)."""
    digest = hashlib.sha256(purpose.encode() + b"\0" + key).digest()
    return int.from_bytes(digest[:8], "little") >> 1
