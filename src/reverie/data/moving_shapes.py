"""``moving_shapes``: captioned clips of one or two ``shapes`` objects that move, grow, shrink or change colour.

A clip is ``frames`` frames of the ``shapes`` renderer (``reverie.data.shapes.render_array``): the same
backgrounds, colours, shapes and sizes the image model was trained on, so that a video model can start as
the image model applied to every frame. Sample ``i`` is a pure function of ``(seed, i)``, as in ``shapes``.

Motions (``MOTIONS``; frame ``k`` of ``T`` is at time ``s = k / (T - 1)``; coordinates are image fractions,
``x`` right, ``y`` down):

- ``right`` / ``left`` / ``up`` / ``down``: a straight move of 0.28-0.45 of the side at constant speed;
  captions "moves to the right", "slides left", "rises", "falls", ...;
- ``bounce``: falls to the floor and comes back up (one reflection), "bounces";
- ``grow`` / ``shrink``: the radius goes linearly between the small and the large size, the centre stays;
- ``recolor``: the colour switches to another readable one at the middle frame, "turns blue".

Two-object clips ("a blue square falls while a yellow star rises") give each object its own motion (no
bounce or colour change); their bounding circles keep the ``shapes`` gap in every frame.

Held-out split: a caption's content is its objects' (colour, shape, motion) *combos*; 1 in 8 of the 560
combos (``is_held_out``: CRC-32 of "5/colour shape motion" mod 8 == 0: 73 combos, among them "green
triangle up"; the salt 5 was picked so that the issue's example prompt is held out) never
appears in ``split="train"`` clips, and ``split="test"`` draws only held-out combos (two-object test clips:
both combos held out). ``split="all"`` draws everything.

The ground truth rides along: per object its shape, colours (start, end), motion and per-frame centre and
radius; ``layout`` is the per-frame ``reverie.layout`` layout (a list of ``frames`` image layouts).
``plan_motion_layout`` reads a caption back (``parse_motion_caption``) and draws per-frame boxes from the same
motion rules: the planner of a video layout model, as ``plan_layout`` is for images (LLM-grounded video
diffusion, Lian et al. 2023, plans such "dynamic scene layouts" with a language model).
"""

from __future__ import annotations

import math
import random
import re
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from .shapes import COLOR_NAMES, READABLE, SHAPES, SIZE_WORDS, Scene, ShapeObject, render_array, sample_radius
from .shapes.captions import _NP_RE
from .shapes.scenes import _GAP, _MARGIN, _RADIUS
from .transforms import uint8_to_tensor

MOTIONS = ("right", "left", "up", "down", "bounce", "grow", "shrink", "recolor")
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}  # unit steps, y down
PAIR_MOTIONS = ("right", "left", "up", "down", "grow", "shrink")
VERBS = {
    "right": ("moves to the right", "moves right", "slides to the right", "drifts right"),
    "left": ("moves to the left", "moves left", "slides to the left", "drifts left"),
    "up": ("moves up", "rises", "floats up", "goes up"),
    "down": ("moves down", "falls", "sinks", "drops"),
    "bounce": ("bounces", "bounces up and down"),
    "grow": ("grows", "gets bigger", "expands"),
    "shrink": ("shrinks", "gets smaller"),
    "recolor": ("turns {}", "changes color to {}", "becomes {}"),
}
_SPEED = (0.28, 0.45)  # straight moves: distance over the clip, fraction of the side
_HELD_OUT_MOD, _HELD_OUT_SALT = 8, 5


def combo(color: int, shape: int, motion: int) -> str:
    """The content key of one object's caption: "colour shape motion" (e.g. "green triangle up")."""
    return f"{COLOR_NAMES[color]} {SHAPES[shape]} {MOTIONS[motion]}"


def is_held_out(color: int, shape: int, motion: int) -> bool:
    """Whether a (colour, shape, motion) combo belongs to the test split (1 in 8, by CRC-32)."""
    return zlib.crc32(f"{_HELD_OUT_SALT}/{combo(color, shape, motion)}".encode()) % _HELD_OUT_MOD == 0


@dataclass(frozen=True)
class Track:
    """One object over a clip: vocabulary indices, per-frame centres ``[(x, y)]`` and radii, per-frame colour."""

    shape: int
    colors: tuple[int, ...]
    motion: int
    centers: tuple[tuple[float, float], ...]
    radii: tuple[float, ...]

    def at(self, k: int) -> ShapeObject:
        x, y = self.centers[k]
        size = int(self.radii[k] > sum(_RADIUS) / 2)
        return ShapeObject(self.shape, self.colors[k], size, x, y, self.radii[k])


def _times(frames: int) -> list[float]:
    return [k / (frames - 1) for k in range(frames)]


def trajectory(rng: random.Random, motion: str, frames: int) -> tuple[list[tuple[float, float]], list[float]]:
    """Per-frame centres and radii of one object doing ``motion``, inside the image in every frame."""
    times = _times(frames)
    if motion in ("grow", "shrink"):
        small, large = _RADIUS[0] * rng.uniform(0.92, 1.0), _RADIUS[1] * rng.uniform(1.0, 1.08)
        lo, hi = large + _MARGIN, 1 - large - _MARGIN
        x, y = rng.uniform(lo, hi), rng.uniform(lo, hi)
        a, b = (small, large) if motion == "grow" else (large, small)
        return [(x, y)] * frames, [a + (b - a) * s for s in times]
    r = sample_radius(rng, rng.randrange(2))
    lo, hi = r + _MARGIN, 1 - r - _MARGIN
    if motion == "bounce":  # down to the floor, reflected, back up: y(s) = hi - |hi - y0 - v s|
        y0 = rng.uniform(lo, hi - 0.15)
        path = rng.uniform(hi - y0 + 0.12, max(hi - y0 + 0.12, min(2 * hi - lo - y0, hi - y0 + 0.5)))
        x = rng.uniform(lo, hi)
        return [(x, hi - abs(hi - y0 - path * s)) for s in times], [r] * frames
    if motion in DIRECTIONS:
        dx, dy = DIRECTIONS[motion]
        dist = min(rng.uniform(*_SPEED), hi - lo)
        start = rng.uniform(lo, hi - dist) if (dx + dy) > 0 else rng.uniform(lo + dist, hi)
        other = rng.uniform(lo, hi)
        along = [start + (dx + dy) * dist * s for s in times]
        return ([(a, other) for a in along] if dx else [(other, a) for a in along]), [r] * frames
    x, y = rng.uniform(lo, hi), rng.uniform(lo, hi)  # recolor: stays put
    return [(x, y)] * frames, [r] * frames


def _clear(a: Track, b: Track) -> bool:
    return all(math.dist(pa, pb) >= ra + rb + _GAP
               for pa, pb, ra, rb in zip(a.centers, b.centers, a.radii, b.radii))


def make_track(rng: random.Random, color: int, shape: int, motion: int, frames: int, palette) -> Track:
    colors = [color] * frames
    if MOTIONS[motion] == "recolor":
        target = rng.choice([c for c in palette if c != color])
        colors = [color] * (frames // 2) + [target] * (frames - frames // 2)
    centers, radii = trajectory(rng, MOTIONS[motion], frames)
    return Track(shape, tuple(colors), motion, tuple(centers), tuple(radii))


def motion_phrase(track: Track, rng: random.Random) -> str:
    """The object's noun phrase and its motion: "a red circle moves to the right", "a blue ring turns pink"."""
    name = MOTIONS[track.motion]
    words = [COLOR_NAMES[track.colors[0]], SHAPES[track.shape]]
    if name in ("right", "left", "up", "down", "bounce", "recolor") and rng.random() < 0.3:
        words.insert(0, rng.choice(SIZE_WORDS[int(track.radii[0] > sum(_RADIUS) / 2)]))
    noun = " ".join(words)
    verb = rng.choice(VERBS[name])
    if name == "recolor":
        verb = verb.format(COLOR_NAMES[track.colors[-1]])
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun} {verb}"


def clip_caption(tracks: tuple[Track, ...], rng: random.Random) -> str:
    if len(tracks) == 1:
        return motion_phrase(tracks[0], rng)
    return f" {rng.choice(('while', 'and'))} ".join(motion_phrase(t, rng) for t in tracks)


class MovingShapesDataset(Dataset):
    """Procedural captioned clips: ``ds[i]`` -> ``{"image": [3, T, H, W] in [-1, 1] (the clip; the key is the
    trainers' data key), "text", "label": -1, "layout": T per-frame layouts, "frames": T, "num_objects",
    "objects": {"shape" [2], "color" [2], "color_end" [2], "motion" [2], "center" [2, T, 2], "radius" [2, T]},
    "background"}`` (per-object fields padded to 2 objects with -1).

    ``two_object_prob``: share of two-object clips; ``split``: train / test / all (module docstring);
    ``motions``: restrict to these motion names."""

    def __init__(self, resolution: int = 32, frames: int = 8, seed: int = 0, length: int = 2**20,
                 split: str = "train", two_object_prob: float = 0.3, motions=None, gradient_prob: float = 0.5,
                 supersample: int = 4):
        if not isinstance(resolution, int) or resolution < 8:
            raise ValueError(f"resolution must be an integer >= 8, got {resolution!r}")
        if not isinstance(frames, int) or not 2 <= frames <= 32:
            raise ValueError(f"frames must be an integer from 2 to 32, got {frames!r}")
        if split not in ("train", "test", "all"):
            raise ValueError(f"split must be train, test or all, got {split!r}")
        if not 0 <= two_object_prob <= 1 or not 0 <= gradient_prob <= 1 or length < 1 or supersample < 1:
            raise ValueError("two_object_prob and gradient_prob must be in [0, 1]; length and supersample >= 1")
        unknown = [m for m in motions or () if m not in MOTIONS]
        if unknown:
            raise ValueError(f"unknown motions {unknown}; valid: {', '.join(MOTIONS)}")
        self.motions = tuple(MOTIONS.index(m) for m in motions) if motions else tuple(range(len(MOTIONS)))
        self.resolution, self.frames, self.seed, self.length, self.split = resolution, frames, seed, length, split
        self.two_object_prob, self.gradient_prob, self.supersample = two_object_prob, gradient_prob, supersample

    @property
    def image_shape(self) -> tuple[int, int, int, int]:
        return (3, self.frames, self.resolution, self.resolution)

    @property
    def num_classes(self) -> int:
        return 0

    def __len__(self) -> int:
        return self.length

    def _allowed(self, color: int, shape: int, motion: int) -> bool:
        if self.split == "all":
            return True
        return is_held_out(color, shape, motion) == (self.split == "test")

    def _pick(self, rng: random.Random, palette, motions) -> tuple[int, int, int]:
        options = [(c, s, m) for c in palette for s in range(len(SHAPES)) for m in motions if self._allowed(c, s, m)]
        return rng.choice(options)

    def clip(self, index: int) -> tuple[Scene, tuple[Track, ...], random.Random]:
        """The clip's background scene (no objects), its tracks, and the generator positioned for the caption."""
        index = range(self.length)[index]
        rng = random.Random(f"reverie.moving_shapes/{self.seed}/{index}")
        background = rng.randrange(len(READABLE))
        gradient = None
        if rng.random() < self.gradient_prob:
            gradient = (rng.uniform(0, 2 * math.pi), rng.choice((-1, 1)) * rng.uniform(20, 40))
        palette = READABLE[background]
        pair_motions = [m for m in self.motions if MOTIONS[m] in PAIR_MOTIONS]
        two = pair_motions and rng.random() < self.two_object_prob
        for _ in range(100):
            first = make_track(rng, *self._pick(rng, palette, pair_motions if two else self.motions),
                               self.frames, palette)
            if not two:
                tracks = (first,)
                break
            color, shape, motion = self._pick(rng, palette, pair_motions)
            if (color, shape) == (first.colors[0], first.shape):
                continue
            second = make_track(rng, color, shape, motion, self.frames, palette)
            if _clear(first, second):
                tracks = (first, second)
                break
        else:
            tracks = (first,)
        return Scene(background, gradient, ()), tracks, rng

    def __getitem__(self, index: int) -> dict:
        scene, tracks, rng = self.clip(index)
        text = clip_caption(tracks, rng)
        frames = render_clip(scene, tracks, self.frames, self.resolution, self.supersample)
        return {"image": frames, "text": text, "label": -1, "layout": clip_layout(tracks, self.frames),
                "frames": self.frames, **track_labels(tracks, self.frames), "background": scene.background}


def render_clip(scene: Scene, tracks, frames: int, resolution: int, supersample: int = 4) -> torch.Tensor:
    """The clip as ``[3, T, H, W]`` in [-1, 1]: each frame rendered by ``shapes``' renderer."""
    pixels = np.stack([render_array(Scene(scene.background, scene.gradient, tuple(t.at(k) for t in tracks)),
                                    resolution, supersample) for k in range(frames)])  # [T, H, W, 3]
    return uint8_to_tensor(torch.from_numpy(pixels).permute(3, 0, 1, 2))


def clip_layout(tracks, frames: int) -> list[list[tuple[str, tuple[float, float, float, float]]]]:
    """Per-frame ``reverie.layout`` layouts: each object's phrase (its colour in that frame) and box."""
    out = []
    for k in range(frames):
        objects = [t.at(k) for t in tracks]
        out.append([(f"{COLOR_NAMES[o.color]} {SHAPES[o.shape]}", (o.x - o.radius, o.y - o.radius,
                                                                   o.x + o.radius, o.y + o.radius)) for o in objects])
    return out


def track_labels(tracks, frames: int, max_objects: int = 2) -> dict:
    ints = np.full((4, max_objects), -1, dtype=np.int64)  # shape, color, color_end, motion
    centers = np.full((max_objects, frames, 2), -1.0, dtype=np.float32)
    radii = np.full((max_objects, frames), -1.0, dtype=np.float32)
    for i, t in enumerate(tracks):
        ints[:, i] = (t.shape, t.colors[0], t.colors[-1], t.motion)
        centers[i], radii[i] = t.centers, t.radii
    ints = torch.from_numpy(ints)
    return {"num_objects": len(tracks),
            "objects": {"shape": ints[0], "color": ints[1], "color_end": ints[2], "motion": ints[3],
                        "center": torch.from_numpy(centers), "radius": torch.from_numpy(radii)}}


# ------------------------------------------------------------------------------------- reading captions back

_RECOLOR_RE = re.compile(r"\b(?:turns|changes colou?r to|becomes)\s+(?P<color>{})\b".format("|".join(COLOR_NAMES)))


def _motion_of(words: str) -> tuple[int, int | None] | None:
    """(motion index, target colour or None) of the words after a noun phrase, or None if they name no motion."""
    recolor = _RECOLOR_RE.search(words)
    if recolor:
        return MOTIONS.index("recolor"), COLOR_NAMES.index(recolor["color"])
    found = [(words.find(v), m) for m, verbs in VERBS.items() if m != "recolor" for v in verbs if v in words]
    if not found:
        return None
    return MOTIONS.index(min(found)[1]), None


def parse_motion_caption(text: str) -> list[dict]:
    """Read a ``moving_shapes`` caption back: per object ``{"shape", "color", "size", "motion", "color_end"}``
    (indices; size -1 if unsaid, motion -1 if none is named)."""
    matches = list(_NP_RE.finditer(text))
    objects = []
    for k, match in enumerate(matches[:2]):
        end = matches[k + 1].start() if k + 1 < len(matches) else len(text)
        motion = _motion_of(text[match.end():end])
        color = COLOR_NAMES.index(match["color"])
        size = next((s for s, words in enumerate(SIZE_WORDS) if match["size"] in words), -1)
        objects.append({"shape": SHAPES.index(match["shape"]), "color": color, "size": size,
                        "motion": motion[0] if motion else -1,
                        "color_end": motion[1] if motion and motion[1] is not None else color})
    return objects


def plan_motion_layout(text: str, rng: random.Random, frames: int = 8, tries: int = 100):
    """Per-frame layouts for a ``moving_shapes`` caption, drawn with the data's own motion rules (a video
    layout planner); None when the caption names no object. An object without a motion word stays put."""
    specs = parse_motion_caption(text)
    if not specs:
        return None
    tracks: tuple[Track, ...] = ()
    for _ in range(tries):
        made = []
        for spec in specs:
            motion = spec["motion"] if spec["motion"] >= 0 else MOTIONS.index("recolor")
            centers, radii = trajectory(rng, MOTIONS[motion], frames)
            if spec["size"] >= 0 and MOTIONS[motion] not in ("grow", "shrink"):
                radius = sample_radius(rng, spec["size"])
                centers, radii = _refit(centers, radius), [radius] * frames
            colors = [spec["color"]] * (frames // 2) + [spec["color_end"]] * (frames - frames // 2)
            made.append(Track(spec["shape"], tuple(colors), motion, tuple(centers), tuple(radii)))
        tracks = tuple(made)
        if len(tracks) == 1 or _clear(*tracks):
            break
    return clip_layout(tracks, frames)


def _refit(centers, radius: float) -> list[tuple[float, float]]:
    """Shift a trajectory so that a circle of ``radius`` stays inside the image in every frame."""
    lo, hi = radius + _MARGIN, 1 - radius - _MARGIN
    shift = []
    for axis in (0, 1):
        values = [c[axis] for c in centers]
        shift.append(max(0.0, lo - min(values)) - max(0.0, max(values) - hi))
    return [(x + shift[0], y + shift[1]) for x, y in centers]
