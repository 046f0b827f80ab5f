"""``shapes``: a procedural, captioned image dataset of one to three colored shapes.

Sample ``i`` is a pure function of ``(seed, i)``: a ``random.Random`` seeded from both draws the scene,
so DataLoader workers, distributed shards and reruns agree byte for byte. A scene is drawn with Pillow
at ``supersample`` times the target resolution and box-downsampled (``Image.reduce``), which gives
clean antialiased edges even for the small shapes of a 32x32 image.

Choices (the structured labels behind every caption, for attribute classifiers and adherence checks):

- colors: 10 named colors at least 39 CIELAB Delta-E apart from one another, and drawn only on
  backgrounds they contrast with (Delta-E >= 45), so every named color is recognisable at 32x32;
- shapes: circle, square, triangle, star, ring, diamond, cross; sizes: small / large (radius 0.13 /
  0.21 of the image side, +-8 % jitter), two sizes so that the label stays readable at 32x32;
- coordinates are fractions of the image side, ``x`` to the right and ``y`` *down* (image rows);
- relation of object ``a`` to object ``b`` ("left of", "right of", "above", "below") holds only when one
  axis dominates: ``|d_major| >= 2 |d_minor|``; otherwise it is ambiguous (-1) and never captioned;
- objects never overlap: bounding circles keep a gap of 3 % of the image side;
- a single object sits well inside one cell of a 3x3 grid, so its position ("in the top left") is
  unambiguous; for several objects the cell is still labelled (thresholds 0.4 / 0.6);
- the default length is 2**20: effectively infinite for training, and still safe for a DataLoader with
  ``shuffle=True`` (``RandomSampler`` materialises a permutation of the whole index space).

The package, by job: ``vocab`` (label vocabularies, caption words, readable colors), ``scenes`` (the scene
records, relations and grid positions, placement and ``sample_scene``), ``drawing`` (rasterization),
``captions`` (``make_caption`` and ``parse_caption``), ``planner`` (layouts and ``plan_layout``) and
``dataset`` (``ShapesDataset`` and ``scene_labels``). Everything public is re-exported here.
"""

from __future__ import annotations

from .captions import make_caption, parse_caption
from .dataset import ShapesDataset, scene_labels
from .drawing import RING_WIDTH, render, render_array, render_object_masks
from .planner import object_phrase, plan_layout, scene_layout
from .scenes import (
    Scene,
    ShapeObject,
    place_extra,
    place_pair,
    place_single,
    position_cell,
    relation,
    sample_radius,
    sample_scene,
)
from .vocab import (
    BACKGROUND_NAMES,
    BACKGROUNDS,
    COLOR_NAMES,
    COLORS,
    INVERSE_RELATION,
    POSITIONS,
    READABLE,
    RELATION_WORDS,
    RELATIONS,
    SHAPES,
    SIZE_WORDS,
    SIZES,
    cielab,
)

__all__ = [
    "BACKGROUNDS", "BACKGROUND_NAMES", "COLORS", "COLOR_NAMES", "INVERSE_RELATION", "POSITIONS", "READABLE",
    "RELATIONS", "RELATION_WORDS", "RING_WIDTH", "SHAPES", "SIZES", "SIZE_WORDS", "Scene", "ShapeObject",
    "ShapesDataset", "cielab", "make_caption", "object_phrase", "parse_caption", "place_extra", "place_pair",
    "place_single", "plan_layout", "position_cell", "relation", "render", "render_array", "render_object_masks",
    "sample_radius", "sample_scene", "scene_labels", "scene_layout",
]
