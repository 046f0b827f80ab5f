"""The ``reverie`` command: train, sample, inspect, and preview data.

User mistakes (bad config keys or values, missing files, unknown samplers) print one line
``reverie: error: ...`` and exit with status 2; they never show a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .configs import ConfigError


def _cmd_train(args) -> int:
    from .configs import load_config, to_dict
    from .train.config import TrainConfig

    cfg = load_config(TrainConfig, args.config, args.overrides)
    if args.dry_run:
        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    from .train.loop import train

    resume = {"auto": "auto", "no": False}.get(args.resume, args.resume)
    result = train(cfg, resume=resume)
    print(f"model written to {result.export_dir}")
    return 0


def _cmd_train_vae(args) -> int:
    from .configs import load_config, to_dict
    from .train.vae import VAETrainConfig

    cfg = load_config(VAETrainConfig, args.config, args.overrides)
    if args.dry_run:
        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    from .train.vae import train_vae

    resume = {"auto": "auto", "no": False}.get(args.resume, args.resume)
    result = train_vae(cfg, resume=resume)
    psnr = f" (held-out PSNR {result.psnr_db:.2f} dB)" if result.psnr_db is not None else ""
    print(f"autoencoder written to {result.export_dir}{psnr}")
    return 0


DEFAULT_MODEL = Path(__file__).parent / "assets" / "shapes-t2i"
MAX_STEPS, MAX_IMAGES, MAX_GUIDANCE = 1000, 64, 50.0


def _generation_params(args) -> dict:
    if args.from_png:
        from PIL import Image

        src = Path(args.from_png)
        if not src.is_file():
            raise FileNotFoundError(f"{src} not found")
        meta = Image.open(src).text.get("reverie") if src.suffix.lower() == ".png" else None
        if not meta:
            raise ValueError(f"{src} carries no reverie generation parameters")
        return json.loads(meta)
    _resolve_grid(args, default_steps=20)
    grid = args.grid if args.grid is None or isinstance(args.grid, str) else [float(v) for v in args.grid]
    return {"prompt": args.prompt or "", "negative_prompt": args.negative_prompt, "seed": args.seed,
            "sampler": args.sampler, "steps": args.steps, "guidance": args.guidance,
            "guidance_rescale": args.guidance_rescale, "num_images": args.num_images,
            "layout": _layout_arg(args.layout), "grid": grid}


def _layout_arg(value: str):
    """--layout: auto, none, or a JSON list of [phrase, [x0, y0, x1, y1]] (inline or a file) for every image."""
    if value in ("auto", "none"):
        return value
    from .layout import check_layout

    text = Path(value).read_text() if Path(value).suffix == ".json" and Path(value).is_file() else value
    try:
        layout = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"--layout must be auto, none, or a JSON list like "
                         f"'[[\"red circle\", [0.1, 0.1, 0.4, 0.4]]]', got {value!r}") from None
    return [[phrase, list(box)] for phrase, box in check_layout(layout, "--layout")]


def _validate_generation(p: dict) -> None:
    from .samplers import SAMPLERS

    if p["sampler"] not in SAMPLERS:
        raise ValueError(f"unknown sampler {p['sampler']!r}; choose one of {', '.join(sorted(SAMPLERS))}")
    if not 1 <= p["steps"] <= MAX_STEPS:
        raise ValueError(f"--steps must be between 1 and {MAX_STEPS}, got {p['steps']}")
    if not 1 <= p["num_images"] <= MAX_IMAGES:
        raise ValueError(f"--num-images must be between 1 and {MAX_IMAGES}, got {p['num_images']}")
    if not 0 <= p["guidance"] <= MAX_GUIDANCE:
        raise ValueError(f"--guidance must be between 0 and {MAX_GUIDANCE}, got {p['guidance']}")
    if not 0 <= p["guidance_rescale"] <= 1:
        raise ValueError(f"--guidance-rescale must be between 0 and 1, got {p['guidance_rescale']}")
    grid = p.get("grid")
    if isinstance(grid, list) and len(grid) != p["steps"] + 1:
        raise ValueError(f"the stored grid has {len(grid) - 1} steps, not {p['steps']}")


def _grid_param(p: dict):
    """generate's ``grid``: None (the model's), a kind, or the stored sigmas of a tuned grid as a tensor."""
    import torch

    grid = p.get("grid")  # PNGs from before --grid have none
    return torch.tensor(grid, dtype=torch.float64) if isinstance(grid, list) else grid


def _layouts(params: dict):
    """generate's ``layouts``: auto / none (PNGs from before layouts: auto), or the one given for every image."""
    layout = params.get("layout", "auto")
    return layout if isinstance(layout, str) else [layout]


def _save_png(image, path: Path, params: dict) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("reverie", json.dumps(params, sort_keys=True))
    info.add_text("parameters", ", ".join(f"{k}: {v}" for k, v in sorted(params.items())))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=info)


def _cmd_generate(args) -> int:
    import time

    from .images import make_grid
    from .pipeline import Pipeline

    params = _generation_params(args)
    _validate_generation(params)
    model_dir = Path(args.model) if args.model else DEFAULT_MODEL
    pipe = Pipeline.from_pretrained(model_dir)
    if params.get("model_hash") and params["model_hash"] != pipe.weights_hash:
        print(f"reverie: warning: {args.from_png} was made by model {params.get('model')} "
              f"({params['model_hash']}), not {pipe.name} ({pipe.weights_hash})", file=sys.stderr)
    params.update(model=pipe.name, model_hash=pipe.weights_hash)
    start = time.perf_counter()
    images = pipe.generate(params["prompt"], num_images=params["num_images"], steps=params["steps"],
                           sampler=params["sampler"], guidance_scale=params["guidance"],
                           negative_prompt=params["negative_prompt"], seed=params["seed"],
                           guidance_rescale=params["guidance_rescale"], layouts=_layouts(params),
                           grid=_grid_param(params))
    elapsed = time.perf_counter() - start
    if params.get("index") is not None:  # reproducing one file of an --out-dir batch
        images = [images[params["index"]]]
    if args.out_dir:
        for i, img in enumerate(images):
            _save_png(img, Path(args.out_dir) / f"{i:03d}.png", {**params, "index": i})
        where = args.out_dir
    else:
        out = Path(args.output)
        if len(images) == 1:
            _save_png(images[0], out, params)
        else:
            scale = max(1, 128 // images[0].size[0])
            _save_png(make_grid(images, scale=scale), out, params)
        where = str(out)
    print(f"generated {len(images)} image(s) in {elapsed:.2f} s -> {where}")
    return 0


SAMPLE_METRICS = ("fid", "kid", "pr")
EVAL_METRICS = (*SAMPLE_METRICS, "nll", "adherence", "probe")


def _load_for_eval(path: str | None, device: str = "cpu"):
    """A Pipeline from a model directory, a checkpoint directory or a run directory (its latest checkpoint)."""
    import tempfile

    from .pipeline import Pipeline, export_checkpoint

    model_dir = Path(path) if path else DEFAULT_MODEL
    if (model_dir / "config.json").is_file() and not (model_dir / "state.json").is_file() \
            and json.loads((model_dir / "config.json").read_text()).get("format"):
        return Pipeline.from_pretrained(model_dir, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        export_checkpoint(model_dir, Path(tmp) / "model")
        pipe = Pipeline.from_pretrained(Path(tmp) / "model", device=device)
    pipe.name = model_dir.resolve().name
    return pipe


def _reference_spec(pipe, args) -> tuple[str, dict]:
    """(dataset name, options) of the reference images: --ref, else the model's training data (test split
    where the dataset has one)."""
    import inspect

    from .data import DATASETS

    name = args.ref or pipe.cfg.data.name
    if name not in DATASETS:
        raise ValueError(f"unknown reference dataset {name!r}; available: {', '.join(sorted(DATASETS))}")
    options = dict(pipe.cfg.data.options) if name == pipe.cfg.data.name else {}
    options.pop("random_flip", None)  # no augmentation in a reference
    if args.ref_root:
        options["root"] = args.ref_root
    if name == "imagefolder" and "root" not in options:
        raise ValueError("--ref imagefolder needs --ref-root DIR")
    params = inspect.signature(DATASETS[name]).parameters
    if "split" in params:
        options["split"] = args.ref_split
    elif "seed" in params and name == pipe.cfg.data.name:
        options["seed"] = int(options.get("seed", 0)) + 1  # procedural data: a held-out draw, not the training one
    return name, options


def _sample_metrics(pipe, metrics: list[str], args) -> dict:
    import torch

    from .data import get_dataset
    from .eval.fid import dataset_reference, evaluate_samples, get_inception, reference_indices, sample_features

    name, options = _reference_spec(pipe, args)
    resolution = pipe.image_shape[-1]
    ref = dataset_reference(name, resolution=resolution, n=args.ref_n, device=args.device, **options)
    prompts = None
    if pipe.conditioning == "text":  # captions of the reference images, as COCO FID does
        data = get_dataset(name, resolution=resolution, **options)
        idx = reference_indices(len(data), min(args.ref_n, len(data)))
        prompts = [data[idx[i % len(idx)]]["text"] for i in range(args.n)]
    state = {"start": 0}

    def draw(num: int, seed: int):
        start = state["start"]
        state["start"] += num
        labels = None
        if pipe.conditioning == "class":
            labels = torch.arange(start, start + num) % pipe.info["num_classes"]
        batch_prompts = prompts[start:start + num] if prompts else None
        guidance = args.guidance if pipe.conditioning != "none" else None
        return pipe.sample(num, steps=args.steps, sampler=args.sampler, seed=seed, class_labels=labels,
                           grid=args.grid, prompts=batch_prompts, guidance_scale=guidance)

    feats = sample_features(draw, args.n, batch_size=args.batch_size, seed=args.seed, desc=f"sampling {pipe.name}",
                            extractor=get_inception(args.device))
    res = evaluate_samples(feats, ref, tuple(m for m in metrics if m in SAMPLE_METRICS))
    res["reference"] = f"{name} {options.get('split', '')}".strip()
    return res


def _nll_metrics(pipe, args) -> dict:
    """Bits/dim of ``--nll-n`` reference images: the discrete ELBO (VP models) and the exact
    probability-flow ODE likelihood (Hutchinson trace, dequantized: an upper bound on the discrete NLL)."""
    import torch

    from .data import get_dataset
    from .likelihood import nll_bits_per_dim
    from .likelihood_ode import ode_bits_per_dim

    name, options = _reference_spec(pipe, args)
    if pipe.vae is not None:
        raise ValueError("nll is defined for pixel-space models; this is a latent model (its likelihood would "
                         "be of latents, not images)")
    data = get_dataset(name, resolution=pipe.image_shape[-1], **options)
    n = min(args.nll_n, len(data))
    items = [data[i] for i in range(n)]
    x0 = torch.stack([item["image"] for item in items])
    res: dict = {"n": n, "reference": f"{name} {options.get('split', '')}".strip()}
    if pipe.conditioning != "none":
        raise ValueError("nll is implemented for unconditional models only")
    if pipe.cfg.model.prediction == "edm":
        res["elbo_bpd"] = None  # no discrete chain to bound
    else:
        g = torch.Generator().manual_seed(args.seed)
        bpd = torch.cat([nll_bits_per_dim(pipe.denoiser, x0[i:i + args.batch_size], generator=g, progress=True)
                         for i in range(0, n, args.batch_size)])
        res["elbo_bpd"], res["elbo_bpd_sem"] = float(bpd.mean()), float(bpd.std() / n**0.5) if n > 1 else 0.0
    g = torch.Generator().manual_seed(args.seed)
    bpd = torch.cat([ode_bits_per_dim(pipe.denoiser, x0[i:i + args.batch_size], generator=g, progress=True)
                     for i in range(0, n, args.batch_size)])
    res["ode_bpd"], res["ode_bpd_sem"] = float(bpd.mean()), float(bpd.std() / n**0.5) if n > 1 else 0.0
    return res


def _resolve_grid(args, default_steps: int | None = None) -> None:
    """``--grid``: a grid name, or a grid file from ``reverie tune-grid`` whose sigmas fix the steps (an
    explicit, different ``--steps`` is an error). Sets ``args.grid`` (a name or a sigma tensor),
    ``args.grid_label`` (what to print and record) and ``args.steps``."""
    from .samplers import GRIDS, TunedGrid

    grid = args.grid
    args.grid_label = grid
    if grid is None or grid in GRIDS:
        if args.steps is None:
            args.steps = default_steps
        return
    if not grid.endswith(".json") and not Path(grid).is_file():
        raise ValueError(f"unknown sigma grid {grid!r}; choose one of {', '.join(GRIDS)}, or a .json grid file "
                         f"from reverie tune-grid")
    tuned = TunedGrid.load(grid)
    if args.steps is not None and args.steps != tuned.steps:
        raise ValueError(f"{grid} is a grid of {tuned.steps} steps; leave out --steps (or pass {tuned.steps})")
    if args.sampler is not None and args.sampler != tuned.sampler:
        print(f"reverie: warning: {grid} was tuned for {tuned.sampler}, not {args.sampler}", file=sys.stderr)
    args.steps, args.grid = tuned.steps, tuned.sigmas


def _cmd_tune_grid(args) -> int:
    import time

    from .samplers import GRIDS, SAMPLERS

    if args.sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {args.sampler!r}; choose one of {', '.join(sorted(SAMPLERS))}")
    for key in ("pilot", "teacher_steps"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    if args.teacher_grid is not None and args.teacher_grid not in GRIDS:
        raise ValueError(f"unknown --teacher-grid {args.teacher_grid!r}; choose one of {', '.join(GRIDS)}")
    pipe = _load_for_eval(args.model, args.device or "cpu")
    if args.prompt and pipe.conditioning != "text":
        raise ValueError(f"model {pipe.name!r} is not text-conditioned; --prompt needs a text model")
    start = time.perf_counter()
    tuned = pipe.tune_grid(args.sampler, args.steps, pilot=args.pilot, seed=args.seed, prompts=args.prompt or None,
                           guidance_scale=args.guidance if pipe.conditioning != "none" else None,
                           teacher_steps=args.teacher_steps, teacher_grid=args.teacher_grid, progress=True)
    elapsed = time.perf_counter() - start
    path = tuned.save(args.output)
    print(f"{pipe.name}: {tuned.steps} {tuned.sampler} steps tuned in {elapsed:.1f} s ({tuned.evaluations} pilot runs, "
          f"{tuned.denoiser_calls} denoiser calls on {tuned.pilot} pilot images)")
    own = pipe.cfg.sample.grid
    others = {f"{own} (the model's grid)": tuned.start_losses.get(own)}
    if own != "karras":
        others["karras"] = tuned.start_losses["karras"]
    others[f"best start: {tuned.start}"] = tuned.start_losses[tuned.start]
    print(f"  distance to the {tuned.teacher_steps}-step {tuned.teacher} solve on {tuned.teacher_grid} (mean squared): "
          f"{tuned.loss:.4g} tuned; " + ", ".join(f"{v:.4g} {k}" for k, v in others.items() if v is not None))
    print("  sigmas: " + " ".join(f"{float(v):.4g}" for v in tuned.sigmas))
    use = f"reverie sample {args.model}" if args.model else 'reverie generate "a prompt"'
    print(f"wrote {path}; use it with: {use} --grid {path} --sampler {tuned.sampler}")
    return 0


def _cmd_eval(args) -> int:
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = sorted(set(metrics) - set(EVAL_METRICS))
    if not metrics or unknown:
        raise ValueError(f"unknown metric(s) {unknown}; available: {', '.join(EVAL_METRICS)}")
    for key in ("n", "steps", "ref_n", "batch_size", "per_prompt", "nll_n", "probe_n"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    from .samplers import SAMPLERS

    if args.sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {args.sampler!r}; choose one of {', '.join(sorted(SAMPLERS))}")
    _resolve_grid(args, default_steps=20)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = _load_for_eval(args.model, args.device)
    # Checks that would otherwise fire only after the (long) sample-based metrics:
    if "nll" in metrics and (pipe.vae is not None or pipe.conditioning != "none"):
        raise ValueError("nll needs an unconditional pixel-space model")
    for name in ("adherence", "probe"):
        if name in metrics and pipe.conditioning != "text":
            raise ValueError(f"{name} needs a text-conditioned model")
    if "probe" in metrics and (pipe.vae is not None or pipe.cfg.data.name != "shapes"):
        raise ValueError("probe needs a pixel-space model trained on shapes (it denoises real shapes images)")
    guidance = args.guidance if pipe.conditioning != "none" else None
    results = {"model": pipe.name, "model_hash": pipe.weights_hash, "sampler": args.sampler, "steps": args.steps,
               "grid": args.grid_label or pipe.cfg.sample.grid, "seed": args.seed, "guidance": guidance}
    rows = []
    if any(m in SAMPLE_METRICS for m in metrics):
        res = _sample_metrics(pipe, metrics, args)
        results.update(res)
        where = f"{res['n']} samples vs {res['n_ref']} {res['reference']} images"
        if "fid" in res:
            rows.append(("FID", f"{res['fid']:.3f}", where))
        if "kid" in res:
            rows.append(("KID", f"{res['kid']:.5f} +- {res['kid_std']:.5f}", where))
        if "precision" in res:
            rows.append(("precision", f"{res['precision']:.3f}", where + ", k=3"))
            rows.append(("recall", f"{res['recall']:.3f}", where + ", k=3"))
    if "nll" in metrics:
        res = _nll_metrics(pipe, args)
        results["nll"] = res
        for key, label in (("elbo_bpd", "NLL (ELBO)"), ("ode_bpd", "NLL (PF-ODE)")):
            if res.get(key) is not None:
                rows.append((label, f"{res[key]:.4f} bits/dim", f"{res['n']} {res['reference']} images"))
    if "adherence" in metrics:
        from .eval.adherence import evaluate_adherence

        res = evaluate_adherence(pipe, num_per_prompt=args.per_prompt, steps=args.steps, sampler=args.sampler,
                                 guidance_scale=args.guidance, seed=args.seed, grid=args.grid,
                                 paraphrased=args.paraphrase, layouts=args.layout)
        results["adherence"] = res
        kind = "paraphrased held-out" if args.paraphrase else "held-out"
        where = f"{res['num_images']} images, {res['num_prompts']} {kind} prompts, guidance {args.guidance}"
        if pipe.takes_layouts:
            where += f", layouts {args.layout}"
        for key in ("color_accuracy", "shape_accuracy", "relation_accuracy", "count_accuracy", "all_correct",
                    "pair_count_accuracy", "relation_accuracy_when_drawn"):
            value = res.get(key)
            rows.append((key, "n/a" if value is None else f"{value:.3f}", where))
        two = res.get("two_object") or {}
        for key in ("color_accuracy", "shape_accuracy", "all_correct"):
            if two.get(key) is not None:
                rows.append((f"two-object {key}", f"{two[key]:.3f}", f"{two['num_images']} images of 2-object prompts"))
    if "probe" in metrics:
        from .eval.probe import caption_probe

        res = caption_probe(pipe.denoiser, num_images=args.probe_n, seed=args.seed, batch_size=args.batch_size,
                            resolution=pipe.cfg.data.resolution, data_options=pipe.cfg.data.options)
        results["probe"] = res
        sigmas = " ".join(f"{s:g}" for s in res["sigmas"])
        for kind, r in res["probes"].items():
            per_sigma = " ".join(f"{a:.2f}" for a in r["accuracy"])
            rows.append((f"probe {kind}", f"{r['mean_accuracy']:.3f}",
                         f"true caption wins (0.5: words ignored; s.e. <= {max(r['stderr']):.2f}), "
                         f"{res['num_images']} images; at sigma {sigmas}: {per_sigma}"))
    extra = f", guidance {guidance}" if guidance is not None else ""
    print(f"{pipe.name} ({args.sampler}, {args.steps} steps on the {results['grid']} grid, seed {args.seed}{extra})")
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    for label, value, where in rows:
        print(f"  {label:{width}s}  {value:>{vwidth}s}   {where}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


def _cmd_export(args) -> int:
    import torch

    from .pipeline import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.output, use_ema=not args.no_ema,
                            dtype=torch.float16 if args.half else torch.float32)
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(f"exported {args.checkpoint} -> {out} ({size:.1f} MiB)")
    return 0


def _cmd_sample(args) -> int:
    from .images import save_grid
    from .pipeline import Pipeline

    _resolve_grid(args)
    pipe = Pipeline.from_pretrained(args.model, use_ema=not args.no_ema)
    images = pipe.sample(num_images=args.n, steps=args.steps, sampler=args.sampler, seed=args.seed, grid=args.grid)
    path = save_grid(images, args.output)
    print(f"wrote {args.n} samples to {path}")
    return 0


def _cmd_inspect(args) -> int:
    from safetensors import safe_open

    path = Path(args.path)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        config = json.loads((path / "config.json").read_text())
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        net = config["network"]
        print(f"model directory {path}")
        print(f"  network:    {net.get('arch')} ({n:,} parameters)")
        model = config["train_config"]["model"]
        print(f"  prediction: {model['prediction']}")
        if model.get("conditioning", "none") != "none":
            encoder = f" ({model['text_encoder']} encoder)" if model["conditioning"] == "text" else ""
            layout = f", + object layouts ({model['layout_channels']} channels)" if model.get("layout_channels") else ""
            print(f"  condition:  {model['conditioning']}{encoder}{layout}")
        print(f"  schedule:   {config['train_config']['schedule']['name']}")
        print(f"  data:       {config['train_config']['data']['name']} {config['data']}")
        print(f"  ema:        {'yes' if (path / 'ema.safetensors').is_file() else 'no'}")
        return 0
    from .train.checkpoint import latest_checkpoint, load_checkpoint

    ckpt = path if (path / "state.json").is_file() else latest_checkpoint(path / "checkpoints") \
        or latest_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(f"{path} is neither a model directory, a checkpoint nor a run directory")
    state = load_checkpoint(ckpt)
    n = sum(v.numel() for v in state["model"].values())
    print(f"checkpoint {ckpt}")
    data = state["data"]
    print(f"  step:     {state['step']}  (data epoch {data['epoch']}, batch {data['batch']})")
    print(f"  params:   {n:,}")
    print(f"  skipped non-finite steps: {state.get('nonfinite_total', 0)}")
    return 0


def _cmd_data_preview(args) -> int:
    from .data import get_dataset
    from .data.preview import preview_grid

    options = {"resolution": args.resolution}
    if args.root:
        options["root"] = args.root
    ds = get_dataset(args.name, **options)
    preview_grid(ds, n=args.n, path=args.output, seed=args.seed)
    print(f"wrote a preview of {args.n} {args.name} images to {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(prog="reverie", description="Diffusion models: train, sample, inspect.",
                                formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a YAML/JSON config", formatter_class=fmt)
    t.add_argument("config", help="config file (see configs/)")
    t.add_argument("overrides", nargs="*", help="overrides like --train.lr=2e-4 or train.steps=100")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    t.add_argument("--resume", default="auto", help="auto (latest checkpoint in out_dir), no, or a path")
    t.set_defaults(func=_cmd_train)

    tv = sub.add_parser("train-vae", help="train a KL autoencoder for latent diffusion from a config",
                        formatter_class=fmt)
    tv.add_argument("config", help="config file with kind: vae (see configs/vae-shapes-f4.yaml)")
    tv.add_argument("overrides", nargs="*", help="overrides like --loss.kl_weight=1e-6 or train.steps=100")
    tv.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    tv.add_argument("--resume", default="auto", help="auto (latest checkpoint in out_dir), no, or a path")
    tv.set_defaults(func=_cmd_train_vae)

    gen = sub.add_parser("generate", help="generate images from a text prompt", formatter_class=fmt)
    gen.add_argument("prompt", nargs="?", default="", help='the prompt ("" for unconditional samples)')
    gen.add_argument("--num-images", type=int, default=4, help="how many images")
    gen.add_argument("--steps", type=int, default=None, help="sampling steps (default: 20, or the grid file's)")
    gen.add_argument("--sampler", default="dpmpp_2m", help="sampler name")
    gen.add_argument("--grid", default=None,
                     help="sigma grid: karras, ddim-trailing, ..., or a grid file from tune-grid (default: the "
                          "model's); a file's sigmas are stored in the PNG")
    gen.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (1 = none)")
    gen.add_argument("--guidance-rescale", type=float, default=0.0, help="guidance rescale phi in [0, 1]")
    gen.add_argument("--negative-prompt", default="", help="what to steer away from")
    gen.add_argument("--seed", type=int, default=0, help="random seed")
    gen.add_argument("--model", default=None, help="model directory (default: the shipped shapes model)")
    gen.add_argument("-o", "--output", default="out.png", help="output PNG (a grid for several images)")
    gen.add_argument("--out-dir", default=None, help="write one PNG per image into this folder instead")
    gen.add_argument("--from-png", default=None, help="reproduce the image(s) from a PNG's stored parameters")
    gen.add_argument("--layout", default="auto",
                     help="layout models: auto (plan object boxes from the prompt), none (the prompt alone), or "
                          "a JSON list (or .json file) of [phrase, [x0, y0, x1, y1]] in image fractions, y down")
    gen.set_defaults(func=_cmd_generate)

    ev = sub.add_parser("eval", help="evaluate a model: FID, KID, precision/recall, NLL, prompt adherence",
                        formatter_class=fmt)
    ev.add_argument("model", nargs="?", default=None,
                    help="model, checkpoint or run directory (default: the shipped shapes model)")
    ev.add_argument("--metrics", default="fid", help=f"comma-separated metrics: {', '.join(EVAL_METRICS)}")
    ev.add_argument("--n", type=int, default=2000, help="generated images for fid/kid/pr")
    ev.add_argument("--ref", default=None, help="reference dataset (default: the model's training data)")
    ev.add_argument("--ref-split", default="test", help="reference split, for datasets that have splits")
    ev.add_argument("--ref-root", default=None, help="image folder of an imagefolder reference")
    ev.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ev.add_argument("--ref-n", type=int, default=10000, help="reference images (statistics are cached)")
    ev.add_argument("--batch-size", type=int, default=100, help="images per sampling batch")
    ev.add_argument("--per-prompt", type=int, default=4, help="images per prompt for adherence")
    ev.add_argument("--layout", choices=("auto", "none", "only"), default="auto",
                    help="adherence of a layout model: auto (boxes planned from each prompt), none (prompt alone) "
                         "or only (the planned boxes under an empty caption: what the layout map alone conveys)")
    ev.add_argument("--paraphrase", action="store_true",
                    help="adherence: show the model synonyms of the color and shape words (crimson disc, ...)")
    ev.add_argument("--nll-n", type=int, default=64, help="reference images for nll")
    ev.add_argument("--probe-n", type=int, default=256,
                    help="real shapes images per caption probe (probe metric)")
    ev.add_argument("--steps", type=int, default=None, help="sampling steps (default: 20, or the grid file's)")
    ev.add_argument("--sampler", default="dpmpp_2m", help="sampler name")
    ev.add_argument("--grid", default=None,
                    help="sigma grid: karras, ddim-trailing, ..., or a grid file from tune-grid (default: the model's)")
    ev.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale")
    ev.add_argument("--seed", type=int, default=0, help="random seed")
    ev.add_argument("--json", default=None, help="also write the results as JSON here")
    ev.set_defaults(func=_cmd_eval)

    ex = sub.add_parser("export", help="turn a checkpoint or run directory into a model directory",
                        formatter_class=fmt)
    ex.add_argument("checkpoint", help="checkpoint directory, or a run directory (its latest checkpoint)")
    ex.add_argument("-o", "--output", required=True, help="model directory to write")
    ex.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    ex.add_argument("--half", action="store_true", help="store the weights in float16 (half the size)")
    ex.set_defaults(func=_cmd_export)

    s = sub.add_parser("sample", help="sample a grid of images from a model directory", formatter_class=fmt)
    s.add_argument("model", help="model directory (config.json + model.safetensors)")
    s.add_argument("--n", type=int, default=16, help="number of images")
    s.add_argument("--sampler", default=None, help="sampler (default: the model's)")
    s.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    s.add_argument("--grid", default=None,
                   help="sigma grid: karras, ddim-trailing, ..., or a grid file from tune-grid (default: the model's)")
    s.add_argument("--seed", type=int, default=0, help="random seed")
    s.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    s.add_argument("-o", "--output", default="samples.png", help="output PNG grid")
    s.set_defaults(func=_cmd_sample)

    tg = sub.add_parser("tune-grid", help="tune a few-step sigma grid to a model and a sampler", formatter_class=fmt,
                        description="Choose the noise levels of a STEPS-step sampler for one model: the grid whose "
                                    "samples best match a fine-grid solve from the same pilot noise "
                                    "(reverie.samplers.tune_sigmas). Writes a JSON grid for sample/eval --grid.")
    tg.add_argument("model", nargs="?", default=None,
                    help="model, checkpoint or run directory (default: the shipped shapes model)")
    tg.add_argument("--sampler", default="dpmpp_2m", help="the sampler the grid is for")
    tg.add_argument("--steps", type=int, default=8, help="sampling steps of the grid")
    tg.add_argument("--pilot", type=int, default=16, help="pilot noise draws the grid is tuned on")
    tg.add_argument("--teacher-steps", type=int, default=100, help="steps of the fine reference solve")
    tg.add_argument("--teacher-grid", default=None,
                    help="grid kind of the reference solve (default: the model's own, e.g. karras, ddim-trailing)")
    tg.add_argument("--prompt", action="append", default=None,
                    help="text models: a prompt to tune under (repeatable; default: the config's sample prompts)")
    tg.add_argument("--guidance", type=float, default=4.0, help="guidance scale to tune under (conditional models)")
    tg.add_argument("--seed", type=int, default=10_000, help="pilot noise seed (keep apart from sampling seeds)")
    tg.add_argument("--device", default=None, help="cpu or cuda")
    tg.add_argument("-o", "--output", default="grid.json", help="grid file to write")
    tg.set_defaults(func=_cmd_tune_grid)

    i = sub.add_parser("inspect", help="describe a model directory, checkpoint or run", formatter_class=fmt)
    i.add_argument("path")
    i.set_defaults(func=_cmd_inspect)

    d = sub.add_parser("data", help="dataset tools", formatter_class=fmt)
    dsub = d.add_subparsers(dest="data_command", required=True)
    pv = dsub.add_parser("preview", help="write a PNG grid of a dataset with captions", formatter_class=fmt)
    pv.add_argument("name", help="shapes, mnist, digits or imagefolder")
    pv.add_argument("--n", type=int, default=16, help="number of images")
    pv.add_argument("--resolution", type=int, default=64, help="image size")
    pv.add_argument("--seed", type=int, default=0, help="which images")
    pv.add_argument("--root", default=None, help="image folder (for imagefolder)")
    pv.add_argument("-o", "--output", default="preview.png", help="output PNG")
    pv.set_defaults(func=_cmd_data_preview)
    return p


def _check_numbers(args) -> None:
    for name in ("n", "steps"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # config overrides look like options: --train.lr=2e-4
        if args.command not in ("train", "train-vae") or not all(u.startswith("--") and "=" in u for u in unknown):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides = list(args.overrides) + unknown
    try:
        _check_numbers(args)
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"reverie: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("reverie: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        from .train.loop import TrainingError

        if isinstance(e, TrainingError):
            print(f"reverie: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
