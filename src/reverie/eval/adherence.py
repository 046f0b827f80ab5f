"""Prompt adherence of a text-to-image model on ``shapes``: generate for seeded prompts, read the images
back with the attribute classifier (``reverie.eval.attributes``), compare with what the prompt says.

Prompts. ``evaluation_prompts()`` is a fixed, seeded list of 48 two-object prompts (two distinct
(color, shape) pairs and a relation, each relation 12 times) and 24 single-object prompts (every color
and shape), written with templates the ``shapes`` caption generator never uses ("a photo of",
"placed", "and nothing else", ...). Held out by construction: every prompt contains a word outside the
generator's caption vocabulary, so no prompt can equal any training caption (the caption templates
are fixed; ``tests/test_adherence.py`` checks it against the vocabulary and the set of the first 10,000
training captions of dataset seed 0, and that every prompt parses with ``parse_caption`` into the
objects and relation it was built from). Scoring labels are always read back from the prompt text
with ``parse_caption``, so user prompts are scored the same way.

Paraphrases (``paraphrase=True``): every color and shape word of a prompt is replaced by a synonym that
no training caption contains ("a crimson disc above an azure box"), while the image is still scored
against the original prompt's labels. A frozen pretrained encoder (``minilm``) should place the synonyms
near the trained words; a scratch encoder has never seen them.

Scoring one image against a prompt (1 or 2 objects, at most one relation), from the classifier's
detected objects (color, shape, center; ``reverie.eval.attributes``):

- the prompt's objects are matched to detected objects by shape first, color second (the injective
  assignment with the most ``2 * shape + color`` agreements; ties keep prompt order), so that "a red
  circle and a blue square" drawn as a blue circle and a red square scores shapes right and colors
  wrong, the usual reading of attribute binding;
- ``color`` / ``shape``: per prompted object, its matched detection has that color / shape (an object
  left without a detection, e.g. a two-object prompt drawn as one object, counts as wrong);
- ``relation`` (prompts that state one): the relation between the two matched detections' centers,
  on the dominant axis;
- ``count``: the number of detected objects equals the number of prompted objects;
- ``all_correct``: all of the above for that image.

Two diagnostics say why relations fail: ``pair_count_accuracy`` (``count`` over two-object prompts only)
and ``relation_accuracy_when_drawn`` (``relation`` over the images where both prompted objects got a
detection: placement alone, a missing object does not count against it), with ``relation_confusion``
(for each asked relation, how often each relation was drawn, over those images).

Accuracies are averaged over objects (color, shape), over images with a relation (relation) and over
images (count, all_correct); ``one_object`` / ``two_object`` repeat color, shape, relation and all_correct
over the single- and two-object prompts alone. ``score_real_images`` applies the same scoring to real ``shapes`` images
and their own captions: the ceiling a perfect model reaches (~100 %).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..data import collate
from ..data.shapes import COLORS, RELATION_WORDS, RELATIONS, SHAPES, ShapesDataset, parse_caption
from ..layout import get_planner, plan_layouts
from ..provenance import watermark_noise
from .attributes import AttributeClassifier, load_classifier, relation_between

_COLOR_NAMES = tuple(COLORS)
# Templates no shapes caption uses: each has a word ("photo", "placed", ...) outside the generator's
# caption vocabulary. {a} / {b}: noun phrases with article; {rel}: relation words.
_PAIR_TEMPLATES = (
    "a photo of {a} {rel} {b}",
    "{a} placed {rel} {b}",
    "{a} that sits {rel} {b}",
    "a drawing showing {a} {rel} {b}",
    "in this scene, {a} is located {rel} {b}",
    "{a} appears {rel} {b}",
)
_SINGLE_TEMPLATES = (
    "a photo of {a}",
    "a drawing of {a} and nothing else",
    "just {a}",
    "a single {phrase}",
    "{a} alone",
)


@dataclass(frozen=True)
class PromptLabels:
    """What a prompt asks for: objects as (color, shape) vocabulary indices, and relation
    ``(i, rel, j)`` (object i is ``RELATIONS[rel]`` object j) or None."""

    text: str
    objects: tuple[tuple[int, int], ...]
    relation: tuple[int, int, int] | None


def prompt_labels(text: str) -> PromptLabels:
    """Parse a prompt with ``parse_caption``; the adherence metric handles 1-2 objects, <= 1 relation."""
    parsed = parse_caption(text)
    objects = tuple((o["color"], o["shape"]) for o in parsed["objects"])
    if not 1 <= len(objects) <= 2 or len(parsed["relations"]) > 1:
        raise ValueError(
            f"adherence prompts need 1 or 2 '<color> <shape>' objects and at most one relation, got "
            f"{len(objects)} objects and {len(parsed['relations'])} relations in {text!r}; colors: "
            f"{', '.join(_COLOR_NAMES)}; shapes: {', '.join(SHAPES)}; relations: {', '.join(RELATIONS)}"
        )
    relation = parsed["relations"][0] if parsed["relations"] else None
    if relation is not None and relation[0] == relation[2]:
        raise ValueError(f"prompt {text!r} relates an object to itself")
    return PromptLabels(text, objects, relation)


# Synonyms outside the shapes caption vocabulary (checked in tests/test_adherence.py).
PARAPHRASES = {
    "red": "crimson", "orange": "tangerine", "yellow": "golden", "green": "emerald", "cyan": "turquoise",
    "blue": "azure", "purple": "violet", "pink": "rose", "brown": "chocolate", "white": "ivory",
    "circle": "disc", "square": "box", "triangle": "pyramid", "star": "pentagram", "ring": "donut",
    "diamond": "rhombus", "cross": "plus sign",
}


def paraphrase(text: str) -> str:
    """``text`` with every color and shape word replaced by its ``PARAPHRASES`` synonym (articles fixed)."""
    words = [PARAPHRASES.get(w, w) for w in text.split(" ")]
    for k in range(len(words) - 1):
        if words[k] in ("a", "an"):
            words[k] = _article(words[k + 1])
    return " ".join(words)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(color: int, shape: int, article: bool = True) -> str:
    words = f"{_COLOR_NAMES[color]} {SHAPES[shape]}"
    if not article:
        return words
    return f"{_article(words)} {words}"


def evaluation_prompts(num_pairs: int = 48, num_single: int = 24, seed: int = 0) -> list[str]:
    """Fixed seeded prompts: ``num_pairs`` two-object prompts (distinct (color, shape) pairs, every
    relation equally often) then ``num_single`` single-object prompts (every color and shape covered)."""
    rng = random.Random(f"reverie.adherence/{seed}")
    pairs = [(c, s) for c in range(len(_COLOR_NAMES)) for s in range(len(SHAPES))]
    prompts = []
    for k in range(num_pairs):
        a, b = rng.sample(pairs, 2)
        rel = rng.choice(RELATION_WORDS[k % len(RELATIONS)])
        template = _PAIR_TEMPLATES[rng.randrange(len(_PAIR_TEMPLATES))]
        prompts.append(template.format(a=_phrase(*a), b=_phrase(*b), rel=rel))
    offset = rng.randrange(len(SHAPES))
    for k in range(num_single):
        # k -> (k mod 10, k + offset mod 7): distinct pairs for k < 70, all colors and shapes from k >= 10.
        color, shape = k % len(_COLOR_NAMES), (k + offset) % len(SHAPES)
        template = _SINGLE_TEMPLATES[rng.randrange(len(_SINGLE_TEMPLATES))]
        prompts.append(template.format(a=_phrase(color, shape), phrase=_phrase(color, shape, article=False)))
    return prompts


# --------------------------------------------------------------------------------------------------- scoring


def _match(labels: PromptLabels, color: list[int], shape: list[int]) -> tuple[int | None, ...]:
    """Detected object of each prompted object (None when there is none left): the injective assignment with
    the most ``2 * shape + color`` agreements; ties go to the first in prompt / detection order."""
    found = [k for k, c in enumerate(color) if c >= 0]
    best, best_score = None, -1
    for assignment in itertools.permutations(found + [None] * len(labels.objects), len(labels.objects)):
        score = sum(2 * (shape[k] == o[1]) + (color[k] == o[0])
                    for o, k in zip(labels.objects, assignment) if k is not None)
        if score > best_score:
            best, best_score = assignment, score
    return best


def score_image(labels: PromptLabels, pred: dict) -> dict:
    """Correctness of one image (``pred``: one row of ``AttributeClassifier.predict``) for a prompt."""
    color, shape = pred["color"].tolist(), pred["shape"].tolist()
    match = _match(labels, color, shape)
    colors_ok = [k is not None and color[k] == o[0] for o, k in zip(labels.objects, match)]
    shapes_ok = [k is not None and shape[k] == o[1] for o, k in zip(labels.objects, match)]
    relation_ok = drawn = None  # drawn: (asked, drawn) relation indices when both objects were found
    if labels.relation is not None:
        i, rel, j = labels.relation
        a, b = match[i], match[j]
        if a is not None and b is not None:
            drawn = (rel, relation_between(pred["center"][a], pred["center"][b]))
        relation_ok = drawn is not None and drawn[0] == drawn[1]
    count_ok = int(pred["count"]) == len(labels.objects)
    all_ok = all(colors_ok) and all(shapes_ok) and relation_ok is not False and count_ok
    return {"color": colors_ok, "shape": shapes_ok, "relation": relation_ok, "relation_drawn": drawn,
            "count": count_ok, "all_correct": all_ok}


def score_images(images: torch.Tensor, prompts: list[str], classifier: AttributeClassifier | None = None) -> dict:
    """Adherence of ``images`` ``[N, 3, H, W]`` in [-1, 1] to ``prompts`` (one per image; labels are read
    from these texts, so pass the original prompt of a paraphrased one)."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")
    classifier = classifier or load_classifier()
    pred = classifier.predict(images)
    rows = [score_image(prompt_labels(text), {k: v[n] for k, v in pred.items()}) for n, text in enumerate(prompts)]
    return summarize(rows, prompts)


def _mean(values: list) -> float | None:
    return sum(map(float, values)) / len(values) if values else None


def _subset(rows: list[dict]) -> dict:
    """Color, shape, relation and all-correct accuracy over some of the images."""
    return {"color_accuracy": _mean([ok for r in rows for ok in r["color"]]),
            "shape_accuracy": _mean([ok for r in rows for ok in r["shape"]]),
            "relation_accuracy": _mean([r["relation"] for r in rows if r["relation"] is not None]),
            "all_correct": _mean([r["all_correct"] for r in rows]), "num_images": len(rows)}


def summarize(rows: list[dict], prompts: list[str]) -> dict:
    """Aggregate per-image scores: accuracies in [0, 1] (None when nothing to average), counts, and the
    all-correct rate of every distinct prompt."""
    relations = [r["relation"] for r in rows if r["relation"] is not None]
    drawn = [r["relation_drawn"] for r in rows if r["relation_drawn"] is not None]
    per_prompt: dict[str, list[bool]] = {}
    for row, text in zip(rows, prompts):
        per_prompt.setdefault(text, []).append(row["all_correct"])
    overall = _subset(rows)
    return {
        "color_accuracy": overall["color_accuracy"],
        "shape_accuracy": overall["shape_accuracy"],
        "relation_accuracy": overall["relation_accuracy"],
        "count_accuracy": _mean([r["count"] for r in rows]),
        # Diagnostics: how often a two-object prompt gets exactly two objects, and the relation accuracy
        # over only those relation images where both prompted objects were found (placement, not count),
        # with its confusion counts: asked relation -> relation drawn.
        "pair_count_accuracy": _mean([r["count"] for r in rows if len(r["color"]) == 2]),
        "relation_accuracy_when_drawn": _mean([asked == got for asked, got in drawn]),
        "relation_confusion": {RELATIONS[asked]: {RELATIONS[k]: sum(d == (asked, k) for d in drawn)
                                                  for k in range(len(RELATIONS))} for asked in range(len(RELATIONS))},
        "all_correct": overall["all_correct"],
        # The same per object count (the text-to-image target is stated on two-object prompts).
        "one_object": _subset([r for r in rows if len(r["color"]) == 1]),
        "two_object": _subset([r for r in rows if len(r["color"]) == 2]),
        "num_images": len(rows),
        "num_relation_images": len(relations),
        "num_prompts": len(per_prompt),
        "per_prompt": {text: _mean(oks) for text, oks in per_prompt.items()},
    }


# ------------------------------------------------------------------------------------------------ evaluation


def evaluate_adherence(pipeline, prompts: list[str] | None = None, num_per_prompt: int = 4, steps: int = 20,
                       sampler: str = "dpmpp_2m", guidance_scale: float = 4.0, seed: int = 0,
                       batch_size: int = 64, classifier: AttributeClassifier | None = None,
                       progress: bool = True, grid=None, paraphrased: bool = False,
                       layouts: str = "auto", watermark_key: bytes | None = None) -> dict:
    """Generate ``num_per_prompt`` images per prompt (default: ``evaluation_prompts()``) with a text-to-image
    ``pipeline`` (anything with ``Pipeline.sample``'s signature) and score them (see module docstring).

    Prompts go to the model in batches of about ``batch_size`` images, ``num_per_prompt`` copies of each
    prompt per batch; batch ``k`` uses noise seed ``seed + k``. Returns ``summarize``'s dict plus the
    generation settings. ``grid`` (a sigma grid name, or explicit sigmas, which then fix the steps) is passed
    on only when given. ``paraphrased``: the model sees ``paraphrase(prompt)``, the score uses the prompt's
    own labels. ``layouts`` (layout models):
    ``"auto"`` lets the pipeline plan object boxes from each prompt, ``"none"`` generates from the prompt alone,
    ``"only"`` from the same planned boxes under an empty caption (a diagnostic: does the layout map alone say
    which object goes where?). ``watermark_key``: start each batch from the seed's noise carrying that key's
    Tree-Ring watermark (``reverie.provenance.watermark_noise``, as ``reverie generate`` does), so a run with and
    one without it are paired: same prompts, same seeds."""
    if layouts not in ("auto", "none", "only"):
        raise ValueError(f"layouts must be auto, none or only, got {layouts!r}")
    if layouts != "auto" and not getattr(pipeline, "takes_layouts", False):
        raise ValueError(f"layouts={layouts!r} needs a layout model; this one takes none")
    if getattr(pipeline, "conditioning", "text") != "text":
        raise ValueError(f"prompt adherence needs a text-conditioned model, got conditioning={pipeline.conditioning!r}")
    prompts = list(prompts) if prompts is not None else evaluation_prompts()
    for text in prompts:
        prompt_labels(text)  # fail before generating anything
    if num_per_prompt < 1 or batch_size < 1 or not prompts:
        raise ValueError("need at least one prompt, num_per_prompt >= 1 and batch_size >= 1")
    explicit = grid is not None and not isinstance(grid, str)
    if explicit:  # sigmas: a tensor for sampling, a list for the recorded settings
        sigmas = torch.as_tensor(grid, dtype=torch.float64)
        grid, steps = [float(v) for v in sigmas], len(sigmas) - 1
    classifier = classifier or load_classifier()
    per_batch = max(1, batch_size // num_per_prompt)
    chunks = [prompts[k: k + per_batch] for k in range(0, len(prompts), per_batch)]
    images, image_prompts = [], []
    for k, chunk in enumerate(tqdm(chunks, desc="adherence", disable=not progress)):
        # Pipeline.sample repeats the prompt list to fill num_images: image n gets chunk[n % len(chunk)].
        shown = [paraphrase(text) for text in chunk] if paraphrased else chunk
        n = len(chunk) * num_per_prompt
        extra = {"grid": sigmas if explicit else grid} if grid else {}
        if layouts == "only":  # the boxes "auto" would plan for these images, under an empty caption
            extra["layouts"] = plan_layouts(get_planner(pipeline.cfg.data.name),
                                            [shown[i % len(shown)] for i in range(n)], seed + k)
            shown = [""]
        elif layouts != "auto":
            extra["layouts"] = layouts
        if watermark_key is not None:
            extra["noise"] = watermark_noise(pipeline, n, seed + k, key=watermark_key)[0]
        x = pipeline.sample(num_images=n, steps=steps, sampler=sampler, seed=seed + k,
                            prompts=shown, guidance_scale=guidance_scale, **extra)
        if len(x) != len(chunk) * num_per_prompt:
            raise ValueError(f"pipeline returned {len(x)} images, asked for {len(chunk) * num_per_prompt}")
        images.append(x.float().cpu())
        image_prompts += [chunk[n % len(chunk)] for n in range(len(x))]
    result = score_images(torch.cat(images), image_prompts, classifier)
    settings = {"num_per_prompt": num_per_prompt, "steps": steps, "sampler": sampler,
                "guidance_scale": guidance_scale, "seed": seed, "paraphrased": paraphrased,
                "watermark": "off" if watermark_key is None else "tree-ring",
                **({"grid": grid} if grid else {}),
                **({"layouts": layouts} if getattr(pipeline, "takes_layouts", False) else {})}
    return {**result, "settings": settings}


def score_real_images(num_images: int = 1000, seed: int = 12345, resolution: int = 32,
                      classifier: AttributeClassifier | None = None) -> dict:
    """The ceiling: real one- and two-object ``shapes`` images (dataset seed ``seed``) scored against
    their own captions."""
    data = ShapesDataset(resolution=resolution, min_objects=1, max_objects=2, seed=seed)
    batch = collate([data[i] for i in range(num_images)])
    return score_images(batch["image"], list(batch["text"]), classifier)
