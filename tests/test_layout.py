"""Layout conditioning: painted maps, the shapes planner, the zero-initialized input path, fine-tuning
from a text-only model, training's layout dropout, and the CLI's --layout."""

import json
import random

import pytest
import torch
from PIL import Image

from helpers import RGB16, TEXT_MODEL, tiny_config, tiny_network
from reverie.build import DiffusionModel, build_network
from reverie.cli import main
from reverie.conditioning import TextConditionedNet
from reverie.configs import ConfigError, load_config
from reverie.data.shapes import (
    POSITIONS,
    RELATIONS,
    SHAPES,
    ShapeObject,
    ShapesDataset,
    parse_caption,
    plan_layout,
    position_cell,
    relation,
)
from reverie.layout import (
    LayoutEncoder,
    box_masks,
    check_layout,
    object_regions,
    pad_layouts,
    plan_layouts,
    region_weights,
)
from reverie.pipeline import Pipeline
from reverie.sampling import SamplingOptions, sample_images
from reverie.train import TrainingError
from reverie.train.config import TrainConfig
from reverie.train.diffusion import init_weights, text_condition

INFO = RGB16
LAYOUT = "--model.layout_channels=4"
COLORS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink", "brown", "white")


def _cfg(*extra):
    return tiny_config(*TEXT_MODEL, *extra)


@pytest.fixture(scope="module")
def layout_model(make_model_dir):
    return make_model_dir("tiny-layout", [*TEXT_MODEL, LAYOUT], INFO)


# ------------------------------------------------------------------------------------------- the map

def test_box_masks_select_pixel_centers_inside_the_box():
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.25, 1.0, 0.75]]])
    m = box_masks(boxes, (4, 4))
    expected0 = torch.zeros(4, 4)
    expected0[:2, :2] = 1
    expected1 = torch.zeros(4, 4)
    expected1[1:3, 2:] = 1
    assert torch.equal(m[0, 0], expected0) and torch.equal(m[0, 1], expected1)
    # non-square maps: rows follow y, columns x
    assert box_masks(torch.tensor([[[0.0, 0.0, 0.5, 1.0]]]), (2, 4))[0, 0].tolist() == [[1, 1, 0, 0]] * 2


def test_layout_map_paints_each_phrase_code_in_its_box_only():
    torch.manual_seed(0)
    enc = LayoutEncoder(phrase_dim=6, channels=3)
    phrases = torch.randn(2, 3, 6)
    boxes = torch.tensor([[[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1], [0, 0, 1, 1]]] * 2, dtype=torch.float32)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    out = enc(phrases, boxes, mask, (8, 8))
    code = enc.proj(phrases)
    assert out.shape == (2, 3, 8, 8)
    assert torch.allclose(out[0, :, 1, 2], code[0, 0]) and torch.allclose(out[0, :, 6, 5], code[0, 1])
    assert torch.equal(out[0, :, 1, 6], torch.zeros(3))  # top right: in no (unmasked) box
    assert torch.equal(out[1], torch.zeros(3, 8, 8))  # masked objects paint nothing


def test_pad_layouts_and_validation():
    phrases, boxes, mask = pad_layouts([[("red circle", (0, 0, 0.5, 0.5))], None], max_objects=2)
    assert phrases == [["red circle", ""], ["", ""]]
    assert mask.tolist() == [[True, False], [False, False]] and boxes[0, 0].tolist() == [0, 0, 0.5, 0.5]
    with pytest.raises(ValueError, match="at most 1"):
        pad_layouts([[("a", (0, 0, 1, 1)), ("b", (0, 0, 1, 1))]], max_objects=1)
    for bad, match in ((["red circle"], r"\(phrase"), ([("", (0, 0, 1, 1))], "non-empty"),
                       ([("x", (0.5, 0, 0.2, 1))], "x0 < x1"), ([("x", (0, 0, 1))], "4 finite"), ("abc", "list")):
        with pytest.raises(ValueError, match=match):
            check_layout(bad)


# ----------------------------------------------------------------------------------------- the planner

def _centers(layout):
    return [((x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2) for _, (x0, y0, x1, y1) in layout]


def _objects(layout):
    return [ShapeObject(0, 0, 0, x, y, r) for x, y, r in _centers(layout)]


def test_planned_layouts_satisfy_every_stated_relation_and_position():
    data = ShapesDataset(max_objects=2, position_prob=0.5, relation_prob=1.0, seed=3)
    checked = {"relation": 0, "position": 0}
    for i in range(300):
        text = data[i]["text"]
        parsed = parse_caption(text)
        layout = plan_layout(text, random.Random(i))
        assert [p for p, _ in layout] == [f"{COLORS[o['color']]} {SHAPES[o['shape']]}" for o in parsed["objects"]]
        objs = _objects(layout)
        for a, rel, b in parsed["relations"]:
            assert relation(objs[a], objs[b]) == rel, (text, layout)
            checked["relation"] += 1
        for obj, spec in zip(objs, parsed["objects"]):
            if spec["position"] >= 0:
                assert position_cell(obj) == spec["position"], (text, layout)
                checked["position"] += 1
            if spec["size"] >= 0:  # radius 0.13 / 0.21 +- 8 %
                assert abs(obj.radius - (0.13, 0.21)[spec["size"]]) <= 0.021
            assert 0 <= obj.x - obj.radius and obj.x + obj.radius <= 1  # inside the image
        if len(objs) == 2:  # no overlap
            (x0, y0, r0), (x1, y1, r1) = _centers(layout)
            assert ((x0 - x1) ** 2 + (y0 - y1) ** 2) ** 0.5 >= r0 + r1
    assert checked["relation"] > 120 and checked["position"] > 20


def test_planner_reads_only_the_grammar_and_is_seeded():
    assert plan_layout("hello world", random.Random(0)) is None
    assert plan_layouts(None, ["a red circle"], seed=0) == [None]
    a = plan_layouts(plan_layout, ["a red circle above a blue square"] * 3 + [""], seed=5)
    assert a == plan_layouts(plan_layout, ["a red circle above a blue square"] * 3 + [""], seed=5)
    assert a[0] != a[1] and a[3] is None  # each image its own layout; no prompt, no layout
    assert all(relation(*_objects(lay)) == RELATIONS.index("above") for lay in a[:3])
    single = plan_layout("a green star in the bottom right", random.Random(1))
    assert position_cell(_objects(single)[0]) == POSITIONS.index("in the bottom right")


def test_dataset_layout_is_the_scene():
    item = ShapesDataset(max_objects=2)[7]
    centers = item["objects"]["center"][: item["num_objects"]]
    radii = item["objects"]["radius"][: item["num_objects"]]
    for (phrase, (x0, y0, x1, y1)), c, r, color, shape in zip(item["layout"], centers, radii,
                                                               item["objects"]["color"], item["objects"]["shape"]):
        assert phrase == f"{COLORS[color]} {SHAPES[shape]}"
        assert torch.allclose(torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2]),
                              torch.tensor([*c.tolist(), float(r)]), atol=1e-6)


# ------------------------------------------------------------------------------------ network and training

def test_layout_input_path_starts_at_zero_and_then_moves_the_output():
    net = tiny_network(_cfg(LAYOUT), INFO, seed=0, perturb=0)
    assert isinstance(net, TextConditionedNet) and net.net.config.spatial_channels == 4
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10.0, 500.0])
    with torch.no_grad():
        for p in net.net.conv_out.parameters():  # the zero-initialized output would hide everything
            p.normal_(0, 0.1)
        layouts = [[("red circle", (0.1, 0.1, 0.5, 0.5))], None]
        plain = net(x, t, text=["a red circle", "a red circle"])
        assert torch.equal(net(x, t, text=["a red circle"] * 2, layout=layouts), plain)
        net.net.spatial_in.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
        moved = net(x, t, text=["a red circle"] * 2, layout=layouts)
    assert not torch.allclose(moved[0], plain[0]) and torch.equal(moved[1], plain[1])
    with pytest.raises(ValueError, match="spatial"):
        net.net(x, t, spatial=torch.zeros(2, 3, 16, 16), **{k: v for k, v in net.encode(["a"] * 2).items()
                                                            if not k.startswith("layout")})


def test_layout_needs_text_conditioning_a_unet_and_a_layout_dataset(tmp_path):
    with pytest.raises(ConfigError, match="conditioning=text"):
        load_config(TrainConfig, None, [LAYOUT]).validate()
    with pytest.raises(ConfigError, match="U-Net"):
        build_network(_cfg(LAYOUT, "--model.network=dit-s-2"), INFO)
    from reverie.train import train

    cfg = _cfg(LAYOUT, "--data.name=digits", f"--train.out_dir={tmp_path}")
    with pytest.raises(TrainingError, match="layouts"):
        train(cfg, resume=False)


def test_init_from_a_text_model_reproduces_it_exactly(make_model_dir, tmp_path):
    src = make_model_dir("text", TEXT_MODEL, INFO)
    text_net = Pipeline.from_pretrained(src).net
    net = tiny_network(_cfg(LAYOUT), INFO, seed=1, perturb=0)
    assert init_weights(net, src) == ["layout.proj", "net.spatial_in"]
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3.0, 700.0])
    with torch.no_grad():
        want = text_net(x, t, text=["a red circle", "a blue square above a red circle"])
        got = net.eval()(x, t, text=["a red circle", "a blue square above a red circle"],
                         layout=[[("red circle", (0, 0, 0.5, 0.5))], None])
    assert torch.equal(got, want)
    wider = "{model_channels: 16, channel_mult: [1, 2], attention_resolutions: [8], head_channels: 8}"
    other = make_model_dir("other", [*TEXT_MODEL, f"--model.network_overrides={wider}"], INFO)
    with pytest.raises(TrainingError, match="other shapes"):
        init_weights(net, other)
    with pytest.raises(TrainingError, match="not a model directory"):
        init_weights(net, tmp_path)


def test_training_drops_the_layout_with_the_caption_and_on_its_own():
    cfg = _cfg(LAYOUT, "--train.cond_dropout=0.3", "--train.layout_dropout=0.4")
    batch = {"text": ["a red circle"] * 4000, "layout": [[("red circle", (0, 0, 1, 1))]] * 4000}
    cond = text_condition(cfg.train, batch, torch.Generator().manual_seed(0), layouts=bool(cfg.model.layout_channels))
    pairs = list(zip(cond["text"], cond["layout"]))
    assert not any(t == "" and lay is not None for t, lay in pairs)  # the null condition has no layout
    kept = sum(lay is not None for _, lay in pairs) / len(pairs)
    assert abs(kept - 0.7 * 0.6) < 0.03  # 0.42, binomial s.e. 0.008
    assert abs(sum(t == "" for t, _ in pairs) / len(pairs) - 0.3) < 0.03
    # layout_only: some kept layouts lose their caption; nothing else changes (same generator stream first)
    alone_cfg = _cfg(LAYOUT, "--train.cond_dropout=0.3", "--train.layout_dropout=0.4", "--train.layout_only=0.5")
    alone = text_condition(alone_cfg.train, batch, torch.Generator().manual_seed(0),
                           layouts=bool(alone_cfg.model.layout_channels))
    assert alone["layout"] == cond["layout"]
    emptied = [a == "" and t != "" for a, t in zip(alone["text"], cond["text"])]
    assert all(lay is not None for lay, e in zip(cond["layout"], emptied) if e)
    assert abs(sum(emptied) / sum(lay is not None for lay in cond["layout"]) - 0.5) < 0.04


def test_saved_layout_model_loads_and_guided_sampling_uses_the_layout(layout_model):
    pipe = Pipeline.from_pretrained(layout_model)
    assert pipe.takes_layouts
    with torch.no_grad():
        # make the layout matter in this untrained model
        pipe.net.net.spatial_in.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
    kw = dict(num_images=2, steps=3, prompts=["a red circle above a blue square"], guidance_scale=3.0, seed=0)
    auto, again, none = pipe.sample(**kw), pipe.sample(**kw), pipe.sample(**kw, layouts="none")
    given = pipe.sample(**kw, layouts=[[("red circle", (0.0, 0.0, 0.4, 0.4))]])
    assert torch.equal(auto, again) and not torch.allclose(auto, none) and not torch.allclose(auto, given)
    with pytest.raises(ValueError, match="layouts for"):
        pipe.sample(**kw, layouts=[None, None, None])


def test_text_only_models_refuse_explicit_layouts():
    cfg = _cfg()
    model = DiffusionModel(build_network(cfg, INFO), cfg, INFO)
    with pytest.raises(ValueError, match="takes no layouts"):
        sample_images(model, 1, SamplingOptions(layouts=[[("red circle", (0, 0, 1, 1))]]), prompts=["a red circle"])


# ------------------------------------------------------------------------------------- regional prompts
def test_object_regions_split_images_and_clips_by_object_slot():
    a, b, c = ("red circle", (0.0, 0.0, 0.5, 0.5)), ("blue square", (0.5, 0.5, 1.0, 1.0)), ("cyan star", (0, 0, 1, 1))
    regions = object_regions([[a, b], [c], None])
    assert regions == [[("red circle", [a]), ("cyan star", [c]), None], [("blue square", [b]), None, None]]
    moved = ("blue square", (0.25, 0.5, 0.75, 1.0))
    clip = [[a, b], [a, moved], [a]]  # the blue square leaves in the last frame
    assert object_regions([clip]) == [[("red circle", [[a], [a], [a]])], [("blue square", [[b], [moved], None])]]
    recolored = ("red square", (0.5, 0.5, 1.0, 1.0))  # a blue square turns red: no one phrase names it
    assert object_regions([[[b], [recolored]]]) == [[(None, [[b], [recolored]])]]


def test_region_weights_are_grown_boxes_shared_where_they_overlap():
    left, right = ("l", (0.0, 0.0, 0.5, 1.0)), ("r", (0.5, 0.0, 1.0, 1.0))
    w = region_weights(object_regions([[left, right], [left]]), (2, 3, 8, 8), margin=1)
    assert w.shape == (2, 2, 1, 8, 8)
    assert (w[0, 0, 0, :, :3] == 1).all() and (w[0, 0, 0, :, 5:] == 0).all()  # columns 0-3, grown to 4
    assert (w[0, 0, 0, :, 3:5] == 0.5).all() and (w[1, 0, 0, :, 3:5] == 0.5).all()  # both grown boxes: shared
    assert (w[:, 1].sum(0)[0, :, :5] == 1).all() and (w[:, 1].sum(0)[0, :, 5:] == 0).all()  # one object: no share
    assert float(w.sum(0).max()) == 1.0
    tight = region_weights(object_regions([[left]]), (1, 3, 8, 8), margin=0)
    assert torch.equal(tight[0, 0, 0], box_masks(torch.tensor([[left[1]]]), (8, 8))[0, 0])
    clip = region_weights(object_regions([[[left], [right]]]), (1, 3, 2, 8, 8), margin=0)  # per frame
    assert clip.shape == (1, 1, 1, 2, 8, 8) and clip[0, 0, 0, 0, 0, 0] == 1 and clip[0, 0, 0, 1, 0, 0] == 0
    with pytest.raises(ValueError, match="3 frames"):
        region_weights(object_regions([[[left]] * 3]), (1, 3, 2, 8, 8))


def test_regional_sampling_uses_each_phrase_inside_its_box(layout_model):
    pipe = Pipeline.from_pretrained(layout_model)
    with torch.no_grad():
        # make the layout matter in this untrained model
        pipe.net.net.spatial_in.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
    kw = dict(num_images=2, steps=3, guidance_scale=3.0, seed=0)
    # one object over the whole image, named as the prompt: its region's condition is the prompt's own
    whole = [[("a red circle", (0.0, 0.0, 1.0, 1.0))]]
    plain = pipe.sample(**kw, prompts=["a red circle"], layouts=whole)
    torch.testing.assert_close(pipe.sample(**kw, prompts=["a red circle"], layouts=whole, regional=True), plain,
                               atol=1e-5, rtol=0)
    # a phrase other than the prompt changes what is drawn, inside its box only at the first step
    part = [[("blue square", (0.0, 0.0, 0.5, 0.5))]]
    kw1 = {**kw, "steps": 1, "prompts": ["a red circle"], "layouts": part}
    one, one_regional = pipe.sample(**kw1), pipe.sample(**kw1, regional=True)
    changed = (one - one_regional).abs().amax(dim=(0, 1)) > 1e-5
    assert changed[:8, :8].any() and not changed[:, 10:].any() and not changed[10:, :].any()
    with pytest.raises(ValueError, match="need layouts"):
        pipe.sample(**kw, prompts=["a red circle"], layouts="none", regional=True)
    # a model may make it its default (sample.regional): used where layouts are given, off with them off
    pipe.cfg.sample.regional = True
    assert torch.equal(pipe.sample(**kw1), one_regional) and torch.equal(pipe.sample(**kw1, regional=False), one)
    assert SamplingOptions().resolve(pipe.cfg).regional is True
    assert SamplingOptions(layouts="none").resolve(pipe.cfg).regional is False


def test_regional_prompts_need_a_layout_model():
    cfg = _cfg()
    model = DiffusionModel(build_network(cfg, INFO), cfg, INFO)
    with pytest.raises(ValueError, match="trained with layouts"):
        sample_images(model, 1, SamplingOptions(steps=1, regional=True), prompts=["a red circle"])
    assert SamplingOptions(regional=True).to_metadata()["regional"] is True
    assert "regional" not in SamplingOptions(regional=False).to_metadata()
    assert SamplingOptions.from_metadata(SamplingOptions(regional=True).to_metadata()).regional is True
    # a file without the key (made before regional prompts, or with them off) replays them off, whatever the default
    assert SamplingOptions.from_metadata(SamplingOptions(regional=False).to_metadata()).regional is False
    assert SamplingOptions().resolve(cfg).regional is False  # no layouts: never by default
    with pytest.raises(ConfigError, match="sample.regional: expected true or false"):
        load_config(TrainConfig, None, [*TEXT_MODEL, LAYOUT, "--train.out_dir=x", "--sample.regional=maybe"])


# ------------------------------------------------------------------------------------------------- CLI

def test_generate_with_a_layout_is_recorded_and_reproducible(layout_model, tmp_path):
    box = '[["red circle", [0.1, 0.1, 0.5, 0.5]]]'
    out = tmp_path / "a.png"
    args = ["generate", "a red circle", "--model", str(layout_model), "--steps", "3", "--num-images", "1"]
    assert main([*args, "--layout", box, "-o", str(out)]) == 0
    meta = json.loads(Image.open(out).text["reverie"])
    assert meta["layout"] == [["red circle", [0.1, 0.1, 0.5, 0.5]]]
    again = tmp_path / "b.png"
    assert main(["generate", "--from-png", str(out), "--model", str(layout_model), "-o", str(again)]) == 0
    with Image.open(out) as a, Image.open(again) as b:  # signed files differ in their manifests' ids
        assert a.tobytes() == b.tobytes() and a.text["reverie"] == b.text["reverie"]
    assert main([*args, "-o", str(tmp_path / "c.png")]) == 0
    assert json.loads(Image.open(tmp_path / "c.png").text["reverie"])["layout"] == "auto"


def test_generate_regional_is_recorded_and_refused_without_layouts(layout_model, make_model_dir, tmp_path, capsys):
    out = tmp_path / "r.png"
    args = ["generate", "a red circle left of a blue square", "--model", str(layout_model), "--steps", "2",
            "--num-images", "1", "--regional"]
    assert main([*args, "-o", str(out)]) == 0
    assert json.loads(Image.open(out).text["reverie"])["regional"] is True
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(out), "--model", str(layout_model), "-o", str(again)]) == 0
    with Image.open(out) as a, Image.open(again) as b:
        assert a.tobytes() == b.tobytes()
    capsys.readouterr()
    assert main([*args, "--layout", "none", "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "regional prompts need layouts" in err and "Traceback" not in err
    text_dir = make_model_dir("t-regional", TEXT_MODEL, INFO)
    assert main(["generate", "a red circle", "--model", str(text_dir), "--steps", "2", "--regional",
                 "-o", str(tmp_path / "y.png")]) == 2
    assert "trained with layouts" in capsys.readouterr().err


@pytest.mark.parametrize("value, message", [("[[1, 2]", "JSON list"),
                                            ('[["red circle", [0.5, 0, 0.1, 1]]]', "x0 < x1")])
def test_bad_layout_is_one_line_error(layout_model, tmp_path, capsys, value, message):
    code = main(["generate", "a red circle", "--model", str(layout_model), "--layout", value,
                 "-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_explicit_layout_on_a_text_only_model_is_refused(make_model_dir, tmp_path, capsys):
    text_dir = make_model_dir("t", TEXT_MODEL, INFO)
    code = main(["generate", "a red circle", "--model", str(text_dir), "--steps", "2",
                 "--layout", '[["red circle", [0, 0, 1, 1]]]', "-o", str(tmp_path / "x.png")])
    assert code == 2 and "takes no layouts" in capsys.readouterr().err


def test_inspect_names_the_layout_conditioning(layout_model, capsys):
    assert main(["inspect", str(layout_model)]) == 0
    assert "condition:  text (scratch encoder), + object layouts (4 channels)" in capsys.readouterr().out


def test_fine_tuning_run_trains_and_resumes_without_its_source(make_model_dir, tmp_path):
    import shutil

    from reverie.train import train

    src = make_model_dir("text", TEXT_MODEL, INFO)
    run = [LAYOUT, "--data.batch_size=4", "--train.progress=false", "--sample.every=0",
           f"--train.out_dir={tmp_path / 'run'}", f"--train.init_from={src}", "--train.checkpoint_every=1",
           "--train.layout_only=0.5", "--data.options={max_objects: 2}"]
    first = train(_cfg(*run, "--train.steps=2"), resume="auto")
    assert first.step == 2
    shutil.rmtree(src)  # resuming reads the checkpoint, not the model it started from
    again = train(_cfg(*run, "--train.steps=3"), resume="auto")
    assert again.step == 3 and again.model.layout is not None
    with pytest.raises(FileNotFoundError, match="not a model directory"):  # refused before any work
        train(_cfg(*run, "--train.steps=1", f"--train.out_dir={tmp_path / 'fresh'}"), resume="auto")
