"""The VDM trainer: joint training of the network and its schedule, exact resume, the model directory, and
sampling with every sampler through the learned schedule's denoiser view."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import NET
from reverie.configs import load_config
from reverie.pipeline import Pipeline
from reverie.train.vdm import VDMTrainConfig, train_vdm
from reverie.vdm import GAMMA_REF, GammaNetwork, VDMScheduleView
from toy_data import Toy

TINY = [f"--model.network_overrides={NET}", "--data.batch_size=4", "--data.resolution=16",
        "--train.progress=false", "--sample.every=0", "--optim.warmup_steps=2", "--optim.lr=1e-2",
        "--model.conditioning=class", "--train.log_every=1", "--vdm.hidden=16"]


def _cfg(out, *extra) -> VDMTrainConfig:
    return load_config(VDMTrainConfig, None, [*TINY, f"--train.out_dir={out}", *extra])


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("vdm")
    train_vdm(_cfg(out, "--train.steps=6", "--train.checkpoint_every=3"), resume=False, dataset=Toy(40))
    return out


def test_schedule_trains_jointly_and_is_saved_with_the_model(straight):
    config = json.loads((straight / "model" / "config.json").read_text())
    assert config["vdm"]["kind"] == "learned" and "vdm" not in config["train_config"]
    weights = load_file(str(straight / "model" / "model.safetensors"))
    start = GammaNetwork(hidden=16)
    # the endpoints followed the ELBO, the shape parameters the variance gradient: all moved from their start
    assert float(weights["gamma.gamma_0"]) != GAMMA_REF[0] and float(weights["gamma.gamma_1"]) != GAMMA_REF[1]
    assert not torch.equal(weights["gamma.w1"], start.w1.detach())
    assert weights["gamma.w2"].dtype == torch.float64
    log = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    for r in log:  # the loss is the negative ELBO in bits per dimension: the sum of its three terms
        assert r["loss"] == pytest.approx(r["bpd_diffusion"] + r["bpd_prior"] + r["bpd_recon"], rel=1e-5)


def test_resume_reproduces_the_straight_run(straight, tmp_path):
    train_vdm(_cfg(tmp_path, "--train.steps=3", "--train.checkpoint_every=3"), resume=False, dataset=Toy(40))
    train_vdm(_cfg(tmp_path, "--train.steps=6", "--train.checkpoint_every=3"), resume="auto", dataset=Toy(40))
    for name in ("model", "ema"):
        a = load_file(str(straight / "model" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "model" / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("sampler,grid", [("euler", "karras"), ("dpmpp_2m", "karras"), ("ddim", "ddim-trailing"),
                                          ("unipc", "exponential"), ("heun", "linspace-t")])
def test_pipeline_samples_through_the_learned_schedule(straight, sampler, grid):
    pipe = Pipeline.from_pretrained(straight / "model")
    assert isinstance(pipe.schedule, VDMScheduleView)
    ema = load_file(str(straight / "model" / "ema.safetensors"))
    # the grid spans the learned endpoints (the EMA's), not a fixed schedule's
    assert pipe.schedule.sigma_min == pytest.approx(float(torch.exp(ema["gamma.gamma_0"] / 2)), rel=1e-6)
    images = pipe.sample(num_images=2, steps=3, sampler=sampler, grid=grid, seed=4, class_labels=torch.tensor([0, 1]))
    assert images.shape == (2, 3, 16, 16) and bool(torch.isfinite(images).all())
    again = pipe.sample(num_images=2, steps=3, sampler=sampler, grid=grid, seed=4, class_labels=torch.tensor([0, 1]))
    assert torch.equal(images, again)


def test_save_pretrained_keeps_the_schedule(straight, tmp_path):
    pipe = Pipeline.from_pretrained(straight / "model")
    again = Pipeline.from_pretrained(pipe.save_pretrained(tmp_path / "copy"))
    t = torch.linspace(0, 999, 7, dtype=torch.float64)
    torch.testing.assert_close(again.schedule.sigma_from_t(t), pipe.schedule.sigma_from_t(t))


def test_config_mistakes_are_one_line():
    with pytest.raises(ValueError, match="predicts eps"):
        load_config(VDMTrainConfig, None, ["--model.prediction=v"])
    with pytest.raises(ValueError, match="gamma_min must be below"):
        load_config(VDMTrainConfig, None, ["--vdm.gamma_min=6"])


def test_reverie_train_sends_a_vdm_config_to_the_vdm_trainer(tmp_path):
    from helpers import cli

    config = tmp_path / "vdm.yaml"
    config.write_text("vdm: {hidden: 16}\ndata: {name: shapes, resolution: 16, batch_size: 4}\n")
    out = tmp_path / "run"
    args = ["train", str(config), "--quiet", f"--model.network_overrides={NET}", "--sample.every=0",
            "--train.steps=2", f"--train.out_dir={out}", "--resume", "no"]
    assert cli(args) == 0
    saved = json.loads((out / "model" / "config.json").read_text())
    assert saved["vdm"]["kind"] == "learned" and saved["vdm"]["hidden"] == 16


def test_eval_nll_of_a_vdm_model_is_its_continuous_elbo(tmp_path):
    from reverie.data import get_dataset
    from reverie.eval.evaluate import EvalSettings, nll_metrics, reference_spec
    from reverie.vdm import continuous_elbo

    train_vdm(_cfg(tmp_path, "--train.steps=2", "--model.conditioning=none"), resume=False, dataset=Toy(8))
    pipe = Pipeline.from_pretrained(tmp_path / "model")
    settings = EvalSettings(nll_n=3, progress=False)
    res = nll_metrics(pipe, settings, seed=1)
    name, options = reference_spec(pipe, settings)
    data = get_dataset(name, resolution=16, **options)
    x0 = torch.stack([data[i]["image"] for i in range(3)])
    direct = continuous_elbo(pipe.denoiser, x0, pipe.net.gamma, torch.Generator().manual_seed(1)).bits_per_dim()
    assert res["n"] == 3 and res["elbo_bpd"] == pytest.approx(float(direct.mean()), rel=1e-9)
    assert res["elbo_bpd"] > 0 and res["ode_bpd"] > 0
