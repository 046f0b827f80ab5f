"""Score-SDE, heat-equation and PFGM++ models through the ordinary trainer, model format, sampling options
and CLI: the configs' choices reach the loss, the denoiser and the samplers."""

import math

import pytest
import torch

from helpers import NET, cli, tiny_config, tiny_network
from reverie.build import DiffusionModel, build_denoiser, build_schedule, save_diffusion
from reverie.configs import ConfigError
from reverie.heat import IHDM
from reverie.pipeline import Pipeline
from reverie.sampling import SamplingOptions, sample_images, start_noise
from reverie.sde import TIME_SCALE, VPSDE, discretize, get_sde
from reverie.train.diffusion import heat_loss, heat_process, noise_levels

GRAY16 = {"in_channels": 1, "resolution": 16, "num_classes": 0}
SMALL = (f"--model.network_overrides={NET}", "--data.resolution=16", "--data.name=digits")
SDE = (*SMALL, "--schedule.name=vp-sde", "--loss.noise_levels=continuous", "--sample.grid=karras")


def _model(*overrides, seed=0):
    cfg = tiny_config(*overrides)
    cfg.validate()
    return DiffusionModel(tiny_network(cfg, GRAY16, seed=seed), cfg, GRAY16)


def test_sde_config_builds_a_continuous_time_denoiser():
    model = _model(*SDE)
    assert isinstance(model.schedule, VPSDE)
    den = model.denoiser
    sigma = torch.tensor([0.5, 3.0], dtype=torch.float64)
    # the network's time is 999 t with t = t(sigma) of the VP SDE; its input x / sqrt(1 + sigma^2)
    torch.testing.assert_close(den.c_noise(sigma), TIME_SCALE * get_sde("vp-sde").t_from_sigma(sigma))
    levels = noise_levels(model.cfg, model.schedule)(4000, torch.Generator().manual_seed(0))
    t = model.schedule.t_from_sigma(levels.sigma)
    assert abs(float(t.mean()) - 0.5005) < 0.01 and float(t.min()) >= 1e-3 - 1e-12


@pytest.mark.parametrize(("overrides", "message"), [
    (("--schedule.name=vp-sde",), "trains with loss.noise_levels=continuous"),
    (("--loss.noise_levels=continuous",), "trains with loss.noise_levels=uniform"),
    (("--model.pfgm_d=128",), "use model.prediction=edm"),
    (("--model.process=ihdm", "--model.conditioning=class"), "unconditional pixel-space"),
])
def test_inconsistent_configs_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(*overrides).validate()


def test_pc_options_reach_the_sampler():
    """corrector_steps=0 is the reverse-diffusion predictor alone (same seed, same bytes); corrector steps and
    snr change the result; they are refused for other samplers."""
    model = _model(*SDE)
    base = SamplingOptions(steps=3, grid="karras", seed=1)
    plain = sample_images(model, 2, SamplingOptions.make(base, sampler="reverse_diffusion"))
    pc0 = sample_images(model, 2, SamplingOptions.make(base, sampler="pc", corrector_steps=0))
    pc = sample_images(model, 2, SamplingOptions.make(base, sampler="pc", snr=0.3))
    assert torch.equal(plain, pc0) and not torch.equal(pc0, pc)
    with pytest.raises(ValueError, match="options of the pc sampler"):
        SamplingOptions(sampler="ddim", snr=0.2)
    meta = SamplingOptions.make(base, sampler="pc", corrector_steps=2, snr=0.1).to_metadata()
    back = SamplingOptions.from_metadata(meta)
    assert (back.corrector_steps, back.snr) == (2, 0.1)


def test_clip_denoised_bounds_every_x0_estimate():
    """clip_denoised clamps the (guided) x0 estimate to [-1, 1], which an untrained eps model leaves by far at a
    large sigma; every sampler step then moves toward the clamped estimate (the images differ); it is recorded in
    the metadata only when on, and refused where x0 is not in pixels (latent models) or no denoiser exists (heat)."""
    from reverie.sampling import guided_denoiser

    model = _model(*SDE)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 20
    sigma = torch.full((2,), 20.0)
    with torch.no_grad():
        plain = guided_denoiser(model, SamplingOptions(), {})(x, sigma)
        clipped = guided_denoiser(model, SamplingOptions(clip_denoised=True), {})(x, sigma)
    assert plain.abs().max() > 2  # the test means something: the estimate leaves the range
    torch.testing.assert_close(clipped, plain.clamp(-1, 1))
    base = SamplingOptions(sampler="ddim", steps=3, grid="karras", seed=1)
    a = sample_images(model, 2, base)
    b = sample_images(model, 2, SamplingOptions.make(base, clip_denoised=True))
    assert not torch.equal(a, b)
    assert "clip_denoised" not in base.to_metadata()
    meta = SamplingOptions.make(base, clip_denoised=True).to_metadata()
    assert meta["clip_denoised"] is True and SamplingOptions.from_metadata(meta).clip_denoised
    assert SamplingOptions.from_metadata(base.to_metadata()).clip_denoised is False
    with pytest.raises(ValueError, match="true or false"):
        SamplingOptions(clip_denoised="yes")
    model.vae = torch.nn.Identity()
    with pytest.raises(ValueError, match="latent model"):
        guided_denoiser(model, SamplingOptions(clip_denoised=True), {})
    with pytest.raises(ValueError, match="Gaussian diffusion"):
        sample_images(_model(*SMALL, "--model.process=ihdm", "--heat.num_levels=3"), 1,
                      SamplingOptions(clip_denoised=True))


def test_pfgm_prior_and_training_noise_are_heavy_tailed():
    """A PFGM++ model starts from the D-dimensional kernel: per-coordinate variance D / (D - 2) times sigma^2."""
    model = _model(*SMALL, "--model.prediction=edm", "--loss.noise_levels=lognormal", "--loss.weighting=edm",
                   "--sample.grid=karras", "--model.pfgm_d=8")
    x = start_noise(model, 2000, 2.0, torch.Generator().manual_seed(0))
    assert float(x.pow(2).mean()) / 4 == pytest.approx(8 / 6, rel=0.03)
    edm = _model(*SMALL, "--model.prediction=edm", "--loss.noise_levels=lognormal", "--loss.weighting=edm",
                 "--sample.grid=karras")
    assert float(start_noise(edm, 2000, 2.0, torch.Generator().manual_seed(0)).pow(2).mean()) / 4 == \
        pytest.approx(1.0, rel=0.03)


def test_heat_models_train_on_their_own_loss_and_sample_with_their_own_sampler():
    """The trainer's loss for an IHDM config is IHDM's residual loss at the drawn levels; sample_images runs
    IHDM's K-step sampler (K network calls) and blurring diffusion's ancestral one (steps calls)."""
    ihdm = _model(*SMALL, "--model.process=ihdm", "--heat.num_levels=5")
    process = heat_process(ihdm.cfg)
    assert isinstance(process, IHDM) and process.num_levels == 5
    x0 = torch.rand(3, 1, 16, 16) * 2 - 1
    loss = heat_loss(process, ihdm.net, x0, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    k, noise = process.draw_levels(3, g), torch.randn(x0.shape, generator=g)
    torch.testing.assert_close(loss, process.loss(ihdm.net, x0, k, noise).mean())
    calls = []
    hook = ihdm.net.register_forward_hook(lambda m, a, o: calls.append(float(a[1][0])))
    out = sample_images(ihdm, 2, SamplingOptions(seed=0))
    assert out.shape == (2, 1, 16, 16) and calls == [1000 * k / 5 for k in (5, 4, 3, 2, 1)]
    hook.remove()
    blur = _model(*SMALL, "--model.process=blurring")
    calls = []
    blur.net.register_forward_hook(lambda m, a, o: calls.append(float(a[1][0])))
    sample_images(blur, 2, SamplingOptions(steps=4, seed=0))
    assert len(calls) == 4 and calls[0] == pytest.approx(999.0) and calls[-1] == pytest.approx(999 / 4, rel=1e-6)


@pytest.fixture(scope="module")
def vp_dir(tmp_path_factory):
    cfg = tiny_config(*SDE)
    return save_diffusion(tmp_path_factory.mktemp("sde") / "vp", cfg, GRAY16, tiny_network(cfg, GRAY16))


def test_sde_model_dir_samples_through_the_cli(vp_dir, tmp_path):
    """An exported VP-SDE model: reverie sample --sampler pc / ode; --snr with another sampler is one error."""
    path = vp_dir
    assert cli(["sample", str(path), "--sampler", "pc", "--corrector-steps", "1", "--snr", "0.16", "--steps", "3",
                "--n", "2", "-o", str(tmp_path / "pc.png"), "--quiet"]) == 0
    assert cli(["sample", str(path), "--sampler", "ode", "--n", "2", "-o", str(tmp_path / "ode.png"),
                "--quiet"]) == 0
    assert cli(["sample", str(path), "--sampler", "ddim", "--steps", "3", "--clip-denoised", "--n", "2",
                "-o", str(tmp_path / "clip.png"), "--quiet"]) == 0
    from PIL import Image
    assert "clip_denoised: True" in Image.open(tmp_path / "clip.png").text["parameters"]
    assert cli(["sample", str(path), "--sampler", "ddim", "--snr", "0.1", "--n", "2",
                "-o", str(tmp_path / "x.png"), "--quiet"]) == 2
    pipe = Pipeline.from_pretrained(path)
    assert build_denoiser(pipe.cfg, pipe.net, pipe.schedule).time_scale == TIME_SCALE


@pytest.mark.slow
def test_sde_model_evaluates_nll(vp_dir):
    """Pipeline's denoiser gives the ELBO of the SDE's discretization and the ODE likelihood (a minute)."""
    from reverie.eval.evaluate import EvalSettings, nll_metrics

    cfg = tiny_config(*SDE)
    pipe = Pipeline.from_pretrained(vp_dir)
    res = nll_metrics(pipe, EvalSettings(nll_n=2, batch_size=2, progress=False))
    assert math.isfinite(res["elbo_bpd"]) and math.isfinite(res["ode_bpd"]) and res["n"] == 2
    assert discretize(build_schedule(cfg)).num_timesteps == 1000
