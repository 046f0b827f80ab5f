"""Scenes of ``shapes``: the ``ShapeObject`` / ``Scene`` records, the spatial labels read off a scene
(``relation`` between two objects, ``position_cell`` in the 3x3 grid), the placement rules (``place_single``,
``place_pair``, ``place_extra``, ``sample_radius``; the geometry constants live here) and ``sample_scene``,
which draws a whole scene from a ``random.Random``. The layout planner reuses the same placement rules.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from .vocab import READABLE, RELATIONS

_RADIUS = (0.13, 0.21)  # per size, as a fraction of the image side
_RADIUS_JITTER = 0.08
_MARGIN = 0.02  # minimum gap between a shape's bounding circle and the image border
_GAP = 0.03  # minimum gap between two bounding circles
_DOMINANCE = 2.0  # |d_major| / |d_minor| needed for a relation to be stated
_CELL_EDGES = (0.4, 0.6)
_CELL_DEAD_ZONE = 0.03


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object: indices into SHAPES / COLORS / SIZES, center and radius as image fractions."""

    shape: int
    color: int
    size: int
    x: float
    y: float
    radius: float


@dataclass(frozen=True)
class Scene:
    """Everything needed to draw and caption a sample; ``gradient`` is (angle, strength) or None."""

    background: int
    gradient: tuple[float, float] | None
    objects: tuple[ShapeObject, ...]


def relation(a: ShapeObject, b: ShapeObject) -> int:
    """Index into RELATIONS of ``a`` relative to ``b``, or -1 when no axis clearly dominates."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= _DOMINANCE * abs(dy) and dx != 0:
        return 0 if dx < 0 else 1
    if abs(dy) >= _DOMINANCE * abs(dx) and dy != 0:
        return 2 if dy < 0 else 3
    return -1


def position_cell(obj: ShapeObject) -> int:
    """Index into POSITIONS of the 3x3 grid cell holding the object's center."""
    low, high = _CELL_EDGES
    column = (obj.x >= low) + (obj.x >= high)
    row = (obj.y >= low) + (obj.y >= high)
    return 3 * row + column


def _span(radius: float) -> tuple[float, float]:
    """Range of centers that keeps a bounding circle inside the image with the border margin."""
    return radius + _MARGIN, 1.0 - radius - _MARGIN


def place_single(rng: random.Random, radius: float) -> tuple[float, float]:
    """Center inside a random 3x3 cell, away from the cell edges so the position word is unambiguous."""
    lo, hi = _span(radius)
    cells = ((lo, _CELL_EDGES[0] - _CELL_DEAD_ZONE), (_CELL_EDGES[0] + _CELL_DEAD_ZONE,
             _CELL_EDGES[1] - _CELL_DEAD_ZONE), (_CELL_EDGES[1] + _CELL_DEAD_ZONE, hi))
    x_lo, x_hi = rng.choice(cells)
    y_lo, y_hi = rng.choice(cells)
    return rng.uniform(x_lo, x_hi), rng.uniform(y_lo, y_hi)


def place_pair(rng: random.Random, r0: float, r1: float, rel: int) -> tuple[tuple[float, float], ...]:
    """Centers of two objects with object 0 ``RELATIONS[rel]`` object 1, clearly and without overlap."""
    (lo0, hi0), (lo1, hi1) = _span(r0), _span(r1)
    # Along the relation axis the object with the smaller coordinate comes first.
    first_is_0 = rel in (0, 2)
    (lo_a, hi_a), (lo_b, hi_b) = ((lo0, hi0), (lo1, hi1)) if first_is_0 else ((lo1, hi1), (lo0, hi0))
    # Center distance along the axis: no overlap at the least, both inside the image at the most.
    gap = rng.uniform(r0 + r1 + _GAP, max(r0 + r1 + _GAP, hi_b - lo_a))
    start_lo, start_hi = max(lo_a, lo_b - gap), min(hi_a, hi_b - gap)
    p_a = rng.uniform(start_lo, max(start_lo, start_hi))
    p0, p1 = (p_a, p_a + gap) if first_is_0 else (p_a + gap, p_a)
    # Across the axis: offset at most gap / 2.2, so the relation axis dominates by more than 2x.
    q0 = rng.uniform(lo0, hi0)
    offset_max = gap / (_DOMINANCE * 1.1)
    lo_e, hi_e = max(-offset_max, lo1 - q0), min(offset_max, hi1 - q0)
    q1 = q0 + (rng.uniform(lo_e, hi_e) if lo_e <= hi_e else 0.0)
    return ((p0, q0), (p1, q1)) if rel < 2 else ((q0, p0), (q1, p1))


def place_extra(rng, radius, placed, tries=40) -> tuple[float, float] | None:
    """Rejection-sample a center that keeps clear of the already placed (x, y, r) circles."""
    lo, hi = _span(radius)
    for _ in range(tries):
        x, y = rng.uniform(lo, hi), rng.uniform(lo, hi)
        if all(math.hypot(x - px, y - py) >= radius + pr + _GAP for px, py, pr in placed):
            return x, y
    return None


def sample_radius(rng: random.Random, size: int) -> float:
    """A radius for size index ``size``: the nominal radius with +-8 % jitter."""
    return _RADIUS[size] * rng.uniform(1 - _RADIUS_JITTER, 1 + _RADIUS_JITTER)


def sample_scene(rng: random.Random, num_objects: int, shapes, colors, backgrounds, gradient_prob,
                 sizes_allowed=(0, 1)) -> Scene:
    """Draw one scene from ``rng``: background, then sizes and layout, then distinct (shape, color) pairs."""
    background = rng.choice(backgrounds)
    gradient = None
    if rng.random() < gradient_prob:
        gradient = (rng.uniform(0, 2 * math.pi), rng.choice((-1, 1)) * rng.uniform(20, 40))
    sizes = [rng.choice(sizes_allowed) for _ in range(num_objects)]
    radii = [sample_radius(rng, size) for size in sizes]
    if num_objects == 1:
        centers = [place_single(rng, radii[0])]
    else:
        centers = list(place_pair(rng, radii[0], radii[1], rng.randrange(len(RELATIONS))))
        if num_objects == 3:
            placed = [(x, y, r) for (x, y), r in zip(centers, radii)]
            center = place_extra(rng, radii[2], placed)
            if center is None and 0 in sizes_allowed:  # no room for a large one: try small, else keep two
                sizes[2] = 0
                radii[2] = sample_radius(rng, 0)
                center = place_extra(rng, radii[2], placed)
            if center is not None:
                centers.append(center)
    palette = [c for c in colors if c in READABLE[background]]
    combinations = [(s, c) for s in shapes for c in palette]
    pairs = rng.sample(combinations, min(len(centers), len(combinations)))
    objects = tuple(
        ShapeObject(shape, color, size, x, y, r)
        for (shape, color), size, (x, y), r in zip(pairs, sizes, centers, radii)
    )
    return Scene(background, gradient, objects)
