"""Layouts of ``shapes`` scenes (``reverie.layout``): ``object_phrase`` and ``scene_layout`` turn a scene
into (phrase, box) pairs, and ``plan_layout`` plans a layout for a caption, reading it with
``parse_caption`` and placing its objects with the data's own placement rules so that every stated
position and relation holds.
"""

from __future__ import annotations

import random

from .captions import parse_caption
from .scenes import (
    Scene,
    ShapeObject,
    place_extra,
    place_pair,
    place_single,
    position_cell,
    relation,
    sample_radius,
)
from .vocab import COLOR_NAMES, INVERSE_RELATION, RELATIONS, SHAPES


def object_phrase(obj: ShapeObject) -> str:
    """The layout phrase of an object: its color and shape ("red circle"); the box carries the size."""
    return f"{COLOR_NAMES[obj.color]} {SHAPES[obj.shape]}"


def scene_layout(scene: Scene) -> list[tuple[str, tuple[float, float, float, float]]]:
    """The scene as a ``reverie.layout`` layout: each object's phrase and its bounding-circle box."""
    return [(object_phrase(o), (o.x - o.radius, o.y - o.radius, o.x + o.radius, o.y + o.radius))
            for o in scene.objects]


def _layout_holds(objects: list[ShapeObject], parsed: dict) -> bool:
    positions_ok = all(p["position"] < 0 or position_cell(o) == p["position"]
                       for o, p in zip(objects, parsed["objects"]))
    return positions_ok and all(relation(objects[i], objects[j]) == r for i, r, j in parsed["relations"])


def plan_layout(text: str, rng: random.Random, tries: int = 200):
    """A layout for a shapes caption, drawn from the data's own placement rules so that every stated
    position and relation holds (a ``reverie.layout`` planner); None when the caption names no object.

    Sizes follow the size words ("small", "big", ...) or are drawn; a two-object relation is placed
    directly; anything else is rejection-sampled (``tries`` draws, then the last draw is kept: a caption
    can ask for the impossible, e.g. "a circle above a square above the circle")."""
    parsed = parse_caption(text)
    specs = parsed["objects"][:3]
    if not specs:
        return None
    parsed = {"objects": specs, "relations": [r for r in parsed["relations"] if max(r[0], r[2]) < len(specs)]}
    first = next(((i, r, j) for i, r, j in parsed["relations"] if {i, j} == {0, 1}), None)
    objects: list[ShapeObject] = []
    for _ in range(tries):
        radii = [sample_radius(rng, p["size"] if p["size"] >= 0 else rng.randrange(2)) for p in specs]
        if len(specs) == 1:
            centers = [place_single(rng, radii[0])]
        else:
            rel = rng.randrange(len(RELATIONS)) if first is None else \
                (first[1] if first[0] == 0 else INVERSE_RELATION[first[1]])
            centers = list(place_pair(rng, radii[0], radii[1], rel))
            if len(specs) == 3:
                center = place_extra(rng, radii[2], [(x, y, r) for (x, y), r in zip(centers, radii)])
                if center is None:
                    continue
                centers.append(center)
        objects = [ShapeObject(p["shape"], p["color"], 0, x, y, r) for p, (x, y), r in zip(specs, centers, radii)]
        if _layout_holds(objects, parsed):
            break
    if not objects:
        return None
    return scene_layout(Scene(0, None, tuple(objects)))
