"""Provenance of generated images: C2PA Content Credentials and two watermarks, written and verified.

* ``png``: :func:`save_png`, the one writer of generated PNGs (CLI, editing commands, server), and
  :func:`read_png_parameters` (what ``--from-png`` reads). Every PNG carries its parameters in text chunks,
  a signed C2PA manifest, and, at 256 px and up, the pixel watermark.
* ``credentials``: the local CA and signing certificate (made on first use under ``$REVERIE_HOME`` or
  ``~/.config/reverie``; a user's own through ``REVERIE_C2PA_CERT`` / ``REVERIE_C2PA_KEY``), the manifest
  (``c2pa.created``, ``trainedAlgorithmicMedia``, model name, hash and parameters) and its validation.
* ``treering``: the noise-space watermark (Tree-Ring, Wen et al. 2023) in the initial noise, detected by
  inverting the image (``reverie.editing.invert``) with an exact p-value.
* ``pixelmark``: the pixel-space watermark (a keyed periodic pattern, phase correlation).
* ``keys``: the user's secret watermark key (``watermark.key`` beside the certificates).
* ``verify``: :func:`verify_image` reads all of it back (``reverie verify FILE``).
"""

from __future__ import annotations

from .png import png_bytes, read_png_parameters, save_png

__all__ = ["save_png", "read_png_parameters", "png_bytes", "encode_png", "watermark_noise", "watermark_enabled"]


def watermark_enabled(params: dict) -> bool:
    """False when ``params`` (a PNG's parameters) record that the watermarks were switched off."""
    return params.get("watermark") != "off"


def watermark_noise(model, num_images: int, seed: int, enabled: bool = True, key: bytes | None = None):
    """``(noise, record)``: the unit-variance start noise for ``reverie.sampling.sample_images(..., noise=)``
    carrying the Tree-Ring key (the seed's own draw with its ring replaced; ``key`` defaults to the user's),
    and what the PNG metadata says about it (its ``watermark`` entry). ``enabled=False`` (``--no-watermark``)
    gives ``(None, "off")``: the seed's plain noise, and the metadata saying so."""
    if not enabled:
        return None, "off"
    from ..sampling import noise_shape
    from . import treering
    from .keys import watermark_key

    key = watermark_key() if key is None else key
    return treering.watermarked_noise(noise_shape(model, num_images), seed, key), {"noise": treering.record(key)}


def encode_png(image, params: dict, *, watermark: bool = True, sign: bool = True) -> bytes:
    """The bytes :func:`save_png` would write (for the server)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="reverie-png-") as tmp:
        path = Path(tmp) / "image.png"
        save_png(image, path, params, watermark=watermark, sign=sign)
        return path.read_bytes()
