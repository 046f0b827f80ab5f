"""Tuned sigma grids (reverie.samplers.tune_sigmas): validity, optimality on a problem whose loss can be
scanned densely, a real gain on an exact Gaussian-mixture denoiser, the file format, the Pipeline and the CLI."""

import json
import math

import pytest
import torch

from helpers import cli, tiny_config
from reverie.cli import main
from reverie.gmm import GaussianMixture, grid2d, sliced_w2
from reverie.samplers import TunedGrid, get_sigmas, sample, tune_sigmas

SMIN, SMAX = 0.002, 80.0
NET = "{model_channels: 8, channel_mult: [1, 2], attention_resolutions: [], head_channels: 8}"
INFO = {"in_channels": 3, "resolution": 8, "num_classes": 0}


def _start(gmm, n, seed):
    x0 = gmm.sample(n, torch.Generator().manual_seed(seed))
    return x0 + SMAX * torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=x0.dtype)


def test_tuned_grid_is_valid_and_beats_karras_on_held_out_samples():
    """A 4-step UniPC grid for a 25-mode 2-D mixture: a valid grid, each stage no worse than the last, and on
    start states it was not tuned on it lands much closer to the true mixture than the Karras grid."""
    gmm = grid2d(5, 0.5, 0.05)
    tuned = tune_sigmas(gmm, _start(gmm, 256, 5), "unipc", 4, SMIN, SMAX)
    s = tuned.sigmas
    assert s.dtype == torch.float64 and len(s) == 5 and float(s[-1]) == 0.0
    assert float(s[0]) == pytest.approx(SMAX) and bool((s[1:] < s[:-1]).all()) and float(s[-2]) >= SMIN
    assert tuned.loss <= tuned.start_losses[tuned.start] == min(tuned.start_losses.values())
    assert tuned.loss < 0.2 * tuned.start_losses["karras"] and len(tuned.start_losses) == 13
    # calls: 200 teacher steps + 4 per pilot run
    assert tuned.denoiser_calls == 200 + 4 * tuned.evaluations and tuned.pilot == 256

    x = _start(gmm, 4000, 100)
    true = gmm.sample(4000, torch.Generator().manual_seed(200))
    err_tuned = sliced_w2(sample("unipc", gmm, x, s), true)
    err_karras = sliced_w2(sample("unipc", gmm, x, get_sigmas("karras", 4, SMIN, SMAX)), true)
    assert err_tuned < 0.5 * err_karras


def test_two_step_grid_finds_the_scanned_optimum():
    """Two DDIM steps on Gaussian data N(0, 0.5^2) against the exact flow map x -> x s / sqrt(s^2 + sigma_max^2):
    the loss depends on the middle sigma alone, so a dense scan gives the optimum the search must find."""
    s = 0.5
    gmm = GaussianMixture(torch.ones(1), torch.zeros(1, 3), stds=torch.full((1, 3), s))
    x = _start(gmm, 64, 3)
    target = x * s / math.sqrt(s**2 + SMAX**2)

    def loss(mid):
        grid = torch.tensor([SMAX, mid, 0.0], dtype=torch.float64)
        return float(((sample("ddim", gmm, x, grid) - target) ** 2).mean())

    scan = torch.logspace(math.log10(SMIN), math.log10(SMAX * 0.999), 3000, dtype=torch.float64)
    losses = torch.tensor([loss(float(m)) for m in scan])
    best = float(scan[losses.argmin()])
    tuned = tune_sigmas(gmm, x, "ddim", 2, SMIN, SMAX, target=target)
    assert tuned.loss == pytest.approx(loss(float(tuned.sigmas[1])), rel=1e-12)
    assert tuned.loss <= float(losses.min()) * 1.01
    assert abs(math.log(float(tuned.sigmas[1]) / best)) < 0.1
    assert tuned.denoiser_calls == 2 * tuned.evaluations  # a given target costs no teacher calls


def test_one_step_and_bad_input():
    gmm = grid2d(3, 0.5, 0.05)
    x = _start(gmm, 16, 0)
    one = tune_sigmas(gmm, x, "euler", 1, SMIN, SMAX, teacher_steps=5)
    assert one.sigmas.tolist() == [SMAX, 0.0] and one.evaluations == 1
    with pytest.raises(ValueError, match="unknown sampler"):
        tune_sigmas(gmm, x, "nope", 4, SMIN, SMAX)
    with pytest.raises(ValueError, match="at least 1"):
        tune_sigmas(gmm, x, "euler", 0, SMIN, SMAX)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        tune_sigmas(gmm, x, "euler", 4, SMAX, SMIN)
    with pytest.raises(ValueError, match="target has shape"):
        tune_sigmas(gmm, x, "euler", 4, SMIN, SMAX, target=x[:3])
    with pytest.raises(ValueError, match="starting grid 'mine' must have 5 levels"):
        tune_sigmas(gmm, x, "euler", 4, SMIN, SMAX, starts={"mine": get_sigmas("karras", 4, SMIN, SMAX / 2)})
    mine = get_sigmas("exponential", 4, 0.05, SMAX)
    tuned = tune_sigmas(gmm, x, "euler", 4, SMIN, SMAX, teacher_steps=20, starts={"mine": mine}, max_sweeps=1)
    assert tuned.start_losses["mine"] == pytest.approx(
        float(((sample("euler", gmm, x, mine) - sample("dpmpp_2m", gmm, x, get_sigmas("karras", 20, SMIN, SMAX)))
               ** 2).mean()), rel=1e-9)


def test_heun_grids_count_two_calls_per_step():
    gmm = grid2d(3, 0.5, 0.05)
    tuned = tune_sigmas(gmm, _start(gmm, 32, 1), "heun", 3, SMIN, SMAX, teacher_steps=10, max_sweeps=1)
    # Heun: 2 calls per step, 1 for the last (to sigma 0): 5 per run; the teacher (dpmpp_2m): 10
    assert tuned.denoiser_calls == 10 + 5 * tuned.evaluations
    assert (tuned.teacher_grid, tuned.teacher_steps) == ("karras", 10)
    given = tune_sigmas(gmm, _start(gmm, 32, 1), "heun", 3, SMIN, SMAX, max_sweeps=1,
                        teacher_grid=get_sigmas("exponential", 7, SMIN, SMAX))
    assert (given.teacher_grid, given.teacher_steps) == ("given", 7)
    assert given.denoiser_calls == 7 + 5 * given.evaluations


def test_save_and_load(tmp_path):
    gmm = grid2d(3, 0.5, 0.05)
    tuned = tune_sigmas(gmm, _start(gmm, 16, 0), "dpmpp_2m", 3, SMIN, SMAX, teacher_steps=10, max_sweeps=1)
    back = TunedGrid.load(tuned.save(tmp_path / "g" / "grid.json"))
    assert torch.equal(back.sigmas, tuned.sigmas) and back.to_dict() == tuned.to_dict()
    with pytest.raises(FileNotFoundError):
        TunedGrid.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON grid file"):
        TunedGrid.load(bad)
    d = tuned.to_dict()
    bad.write_text(json.dumps({**d, "steps": 5}))
    with pytest.raises(ValueError, match="needs 6 sigmas"):
        TunedGrid.load(bad)
    bad.write_text(json.dumps({**d, "sigmas": [1.0, 2.0, 0.0, 0.0]}))
    with pytest.raises(ValueError, match="non-increasing"):
        TunedGrid.load(bad)


@pytest.fixture(scope="module")
def tiny_model(make_model_dir):
    return make_model_dir("tiny", [f"--model.network_overrides={NET}", "--data.resolution=8"], INFO)


def test_cli_tune_grid_then_sample_with_it(tiny_model, tmp_path, capsys):
    from reverie.pipeline import Pipeline

    out = tmp_path / "grid.json"
    assert main(["tune-grid", str(tiny_model), "--sampler", "dpmpp_2m", "--steps", "3", "--pilot", "2",
                 "--teacher-steps", "6", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    tuned = TunedGrid.load(out)
    assert tuned.steps == 3 and tuned.sampler == "dpmpp_2m" and tuned.loss <= min(tuned.start_losses.values())
    assert f"{tuned.loss:.4g} tuned" in printed
    # the model's own grid (the config default: karras over the schedule's range) was scored as a start
    assert f"{tuned.start_losses['karras']:.4g} karras (the model's grid)" in printed
    pipe = Pipeline.from_pretrained(tiny_model)
    lo, hi = float(pipe.schedule.sigma_min), float(pipe.schedule.sigma_max)
    assert float(tuned.sigmas[0]) == pytest.approx(hi) and float(tuned.sigmas[-2]) >= lo
    # the file drives sampling: same images as passing its sigmas to the Pipeline
    direct = pipe.sample(2, sampler="dpmpp_2m", seed=4, grid=tuned.sigmas)
    assert not torch.equal(direct, pipe.sample(2, steps=3, sampler="dpmpp_2m", seed=4, grid="karras"))
    assert main(["sample", str(tiny_model), "--grid", str(out), "--n", "2", "--seed", "4", "--sampler", "dpmpp_2m",
                 "-o", str(tmp_path / "s.png"), "--no-watermark"]) == 0
    import numpy as np
    from PIL import Image

    from reverie.images import save_grid

    save_grid(direct, tmp_path / "expected.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "s.png")), np.asarray(Image.open(tmp_path / "expected.png")))


def test_cli_tune_grid_teacher_grid_and_errors(tiny_model, tmp_path, capsys):
    out = tmp_path / "g.json"
    assert main(["tune-grid", str(tiny_model), "--steps", "2", "--pilot", "1", "--teacher-steps", "5",
                 "--teacher-grid", "ddim-trailing", "-o", str(out)]) == 0
    tuned = TunedGrid.load(out)
    assert (tuned.teacher_grid, tuned.teacher_steps) == ("ddim-trailing", 5)
    assert "5-step dpmpp_2m solve on ddim-trailing" in capsys.readouterr().out
    for args, message in ((["--teacher-grid", "x.json"], "unknown --teacher-grid"),
                          (["--teacher-grid", "ddim-leading"], "pick a teacher grid that starts there"),
                          (["--sampler", "nope"], "--sampler: unknown sampler 'nope'"),
                          (["--pilot", "0"], "--pilot: must be at least 1, got 0")):
        assert cli(["tune-grid", str(tiny_model), "-o", str(out), *args]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--steps", "5"], "is a grid of 3 steps"),
    (["--grid", "nope"], "unknown sigma grid 'nope'"),
])
def test_cli_grid_file_errors(tiny_model, tmp_path, capsys, args, message):
    gmm = grid2d(3, 0.5, 0.05)
    grid = tune_sigmas(gmm, _start(gmm, 8, 0), "euler", 3, 0.01, 100.0, teacher_steps=5, max_sweeps=1)
    path = grid.save(tmp_path / "grid.json")
    cmd = ["sample", str(tiny_model), "--grid", str(path), "--n", "1", "-o", str(tmp_path / "s.png"), *args]
    assert cli(cmd) == 2
    assert message in capsys.readouterr().err


def test_explicit_grid_outside_the_model_range_is_refused(tiny_model):
    from reverie.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(tiny_model)
    hi = float(pipe.schedule.sigma_max)
    with pytest.raises(ValueError, match="outside this model's range"):
        pipe.sample(1, grid=torch.tensor([hi * 2, 1.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="the grid has 2 steps, not 4"):
        pipe.sample(1, steps=4, grid=torch.tensor([hi, 1.0, 0.0], dtype=torch.float64))


def test_sampling_options_take_steps_from_a_grid_file(tmp_path, capsys):
    from argparse import Namespace

    from reverie.cli.common import UserError, sampling_options

    def args(**given):
        return Namespace(**{**dict(grid=None, steps=None, sampler="euler", guidance_scale=None, guidance_rescale=0.0,
                                   negative_prompt="", seed=0), **given})

    gmm = grid2d(3, 0.5, 0.05)
    grid = tune_sigmas(gmm, _start(gmm, 8, 0), "euler", 3, 0.01, 100.0, teacher_steps=5, max_sweeps=1)
    path = str(grid.save(tmp_path / "grid.json"))
    options = sampling_options(args())
    assert (options.grid, options.steps) == (None, None)  # the model's own
    options = sampling_options(args(grid="karras", steps=7))
    assert (options.grid, options.steps) == ("karras", 7)
    options = sampling_options(args(grid=path, sampler="heun"))
    assert options.grid.dtype == torch.float64 and torch.equal(options.grid, grid.sigmas)
    assert options.resolve(tiny_config()).steps == 3  # the file's steps, whatever the model's own
    assert options.sampler == "heun" and "tuned for euler, not heun" in capsys.readouterr().err
    with pytest.raises(UserError, match="is a grid of 3 steps"):
        sampling_options(args(grid=path, steps=4))
    with pytest.raises(UserError, match="unknown sigma grid 'nope'"):
        sampling_options(args(grid="nope"))


def test_custom_distance_is_the_loss():
    gmm = grid2d(3, 0.5, 0.05)
    x = _start(gmm, 32, 2)
    target = sample("dpmpp_2m", gmm, x, get_sigmas("karras", 30, SMIN, SMAX))

    def l1(out, tgt):
        return (out - tgt).abs().mean()

    tuned = tune_sigmas(gmm, x, "dpmpp_2m", 3, SMIN, SMAX, target=target, distance=l1, max_sweeps=2)
    assert tuned.loss == pytest.approx(float(l1(sample("dpmpp_2m", gmm, x, tuned.sigmas), target)), rel=1e-9)
    assert tuned.start_losses["karras"] == pytest.approx(
        float(l1(sample("dpmpp_2m", gmm, x, get_sigmas("karras", 3, SMIN, SMAX)), target)), rel=1e-9)


def test_generate_with_a_grid_file_stores_the_sigmas_and_reproduces(tiny_model, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    gmm = grid2d(3, 0.5, 0.05)
    from reverie.pipeline import Pipeline

    hi = float(Pipeline.from_pretrained(tiny_model).schedule.sigma_max)
    grid = tune_sigmas(gmm, _start(gmm, 8, 0), "dpmpp_2m", 3, 0.05, hi, teacher_steps=5, max_sweeps=1)
    path = grid.save(tmp_path / "grid.json")
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert main(["generate", "", "--model", str(tiny_model), "--grid", str(path), "--num-images", "1",
                 "-o", str(a)]) == 0
    meta = json.loads(Image.open(a).text["reverie"])
    assert meta["steps"] == 3 and meta["grid"] == [float(v) for v in grid.sigmas]
    assert main(["generate", "--from-png", str(a), "--model", str(tiny_model), "-o", str(b)]) == 0
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    assert main(["generate", "", "--model", str(tiny_model), "--grid", str(path), "--steps", "4",
                 "-o", str(b)]) == 2
    assert "is a grid of 3 steps" in capsys.readouterr().err


def test_edm_model_tunes_over_edm_range(make_model_dir):
    from reverie.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(make_model_dir("edm", [f"--model.network_overrides={NET}", "--data.resolution=8",
                                                           "--model.prediction=edm", "--loss.noise_levels=lognormal"],
                                                   INFO, perturb=0))
    tuned = pipe.tune_grid("euler", 3, pilot=2, teacher_steps=4, max_sweeps=1)
    assert float(tuned.sigmas[0]) == pytest.approx(80.0) and float(tuned.sigmas[-2]) >= 0.002
    assert tuned.teacher_grid == "karras" and tuned.loss <= tuned.start_losses["karras"]
    assert torch.isfinite(pipe.sample(1, sampler="euler", grid=tuned.sigmas)).all()
