"""reverie edit / inpaint / invert: PNG metadata that reproduces the edit, and one line for each bad input."""

import json

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from helpers import RGB16, TEXT_MODEL, cli
from reverie.cli import main


@pytest.fixture(scope="module")
def model(make_model_dir):
    return make_model_dir("tiny-t2i", TEXT_MODEL, RGB16)


@pytest.fixture()
def image(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "in.png"
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    return path


def _meta(path):
    with Image.open(path) as im:
        return json.loads(im.text["reverie"])


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_edit_records_and_reproduces(model, image, tmp_path):
    out, again = tmp_path / "a.png", tmp_path / "b.png"
    assert main(["edit", str(image), "a green star", "--strength", "0.5", "--steps", "4", "--model", str(model),
                 "-o", str(out), "-q"]) == 0
    meta = _meta(out)
    assert meta["command"] == "edit" and meta["strength"] == 0.5 and meta["prompt"] == "a green star"
    assert meta["source_sha256"] == __import__("hashlib").sha256(image.read_bytes()).hexdigest()
    assert meta["steps"] == 4 and meta["sampler"]
    assert main(["edit", "--from-png", str(out), "--model", str(model), "-o", str(again), "-q"]) == 0
    assert np.array_equal(_pixels(out), _pixels(again))
    # a prompt edit to the same prompt with exact inversion gives the input back
    same = tmp_path / "same.png"
    assert main(["edit", str(image), "--from-prompt", "a red circle", "--to-prompt", "a red circle", "--steps", "4",
                 "--model", str(model), "-o", str(same), "-q"]) == 0
    assert np.abs(_pixels(same).astype(int) - _pixels(image).astype(int)).max() <= 1


def test_inpaint_box_and_mask(model, image, tmp_path):
    out, again, by_mask = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    assert main(["inpaint", str(image), "a yellow star", "--box", "4,4,12,10", "--steps", "3", "--resample", "2",
                 "--jump-length", "2", "--model", str(model), "-o", str(out), "-q"]) == 0
    before, after = _pixels(image), _pixels(out)
    keep = np.ones((16, 16), bool)
    keep[4:10, 4:12] = False
    assert np.array_equal(before[keep], after[keep]) and not np.array_equal(before[~keep], after[~keep])
    assert _meta(out)["box"] == "4,4,12,10" and _meta(out)["resample"] == 2
    assert main(["inpaint", "--from-png", str(out), "--model", str(model), "-o", str(again), "-q"]) == 0
    assert np.array_equal(after, _pixels(again))
    mask = tmp_path / "mask.png"
    Image.fromarray((~keep).astype(np.uint8) * 255).save(mask)
    assert main(["inpaint", str(image), "a yellow star", "--mask", str(mask), "--steps", "3", "--resample", "2",
                 "--jump-length", "2", "--model", str(model), "-o", str(by_mask), "-q"]) == 0
    assert np.array_equal(_pixels(by_mask), after)  # the same region, seed and settings
    assert _meta(by_mask)["mask_sha256"]


def test_invert_writes_noise(model, image, tmp_path):
    out = tmp_path / "noise.safetensors"
    assert main(["invert", str(image), "--prompt", "a red circle", "--steps", "4", "--method", "exact",
                 "--model", str(model), "-o", str(out), "-q"]) == 0
    with safe_open(str(out), "pt") as f:
        assert f.get_tensor("noise").shape == (1, 3, 16, 16)
        assert len([k for k in f.keys() if k.startswith("residual.")]) == 4
        assert json.loads(f.metadata()["reverie"])["prompt"] == "a red circle"


def test_bad_inputs_get_one_line(model, image, tmp_path, capsys):
    big = tmp_path / "big.png"
    Image.new("RGB", (40, 40), (255, 0, 0)).save(big)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    small_mask = tmp_path / "small.png"
    Image.new("L", (8, 8), 255).save(small_mask)
    empty, full = tmp_path / "empty.png", tmp_path / "full.png"
    Image.new("L", (16, 16), 0).save(empty)
    Image.new("L", (16, 16), 255).save(full)
    m = ["--model", str(model), "--steps", "2", "-q", "-o", str(tmp_path / "o.png")]
    cases = [
        (["edit", str(text), "x", *m], "is not an image"),
        (["edit", str(tmp_path / "missing.png"), "x", *m], "not found"),
        (["edit", str(image), "x", "--strength", "0", *m], "strength must be in (0, 1]"),
        (["edit", str(image), "x", "--strength", "1.5", *m], "--strength"),
        (["edit", str(image), "x", "--strength", "0.1", *m], "runs no step"),
        (["edit", str(image), "--from-prompt", "a", *m], "needs both"),
        (["inpaint", str(image), "x", "--mask", str(small_mask), *m], "must be the same size"),
        (["inpaint", str(image), "x", "--mask", str(empty), *m], "the mask is empty"),
        (["inpaint", str(image), "x", "--mask", str(full), *m], "all white"),
        (["inpaint", str(image), "x", *m], "--mask MASK.png or --box"),
        (["inpaint", str(image), "x", "--box", "1,2,3", *m], "--box must be x0,y0,x1,y1"),
        (["inpaint", str(image), "x", "--box", "0,0,20,5", *m], "x1 <= 16"),
        (["edit", "--from-png", str(image), *m], "carries no reverie"),
    ]
    for argv, message in cases:
        assert cli(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)
    # a larger image is resized with a warning line, then edited
    assert main(["edit", str(big), "x", "--strength", "0.5", *m]) == 0
    assert "resized to the model's 16x16" in capsys.readouterr().err


def test_prompt_edit_local_blend_round_trips(make_model_dir, model, image, tmp_path):
    layout = make_model_dir("tiny-layout", (*TEXT_MODEL, "--model.layout_channels=4"), RGB16)
    out, again = tmp_path / "a.png", tmp_path / "b.png"
    lay = json.dumps([["red circle", [0.1, 0.1, 0.4, 0.45]], ["blue square", [0.55, 0.5, 0.95, 0.9]]])
    args = ["edit", str(image), "--from-prompt", "a red circle above a blue square", "--to-prompt",
            "a green circle above a blue square", "--steps", "3", "--layout", lay, "--model", str(layout)]
    assert main([*args, "--no-local-blend", "-o", str(out), "-q"]) == 0
    assert _meta(out)["local_blend"] is False
    assert main(["edit", "--from-png", str(out), "--model", str(layout), "-o", str(again), "-q"]) == 0
    assert np.array_equal(_pixels(out), _pixels(again))
    assert main([*args, "-o", str(again), "-q"]) == 0
    assert _meta(again)["local_blend"] == "auto" and _meta(again)["fresh_noise"] == 0.75
    third = tmp_path / "c.png"
    assert main([*args, "--fresh-noise", "0", "-o", str(third), "-q"]) == 0
    assert _meta(third)["fresh_noise"] == 0.0
    assert main(["edit", "--from-png", str(third), "--model", str(layout), "-o", str(tmp_path / "d.png"), "-q"]) == 0
    assert np.array_equal(_pixels(tmp_path / "d.png"), _pixels(third))
    keep = np.ones((16, 16), bool)
    keep[0:9, 0:8] = False  # the changed box (x 1.6..6.4, y 1.6..7.2 px) grown by 2 px
    assert np.array_equal(_pixels(again)[keep], _pixels(image)[keep])
    assert not np.array_equal(_pixels(out)[keep], _pixels(image)[keep])
    assert cli(["edit", str(image), "--from-prompt", "a", "--to-prompt", "b", "--local-blend", "--model",
                str(model), "-o", str(out)]) == 2
    assert cli([*args, "--fresh-noise", "1.5", "-o", str(out)]) == 2
