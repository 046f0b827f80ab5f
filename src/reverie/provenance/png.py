"""The one PNG writer of generated images, and the reader of their parameters.

:func:`save_png` writes the generation parameters in two text chunks, ``reverie`` (JSON, what ``reverie
generate --from-png`` reads) and ``parameters`` (readable), adds the pixel watermark to images of at least
:data:`reverie.provenance.pixelmark.MIN_SIZE` px (unless told not to), and embeds a signed C2PA manifest
(``reverie.provenance.credentials``). C2PA embedding keeps the text chunks. Without c2pa-python the image
is saved unsigned and ``reverie verify`` says why.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from pathlib import Path

from . import credentials

_warned = False


def pixel_sha256(image) -> str:
    """SHA-256 of the decoded pixels (mode, size, then the raw bytes): what the manifest binds, independent of
    how the PNG was compressed."""
    h = hashlib.sha256(f"{image.mode} {image.size[0]}x{image.size[1]} ".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def png_bytes(image, params: dict) -> bytes:
    """``image`` as PNG bytes with the two parameter text chunks."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("reverie", json.dumps(params, sort_keys=True))
    info.add_text("parameters", ", ".join(f"{k}: {v}" for k, v in sorted(params.items())))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(image, path: Path, params: dict, *, watermark: bool | None = None, sign: bool = True) -> dict:
    """Write ``image`` (PIL) to ``path`` with ``params`` as its generation parameters; see the module docstring.

    ``watermark``: add the pixel watermark when the image is large enough (recorded in
    ``params["watermark"]["pixel"]``); None: unless ``params["watermark"]`` is ``"off"`` (``--no-watermark``).
    ``sign``: embed a C2PA manifest. Returns the parameters as written."""
    global _warned
    from . import pixelmark

    params = dict(params)
    if watermark is None:
        watermark = params.get("watermark") != "off"
    marks = params.get("watermark")
    if marks == "off":
        watermark = False
    marks = dict(marks) if isinstance(marks, dict) else {}
    if watermark and pixelmark.fits(image):
        key = pixelmark.default_key()
        image = pixelmark.embed(image, key)
        marks["pixel"] = pixelmark.record(key)
    elif not watermark and params.get("watermark") != "off":
        marks["pixel"] = "off"
    if marks:
        params["watermark"] = marks
    data = png_bytes(image, params)
    if sign and credentials.c2pa_module() is not None:
        manifest = credentials.manifest_for(params, pixel_sha256(image), Path(path).name)
        data = credentials.sign_png(data, manifest)
    elif sign and not _warned:
        _warned = True
        warnings.warn('c2pa-python is not installed: PNGs are saved without Content Credentials '
                      '(pip install "reverie[provenance]")', stacklevel=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return params


def read_png_parameters(src: Path) -> dict:
    """The generation parameters stored by :func:`save_png`; a missing, unreadable or foreign file is a
    one-line error naming it."""
    from PIL import Image, UnidentifiedImageError

    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"{src} not found")
    try:
        with Image.open(src) as im:
            meta = getattr(im, "text", {}).get("reverie") if im.format == "PNG" else None
    except (UnidentifiedImageError, OSError):
        raise ValueError(f"{src} is not a readable PNG image") from None
    if not meta:
        raise ValueError(f"{src} carries no reverie generation parameters")
    try:
        params = json.loads(meta)
    except json.JSONDecodeError:
        raise ValueError(f"{src}: its reverie parameters are not valid JSON") from None
    if not isinstance(params, dict):
        raise ValueError(f"{src}: its reverie parameters must be a JSON object")
    return params
