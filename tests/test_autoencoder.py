"""The KL autoencoder: shapes, the posterior's KL against torch.distributions, latent scaling, the
PSNR formula, overfitting a few images, and the VAE trainer's export, reload and exact resume."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributions import Normal, kl_divergence

from reverie.build import load_autoencoder
from reverie.configs import ConfigError, load_config
from reverie.nets import AUTOENCODER_PRESETS, count_parameters, create_autoencoder, create_network
from reverie.nets.autoencoder import AutoencoderConfig, AutoencoderKL, DiagonalGaussian, estimate_latent_scaling
from reverie.train.config import TrainConfig
from reverie.train.data import ShardedSampler
from reverie.train.vae import VAETrainConfig, reconstruction_psnr, train_vae, vae_loss
from toy_data import Toy

ROOT = Path(__file__).resolve().parents[1]
PINNED = {"vae-f4": 954_475, "vae-f8": 2_998_187}
SMALL = dict(base_channels=8, norm_groups=4)


def perturb(module, seed=0, scale=0.05):
    """Add noise to every parameter so zero-initialized residual branches take part."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module


def small_vae(seed=0, **overrides):
    torch.manual_seed(seed)
    return perturb(AutoencoderKL(AutoencoderConfig(**{**SMALL, **overrides})), seed).eval()


def images(n, size=16, seed=0, channels=3):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --------------------------------------------------------------------------- network

@pytest.mark.parametrize("name", list(AUTOENCODER_PRESETS))
def test_preset_parameter_counts_and_latent_shapes(name):
    with torch.device("meta"):
        vae = create_network(name)  # the network factory knows the autoencoder presets too
        assert isinstance(vae, AutoencoderKL) and count_parameters(vae) == PINNED[name]
        posterior = vae.encode(torch.empty(2, 3, 64, 64))
        recon = vae.decode(posterior.mode())
    f = {"vae-f4": 4, "vae-f8": 8}[name]
    assert vae.config.downsample_factor == f
    assert posterior.mean.shape == posterior.logvar.shape == (2, 4, 64 // f, 64 // f)
    assert recon.shape == (2, 3, 64, 64)


@pytest.mark.parametrize("mult, f", [((1, 2, 2), 4), ((1, 2, 2, 2), 8)])
def test_latent_is_input_over_factor_also_non_square(mult, f):
    vae = small_vae(channel_mult=mult, latent_channels=3)
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    recon, posterior = vae(x, generator=torch.Generator().manual_seed(0))
    assert posterior.mean.shape == (2, 3, 32 // f, 48 // f)
    assert recon.shape == x.shape
    assert vae.config.latent_shape((3, 32, 48)) == (3, 32 // f, 48 // f)


@pytest.mark.parametrize("dims, shape, latent", [(1, (2, 16), (2, 8)), (3, (2, 3, 8, 8), (2, 3, 4, 4))])
def test_audio_and_video_shapes(dims, shape, latent):
    vae = small_vae(dims=dims, in_channels=shape[0], latent_channels=2, channel_mult=(1, 2))
    x = torch.randn(1, *shape)
    recon, posterior = vae(x)
    assert posterior.mean.shape == (1, *latent) and recon.shape == x.shape  # video keeps its frames


def test_config_round_trip_and_errors():
    cfg = AUTOENCODER_PRESETS["vae-f8"].replace(scaling_factor=0.5, shift_factor=0.1)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["arch"] == "vae" and AutoencoderConfig.from_dict(d) == cfg
    assert create_autoencoder("vae-f4", channel_mult=[1, 2]).config.channel_mult == (1, 2)  # lists from YAML
    with pytest.raises(ValueError, match="vae-f4, vae-f8"):
        create_autoencoder("vae-f16")
    with pytest.raises(ValueError, match="latent_channels"):
        create_autoencoder("vae-f4", z_channels=4)
    with pytest.raises(ValueError, match="norm_groups"):
        AutoencoderConfig(base_channels=12, norm_groups=8)
    with pytest.raises(ValueError, match="scaling_factor"):
        AutoencoderConfig(scaling_factor=0.0)
    vae = small_vae()
    with pytest.raises(ValueError, match="divisible by"):
        vae.encode(torch.zeros(1, 3, 18, 18))
    with pytest.raises(ValueError, match=r"\(B, 3, \*spatial\)"):
        vae.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 4, \*spatial\)"):
        vae.decode(torch.zeros(1, 3, 4, 4))


# --------------------------------------------------------------------------- posterior

def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, 5, 5, generator=g) * 2
    logvar = torch.randn(3, 4, 5, 5, generator=g) * 3
    ref = kl_divergence(Normal(mean.double(), (0.5 * logvar.double()).exp()), Normal(0.0, 1.0))
    kl = DiagonalGaussian(mean, logvar).kl()
    assert kl.shape == (3,)
    torch.testing.assert_close(kl.double(), ref.flatten(1).sum(1), rtol=1e-5, atol=1e-4)


def test_kl_is_zero_at_the_prior_and_logvar_is_clamped():
    assert torch.equal(DiagonalGaussian(torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)).kl(), torch.zeros(2))
    q = DiagonalGaussian(torch.zeros(1, 1, 1, 2), torch.tensor([[[[50.0, -80.0]]]]))
    assert q.logvar.flatten().tolist() == [20.0, -30.0]
    expected = 0.5 * ((math.exp(20) - 1 - 20) + (math.exp(-30) - 1 + 30))
    assert float(q.kl()) == pytest.approx(expected, rel=1e-6)


def test_sample_is_reparameterized_from_the_generator():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    q = DiagonalGaussian(mean, logvar)
    z = q.sample(torch.Generator().manual_seed(5))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(z, mean + (0.5 * logvar).exp() * eps)
    assert torch.equal(q.mode(), mean)
    # empirically N(mean, exp(logvar)): 4000 draws of a 1-element posterior
    q1 = DiagonalGaussian(torch.full((4000, 1), 0.7), torch.full((4000, 1), math.log(0.25)))
    draws = q1.sample(torch.Generator().manual_seed(1))
    assert abs(float(draws.mean()) - 0.7) < 4 * 0.5 / math.sqrt(4000)
    assert abs(float(draws.std()) - 0.5) < 0.03


def test_forward_is_deterministic_given_a_generator():
    vae, x = small_vae(), images(2)
    a = vae(x, generator=torch.Generator().manual_seed(3))
    b = vae(x, generator=torch.Generator().manual_seed(3))
    c = vae(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    recon, posterior = vae(x, sample_posterior=False)
    torch.testing.assert_close(recon, vae.decode(posterior.mean))


# --------------------------------------------------------------------------- latent scaling

def test_to_latent_and_from_latent_invert_the_scaling():
    vae, x = small_vae(), images(2)
    vae.set_latent_scaling(0.37, 0.2)
    with torch.no_grad():
        mode = vae.encode(x).mode()
        lat = vae.to_latent(x)
        torch.testing.assert_close(lat, (mode - 0.2) * 0.37)
        torch.testing.assert_close(vae.from_latent(lat), vae.decode(mode), rtol=1e-5, atol=1e-5)
        sampled = vae.to_latent(x, generator=torch.Generator().manual_seed(0), sample=True)
    assert not torch.equal(sampled, lat)
    assert vae.config.scaling_factor == 0.37 and vae.config.shift_factor == 0.2


def test_scaling_estimate_makes_latents_zero_mean_unit_std():
    vae = small_vae(seed=1)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 3, 16, 16, generator=g) * 0.6 + 0.1 for _ in range(4)]
    scale, shift = estimate_latent_scaling(vae, ({"image": b} for b in batches))  # dicts or tensors
    with torch.no_grad():
        raw = torch.cat([vae.encode(b).mode() for b in batches]).double()
    assert shift == pytest.approx(float(raw.mean()), rel=1e-6)
    assert scale == pytest.approx(1 / float(raw.std(unbiased=False)), rel=1e-6)
    vae.set_latent_scaling(scale, shift)
    with torch.no_grad():
        lat = torch.cat([vae.to_latent(b) for b in batches]).double()
        held_out = torch.cat([vae.to_latent(torch.randn(8, 3, 16, 16, generator=g) * 0.6 + 0.1) for _ in range(4)])
    assert abs(float(lat.mean())) < 1e-5 and float(lat.std(unbiased=False)) == pytest.approx(1.0, abs=1e-5)
    assert float(held_out.std()) == pytest.approx(1.0, abs=0.1)  # same distribution, other draws
    assert scale != pytest.approx(1.0, abs=0.1)  # the test data were not unit-std already
    assert estimate_latent_scaling(vae, batches, center=False)[1] == 0.0


# --------------------------------------------------------------------------- losses and PSNR

def test_vae_loss_is_ldm_sum_over_pixels():
    g = torch.Generator().manual_seed(0)
    x, recon = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    q = DiagonalGaussian(torch.randn(2, 4, 2, 2, generator=g), torch.randn(2, 4, 2, 2, generator=g))
    w = 0.01
    for kind, err in (("l1", (x - recon).abs()), ("l2", (x - recon).square())):
        loss, rec, kl = vae_loss(x, recon, q, kind, w)
        ldm = (err.flatten(1).sum(1) + w * q.kl()) / (3 * 8 * 8)
        torch.testing.assert_close(loss, ldm)
        torch.testing.assert_close(rec, err.flatten(1).mean(1))
    with pytest.raises(ValueError, match="l1 or l2"):
        vae_loss(x, recon, q, "huber")


class _Offset(torch.nn.Module):
    """Reconstructs x + offset: PSNR = 10 log10(1 / (offset / 2)^2) on [0, 1] images."""

    def __init__(self, offset):
        super().__init__()
        self.offset = torch.nn.Parameter(torch.tensor(offset))

    def encode(self, x):
        return DiagonalGaussian(x, torch.zeros_like(x))

    def decode(self, z):
        return z + self.offset


def test_reconstruction_psnr_closed_form():
    data = [{"image": torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(i)) - 0.5} for i in range(10)]
    assert reconstruction_psnr(_Offset(0.1), data, 10, batch_size=3) == pytest.approx(
        10 * math.log10(1 / 0.05**2), rel=1e-5)  # 26.02 dB
    # reconstructions are clamped to [-1, 1]: an offset of 3 gives errors (1 - x) / 2 exactly
    expected = sum(float(-10 * torch.log10(((1 - d["image"]) / 2).square().mean())) for d in data[:4]) / 4
    assert reconstruction_psnr(_Offset(3.0), data, 4) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="between 1 and the dataset size"):
        reconstruction_psnr(_Offset(0.1), data, 11)


def test_a_tiny_vae_overfits_a_few_images():
    from reverie.data import get_dataset

    ds = get_dataset("shapes", resolution=16)
    x = torch.stack([ds[i]["image"] for i in range(8)])
    data = [{"image": img} for img in x]
    torch.manual_seed(0)
    vae = AutoencoderKL(AutoencoderConfig(base_channels=16, channel_mult=(1, 2), norm_groups=8))
    before = reconstruction_psnr(vae, data, 8)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        recon, posterior = vae(x, generator=g)
        loss = vae_loss(x, recon, posterior)[0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = reconstruction_psnr(vae, data, 8)
    assert after > 24.0 and after > before + 10.0, (before, after)


# --------------------------------------------------------------------------- trainer

NET = "{base_channels: 8, channel_mult: [1, 2], norm_groups: 4}"
TINY = [f"--model.overrides={NET}", "--data.batch_size=4", "--data.resolution=16", "--train.progress=false",
        "--optim.warmup_steps=2", "--train.log_every=1", "--train.scaling_batches=2", "--eval.num_images=6"]


def _cfg(out, *extra):
    return load_config(VAETrainConfig, None, [*TINY, f"--train.out_dir={out}", *extra])


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae-straight")
    result = train_vae(_cfg(out, "--train.steps=8", "--train.checkpoint_every=4"), resume=False,
                       dataset=Toy(40), eval_dataset=Toy(6))
    return out, result


def test_trained_model_dir_reloads_with_identical_outputs(straight):
    out, result = straight
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["kind"] == "vae" and config["network"]["arch"] == "vae"
    vae = load_autoencoder(out / "model")
    assert vae.config == result.model.config and result.step == 8
    x = images(3)
    with torch.no_grad():
        assert torch.equal(vae.to_latent(x), result.model.eval().to_latent(x))
        assert torch.equal(vae.from_latent(torch.ones(1, 4, 8, 8)), result.model.from_latent(torch.ones(1, 4, 8, 8)))
    # the stored scaling is the estimate on the first 2 batches of epoch 0's order, recomputed here
    order = list(ShardedSampler(40, 0, 1, seed=0, epoch=0, shuffle=True))[:8]
    batches = [torch.stack([Toy(40)[i]["image"] for i in order[k:k + 4]]) for k in (0, 4)]
    scale, shift = estimate_latent_scaling(vae, batches)
    assert vae.config.scaling_factor == pytest.approx(scale, rel=1e-9) and scale != 1.0
    assert vae.config.shift_factor == pytest.approx(shift, rel=1e-9, abs=1e-12)
    assert config["metrics"]["psnr_db"] == pytest.approx(reconstruction_psnr(vae, Toy(6), 6), rel=1e-6)
    assert result.psnr_db == config["metrics"]["psnr_db"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 9))
    assert all(r["elapsed_s"] > 0 and r["kl"] > 0 for r in log)


def test_load_autoencoder_validates(straight, tmp_path):
    out, _ = straight
    bad = tmp_path / "bad"
    shutil.copytree(out / "model", bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["network"]["base_channels"] = 16
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="wrong shape"):
        load_autoencoder(bad)
    cfg["kind"] = "diffusion"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="is a diffusion model, not a vae model"):
        load_autoencoder(bad)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_autoencoder(tmp_path / "missing")


def test_resume_reproduces_uninterrupted_run(straight, tmp_path):
    out, _ = straight
    train_vae(_cfg(tmp_path, "--train.steps=4", "--train.checkpoint_every=4"), resume=False,
              dataset=Toy(40), eval_dataset=Toy(6))
    train_vae(_cfg(tmp_path, "--train.steps=8", "--train.checkpoint_every=4"), resume="auto",
              dataset=Toy(40), eval_dataset=Toy(6))
    a, b = load_file(str(out / "model" / "model.safetensors")), load_file(str(tmp_path / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    net_a, net_b = (json.loads((p / "model" / "config.json").read_text())["network"] for p in (out, tmp_path))
    assert net_a == net_b  # the same latent scaling, to the last bit
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 9))


def test_shipped_config_and_config_errors(tmp_path):
    cfg = load_config(VAETrainConfig, ROOT / "configs" / "vae-shapes-f4.yaml")
    assert cfg.kind == "vae" and cfg.data.name == "shapes" and cfg.data.resolution == 64
    preset = AUTOENCODER_PRESETS[cfg.model.preset]
    assert preset.downsample_factor == 4 and preset.latent_channels == 4
    with pytest.raises(ConfigError, match="kind"):
        load_config(TrainConfig, ROOT / "configs" / "vae-shapes-f4.yaml")  # not a diffusion config
    with pytest.raises(ConfigError, match="vae-f4, vae-f8"):
        load_config(VAETrainConfig, None, ["--model.preset=unet-tiny"])
    with pytest.raises(ConfigError, match="not divisible by the autoencoder's downsampling factor 32"):
        train_vae(_cfg(tmp_path, "--model.overrides={channel_mult: [1, 1, 1, 1, 1, 1], base_channels: 8, "
                       "norm_groups: 4}"), resume=False, dataset=Toy(8))
