"""Image transforms shared by the datasets: PIL <-> tensor in [-1, 1], RGB conversion, resize, crop, flip.

All transforms are plain functions of a PIL image (and, for random ones, an explicit ``random.Random``),
so a sample is a pure function of its index and seed whichever worker or process loads it.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

# Transparent pixels are composited onto white: the usual look of a transparent PNG in a viewer.
_MATTE = (255, 255, 255)


def to_tensor(image: Image.Image) -> Tensor:
    """8-bit ``L`` or ``RGB`` PIL image -> float32 tensor ``[C, H, W]`` in ``[-1, 1]``."""
    if image.mode not in ("L", "RGB"):
        raise ValueError(f"to_tensor expects an 'L' or 'RGB' image, got mode {image.mode!r}")
    array = np.array(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return uint8_to_tensor(torch.from_numpy(array).permute(2, 0, 1))


def uint8_to_tensor(array: Tensor) -> Tensor:
    """uint8 tensor (values 0..255) -> float32 in ``[-1, 1]`` (0 -> -1, 255 -> 1)."""
    return array.to(torch.float32).div_(127.5).sub_(1.0)


def to_pil(image: Tensor) -> Image.Image:
    """Float tensor ``[C, H, W]`` in ``[-1, 1]`` (C = 1 or 3) -> 8-bit PIL image (values clamped)."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"to_pil expects a [1 or 3, H, W] tensor, got shape {tuple(image.shape)}")
    array = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    array = array.permute(1, 2, 0).numpy()
    return Image.fromarray(array[:, :, 0], "L") if array.shape[2] == 1 else Image.fromarray(array, "RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB: applies EXIF orientation, composites alpha on white, rescales 16-bit."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # Pillow's own I->L conversion clips at 255, which turns 16-bit images white; rescale instead.
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray((array.clip(0, top) * (255.0 / top)).round().astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        matte = Image.new("RGBA", rgba.size, (*_MATTE, 255))
        return Image.alpha_composite(matte, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` pixels, keeping the aspect ratio (Lanczos, antialiased)."""
    width, height = image.size
    if min(width, height) == size:
        return image
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    return image.resize(new_size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Crop the central ``size`` x ``size`` square (the image must be at least that big on both sides)."""
    width, height = image.size
    if width < size or height < size:
        raise ValueError(f"cannot center-crop {size}x{size} from an image of size {width}x{height}")
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def random_hflip(image: Image.Image, rng: random.Random, p: float = 0.5) -> Image.Image:
    """Mirror left-right with probability ``p``, drawing from the caller's seeded ``rng``."""
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < p else image


def pad_to(image: Image.Image, size: int, fill: int | tuple[int, ...] = 0) -> Image.Image:
    """Pad an image centrally to ``size`` x ``size`` with a constant ``fill``."""
    width, height = image.size
    if width > size or height > size:
        raise ValueError(f"cannot pad a {width}x{height} image to {size}x{size}")
    canvas = Image.new(image.mode, (size, size), fill)
    canvas.paste(image, ((size - width) // 2, (size - height) // 2))
    return canvas
