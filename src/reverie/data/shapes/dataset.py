"""The ``shapes`` dataset: ``ShapesDataset`` draws sample ``i`` as a pure function of ``(seed, i)``
(scene, caption, rendered image, layout) and ``scene_labels`` turns a scene into the fixed-size tensors
of structured labels (per-object shape / color / size / position / center / radius, pairwise relations)
that ride along with each item.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from torch.utils.data import Dataset

from ..transforms import uint8_to_tensor
from .captions import make_caption
from .drawing import render_array, render_object_masks
from .planner import scene_layout
from .scenes import Scene, position_cell, relation, sample_scene
from .vocab import COLOR_NAMES, INVERSE_RELATION, READABLE, SHAPES, SIZES


def _indices(names, vocabulary: tuple[str, ...], what: str) -> tuple[int, ...]:
    if names is None:
        return tuple(range(len(vocabulary)))
    unknown = [name for name in names if name not in vocabulary]
    if unknown or not names:
        raise ValueError(f"unknown {what} {unknown}; valid {what}: {', '.join(vocabulary)}")
    return tuple(vocabulary.index(name) for name in dict.fromkeys(names))


class ShapesDataset(Dataset):
    """Procedural captioned shapes: ``ds[i]`` -> ``{"image": [3, H, W] in [-1, 1], "text", "label": -1,
    "num_objects", "objects": {"shape", "color", "size", "center" [3, 2], "radius", "position"},
    "relation" (object 0 to object 1, -1 if none), "relations" [3, 3], "background"}``.

    Per-object fields are padded to 3 objects with -1. ``shapes`` / ``colors`` / ``sizes`` restrict the
    vocabulary; ``gradient_prob`` is the share of gradient (vs plain) backgrounds. The caption mix:
    ``object_weights`` (relative frequencies of ``min_objects..max_objects`` objects; default equal),
    ``position_prob`` (share of single-object captions that state the position; default 1/5) and
    ``relation_prob`` (share of two-object captions that state the relation; default 2/3; three-object
    captions are unaffected). Spatial words are what a text-to-image model learns last, so a recipe may
    want more of them. Leaving an option unset draws the captions of earlier versions; setting it, even to
    the default share, draws a different (equally distributed) stream. ``object_masks=True`` adds
    ``"object_masks"``: each object's coverage, float [3, H, W] (zeros for absent objects), for inpainting.
    """

    def __init__(self, resolution: int = 32, max_objects: int = 3, min_objects: int = 1, seed: int = 0,
                 length: int = 2**20, shapes=None, colors=None, gradient_prob: float = 0.5,
                 supersample: int = 4, sizes=None, object_weights=None, position_prob: float | None = None,
                 relation_prob: float | None = None, object_masks: bool = False):
        if not isinstance(resolution, int) or resolution < 8:
            raise ValueError(f"resolution must be an integer >= 8, got {resolution!r}")
        if not 1 <= min_objects <= max_objects <= 3:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= 3, got {min_objects}, {max_objects}")
        if length < 1 or supersample < 1 or not 0 <= gradient_prob <= 1:
            raise ValueError("length and supersample must be >= 1 and gradient_prob in [0, 1]")
        for name, p in (("position_prob", position_prob), ("relation_prob", relation_prob)):
            if p is not None and not 0 <= p <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {p!r}")
        if object_weights is not None:
            object_weights = [float(w) for w in object_weights]
            if len(object_weights) != max_objects - min_objects + 1 or min(object_weights) < 0 \
                    or sum(object_weights) <= 0 or not all(math.isfinite(w) for w in object_weights):
                raise ValueError(f"object_weights needs {max_objects - min_objects + 1} non-negative weights "
                                 f"(object counts {min_objects}..{max_objects}), got {object_weights}")
        self.object_weights, self.position_prob, self.relation_prob = object_weights, position_prob, relation_prob
        self.object_masks = bool(object_masks)
        self.resolution, self.seed, self.length, self.supersample = resolution, seed, length, supersample
        self.min_objects, self.max_objects, self.gradient_prob = min_objects, max_objects, gradient_prob
        self.shapes = _indices(shapes, SHAPES, "shapes")
        self.colors = _indices(colors, COLOR_NAMES, "colors")
        self.sizes = _indices(sizes, SIZES, "sizes")
        self.backgrounds = tuple(b for b, ok in enumerate(READABLE) if set(ok) & set(self.colors))
        if not self.backgrounds:
            raise ValueError(f"colors {colors} contrast with no background")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.resolution, self.resolution)

    @property
    def num_classes(self) -> int:
        """0: shapes has captions and structured labels, no class label (``label`` is -1)."""
        return 0

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> tuple[Scene, random.Random]:
        """The scene of sample ``index`` and the generator, positioned to draw its caption."""
        index = range(self.length)[index]  # IndexError when out of range; negative indices wrap
        rng = random.Random(f"reverie.shapes/{self.seed}/{index}")
        if self.object_weights is None:
            num_objects = rng.randint(self.min_objects, self.max_objects)
        else:
            num_objects = rng.choices(range(self.min_objects, self.max_objects + 1), self.object_weights)[0]
        scene = sample_scene(rng, num_objects, self.shapes, self.colors, self.backgrounds, self.gradient_prob,
                             self.sizes)
        return scene, rng

    def __getitem__(self, index: int) -> dict:
        scene, rng = self.scene(index)
        text = make_caption(scene, rng, self.position_prob, self.relation_prob)
        pixels = torch.from_numpy(render_array(scene, self.resolution, self.supersample))
        image = uint8_to_tensor(pixels.permute(2, 0, 1))
        item = {"image": image, "text": text, "label": -1, "layout": scene_layout(scene), **scene_labels(scene)}
        if self.object_masks:
            item["object_masks"] = torch.from_numpy(render_object_masks(scene, self.resolution, self.supersample))
        return item


def scene_labels(scene: Scene, max_objects: int = 3) -> dict:
    """Structured labels of a scene as fixed-size tensors (padded with -1), ready for default collation."""
    objects = scene.objects
    count = len(objects)
    ints = np.full((4, max_objects), -1, dtype=np.int64)  # shape, color, size, position
    floats = np.full((max_objects, 3), -1.0, dtype=np.float32)  # x, y, radius
    relations = np.full((max_objects, max_objects), -1, dtype=np.int64)
    for i, a in enumerate(objects):
        ints[:, i] = (a.shape, a.color, a.size, position_cell(a))
        floats[i] = (a.x, a.y, a.radius)
        for j, b in enumerate(objects[:i]):
            relations[i, j] = relation(a, b)
            relations[j, i] = INVERSE_RELATION[relations[i, j]] if relations[i, j] >= 0 else -1
    ints, floats = torch.from_numpy(ints), torch.from_numpy(floats)
    return {
        "num_objects": count,
        "objects": {"shape": ints[0], "color": ints[1], "size": ints[2], "position": ints[3],
                    "center": floats[:, :2], "radius": floats[:, 2]},
        "relation": int(relations[0, 1]),
        "relations": torch.from_numpy(relations),
        "background": scene.background,
    }
