"""Random inpainting masks for training a mask-aware model (``model.inpainting``; ``reverie.editing``).

Masks are float ``[H, W]`` (or ``[B, 1, H, W]``) tensors, 1 (white) = repaint and 0 = keep, as in diffusers.
Every draw comes from an explicit ``torch.Generator``, so a training step's masks are a function of its seed.
The kinds (``MASK_KINDS``), mixed by ``train.mask_kinds``:

- ``object``: one object of the scene: its silhouette as the shapes renderer draws it (``object_masks``
  of ``ShapesDataset(object_masks=True)``) dilated by 0-2 px (a third), or its layout box grown by 0-3 px. This is
  the editing task of replacing one object's region with another object (the benchmark's mask is the box
  grown by 2 px). Falls back to ``box`` for an image without objects.
- ``box``: an axis-aligned rectangle of 15-60 % of each side, anywhere.
- ``strokes``: one to three brush strokes (free-form masks in the manner of Yu et al. 2019, DeepFill v2):
  polylines of 2-5 random segments, 2-5 px wide.
- ``full``: everything; the masked image is then empty, so the model keeps generating from the prompt alone.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor

MASK_KINDS = ("object", "box", "strokes", "full")


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """An integer in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (), generator=g))


def box_pixels(box, size: int, margin: float = 0.0) -> Tensor:
    """A ``[size, size]`` 0/1 mask of the pixels whose centers lie inside ``box`` (x0, y0, x1, y1 as fractions
    of the side, y down) grown by ``margin`` pixels on every side."""
    x0, y0, x1, y1 = (float(v) * size for v in box)
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    inside = (xs > x0 - margin) & (xs < x1 + margin) & (ys > y0 - margin) & (ys < y1 + margin)
    return inside.float()


def random_box(size: int, g: torch.Generator) -> Tensor:
    w, h = (max(1, round(size * _uniform(g, 0.15, 0.6))) for _ in range(2))
    x, y = _randint(g, 0, size - w), _randint(g, 0, size - h)
    mask = torch.zeros(size, size)
    mask[y:y + h, x:x + w] = 1
    return mask


def brush_strokes(size: int, g: torch.Generator) -> Tensor:
    image = Image.new("L", (size, size))
    draw = ImageDraw.Draw(image)
    for _ in range(_randint(g, 1, 3)):
        width = _randint(g, 2, 5)
        points = [(_uniform(g, 0, size), _uniform(g, 0, size))]
        for _ in range(_randint(g, 2, 5)):
            angle, length = _uniform(g, 0, 2 * math.pi), _uniform(g, 0.1, 0.35) * size
            x, y = points[-1]
            points.append((min(max(x + length * math.cos(angle), 0), size - 1),
                           min(max(y + length * math.sin(angle), 0), size - 1)))
        draw.line(points, fill=255, width=width, joint="curve")
        for x, y in points:  # round caps
            draw.ellipse((x - width / 2, y - width / 2, x + width / 2, y + width / 2), fill=255)
    return torch.from_numpy((np.asarray(image) > 127).astype(np.float32))


def dilate(mask: Tensor, pixels: int) -> Tensor:
    """``mask`` ([H, W] 0/1) grown by ``pixels`` in every direction (a square structuring element)."""
    if pixels <= 0:
        return mask
    return F.max_pool2d(mask[None, None], 2 * pixels + 1, 1, pixels)[0, 0]


def object_mask(coverage: Tensor | None, box, size: int, g: torch.Generator) -> Tensor:
    """One object's mask: a third of the time its silhouette (``coverage`` [H, W], from the renderer) dilated by
    0-2 px, else its layout ``box`` grown by 0-3 px (a box says nothing of the shape, which the prompt may
    change; the silhouette is used only when given)."""
    if coverage is not None and bool(torch.rand((), generator=g) < 1 / 3):
        return dilate((coverage > 0).float(), _randint(g, 0, 2))
    return box_pixels(box, size, margin=_randint(g, 0, 3))


def training_masks(batch: dict, size: int, g: torch.Generator, kinds: dict[str, float]) -> Tensor:
    """``[B, 1, size, size]`` random masks for a training batch (``kinds``: kind -> share). Object masks use
    the batch's ``layout`` (boxes) and, when present, ``object_masks`` (silhouettes)."""
    names = [k for k in MASK_KINDS if kinds.get(k, 0) > 0]
    shares = torch.tensor([float(kinds[k]) for k in names])
    n = len(batch["text"]) if "text" in batch else batch["image"].shape[0]
    picks = torch.multinomial(shares, n, replacement=True, generator=g).tolist()
    layouts = batch.get("layout") or [None] * n
    silhouettes = batch.get("object_masks")
    masks = []
    for b, pick in enumerate(picks):
        kind = names[pick]
        if kind == "object" and layouts[b]:
            k = _randint(g, 0, len(layouts[b]) - 1)
            coverage = silhouettes[b, k] if silhouettes is not None else None
            masks.append(object_mask(coverage, layouts[b][k][1], size, g))
        elif kind == "strokes":
            masks.append(brush_strokes(size, g))
        elif kind == "full":
            masks.append(torch.ones(size, size))
        else:
            masks.append(random_box(size, g))
    return torch.stack(masks)[:, None]
