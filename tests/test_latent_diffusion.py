"""Latent diffusion end to end: VAE -> diffusion on its latents -> Pipeline / CLI decode to images."""

import json

import pytest
import torch

from reverie.build import load_autoencoder
from reverie.cli import main
from reverie.configs import load_config
from reverie.latent import LatentCache, encode_batch, latent_info
from reverie.pipeline import Pipeline
from reverie.train import TrainingError, VAETrainConfig, train, train_vae
from reverie.train.config import TrainConfig
from reverie.train.data import collate

VAE_NET = "{base_channels: 8, channel_mult: [1, 2], norm_groups: 4}"
NET = "{model_channels: 8, channel_mult: [1, 2], attention_resolutions: [4], head_channels: 8}"
TEXT = "{width: 32, depth: 1, num_heads: 2, pooled_dim: 32, max_length: 16, num_buckets: 64}"


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    cfg = load_config(VAETrainConfig, None, [
        f"--model.overrides={VAE_NET}", "--data.batch_size=4", "--data.resolution=16", "--train.progress=false",
        "--optim.warmup_steps=2", "--train.scaling_batches=2", "--eval.num_images=4", "--train.steps=3",
        f"--train.out_dir={out}", "--train.checkpoint_every=0", "--data.options={length: 64}"])
    return train_vae(cfg, resume=False).export_dir


def _ldm_cfg(vae_dir, out, *extra):
    return load_config(TrainConfig, None, [
        f"--model.network_overrides={NET}", "--model.conditioning=text", f"--model.text_encoder_options={TEXT}",
        f"--model.autoencoder={vae_dir}", "--data.resolution=16", "--data.batch_size=4",
        "--data.options={length: 32}", "--train.steps=3", "--train.checkpoint_every=3", "--sample.every=0",
        "--train.progress=false", f"--train.out_dir={out}", *extra])


def test_latent_info_and_errors(vae_dir):
    vae = load_autoencoder(vae_dir)
    info = latent_info({"in_channels": 3, "resolution": 16, "num_classes": 0}, vae)
    assert (info["in_channels"], info["resolution"]) == (vae.config.latent_channels, 8)
    assert (info["image_channels"], info["image_resolution"]) == (3, 16)
    with pytest.raises(ValueError, match="not divisible"):
        latent_info({"in_channels": 3, "resolution": 15, "num_classes": 0}, vae)
    with pytest.raises(ValueError, match="channels"):
        latent_info({"in_channels": 1, "resolution": 16, "num_classes": 0}, vae)


def test_cached_moments_give_the_same_latents_as_encoding(vae_dir):
    from reverie.data import get_dataset

    vae = load_autoencoder(vae_dir)
    data = get_dataset("shapes", resolution=16, length=10)
    cached = LatentCache(data, vae, batch_size=3, progress=False)
    items = [cached[i] for i in range(5)]
    assert "image" not in items[0] and items[0]["text"] == data[0]["text"]
    batch_cached = collate(items)
    batch_images = collate([data[i] for i in range(5)])
    # Posterior means agree (batching may move the last bits), and samples use the generator the same way.
    a = encode_batch(vae, batch_cached, None, sample=False)
    b = encode_batch(vae, batch_images, None, sample=False)
    assert torch.allclose(a, b, atol=1e-5)
    s1 = encode_batch(vae, batch_cached, torch.Generator().manual_seed(0), sample=True)
    s2 = encode_batch(vae, batch_images, torch.Generator().manual_seed(0), sample=True)
    assert torch.allclose(s1, s2, atol=1e-4) and not torch.allclose(s1, a)


@pytest.mark.parametrize("cache", [False, True])
def test_ldm_trains_exports_and_generates_images(vae_dir, tmp_path, cache):
    cfg = _ldm_cfg(vae_dir, tmp_path / "run", f"--data.cache_latents={str(cache).lower()}")
    result = train(cfg, resume=False)
    model_dir = result.export_dir
    config = json.loads((model_dir / "config.json").read_text())
    assert config["autoencoder"] == "autoencoder" and (model_dir / "autoencoder" / "model.safetensors").is_file()
    assert config["network"]["in_channels"] == 4 and config["data"]["resolution"] == 8

    pipe = Pipeline.from_pretrained(model_dir)
    images = pipe.sample(num_images=2, steps=3, prompts=["a red circle"], guidance_scale=2.0)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    assert images.min() >= -1 and images.max() <= 1
    assert pipe.image_shape == (3, 16, 16)
    # A grid tuned to a latent model works in latent space and drives sampling like any grid.
    tuned = pipe.tune_grid("dpmpp_2m", 2, pilot=1, teacher_steps=3, prompts=["a red circle"], guidance_scale=2.0,
                           max_sweeps=1)
    tuned_images = pipe.sample(num_images=1, grid=tuned.sigmas, prompts=["a red circle"], guidance_scale=2.0)
    assert tuned_images.shape == (1, 3, 16, 16) and torch.isfinite(tuned_images).all()
    # The model directory is self-contained: the VAE copy decodes exactly like the original.
    z = torch.randn(1, 4, 8, 8)
    assert torch.equal(pipe.vae.from_latent(z), load_autoencoder(vae_dir).from_latent(z))

    out = tmp_path / "gen.png"
    assert main(["generate", "a blue square", "--model", str(model_dir), "--num-images", "1", "--steps", "2",
                 "-o", str(out)]) == 0
    from PIL import Image

    assert Image.open(out).size == (16, 16)


def test_export_of_a_latent_checkpoint_and_config_errors(vae_dir, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    vae_copy = tmp_path / "vae"
    shutil.copytree(vae_dir, vae_copy)
    cfg = _ldm_cfg(vae_copy, tmp_path / "run")
    train(cfg, resume=False)
    assert main(["export", str(tmp_path / "run"), "-o", str(tmp_path / "exported")]) == 0
    pipe = Pipeline.from_pretrained(tmp_path / "exported")
    assert pipe.vae is not None and pipe.sample(num_images=1, steps=2).shape == (1, 3, 16, 16)
    # An autoencoder retrained in place is refused, never silently decoded with.
    weights = load_file(str(vae_copy / "model.safetensors"))
    first = next(iter(weights))
    weights[first] = weights[first] + 0.01
    save_file(weights, str(vae_copy / "model.safetensors"))
    assert main(["export", str(tmp_path / "run"), "-o", str(tmp_path / "again")]) == 2
    assert "is not the autoencoder" in capsys.readouterr().err
    with pytest.raises(TrainingError, match="is not the autoencoder"):
        train(_ldm_cfg(vae_copy, tmp_path / "run", "--train.steps=4"))
    # A VAE directory is not a diffusion model; cache_latents without an autoencoder is a config error.
    with pytest.raises(ValueError, match="is a vae model, not a diffusion model"):
        Pipeline.from_pretrained(vae_dir)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert main(["train", str(empty), "--data.cache_latents=true", "--dry-run"]) == 2
    assert "cache_latents needs model.autoencoder" in capsys.readouterr().err
