"""Latent diffusion plumbing: train and sample a diffusion model in a KL autoencoder's latent space.

Rombach et al. 2022 ("High-Resolution Image Synthesis with Latent Diffusion Models"): a frozen
autoencoder (``reverie.nets.autoencoder``, trained by ``reverie train-vae``) maps images to latents
``to_latent(x) = (z - shift) * scale`` with the scale measured on data; the diffusion model is trained
and sampled on those latents exactly as on pixels, and its samples are decoded with ``from_latent``.

A training config opts in with ``model.autoencoder: PATH`` (a VAE model directory, loaded by
``reverie.build.load_autoencoder``). Then:

- The network is built for the latent shape (``latent_info``): ``in_channels`` / ``resolution`` of
  the dataset info become the latent channels and ``resolution / f``; the image shape is kept under
  ``image_channels`` / ``image_resolution``.
- Each training batch is encoded with the frozen VAE (``encode_batch``): a posterior sample, as LDM
  trains (``model.latent_sample: false`` uses the posterior mean). With ``data.cache_latents: true``
  the posterior moments (mean, log-variance) of every item of a finite dataset are computed once in
  batches before training (``LatentCache``) and each step only draws the Gaussian sample: the VAE
  encoder leaves the training step. The cache freezes per-item randomness of the image pipeline
  (e.g. random flips), which is why it is an option and not the default; its cost and benefit are
  measured by ``benchmarks/latent_vs_pixel.py``.
- The exported model directory holds a copy of the autoencoder in ``autoencoder/`` (so the model
  directory is self-contained), and ``Pipeline`` decodes samples to images.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm


def latent_info(info: dict, vae) -> dict:
    """Dataset info for the network in latent space (the image shape kept as ``image_*``)."""
    factor = vae.config.downsample_factor
    if info["resolution"] % factor:
        raise ValueError(f"image resolution {info['resolution']} is not divisible by the autoencoder's factor {factor}")
    if info["in_channels"] != vae.config.in_channels:
        raise ValueError(f"the data have {info['in_channels']} channels, the autoencoder expects "
                         f"{vae.config.in_channels}")
    return {**info, "in_channels": vae.config.latent_channels, "resolution": info["resolution"] // factor,
            "image_channels": info["in_channels"], "image_resolution": info["resolution"], "latent": True}


def image_shape(info: dict) -> tuple[int, int, int]:
    """``(C, H, W)`` of the images a model with dataset ``info`` produces (decoded, for latent models)."""
    channels = info.get("image_channels", info["in_channels"])
    resolution = info.get("image_resolution", info["resolution"])
    return (channels, info.get("image_height", resolution), info.get("image_width", resolution))


class LatentCache(Dataset):
    """A dataset's items with the image replaced by the VAE posterior's moments ``[2 z, h, w]``
    (mean and log-variance stacked on channels), computed once in batches; the other fields (label,
    caption) are kept in memory, so a training step never touches the image pipeline."""

    def __init__(self, dataset, vae, batch_size: int = 64, progress: bool = True):
        try:
            size = len(dataset)
        except TypeError as err:
            raise ValueError("data.cache_latents needs a finite dataset") from err
        if size > 500_000:
            raise ValueError(f"data.cache_latents on {size} items would not fit in memory; use a finite "
                             f"subset (e.g. data.options.length) or encode on the fly")
        self.num_classes = int(getattr(dataset, "num_classes", 0) or 0)
        device = next(vae.parameters()).device
        chunks, self.items = [], []
        with torch.no_grad():
            for start in tqdm(range(0, size, batch_size), desc="caching latents", disable=not progress, leave=False):
                items = [dataset[i] for i in range(start, min(start + batch_size, size))]
                post = vae.encode(torch.stack([it["image"] for it in items]).to(device))
                chunks.append(torch.cat([post.mean, post.logvar], 1).float().cpu())
                self.items.extend({k: v for k, v in it.items() if k != "image"} for it in items)
        self.moments = torch.cat(chunks)

    def __len__(self) -> int:
        return self.moments.shape[0]

    def __getitem__(self, index: int) -> dict:  # no image is loaded: labels and captions are cached too
        return {**self.items[index], "moments": self.moments[index]}


@torch.no_grad()
def encode_batch(vae, batch: dict, generator: torch.Generator | None, sample: bool = True) -> torch.Tensor:
    """Diffusion-space latents of a training batch: from cached moments or by encoding its images."""
    cfg = vae.config
    if "moments" in batch:
        mean, logvar = batch["moments"].chunk(2, dim=1)
        z = mean
        if sample:
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise.to(mean.device)
        return (z - cfg.shift_factor) * cfg.scaling_factor
    device = next(vae.parameters()).device
    return vae.to_latent(batch["image"].to(device), generator=generator, sample=sample)
