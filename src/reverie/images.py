"""Tensor <-> PIL conversion and image grids."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``[B, C, H, W]`` in [-1, 1] -> list of PIL images (L for 1 channel, RGB for 3)."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    out = []
    for img in x:
        arr = img.permute(1, 2, 0).numpy()
        out.append(Image.fromarray(arr[..., 0], "L") if arr.shape[-1] == 1 else Image.fromarray(arr, "RGB"))
    return out


def make_grid(images: list[Image.Image], ncols: int | None = None, pad: int = 2,
              scale: int = 1) -> Image.Image:
    """Tile PIL images in a grid (NEAREST upscaling by ``scale`` so small images stay crisp)."""
    if not images:
        raise ValueError("no images to put in a grid")
    n = len(images)
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    w, h = images[0].size
    w, h = w * scale, h * scale
    grid = Image.new("RGB", (ncols * (w + pad) + pad, nrows * (h + pad) + pad), (255, 255, 255))
    for i, img in enumerate(images):
        img = img.convert("RGB")
        if scale != 1:
            img = img.resize((w, h), Image.NEAREST)
        grid.paste(img, (pad + (i % ncols) * (w + pad), pad + (i // ncols) * (h + pad)))
    return grid


def save_grid(images: torch.Tensor, path: str | Path, ncols: int | None = None) -> Path:
    """Save a ``[B, C, H, W]`` batch in [-1, 1] as one PNG grid (small images upscaled)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pil = to_pil(images)
    scale = max(1, 64 // pil[0].size[0])
    make_grid(pil, ncols, scale=scale).save(path)
    return path
