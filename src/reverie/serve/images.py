"""Images in and out of the API: bounded base64 decoding, and PNG bytes through reverie's one PNG writer.

Uploaded images are checked from their header (size, pixel count) before a pixel is decoded, so a small
file that claims a huge image (a decompression bomb) costs nothing. Every PNG the server returns is
written by the writer that ``reverie generate`` uses, so it carries the same metadata (and whatever
that writer adds: Content Credentials, watermarks) as a file from the command line.
"""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image, UnidentifiedImageError

from .schemas import MAX_PIXELS, MAX_SIDE


class BadImage(ValueError):
    """An uploaded image that cannot be used; the message names the field."""


def decode_image(text: str, field: str) -> Image.Image:
    """A base64 image (plain, or a ``data:image/...;base64,`` URL; never a URL to fetch) as an RGB or L PIL
    image, within ``MAX_SIDE`` and ``MAX_PIXELS``."""
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if ";base64" not in head:
            raise BadImage(f"{field}: a data URL must be base64-encoded")
    elif text.startswith(("http://", "https://", "file:")):
        raise BadImage(f"{field}: give the image itself (base64), not a URL; the server fetches nothing")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadImage(f"{field}: not valid base64") from None
    try:
        im = Image.open(io.BytesIO(data))
        w, h = im.size
        if w > MAX_SIDE or h > MAX_SIDE or w * h > MAX_PIXELS:
            raise BadImage(f"{field}: {w}x{h} is larger than the {MAX_SIDE}x{MAX_SIDE} the server takes")
        im.load()
    except BadImage:
        raise
    except Image.DecompressionBombError:  # PIL's own guard, for headers far beyond ours
        raise BadImage(f"{field}: the image is larger than the {MAX_SIDE}x{MAX_SIDE} the server takes") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"{field}: not a readable image ({type(e).__name__})") from None
    return im.convert("L" if im.mode in ("1", "L", "I", "I;16", "F") else "RGB")


def png_bytes(image: Image.Image, params: dict, watermark: bool = True) -> bytes:
    """The PNG that ``reverie generate`` would write for ``image`` with ``params``, as bytes: the parameters,
    a signed C2PA manifest and, at 256 px and up, the pixel watermark (``reverie.provenance``)."""
    from ..provenance import encode_png

    return encode_png(image, params, watermark=watermark)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def preview_jpeg(image: Image.Image, side: int = 256) -> str:
    """A denoising preview (the current estimate of the final image) as base64 JPEG, scaled up to ``side``
    pixels with nearest-neighbour so small images stay crisp. Previews are not results and carry no metadata."""
    scale = max(1, side // max(image.size))
    if scale > 1:
        image = image.resize((image.size[0] * scale, image.size[1] * scale), Image.NEAREST)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=85)
    return b64(buf.getvalue())
