"""The `reverie` command: generate (PNG metadata, reproducibility, bad input), sample, inspect, train."""

import json

import pytest
from PIL import Image

from helpers import NET, RGB16, TEXT_MODEL, cli, tiny_config
from reverie.cli import main


@pytest.fixture(scope="module")
def text_model(make_model_dir):
    """A small random text-conditioned model directory (weights perturbed so outputs vary)."""
    return make_model_dir("tiny-t2i", TEXT_MODEL, RGB16)


def _gen(model, *args):
    return main(["generate", *args, "--model", str(model), "--steps", "3"])


def _content(path):
    """Pixels and parameters of a PNG: what is reproducible (the C2PA manifest holds a unique instance id and a
    randomized ECDSA signature, so two signed files never match byte for byte)."""
    img = Image.open(path)
    return img.tobytes(), img.text["reverie"]


def test_generate_writes_png_with_parameters_and_is_reproducible(text_model, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert _gen(text_model, "a red circle", "--num-images", "1", "--seed", "3", "-o", str(a)) == 0
    assert _gen(text_model, "a red circle", "--num-images", "1", "--seed", "3", "-o", str(b)) == 0
    assert _content(a) == _content(b)
    img = Image.open(a)
    assert img.size == (16, 16)
    meta = json.loads(img.text["reverie"])
    assert meta["prompt"] == "a red circle" and meta["seed"] == 3 and meta["steps"] == 3
    assert meta["sampler"] == "dpmpp_2m" and meta["guidance"] == 4.0 and meta["model"] == "tiny-t2i"
    assert len(meta["model_hash"]) == 16
    c = tmp_path / "c.png"
    assert _gen(text_model, "a red circle", "--num-images", "1", "--seed", "4", "-o", str(c)) == 0
    assert _content(c)[0] != _content(a)[0]
    # --from-png reproduces the pixels and parameters
    d = tmp_path / "d.png"
    assert main(["generate", "--from-png", str(a), "--model", str(text_model), "-o", str(d)]) == 0
    assert _content(d) == _content(a)


def test_settings_left_out_are_the_models_own(text_model, tmp_path):
    """Without --sampler/--steps/--guidance-scale/--seed, generate and sample use the model's own settings (its
    config's sample section) and seed 0: the same images as the Pipeline's defaults."""
    import numpy as np

    from reverie.images import save_grid
    from reverie.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(text_model)
    out = tmp_path / "a.png"
    assert main(["generate", "a red circle", "--model", str(text_model), "--num-images", "1", "-o", str(out),
                 "--no-watermark"]) == 0  # the library's Pipeline does not watermark; the CLI does by default
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(pipe.generate("a red circle", 1)[0]))
    assert main(["sample", str(text_model), "--n", "2", "-o", str(tmp_path / "s.png"), "--no-watermark"]) == 0
    save_grid(pipe.sample(2), tmp_path / "expected.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "s.png")), np.asarray(Image.open(tmp_path / "expected.png")))


def test_grid_and_out_dir(text_model, tmp_path):
    assert _gen(text_model, "a blue square", "--num-images", "4", "-o", str(tmp_path / "grid.png")) == 0
    assert Image.open(tmp_path / "grid.png").size[0] > 2 * 16
    assert _gen(text_model, "a blue square", "--num-images", "3", "--out-dir", str(tmp_path / "each")) == 0
    files = sorted((tmp_path / "each").glob("*.png"))
    assert len(files) == 3
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(files[1]), "--model", str(text_model), "-o", str(again)]) == 0
    assert Image.open(again).tobytes() == Image.open(files[1]).tobytes()


def test_empty_and_overlong_prompts(text_model, tmp_path, capsys):
    assert _gen(text_model, "", "--num-images", "1", "-o", str(tmp_path / "u.png")) == 0
    long = " ".join(["red circle"] * 20)
    with pytest.warns(UserWarning, match="dropped"):
        assert _gen(text_model, long, "--num-images", "1", "-o", str(tmp_path / "l.png")) == 0


@pytest.mark.parametrize("args, message", [
    (["--sampler", "magic"], "--sampler: unknown sampler 'magic'; choose one of"),
    (["--steps", "0"], "--steps: must be at least 1, got 0"),
    (["--guidance", "-1"], "--guidance-scale/--guidance: must be between 0 and 50, got -1"),
    (["--guidance-scale", "51"], "--guidance-scale/--guidance: must be between 0 and 50, got 51"),
    (["--num-images", "100000"], "--num-images must be between"),
])
def test_bad_input_is_one_line_error(text_model, tmp_path, capsys, args, message):
    code = cli(["generate", "x", "--model", str(text_model), "-o", str(tmp_path / "x.png"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and err.count("\n") == 1


def test_missing_model_and_png_without_metadata(tmp_path, capsys):
    assert main(["generate", "x", "--model", str(tmp_path / "none")]) == 2
    plain = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(plain)
    assert main(["generate", "--from-png", str(plain), "--model", str(tmp_path)]) == 2
    assert "no reverie generation parameters" in capsys.readouterr().err


def test_inspect_and_sample(text_model, tmp_path, capsys):
    assert main(["inspect", str(text_model)]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "prediction: eps" in out
    assert main(["sample", str(text_model), "--n", "2", "--steps", "2", "-o", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").is_file()


def test_train_dry_run_and_config_errors(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  steps: 5\n")
    assert main(["train", str(cfg), "--optim.lr=3e-4", "--dry-run"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["optim"]["lr"] == pytest.approx(3e-4) and resolved["train"]["steps"] == 5
    assert main(["train", str(cfg), "--train.lr=1"]) == 2
    assert "did you mean optim.lr" in capsys.readouterr().err
    assert main(["train", str(cfg), "--train.steps=zero"]) == 2
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2


def test_export_checkpoint_to_half_precision_model(tmp_path, capsys):
    from reverie.pipeline import Pipeline
    from reverie.train import train

    cfg = tiny_config(f"--model.network_overrides={NET}", "--data.resolution=16", "--data.batch_size=2",
                      "--train.steps=2", "--train.checkpoint_every=2", f"--train.out_dir={tmp_path / 'run'}",
                      "--train.progress=false", "--sample.every=0", "--data.options={length: 64}")
    result = train(cfg, resume=False)
    assert main(["export", str(tmp_path / "run"), "-o", str(tmp_path / "half"), "--half"]) == 0
    half = Pipeline.from_pretrained(tmp_path / "half")
    full = Pipeline.from_pretrained(result.export_dir)  # EMA weights in float32
    assert (tmp_path / "half" / "model.safetensors").stat().st_size < \
        0.6 * (result.export_dir / "model.safetensors").stat().st_size
    a = half.sample(num_images=2, steps=2, sampler="euler", seed=0)
    b = full.sample(num_images=2, steps=2, sampler="euler", seed=0)
    assert (a - b).abs().max() < 2e-2  # fp16 rounding of the weights only
    # a run directory loads too: its latest checkpoint's EMA weights, exported on the fly
    run = Pipeline.from_pretrained(tmp_path / "run")
    assert run.name == "run" and run.sample(num_images=2, steps=2, sampler="euler", seed=0).equal(b)


def test_pipeline_generate_takes_a_sigma_grid(text_model):
    import numpy as np

    from reverie.images import to_pil
    from reverie.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(text_model)

    def pixels(images):
        return np.stack([np.asarray(im) for im in images])

    kw = dict(num_images=2, steps=3, seed=1)
    karras = pixels(pipe.generate("a red circle", grid="karras", **kw))
    direct = pipe.sample(2, steps=3, seed=1, prompts=["a red circle"], guidance_scale=4.0, grid="karras")
    assert np.array_equal(karras, pixels(to_pil(direct)))
    assert not np.array_equal(karras, pixels(pipe.generate("a red circle", grid="ddim-trailing", **kw)))
