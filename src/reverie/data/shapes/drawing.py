"""Rasterization of ``shapes`` scenes: ``render_array`` (uint8 numpy) and ``render`` (PIL) draw a
``Scene`` with Pillow at ``supersample`` times the target resolution and box-downsample it, compositing the
objects over a gradient background when the scene has one; ``RING_WIDTH`` is the ring's stroke width.
(Named ``drawing`` rather than ``render`` so the module does not shadow the ``render`` function.)
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageDraw

from .scenes import Scene, ShapeObject
from .vocab import BACKGROUND_NAMES, BACKGROUNDS, COLOR_NAMES, COLORS, SHAPES


@functools.lru_cache(maxsize=8)
def _pixel_coords(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-center coordinates relative to the image center, float32 [1, R] (x) and [R, 1] (y)."""
    coords = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution - 0.5
    return coords[None, :], coords[:, None]


def _gradient(scene: Scene, resolution: int) -> np.ndarray:
    """Background with a subtle linear ramp at the target resolution, float32 [R, R, 3] in [0, 255]."""
    base = np.asarray(BACKGROUNDS[BACKGROUND_NAMES[scene.background]], dtype=np.float32)
    angle, strength = scene.gradient
    x, y = _pixel_coords(resolution)
    ramp = x * np.float32(strength * math.cos(angle)) + y * np.float32(strength * math.sin(angle))
    return np.clip(base + ramp[:, :, None], 0, 255)  # |ramp| <= 0.71 * strength


RING_WIDTH = 0.45  # ring thickness as a fraction of its radius (the center of a ring is background)


def _star(cx, cy, r, points=5, inner=0.5):
    angles = [-math.pi / 2 + k * math.pi / points for k in range(2 * points)]
    radii = [r * 1.08 if k % 2 == 0 else r * 1.08 * inner for k in range(2 * points)]
    return [(cx + rad * math.cos(a), cy + rad * math.sin(a)) for a, rad in zip(angles, radii)]


def _draw_object(draw: ImageDraw.ImageDraw, obj: ShapeObject, big: int, fill) -> None:
    cx, cy, r = obj.x * big, obj.y * big, obj.radius * big
    name = SHAPES[obj.shape]
    if name == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif name == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(1, round(RING_WIDTH * r)))
    elif name == "square":
        h = 0.82 * r
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif name == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)], fill=fill)
    elif name == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
    elif name == "star":
        draw.polygon(_star(cx, cy, r), fill=fill)
    elif name == "cross":
        w = 0.34 * r
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:  # unreachable: shapes are validated at construction
        raise ValueError(f"unknown shape {name!r}")


def render_array(scene: Scene, resolution: int, supersample: int = 4) -> np.ndarray:
    """Scene -> uint8 [R, R, 3], drawn at ``supersample`` x ``resolution`` and box-downsampled.

    On a plain background the objects are drawn straight onto it. Under a gradient they are drawn into
    a color layer on black plus a coverage mask, both downsampled (the layer becomes color x coverage)
    and composited over the gradient at the target resolution: the same area antialiasing, since
    objects never overlap, without drawing a large gradient. (One RGBA layer would do, but Pillow
    reduces RGBA several times slower than RGB + L.)"""
    big = resolution * supersample
    plain = scene.gradient is None
    layer = Image.new("RGB", (big, big), BACKGROUNDS[BACKGROUND_NAMES[scene.background]] if plain else 0)
    draws = [(ImageDraw.Draw(layer), None)]
    if not plain:
        mask = Image.new("L", (big, big))
        draws.append((ImageDraw.Draw(mask), 255))
    for obj in scene.objects:
        for draw, fill in draws:
            _draw_object(draw, obj, big, fill or COLORS[COLOR_NAMES[obj.color]])
    layer = layer.reduce(supersample) if supersample > 1 else layer
    if plain:
        return np.asarray(layer).copy()
    coverage = np.asarray(mask.reduce(supersample) if supersample > 1 else mask, dtype=np.float32)
    pixels = _gradient(scene, resolution)
    pixels *= 1 - coverage[:, :, None] * np.float32(1 / 255)
    pixels += np.asarray(layer, dtype=np.float32)
    return np.clip(np.rint(pixels, out=pixels), 0, 255, out=pixels).astype(np.uint8)


def render_object_masks(scene: Scene, resolution: int, supersample: int = 4, max_objects: int = 3) -> np.ndarray:
    """Each object's coverage, drawn as ``render_array`` draws it: float32 [max_objects, R, R] in [0, 1]
    (zeros for absent objects); object masks for inpainting (``reverie.data.masks``)."""
    big = resolution * supersample
    out = np.zeros((max_objects, resolution, resolution), dtype=np.float32)
    for k, obj in enumerate(scene.objects[:max_objects]):
        mask = Image.new("L", (big, big))
        _draw_object(ImageDraw.Draw(mask), obj, big, 255)
        out[k] = np.asarray(mask.reduce(supersample) if supersample > 1 else mask, dtype=np.float32) / 255
    return out


def render(scene: Scene, resolution: int, supersample: int = 4) -> Image.Image:
    """Scene -> RGB PIL image at ``resolution`` (see ``render_array``)."""
    return Image.fromarray(render_array(scene, resolution, supersample), "RGB")
