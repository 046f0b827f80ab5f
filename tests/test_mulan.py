"""reverie.mulan and its trainer: the per-pixel, input-adaptive schedule (monotone, shared endpoints, exact
derivative), the latent KL, the ELBO's reduction to VDM's when the schedule ignores the input, the per-pixel
diffusion term against a closed form, the denoiser view against the per-pixel ODE's exact solution, exact resume
and sampling through the Pipeline."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from helpers import NET
from reverie.configs import load_config
from reverie.mulan import (
    LatentEncoder,
    MuLANNet,
    PolynomialGamma,
    gaussian_kl,
    negative_elbo,
)
from reverie.pipeline import Pipeline
from reverie.samplers import get_sigmas, sample
from reverie.train.mulan import MuLANTrainConfig, train_mulan
from reverie.vdm import (
    GAMMA_REF,
    FixedGamma,
    VDMScheduleView,
    diffusion_loss,
    gamma_with_derivative,
    optimal_gaussian_diffusion_loss,
    prior_kl,
    reconstruction_nll,
    sample_times,
)
from toy_data import Toy

G0, G1 = -10.0, 6.0
SHAPE = (1, 4, 4)


def scrambled_gamma(seed: int = 0, latent_dim: int = 3) -> PolynomialGamma:
    """A PolynomialGamma far from its linear start: every weight random."""
    gen = torch.Generator().manual_seed(seed)
    gamma = PolynomialGamma(math.prod(SHAPE), latent_dim, hidden=16, gamma_min=G0, gamma_max=G1)
    with torch.no_grad():
        for p in gamma.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return gamma


class ExactGaussianEps(torch.nn.Module):
    """The optimal eps for independent pixels x_i ~ N(0, v_i), read from the gamma map MuLANNet passes as
    ``spatial``: E[eps | z] = sigma z / (alpha^2 v + sigma^2)."""

    def __init__(self, v: torch.Tensor):
        super().__init__()
        self.v = v

    def forward(self, z, c_noise, pooled=None, spatial=None):
        gamma = (spatial.double() + 1) / 2 * (GAMMA_REF[1] - GAMMA_REF[0]) + GAMMA_REF[0]
        a2, s2 = torch.sigmoid(-gamma), torch.sigmoid(gamma)
        return (s2.sqrt() * z.double() / (a2 * self.v + s2)).to(z.dtype)


class ScaledInput(torch.nn.Module):
    """A stand-in eps network that ignores the latent and the gamma map: eps_hat = x c_noise / 1000."""

    def forward(self, z, c_noise, pooled=None, spatial=None):
        return z * (c_noise.reshape(-1, 1, 1, 1) / 1000)


def mulan(net, gamma: PolynomialGamma | None = None, latent_dim: int = 3) -> MuLANNet:
    model = MuLANNet(net, SHAPE, latent_dim=latent_dim, hidden=16, gamma_min=G0, gamma_max=G1)
    if gamma is not None:
        model.gamma = gamma
    return model.double()


def test_schedule_is_monotone_per_pixel_with_shared_endpoints_and_exact_derivative():
    gamma = scrambled_gamma(0)
    latent = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.linspace(0, 1, 2001, dtype=torch.float64)
    g = torch.stack([gamma(latent, torch.full((5,), float(s), dtype=torch.float64)) for s in t], -1).detach()
    assert bool((g.diff(dim=-1) > 0).all())  # [B, P, T]: every pixel of every input increases in t
    torch.testing.assert_close(g[..., 0], torch.full_like(g[..., 0], G0), atol=1e-12, rtol=0)
    torch.testing.assert_close(g[..., -1], torch.full_like(g[..., -1], G1), atol=1e-12, rtol=0)
    # per input and per pixel: the schedules differ
    assert float((g[0] - g[1]).abs().max()) > 0.1 and float((g[0, 0] - g[0, 1]).abs().max()) > 0.1
    ts = torch.rand(5, generator=torch.Generator().manual_seed(2), dtype=torch.float64).requires_grad_(True)
    value, closed = gamma.with_derivative(latent, ts)
    autograd = torch.stack([torch.autograd.grad(value[:, i].sum(), ts, retain_graph=True)[0] for i in range(16)], -1)
    torch.testing.assert_close(closed.detach(), autograd, rtol=1e-10, atol=1e-10)


def test_starts_linear_in_gamma_with_the_latent_at_its_prior():
    gamma = PolynomialGamma(16, 3, hidden=8, gamma_min=G0, gamma_max=G1)
    latent = torch.randn(4, 3, dtype=torch.float64)
    t = torch.rand(4, dtype=torch.float64)
    value, slope = (v.detach() for v in gamma.with_derivative(latent, t))
    torch.testing.assert_close(value, (G0 + (G1 - G0) * t)[:, None].expand(4, 16), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(slope, torch.full_like(slope, G1 - G0))
    mu, var = LatentEncoder(1, 8, 3)(torch.randn(2, 1, 8, 8))
    assert float(gaussian_kl(mu, var).detach().abs().max()) < 1e-5


def test_speed_is_a_learning_rate_multiplier_not_a_different_schedule():
    latent, t = torch.randn(3, 3, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    torch.manual_seed(0)
    slow = PolynomialGamma(16, 3, hidden=8, gamma_min=G0, gamma_max=G1)
    torch.manual_seed(0)
    fast = PolynomialGamma(16, 3, hidden=8, gamma_min=G0, gamma_max=G1, speed=30)
    torch.testing.assert_close(fast(latent, t), slow(latent, t))
    for model in (slow, fast):  # one plain SGD step of the same loss: the fast schedule moves 30^2 x as far
        model(latent, t).pow(2).sum().backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 1e-4 * p.grad
    moved = [float((m(latent, t).detach() - (G0 + (G1 - G0) * t)[:, None]).abs().max()) for m in (slow, fast)]
    assert moved[1] > 100 * moved[0] > 0


def test_latent_kl_is_the_closed_form():
    gen = torch.Generator().manual_seed(3)
    mu, var = torch.randn(6, 5, generator=gen), torch.rand(6, 5, generator=gen) * 3 + 0.01
    q = torch.distributions.Normal(mu.double(), var.double().sqrt())
    p = torch.distributions.Normal(torch.zeros(6, 5, dtype=torch.float64), torch.ones(6, 5, dtype=torch.float64))
    torch.testing.assert_close(gaussian_kl(mu, var), torch.distributions.kl_divergence(q, p).sum(-1))


def test_elbo_reduces_to_vdm_when_the_schedule_ignores_the_input():
    """Fresh schedule (linear in gamma for every pixel and latent), fresh encoder (q(c | x) = p(c)), a network
    that ignores the latent and the map: MuLAN's terms are VDM's on the linear schedule, draw for draw."""
    x0 = torch.rand(6, *SHAPE, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 2 - 1
    model = mulan(ScaledInput())
    terms = negative_elbo(model, x0, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # VDM's trainer draws t, eps, eps_0 in this order too
    linear = FixedGamma("linear", G0, G1)
    gamma, dgamma = gamma_with_derivative(linear, sample_times(6, g))
    noise = torch.randn(x0.shape, generator=g).double()
    noise_0 = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    a, s = (torch.sigmoid(v).sqrt().reshape(-1, 1, 1, 1) for v in (-gamma, gamma))
    eps_hat = ScaledInput()(a * x0 + s * noise, 1000 * (gamma - GAMMA_REF[0]) / (GAMMA_REF[1] - GAMMA_REF[0]))
    # (vdm.diffusion_loss sums the squared error in float32)
    torch.testing.assert_close(terms.diffusion, diffusion_loss(noise, eps_hat, dgamma), rtol=1e-5, atol=0)
    torch.testing.assert_close(terms.prior, prior_kl(x0, torch.tensor(G1)))
    torch.testing.assert_close(terms.reconstruction, reconstruction_nll(x0, torch.tensor(G0), noise_0))
    assert float(terms.latent.detach().abs().max()) < 1e-5
    torch.testing.assert_close(terms.total, terms.prior + terms.reconstruction + terms.diffusion + terms.latent)


def test_per_pixel_diffusion_term_matches_the_closed_form_for_independent_gaussian_pixels():
    """For independent pixels each pixel's integral depends only on its (shared) endpoints: the Monte-Carlo
    diffusion term under an input-adaptive per-pixel schedule and the exact denoiser is the closed form."""
    v = torch.linspace(0.05, 1.0, 16, dtype=torch.float64).reshape(1, *SHAPE)
    model = mulan(ExactGaussianEps(v), scrambled_gamma(1))
    with torch.no_grad():  # an encoder whose latent moves with the input: the schedule does too
        model.latent_encoder.head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(6)
    x0 = torch.randn(4000, *SHAPE, generator=gen, dtype=torch.float64) * v.sqrt()
    with torch.no_grad():
        diff = negative_elbo(model, x0, gen).diffusion
    exact = sum(optimal_gaussian_diffusion_loss(float(vi), 1, G0, G1) for vi in v.flatten())
    sem = float(diff.std()) / math.sqrt(len(diff))
    assert abs(float(diff.mean()) - exact) < 4 * sem, (float(diff.mean()), exact, sem)
    assert sem < 0.05 * exact


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m"])
def test_denoiser_view_integrates_the_per_pixel_ode(sampler):
    """Gaussian pixels N(0, v_i): the per-pixel probability-flow ODE scales pixel i by
    sqrt((v_i + sigma_i(t)^2) / (v_i + sigma_max^2)) whatever the path; then D at sigma_min. The samplers,
    stepping the view's scalar reference level, must land there."""
    v = torch.linspace(0.05, 1.0, 16, dtype=torch.float64).reshape(1, *SHAPE)
    model = mulan(ExactGaussianEps(v), scrambled_gamma(2))
    latent = torch.randn(3, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    view, ref = model.denoiser_view(), model.schedule_view
    smin, smax = ref.sigma_min, ref.sigma_max
    assert smin == pytest.approx(math.exp(G0 / 2)) and smax == pytest.approx(math.exp(G1 / 2))
    x1 = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(8), dtype=torch.float64) * smax
    expected = x1 * (v / (v + smin**2)) * ((v + smin**2) / (v + smax**2)).sqrt()
    errors = []
    for n in (400, 1600):
        sigmas = get_sigmas("karras", n=n, sigma_min=smin, sigma_max=smax).double()
        with torch.no_grad():
            out = sample(sampler, view, x1, sigmas, cond={"latent": latent})
        errors.append(float(((out - expected) / expected).abs().max()))
    # second-order samplers converge to the exact solution at their order (4x steps: ~16x smaller error)
    assert errors[1] < 1e-3 and errors[0] / errors[1] > 8, errors

    def plain(x, s, latent):  # each pixel's own denoiser D without the view's rate ratio r: a different ODE
        t = ((2 * torch.as_tensor(s).log() - G0) / (G1 - G0)).clamp(0, 1).expand(x.shape[0])
        gamma, _ = model.gamma_map(latent, t)
        return x - torch.exp(gamma / 2) * model(x * torch.sigmoid(-gamma).sqrt(), gamma, latent)

    with torch.no_grad():
        wrong = sample(sampler, plain, x1, sigmas, cond={"latent": latent})
    assert float(((wrong - expected) / expected).abs().max()) > 0.05


# ---- the trainer ----

TINY = [f"--model.network_overrides={NET}", "--data.batch_size=4", "--data.resolution=16",
        "--train.progress=false", "--sample.every=0", "--optim.warmup_steps=2", "--optim.lr=1e-2",
        "--train.log_every=1", "--mulan.hidden=8", "--mulan.latent_dim=4", "--mulan.encoder_width=4"]


def _cfg(out, *extra) -> MuLANTrainConfig:
    return load_config(MuLANTrainConfig, None, [*TINY, f"--train.out_dir={out}", *extra])


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("mulan")
    train_mulan(_cfg(out, "--train.steps=6", "--train.checkpoint_every=3"), resume=False, dataset=Toy(40))
    return out


def test_trains_jointly_and_saves_the_schedule_and_encoder(straight):
    config = json.loads((straight / "model" / "config.json").read_text())
    assert config["mulan"]["latent_dim"] == 4 and "mulan" not in config["train_config"]
    assert config["network"]["spatial_channels"] == 3 and config["network"]["pooled_dim"] == 4
    weights = load_file(str(straight / "model" / "model.safetensors"))
    fresh = PolynomialGamma(3 * 16 * 16, 4, hidden=8)
    assert weights["gamma.head.weight"].dtype == torch.float64
    assert not torch.equal(weights["gamma.head.weight"], fresh.head.weight.detach())  # the schedule learned
    assert float(weights["latent_encoder.head.weight"].abs().max()) > 0  # and the encoder
    log = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    for r in log:  # the loss is MuLAN's negative ELBO in bits/dim: the sum of its four terms
        parts = r["bpd_diffusion"] + r["bpd_prior"] + r["bpd_reconstruction"] + r["bpd_latent"]
        assert r["loss"] == pytest.approx(parts, rel=1e-5)


def test_resume_reproduces_the_straight_run(straight, tmp_path):
    train_mulan(_cfg(tmp_path, "--train.steps=3", "--train.checkpoint_every=3"), resume=False, dataset=Toy(40))
    train_mulan(_cfg(tmp_path, "--train.steps=6", "--train.checkpoint_every=3"), resume="auto", dataset=Toy(40))
    for name in ("model", "ema"):
        a = load_file(str(straight / "model" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "model" / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_pipeline_samples_with_latents_from_the_prior(straight, sampler):
    pipe = Pipeline.from_pretrained(straight / "model")
    assert isinstance(pipe.schedule, VDMScheduleView)
    assert pipe.schedule.sigma_min == pytest.approx(math.exp(GAMMA_REF[0] / 2))
    images = pipe.sample(num_images=2, steps=3, sampler=sampler, seed=4)
    assert images.shape == (2, 3, 16, 16) and bool(torch.isfinite(images).all())
    assert torch.equal(images, pipe.sample(num_images=2, steps=3, sampler=sampler, seed=4))
    assert not torch.equal(images, pipe.sample(num_images=2, steps=3, sampler=sampler, seed=5))


def test_config_mistakes_are_one_line():
    with pytest.raises(ValueError, match="predicts eps"):
        load_config(MuLANTrainConfig, None, ["--model.prediction=v"])
    with pytest.raises(ValueError, match="gamma_min must be below"):
        load_config(MuLANTrainConfig, None, ["--mulan.gamma_min=6"])


def test_reverie_train_sends_a_mulan_config_to_the_mulan_trainer(tmp_path):
    from helpers import cli

    config = tmp_path / "mulan.yaml"
    config.write_text("mulan: {hidden: 8, latent_dim: 2}\ndata: {name: shapes, resolution: 16, batch_size: 4}\n")
    out = tmp_path / "run"
    args = ["train", str(config), "--quiet", f"--model.network_overrides={NET}", "--sample.every=0",
            "--train.steps=2", f"--train.out_dir={out}", "--resume", "no"]
    assert cli(args) == 0
    saved = json.loads((out / "model" / "config.json").read_text())
    assert saved["mulan"]["latent_dim"] == 2 and saved["network"]["pooled_dim"] == 2


def test_eval_nll_of_a_mulan_model_is_its_elbo(straight):
    from reverie.data import get_dataset
    from reverie.eval.evaluate import EvalSettings, nll_metrics, reference_spec

    pipe = Pipeline.from_pretrained(straight / "model")
    settings = EvalSettings(nll_n=3, progress=False)
    res = nll_metrics(pipe, settings, seed=1)
    name, options = reference_spec(pipe, settings)
    x0 = torch.stack([get_dataset(name, resolution=16, **options)[i]["image"] for i in range(3)])
    with torch.no_grad():
        direct = negative_elbo(pipe.net, x0, torch.Generator().manual_seed(1)).bits_per_dim()
    assert res["elbo_bpd"] == pytest.approx(float(direct.mean()), rel=1e-9) and res["ode_bpd"] is None
