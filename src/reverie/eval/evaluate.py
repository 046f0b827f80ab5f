"""Evaluate a model on several metrics at once: what ``reverie eval`` computes, callable from benchmarks.

``evaluate(pipe, metrics, options, settings)`` returns one dict of results: FID / KID / precision-recall
of generated images against the reference data (``eval.fid``), bits/dim (ELBO and probability-flow ODE),
prompt adherence (``eval.adherence``) and the caption probe (``eval.probe``). ``result_rows`` turns it
into the table the CLI prints. Every check that would otherwise fail only after the long sample-based
metrics is done first (:func:`check_metrics`).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch

from ..data import DATASETS, get_dataset
from ..likelihood import nll_bits_per_dim
from ..likelihood_ode import ode_bits_per_dim
from ..mulan import negative_elbo
from ..provenance import watermark_noise
from ..sampling import SamplingOptions
from ..sde import discretize, is_sde
from ..vdm import VDMScheduleView, continuous_elbo
from . import EVAL_METRICS, SAMPLE_METRICS
from .adherence import evaluate_adherence
from .fid import dataset_reference, evaluate_samples, get_inception, inception_path, reference_indices, sample_features
from .probe import caption_probe


@dataclass
class EvalSettings:
    """What to measure on: counts, the reference data, and metric-specific options."""

    n: int = 2000                 # generated images for fid / kid / pr
    batch_size: int = 100         # images per sampling batch
    ref: str | None = None        # reference dataset (default: the model's training data)
    ref_split: str = "test"
    ref_root: str | None = None   # imagefolder reference
    ref_n: int = 10_000
    device: str = "cpu"
    fid_precision: str = "fp32"   # the Inception network's precision: fp32 (standard) | bf16 (2.4x faster on AMX)
    per_prompt: int = 4           # adherence: images per prompt
    layout: str = "auto"          # adherence of a layout model: auto | none | only
    paraphrase: bool = False
    nll_n: int = 64
    probe_n: int = 256
    progress: bool = True
    watermark: bool = False       # fid / adherence: start from Tree-Ring-watermarked noise (the user's key)


def parse_metrics(text: str) -> list[str]:
    metrics = [m.strip() for m in text.split(",") if m.strip()]
    unknown = sorted(set(metrics) - set(EVAL_METRICS))
    if not metrics or unknown:
        raise ValueError(f"unknown metric(s) {unknown}; available: {', '.join(EVAL_METRICS)}")
    return metrics


def check_metrics(pipe, metrics: list[str], settings: EvalSettings) -> None:
    """Refuse at once what a metric cannot do with this model."""
    if "nll" in metrics and (pipe.vae is not None or pipe.conditioning != "none"):
        raise ValueError("nll needs an unconditional pixel-space model")
    if "nll" in metrics and pipe.cfg.model.process != "gaussian":
        raise ValueError(f"nll needs a Gaussian diffusion model, not model.process={pipe.cfg.model.process}")
    for name in ("adherence", "probe"):
        if name in metrics and pipe.conditioning != "text":
            raise ValueError(f"{name} needs a text-conditioned model")
    if "probe" in metrics and (pipe.vae is not None or pipe.cfg.data.name != "shapes"):
        raise ValueError("probe needs a pixel-space model trained on shapes (it denoises real shapes images)")
    if any(m in metrics for m in (*SAMPLE_METRICS, "nll")):
        reference_spec(pipe, settings)
    if any(m in metrics for m in SAMPLE_METRICS):
        inception_path()  # installed? (else one line saying how, before any sampling)


def reference_spec(pipe, settings: EvalSettings) -> tuple[str, dict]:
    """(dataset name, options) of the reference images: ``settings.ref``, else the model's training data
    (its test split where the dataset has one; a fresh draw of a procedural one)."""
    name = settings.ref or pipe.cfg.data.name
    if name not in DATASETS:
        raise ValueError(f"unknown reference dataset {name!r}; available: {', '.join(sorted(DATASETS))}")
    options = dict(pipe.cfg.data.options) if name == pipe.cfg.data.name else {}
    options.pop("random_flip", None)  # no augmentation in a reference
    if settings.ref_root:
        options["root"] = settings.ref_root
    if name == "imagefolder" and "root" not in options:
        raise ValueError("--ref imagefolder needs --ref-root DIR")
    params = inspect.signature(DATASETS[name]).parameters
    if "split" in params:
        options["split"] = settings.ref_split
    elif "seed" in params and name == pipe.cfg.data.name:
        options["seed"] = int(options.get("seed", 0)) + 1  # procedural data: a held-out draw, not the training one
    return name, options


def sample_metrics(pipe, metrics: list[str], options: SamplingOptions, settings: EvalSettings) -> dict:
    """FID / KID / precision-recall of ``settings.n`` samples against the reference's Inception features."""
    name, data_options = reference_spec(pipe, settings)
    resolution = pipe.image_shape[-1]
    ref = dataset_reference(name, resolution=resolution, n=settings.ref_n, device=settings.device,
                            precision=settings.fid_precision, progress=settings.progress, **data_options)
    prompts = None
    if pipe.conditioning == "text":  # captions of the reference images, as COCO FID does
        data = get_dataset(name, resolution=resolution, **data_options)
        idx = reference_indices(len(data), min(settings.ref_n, len(data)))
        prompts = [data[idx[i % len(idx)]]["text"] for i in range(settings.n)]
    drawn = {"start": 0}
    key = _watermark_key(settings)

    def start_noise(num: int, seed: int):  # None: the seed's plain noise
        return None if key is None else watermark_noise(pipe, num, seed, key=key)[0]

    def draw(num: int, seed: int):
        start = drawn["start"]
        drawn["start"] += num
        labels = torch.arange(start, start + num) % pipe.info["num_classes"] if pipe.conditioning == "class" else None
        return pipe.sample(num, options, seed=seed, class_labels=labels,
                           prompts=prompts[start:start + num] if prompts else None, noise=start_noise(num, seed))

    feats = sample_features(draw, settings.n, batch_size=settings.batch_size, seed=options.seed,
                            desc=f"sampling {pipe.name}",
                            extractor=get_inception(settings.device, settings.fid_precision),
                            progress=settings.progress)
    res = evaluate_samples(feats, ref, tuple(m for m in metrics if m in SAMPLE_METRICS))
    res["reference"] = f"{name} {data_options.get('split', '')}".strip()
    return res


@torch.no_grad()
def _continuous_elbo_bpd(denoiser, x0, generator, progress=False, schedule=None, mulan=False):
    """Per-image negative ELBO in bits/dim of a VDM model (``reverie.vdm.continuous_elbo``, its own schedule)
    or a MuLAN model (``reverie.mulan.negative_elbo``, one latent and one t per image)."""
    if mulan:
        return negative_elbo(denoiser.net, x0, generator).bits_per_dim()
    return continuous_elbo(denoiser, x0, schedule, generator).bits_per_dim()


def _watermark_key(settings: EvalSettings) -> bytes | None:
    """The Tree-Ring key the samples carry (``settings.watermark``; ``reverie generate``'s default), or None."""
    from ..provenance.keys import watermark_key

    return watermark_key() if settings.watermark else None


def nll_metrics(pipe, settings: EvalSettings, seed: int = 0) -> dict:
    """Bits/dim of ``settings.nll_n`` reference images: the discrete ELBO (VP models) and the exact
    probability-flow ODE likelihood (Hutchinson trace, dequantized: an upper bound on the discrete NLL)."""
    name, options = reference_spec(pipe, settings)
    data = get_dataset(name, resolution=pipe.image_shape[-1], **options)
    n, batch = min(settings.nll_n, len(data)), settings.batch_size
    x0 = torch.stack([data[i]["image"] for i in range(n)])
    res: dict = {"n": n, "reference": f"{name} {options.get('split', '')}".strip()}

    def mean_sem(bits_per_dim, key):
        g = torch.Generator().manual_seed(seed)
        bpd = torch.cat([bits_per_dim(pipe.denoiser, x0[i:i + batch], generator=g, progress=settings.progress)
                         for i in range(0, n, batch)])
        res[key], res[key + "_sem"] = float(bpd.mean()), float(bpd.std() / n**0.5) if n > 1 else 0.0

    if hasattr(pipe.net, "mulan_config"):  # MuLAN: its own ELBO (latent KL included); the ODE needs a latent
        mean_sem(functools.partial(_continuous_elbo_bpd, mulan=True), "elbo_bpd")
        res["ode_bpd"] = None
        return res
    if isinstance(pipe.schedule, VDMScheduleView):  # a learned schedule: the continuous-time ELBO
        mean_sem(functools.partial(_continuous_elbo_bpd, schedule=pipe.net.gamma), "elbo_bpd")
    elif pipe.cfg.model.prediction == "edm":
        res["elbo_bpd"] = None  # no discrete chain to bound
    elif is_sde(pipe.schedule):  # the ELBO of the SDE's 1000-level discretization (reverie.sde.discretize)
        mean_sem(functools.partial(nll_bits_per_dim, schedule=discretize(pipe.schedule)), "elbo_bpd")
    else:
        mean_sem(nll_bits_per_dim, "elbo_bpd")
    mean_sem(ode_bits_per_dim, "ode_bpd")
    return res


def evaluate(pipe, metrics: list[str], options: SamplingOptions | None = None,
             settings: EvalSettings | None = None) -> dict:
    """Every metric of ``metrics`` for ``pipe`` (a ``Pipeline``) under one set of sampling options."""
    settings = settings or EvalSettings()
    options = (options or SamplingOptions()).resolve(pipe.cfg)
    check_metrics(pipe, metrics, settings)
    results = {"model": pipe.name, "model_hash": pipe.weights_hash, "sampler": options.sampler,
               "steps": options.steps, "grid": options.grid if isinstance(options.grid, str) else "explicit",
               "seed": options.seed, "guidance": options.guidance_scale if pipe.conditioning != "none" else None,
               "watermark": "tree-ring" if settings.watermark else "off"}
    if any(m in SAMPLE_METRICS for m in metrics):
        results.update(sample_metrics(pipe, metrics, options, settings))
    if "nll" in metrics:
        results["nll"] = nll_metrics(pipe, settings, options.seed)
    if "adherence" in metrics:
        results["adherence"] = evaluate_adherence(
            pipe, num_per_prompt=settings.per_prompt, steps=options.steps, sampler=options.sampler,
            guidance_scale=options.guidance_scale, seed=options.seed, grid=options.grid,
            paraphrased=settings.paraphrase, layouts=settings.layout, progress=settings.progress,
            watermark_key=_watermark_key(settings))
    if "probe" in metrics:
        results["probe"] = caption_probe(pipe.denoiser, num_images=settings.probe_n, seed=options.seed,
                                         batch_size=settings.batch_size, resolution=pipe.cfg.data.resolution,
                                         data_options=pipe.cfg.data.options, progress=settings.progress)
    return results


def result_rows(results: dict, settings: EvalSettings, takes_layouts: bool = False) -> list[tuple[str, str, str]]:
    """(label, value, what it was measured on) rows of :func:`evaluate`'s results, for printing."""
    rows = []
    if "n_ref" in results:
        where = f"{results['n']} samples vs {results['n_ref']} {results['reference']} images"
        if "fid" in results:
            rows.append(("FID", f"{results['fid']:.3f}", where))
        if "kid" in results:
            rows.append(("KID", f"{results['kid']:.5f} +- {results['kid_std']:.5f}", where))
        if "precision" in results:
            rows.append(("precision", f"{results['precision']:.3f}", where + ", k=3"))
            rows.append(("recall", f"{results['recall']:.3f}", where + ", k=3"))
    res = results.get("nll") or {}
    for key, label in (("elbo_bpd", "NLL (ELBO)"), ("ode_bpd", "NLL (PF-ODE)")):
        if res.get(key) is not None:
            rows.append((label, f"{res[key]:.4f} bits/dim", f"{res['n']} {res['reference']} images"))
    if "adherence" in results:
        rows += _adherence_rows(results["adherence"], results["guidance"], settings, takes_layouts)
    if "probe" in results:
        res = results["probe"]
        sigmas = " ".join(f"{s:g}" for s in res["sigmas"])
        for kind, r in res["probes"].items():
            per_sigma = " ".join(f"{a:.2f}" for a in r["accuracy"])
            rows.append((f"probe {kind}", f"{r['mean_accuracy']:.3f}",
                         f"true caption wins (0.5: words ignored; s.e. <= {max(r['stderr']):.2f}), "
                         f"{res['num_images']} images; at sigma {sigmas}: {per_sigma}"))
    return rows


def _adherence_rows(res: dict, guidance, settings: EvalSettings, takes_layouts: bool) -> list:
    kind = "paraphrased held-out" if settings.paraphrase else "held-out"
    where = f"{res['num_images']} images, {res['num_prompts']} {kind} prompts, guidance {guidance}"
    if takes_layouts:
        where += f", layouts {settings.layout}"
    rows = []
    for key in ("color_accuracy", "shape_accuracy", "relation_accuracy", "count_accuracy", "all_correct",
                "pair_count_accuracy", "relation_accuracy_when_drawn"):
        value = res.get(key)
        rows.append((key, "n/a" if value is None else f"{value:.3f}", where))
    two = res.get("two_object") or {}
    for key in ("color_accuracy", "shape_accuracy", "all_correct"):
        if two.get(key) is not None:
            rows.append((f"two-object {key}", f"{two[key]:.3f}", f"{two['num_images']} images of 2-object prompts"))
    return rows
