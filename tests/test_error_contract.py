"""The CLI's error contract beyond damaged files: OS errors in one line, bugs still show their traceback,
REVERIE_DEBUG shows it always, and counts are checked against a memory estimate before any work."""

import errno
import os

import pytest

from helpers import RGB16, TEXT_MODEL, cli
from reverie.cli import main
from reverie.pipeline import Pipeline
from reverie.sampling import bytes_per_image, check_batch


@pytest.fixture(scope="module")
def model(make_model_dir):
    return make_model_dir("tiny", TEXT_MODEL, RGB16)


def _lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def test_a_full_disk_is_one_line_naming_the_file(model, tmp_path, monkeypatch, capsys):
    import reverie.cli.generate as generate

    def full(image, path, params):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(generate, "save_png", full)
    assert main(["generate", "x", "--model", str(model), "--steps", "1", "-o", str(tmp_path / "a.png")]) == 2
    (line,) = _lines(capsys.readouterr().err)
    assert line == f"reverie: error: {tmp_path / 'a.png'}: No space left on device"


def test_a_bug_keeps_its_traceback_and_reverie_debug_shows_every_one(model, monkeypatch):
    import reverie.cli.generate as generate

    monkeypatch.setattr(generate, "save_png", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # not a user mistake: not turned into a one-line error
        main(["generate", "x", "--model", str(model), "--steps", "1", "-o", "unused.png"])
    monkeypatch.setenv("REVERIE_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(["generate", "x", "--model", str(model / "missing")])


def test_counts_are_checked_against_a_memory_estimate(model, monkeypatch, capsys):
    pipe = Pipeline.from_pretrained(model)
    per_image = bytes_per_image(pipe)
    assert per_image > 1.5 * bytes_per_image(pipe, guided=False) > 0  # guidance runs two batches
    monkeypatch.setenv("REVERIE_MEMORY_GB", str(per_image * 10 / 2**30))  # half of it: 5 images fit
    check_batch(pipe, 5)
    with pytest.raises(ValueError, match="--batch-size 6 would need .* use --batch-size 5 or less"):
        check_batch(pipe, 6)
    assert main(["generate", "x", "--model", str(model), "--num-images", "8", "-o", "unused.png"]) == 2
    assert "--num-images 8 would need" in capsys.readouterr().err


def test_train_help_shows_an_override_form_that_works(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    assert "--train.steps=100" in help_text and "train.steps=100 " not in help_text.replace("--train.steps", "")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    assert cli(["train", str(cfg), "--train.steps=100", "--dry-run"]) == 0


def test_quiet_is_accepted_by_every_command(capsys):
    from reverie.cli import _leaf_parsers, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    leaves = _leaf_parsers(sub)
    assert len(leaves) >= 9 and all(any("--quiet" in a.option_strings for a in p._actions) for p in leaves)


def test_reproducing_one_file_of_a_batch_keeps_its_index(model, tmp_path):
    import json

    from PIL import Image

    assert main(["generate", "x", "--model", str(model), "--steps", "1", "--num-images", "3",
                 "--out-dir", str(tmp_path / "a")]) == 0
    assert main(["generate", "--from-png", str(tmp_path / "a" / "002.png"), "--model", str(model),
                 "-o", str(tmp_path / "b.png")]) == 0
    meta = json.loads(Image.open(tmp_path / "b.png").text["reverie"])
    assert meta["index"] == 2 and meta["num_images"] == 3
    assert Image.open(tmp_path / "b.png").tobytes() == Image.open(tmp_path / "a" / "002.png").tobytes()
    assert main(["generate", "--from-png", str(tmp_path / "b.png"), "--model", str(model),
                 "--out-dir", str(tmp_path / "c")]) == 0
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["002.png"]  # the same file name, the same index


def test_writing_a_model_directory_removes_weights_of_an_earlier_model(tmp_path):
    import torch

    from reverie import modeldir

    modeldir.write(tmp_path / "m", "diffusion", {}, {"model": {"w": torch.ones(1)}, "ema": {"w": torch.zeros(1)}})
    modeldir.write(tmp_path / "m", "diffusion", {}, {"model": {"w": torch.full((1,), 2.0)}})
    assert not (tmp_path / "m" / "ema.safetensors").exists()  # else loaders would prefer the stale EMA weights
    assert float(modeldir.read(tmp_path / "m").load_weights()["w"]) == 2.0
