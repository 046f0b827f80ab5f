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
"""

from __future__ import annotations

import functools
import math
import random
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from .transforms import uint8_to_tensor

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (250, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 70),
    "cyan": (40, 210, 220),
    "blue": (30, 90, 240),
    "purple": (150, 45, 175),
    "pink": (250, 130, 190),
    "brown": (140, 90, 50),
    "white": (245, 245, 245),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "dark gray": (60, 60, 64),
    "navy": (25, 30, 60),
    "light gray": (200, 200, 200),
    "off-white": (245, 243, 238),
}
SHAPES = ("circle", "square", "triangle", "star", "ring", "diamond", "cross")
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")
# 3x3 grid cells, index = 3 * row + column (row 0 = top).
POSITIONS = (
    "in the top left", "at the top", "in the top right",
    "on the left", "in the center", "on the right",
    "in the bottom left", "at the bottom", "in the bottom right",
)

_COLOR_NAMES = tuple(COLORS)
_BACKGROUND_NAMES = tuple(BACKGROUNDS)
_RADIUS = (0.13, 0.21)  # per size, as a fraction of the image side
_RADIUS_JITTER = 0.08
_MARGIN = 0.02  # minimum gap between a shape's bounding circle and the image border
_GAP = 0.03  # minimum gap between two bounding circles
_DOMINANCE = 2.0  # |d_major| / |d_minor| needed for a relation to be stated
_CELL_EDGES = (0.4, 0.6)
_CELL_DEAD_ZONE = 0.03
_INVERSE = (1, 0, 3, 2)
_SIZE_WORDS = (("small", "little", "tiny"), ("large", "big"))
_RELATION_WORDS = (
    ("left of", "to the left of", "on the left of"),
    ("right of", "to the right of", "on the right of"),
    ("above", "over"),
    ("below", "under", "beneath"),
)
_MIN_CONTRAST = 45.0  # CIELAB Delta-E between an object color and its background


def _cielab(rgb: tuple[int, int, int]) -> np.ndarray:
    """sRGB (D65) -> CIELAB; only used to pick readable color/background pairs."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ c
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


# _READABLE[b] = color indices with enough contrast on background b.
_READABLE = tuple(
    tuple(
        c for c, rgb in enumerate(COLORS.values())
        if np.linalg.norm(_cielab(rgb) - _cielab(bg)) >= _MIN_CONTRAST
    )
    for bg in BACKGROUNDS.values()
)


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


# ----------------------------------------------------------------------------------------- scene sampling


def _span(radius: float) -> tuple[float, float]:
    """Range of centers that keeps a bounding circle inside the image with the border margin."""
    return radius + _MARGIN, 1.0 - radius - _MARGIN


def _place_single(rng: random.Random, radius: float) -> tuple[float, float]:
    """Center inside a random 3x3 cell, away from the cell edges so the position word is unambiguous."""
    lo, hi = _span(radius)
    cells = ((lo, _CELL_EDGES[0] - _CELL_DEAD_ZONE), (_CELL_EDGES[0] + _CELL_DEAD_ZONE,
             _CELL_EDGES[1] - _CELL_DEAD_ZONE), (_CELL_EDGES[1] + _CELL_DEAD_ZONE, hi))
    x_lo, x_hi = rng.choice(cells)
    y_lo, y_hi = rng.choice(cells)
    return rng.uniform(x_lo, x_hi), rng.uniform(y_lo, y_hi)


def _place_pair(rng: random.Random, r0: float, r1: float, rel: int) -> tuple[tuple[float, float], ...]:
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


def _place_extra(rng, radius, placed, tries=40) -> tuple[float, float] | None:
    """Rejection-sample a center that keeps clear of the already placed (x, y, r) circles."""
    lo, hi = _span(radius)
    for _ in range(tries):
        x, y = rng.uniform(lo, hi), rng.uniform(lo, hi)
        if all(math.hypot(x - px, y - py) >= radius + pr + _GAP for px, py, pr in placed):
            return x, y
    return None


def _sample_radius(rng: random.Random, size: int) -> float:
    return _RADIUS[size] * rng.uniform(1 - _RADIUS_JITTER, 1 + _RADIUS_JITTER)


def sample_scene(rng: random.Random, num_objects: int, shapes, colors, backgrounds, gradient_prob,
                 sizes_allowed=(0, 1)) -> Scene:
    """Draw one scene from ``rng``: background, then sizes and layout, then distinct (shape, color) pairs."""
    background = rng.choice(backgrounds)
    gradient = None
    if rng.random() < gradient_prob:
        gradient = (rng.uniform(0, 2 * math.pi), rng.choice((-1, 1)) * rng.uniform(20, 40))
    sizes = [rng.choice(sizes_allowed) for _ in range(num_objects)]
    radii = [_sample_radius(rng, size) for size in sizes]
    if num_objects == 1:
        centers = [_place_single(rng, radii[0])]
    else:
        centers = list(_place_pair(rng, radii[0], radii[1], rng.randrange(len(RELATIONS))))
        if num_objects == 3:
            placed = [(x, y, r) for (x, y), r in zip(centers, radii)]
            center = _place_extra(rng, radii[2], placed)
            if center is None and 0 in sizes_allowed:  # no room for a large one: try small, else keep two
                sizes[2] = 0
                radii[2] = _sample_radius(rng, 0)
                center = _place_extra(rng, radii[2], placed)
            if center is not None:
                centers.append(center)
    palette = [c for c in colors if c in _READABLE[background]]
    combinations = [(s, c) for s in shapes for c in palette]
    pairs = rng.sample(combinations, min(len(centers), len(combinations)))
    objects = tuple(
        ShapeObject(shape, color, size, x, y, r)
        for (shape, color), size, (x, y), r in zip(pairs, sizes, centers, radii)
    )
    return Scene(background, gradient, objects)


# ----------------------------------------------------------------------------------------------- drawing


@functools.lru_cache(maxsize=8)
def _pixel_coords(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-center coordinates relative to the image center, float32 [1, R] (x) and [R, 1] (y)."""
    coords = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution - 0.5
    return coords[None, :], coords[:, None]


def _gradient(scene: Scene, resolution: int) -> np.ndarray:
    """Background with a subtle linear ramp at the target resolution, float32 [R, R, 3] in [0, 255]."""
    base = np.asarray(BACKGROUNDS[_BACKGROUND_NAMES[scene.background]], dtype=np.float32)
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
    layer = Image.new("RGB", (big, big), BACKGROUNDS[_BACKGROUND_NAMES[scene.background]] if plain else 0)
    draws = [(ImageDraw.Draw(layer), None)]
    if not plain:
        mask = Image.new("L", (big, big))
        draws.append((ImageDraw.Draw(mask), 255))
    for obj in scene.objects:
        for draw, fill in draws:
            _draw_object(draw, obj, big, fill or COLORS[_COLOR_NAMES[obj.color]])
    layer = layer.reduce(supersample) if supersample > 1 else layer
    if plain:
        return np.asarray(layer).copy()
    coverage = np.asarray(mask.reduce(supersample) if supersample > 1 else mask, dtype=np.float32)
    pixels = _gradient(scene, resolution)
    pixels *= 1 - coverage[:, :, None] * np.float32(1 / 255)
    pixels += np.asarray(layer, dtype=np.float32)
    return np.clip(np.rint(pixels, out=pixels), 0, 255, out=pixels).astype(np.uint8)


def render(scene: Scene, resolution: int, supersample: int = 4) -> Image.Image:
    """Scene -> RGB PIL image at ``resolution`` (see ``render_array``)."""
    return Image.fromarray(render_array(scene, resolution, supersample), "RGB")


# -------------------------------------------------------------------------------------------- captions


def _noun_phrase(obj: ShapeObject, rng: random.Random, article: str | None = "a") -> str:
    words = [rng.choice(_SIZE_WORDS[obj.size])] if rng.random() < 0.5 else []
    words += [_COLOR_NAMES[obj.color], SHAPES[obj.shape]]
    phrase = " ".join(words)
    if article == "a":
        article = "an" if phrase[0] in "aeiou" else "a"
    return f"{article} {phrase}" if article else phrase


def _reference(obj: ShapeObject) -> str:
    """Definite reference to an object already named; (shape, color) pairs are unique within a scene."""
    return f"the {_COLOR_NAMES[obj.color]} {SHAPES[obj.shape]}"


def _caption_one(obj: ShapeObject, rng: random.Random, position_prob: float | None = None) -> str:
    if position_prob is None:
        form = rng.randrange(5)
    else:  # form 1 states the position
        form = 1 if rng.random() < position_prob else rng.choice((0, 2, 3, 4))
    if form == 0:
        return _noun_phrase(obj, rng)
    if form == 1:
        return f"{_noun_phrase(obj, rng)} {POSITIONS[position_cell(obj)]}"
    if form == 2:
        return f"{rng.choice(('a picture of', 'an image of'))} {_noun_phrase(obj, rng)}"
    if form == 3:
        return _noun_phrase(obj, rng, article=None)
    return f"one {_noun_phrase(obj, rng, article=None)}"


def _relation_clause(a: ShapeObject, b: ShapeObject, rng: random.Random) -> tuple[str, str, str]:
    """(subject, relation words, object) for 'A rel B', stated from either side at random (B with the
    inverse relation)."""
    if rng.random() < 0.5:
        a, b = b, a
    return _noun_phrase(a, rng), rng.choice(_RELATION_WORDS[relation(a, b)]), _noun_phrase(b, rng)


def _caption_two(objects, rng: random.Random, relation_prob: float | None = None) -> str:
    if relation_prob is None:
        form = rng.randrange(6)
    else:  # forms 0-3 state the relation
        form = rng.randrange(4) if rng.random() < relation_prob else rng.randrange(4, 6)
    if form < 4:
        subject, rel, obj = _relation_clause(*objects, rng)
        template = ("{} {} {}", "{} {} {}", "there is {} {} {}", "{} is {} {}")[form]
        return template.format(subject, rel, obj)
    pair = list(objects)
    rng.shuffle(pair)
    prefix = "two shapes: " if form == 4 else ""
    return f"{prefix}{_noun_phrase(pair[0], rng)} and {_noun_phrase(pair[1], rng)}"


def _caption_three(objects, rng: random.Random) -> str:
    if rng.random() < 0.35:
        listed = list(objects)
        rng.shuffle(listed)
        a, b, c = (_noun_phrase(obj, rng) for obj in listed)
        return f"{rng.choice(('three shapes: ', ''))}{a}, {b} and {c}"
    first, second, third = objects
    clause = " ".join(_relation_clause(first, second, rng))
    anchors = [obj for obj in (first, second) if relation(third, obj) >= 0]
    if not anchors:
        return f"{clause}, and {_noun_phrase(third, rng)}"
    anchor = rng.choice(anchors)
    rel = rng.choice(_RELATION_WORDS[relation(third, anchor)])
    return f"{clause}, and {_noun_phrase(third, rng)} {rel} {_reference(anchor)}"


def make_caption(scene: Scene, rng: random.Random, position_prob: float | None = None,
                 relation_prob: float | None = None) -> str:
    """A caption from varied templates; every stated color, shape, size, position and relation is true.

    By default a single object's caption states its position one time in five and a two-object caption
    states the relation two times in three; ``position_prob`` / ``relation_prob`` set these shares."""
    objects = scene.objects
    if len(objects) == 1:
        return _caption_one(objects[0], rng, position_prob)
    if len(objects) == 2:
        return _caption_two(objects, rng, relation_prob)
    return _caption_three(objects, rng)


_NP_RE = re.compile(
    r"\b(?:(?P<size>{})\s+)?(?P<color>{})\s+(?P<shape>{})\b".format(
        "|".join(w for words in _SIZE_WORDS for w in words), "|".join(_COLOR_NAMES), "|".join(SHAPES)
    )
)
_RELATION_RE = re.compile(
    r"\b(?P<rel>{})\s+(?:(?:the|a|an)\s+)?$".format(
        "|".join(sorted((w for words in _RELATION_WORDS for w in words), key=len, reverse=True))
    )
)
_POSITION_RE = re.compile(r"^\s*(?P<pos>{})\b(?!\s+of\b)".format("|".join(POSITIONS)))


def parse_caption(text: str) -> dict:
    """Read back a shapes caption: ``{"objects": [{"shape", "color", "size", "position"}], "relations":
    [(i, rel, j)]}``, indices into SHAPES/COLORS/SIZES/POSITIONS/RELATIONS (size, position -1 if unsaid)."""
    objects: list[dict] = []
    relations: list[tuple[int, int, int]] = []
    matches = list(_NP_RE.finditer(text))
    mention: list[int] = []  # object index of each noun phrase
    for k, match in enumerate(matches):
        key = (SHAPES.index(match["shape"]), _COLOR_NAMES.index(match["color"]))
        known = [i for i, obj in enumerate(objects) if (obj["shape"], obj["color"]) == key]
        if known:
            mention.append(known[0])
        else:
            size = next((s for s, words in enumerate(_SIZE_WORDS) if match["size"] in words), -1)
            end = matches[k + 1].start() if k + 1 < len(matches) else len(text)
            position = _POSITION_RE.match(text[match.end():end])
            objects.append({"shape": key[0], "color": key[1], "size": size,
                            "position": POSITIONS.index(position["pos"]) if position else -1})
            mention.append(len(objects) - 1)
        if k > 0:
            between = _RELATION_RE.search(text[matches[k - 1].end():match.start()])
            if between:
                rel = next(r for r, words in enumerate(_RELATION_WORDS) if between["rel"] in words)
                relations.append((mention[k - 1], rel, mention[k]))
    return {"objects": objects, "relations": relations}


# ------------------------------------------------------------------------------------------------ dataset


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
    the default share, draws a different (equally distributed) stream.
    """

    def __init__(self, resolution: int = 32, max_objects: int = 3, min_objects: int = 1, seed: int = 0,
                 length: int = 2**20, shapes=None, colors=None, gradient_prob: float = 0.5,
                 supersample: int = 4, sizes=None, object_weights=None, position_prob: float | None = None,
                 relation_prob: float | None = None):
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
        self.resolution, self.seed, self.length, self.supersample = resolution, seed, length, supersample
        self.min_objects, self.max_objects, self.gradient_prob = min_objects, max_objects, gradient_prob
        self.shapes = _indices(shapes, SHAPES, "shapes")
        self.colors = _indices(colors, _COLOR_NAMES, "colors")
        self.sizes = _indices(sizes, SIZES, "sizes")
        self.backgrounds = tuple(b for b, ok in enumerate(_READABLE) if set(ok) & set(self.colors))
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
        return {"image": image, "text": text, "label": -1, "layout": scene_layout(scene), **scene_labels(scene)}


def object_phrase(obj: ShapeObject) -> str:
    """The layout phrase of an object: its color and shape ("red circle"); the box carries the size."""
    return f"{_COLOR_NAMES[obj.color]} {SHAPES[obj.shape]}"


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
        radii = [_sample_radius(rng, p["size"] if p["size"] >= 0 else rng.randrange(2)) for p in specs]
        if len(specs) == 1:
            centers = [_place_single(rng, radii[0])]
        else:
            rel = rng.randrange(len(RELATIONS)) if first is None else \
                (first[1] if first[0] == 0 else _INVERSE[first[1]])
            centers = list(_place_pair(rng, radii[0], radii[1], rel))
            if len(specs) == 3:
                center = _place_extra(rng, radii[2], [(x, y, r) for (x, y), r in zip(centers, radii)])
                if center is None:
                    continue
                centers.append(center)
        objects = [ShapeObject(p["shape"], p["color"], 0, x, y, r) for p, (x, y), r in zip(specs, centers, radii)]
        if _layout_holds(objects, parsed):
            break
    if not objects:
        return None
    return scene_layout(Scene(0, None, tuple(objects)))


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
            relations[j, i] = _INVERSE[relations[i, j]] if relations[i, j] >= 0 else -1
    ints, floats = torch.from_numpy(ints), torch.from_numpy(floats)
    return {
        "num_objects": count,
        "objects": {"shape": ints[0], "color": ints[1], "size": ints[2], "position": ints[3],
                    "center": floats[:, :2], "radius": floats[:, 2]},
        "relation": int(relations[0, 1]),
        "relations": torch.from_numpy(relations),
        "background": scene.background,
    }
