"""Caption probes: does a text-to-image model's denoiser *use* a given part of the prompt?

Sampling-based adherence (``reverie.eval.adherence``) says how often generated images are right; it
cannot say whether a model ignores the relation words or knows them and fails to act on them. A probe
asks the denoiser directly, as a diffusion classifier does (Li et al. 2023, "Your diffusion model is
secretly a zero-shot classifier"; Clark & Jaini 2023): noise a real ``shapes`` image, denoise it once
under its true caption and once under a caption that differs in exactly one respect, and count how
often the true caption gives the smaller error ``|D(x0 + sigma n; caption) - x0|^2`` (same noise for
both). A model that ignores the altered words scores 0.5 at every noise level (ties count one half);
one that uses them scores near 1 at the noise levels where that information decides the image.

Probes (captions in the ``shapes`` vocabulary, "a <color> <shape>"):

- ``color`` / ``shape``: one object; another color / shape. Controls: any working model passes them.
- ``position``: one object with its 3x3 cell ("in the top left"); the cell mirrored through the
  center (center-cell images are left out).
- ``binding``: two objects and their relation; the two colors swapped between the objects (images
  whose two objects share a color or a shape are left out: there the swap is nothing, or the relation).
- ``relation``: two objects; the relation word inverted ("above" <-> "below").

``sigma`` is the VE noise level (``x = x0 + sigma * noise``, log-SNR ``-2 log sigma``): small sigmas
test detail, large ones the layout that sampling decides first.
"""

from __future__ import annotations

import random

import torch
from tqdm.auto import tqdm

from ..data.shapes import INVERSE_RELATION, POSITIONS, RELATIONS, ShapesDataset
from .adherence import _phrase as _np

PROBES = ("color", "shape", "position", "binding", "relation")
DEFAULT_SIGMAS = (0.3, 1.0, 2.0, 4.0, 8.0, 20.0)


def probe_pairs(kind: str, num_images: int = 256, seed: int = 2024, resolution: int = 32, **options
                ) -> tuple[torch.Tensor, list[str], list[str]]:
    """``(images [N, 3, R, R] in [-1, 1], true captions, altered captions)`` for probe ``kind``.

    Images come from ``ShapesDataset(seed=seed, **options)`` (``options``: a model's vocabulary, e.g.
    ``colors``; training uses other seeds by default); the altered caption differs from the true one in
    the probed attribute only."""
    if kind not in PROBES:
        raise ValueError(f"unknown probe {kind!r}; choose one of {', '.join(PROBES)}")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    two = kind in ("binding", "relation")
    options = {k: v for k, v in options.items() if k in ("shapes", "colors", "sizes", "gradient_prob")}
    ds = ShapesDataset(resolution=resolution, min_objects=2 if two else 1, max_objects=2 if two else 1,
                       seed=seed, **options)
    color_ids, shape_ids = ds.colors, ds.shapes
    rng = random.Random(f"reverie.probe/{kind}/{seed}")
    images, true, altered = [], [], []
    index = 0
    while len(images) < num_images:
        item = ds[index]
        index += 1
        color = item["objects"]["color"].tolist()
        shape = item["objects"]["shape"].tolist()
        if two:
            # Swapping equal colors changes nothing, and between equal shapes it is the relation inverted.
            if kind == "binding" and (color[0] == color[1] or shape[0] == shape[1]):
                continue
            rel = item["relation"]
            a, b = _np(color[0], shape[0]), _np(color[1], shape[1])
            true_text = f"{a} {RELATIONS[rel]} {b}"
            if kind == "relation":
                other = f"{a} {RELATIONS[INVERSE_RELATION[rel]]} {b}"
            else:
                other = f"{_np(color[1], shape[0])} {RELATIONS[rel]} {_np(color[0], shape[1])}"
        else:
            c, s, p = color[0], shape[0], int(item["objects"]["position"][0])
            if kind == "position":
                if p == 4:  # the center cell has no mirror image
                    continue
                true_text, other = f"{_np(c, s)} {POSITIONS[p]}", f"{_np(c, s)} {POSITIONS[8 - p]}"
            elif kind == "color":
                true_text = _np(c, s)
                other = _np(rng.choice([k for k in color_ids if k != c] or [c]), s)
            else:
                true_text = _np(c, s)
                other = _np(c, rng.choice([k for k in shape_ids if k != s] or [s]))
        images.append(item["image"])
        true.append(true_text)
        altered.append(other)
    return torch.stack(images), true, altered


@torch.no_grad()
def caption_probe(denoiser, kinds=PROBES, num_images: int = 256, sigmas=DEFAULT_SIGMAS, repeats: int = 1,
                  seed: int = 0, batch_size: int = 256, progress: bool = True, resolution: int = 32,
                  data_options: dict | None = None) -> dict:
    """Run the probes ``kinds`` against ``denoiser`` (``D(x, sigma, text=[...]) -> x0_hat``, e.g.
    ``Pipeline.denoiser``). Returns ``{"sigmas", "num_images", "repeats", "probes": {kind: {"accuracy":
    [per sigma], "mean_accuracy", "stderr": [per sigma], "error_ratio": [per sigma]}}}``: ``accuracy`` is
    the share of (image, noise draw) pairs where the true caption denoises better (ties 1/2), ``stderr`` its
    binomial standard error, ``error_ratio`` the mean altered error over the mean true error (1.0: the words
    do nothing). Noise is drawn per (probe, sigma, repeat) from ``seed``, so a probe's figures do not
    depend on which other probes ran. ``resolution`` / ``data_options`` (``ShapesDataset`` vocabulary
    options) describe the images the model was trained on."""
    if repeats < 1 or batch_size < 1 or not sigmas or any(s <= 0 for s in sigmas):
        raise ValueError("need repeats >= 1, batch_size >= 1 and positive sigmas")
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    params = denoiser.parameters() if isinstance(denoiser, torch.nn.Module) else ()
    device = next((p.device for p in params), torch.device("cpu"))
    out = {"sigmas": [float(s) for s in sigmas], "num_images": num_images, "repeats": repeats, "probes": {}}
    work = [(kind, sigma) for kind in kinds for sigma in sigmas]
    pairs = {kind: probe_pairs(kind, num_images, resolution=resolution, **(data_options or {})) for kind in kinds}
    bar = tqdm(total=len(work) * repeats, desc="probe", disable=not progress)
    for kind in kinds:
        x0, true, altered = pairs[kind]
        acc, err_bars, ratio = [], [], []
        for i, sigma in enumerate(sigmas):
            wins, errors = [], [[], []]
            for r in range(repeats):
                generator = torch.Generator().manual_seed(seed * 1_000_003 + PROBES.index(kind) * 10_007 + i * 101 + r)
                noise = torch.randn(x0.shape, generator=generator)
                for k in range(0, len(x0), batch_size):
                    clean = x0[k: k + batch_size].to(device)
                    x = clean + sigma * noise[k: k + batch_size].to(device)
                    s = torch.full((len(x),), float(sigma), device=device)
                    err = [((denoiser(x, s, text=texts[k: k + batch_size]) - clean) ** 2).flatten(1).mean(1)
                           .double().cpu() for texts in (true, altered)]
                    wins.append((err[0] < err[1]).double() + 0.5 * (err[0] == err[1]).double())
                    errors[0].append(err[0])
                    errors[1].append(err[1])
                bar.update()
            won = torch.cat(wins)
            acc.append(won.mean().item())
            err_bars.append((won.var(unbiased=False) / len(won)).sqrt().item())
            ratio.append((torch.cat(errors[1]).mean() / torch.cat(errors[0]).mean().clamp_min(1e-12)).item())
        out["probes"][kind] = {"accuracy": acc, "mean_accuracy": sum(acc) / len(acc), "stderr": err_bars,
                               "error_ratio": ratio}
    bar.close()
    return out
