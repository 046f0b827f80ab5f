"""Captions of ``shapes``: ``make_caption`` writes a caption for a scene from varied templates (every
stated color, shape, size, position and relation is true of the scene), and ``parse_caption`` reads such a
caption back into objects (shape, color, size, position) and relations between them.
"""

from __future__ import annotations

import random
import re

from .scenes import Scene, ShapeObject, position_cell, relation
from .vocab import COLOR_NAMES, POSITIONS, RELATION_WORDS, SHAPES, SIZE_WORDS


def _noun_phrase(obj: ShapeObject, rng: random.Random, article: str | None = "a") -> str:
    words = [rng.choice(SIZE_WORDS[obj.size])] if rng.random() < 0.5 else []
    words += [COLOR_NAMES[obj.color], SHAPES[obj.shape]]
    phrase = " ".join(words)
    if article == "a":
        article = "an" if phrase[0] in "aeiou" else "a"
    return f"{article} {phrase}" if article else phrase


def _reference(obj: ShapeObject) -> str:
    """Definite reference to an object already named; (shape, color) pairs are unique within a scene."""
    return f"the {COLOR_NAMES[obj.color]} {SHAPES[obj.shape]}"


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
    return _noun_phrase(a, rng), rng.choice(RELATION_WORDS[relation(a, b)]), _noun_phrase(b, rng)


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
    rel = rng.choice(RELATION_WORDS[relation(third, anchor)])
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
        "|".join(w for words in SIZE_WORDS for w in words), "|".join(COLOR_NAMES), "|".join(SHAPES)
    )
)
_RELATION_RE = re.compile(
    r"\b(?P<rel>{})\s+(?:(?:the|a|an)\s+)?$".format(
        "|".join(sorted((w for words in RELATION_WORDS for w in words), key=len, reverse=True))
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
        key = (SHAPES.index(match["shape"]), COLOR_NAMES.index(match["color"]))
        known = [i for i, obj in enumerate(objects) if (obj["shape"], obj["color"]) == key]
        if known:
            mention.append(known[0])
        else:
            size = next((s for s, words in enumerate(SIZE_WORDS) if match["size"] in words), -1)
            end = matches[k + 1].start() if k + 1 < len(matches) else len(text)
            position = _POSITION_RE.match(text[match.end():end])
            objects.append({"shape": key[0], "color": key[1], "size": size,
                            "position": POSITIONS.index(position["pos"]) if position else -1})
            mention.append(len(objects) - 1)
        if k > 0:
            between = _RELATION_RE.search(text[matches[k - 1].end():match.start()])
            if between:
                rel = next(r for r, words in enumerate(RELATION_WORDS) if between["rel"] in words)
                relations.append((mention[k - 1], rel, mention[k]))
    return {"objects": objects, "relations": relations}
