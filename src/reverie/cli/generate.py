"""Commands that generate: ``generate`` (text to image, PNGs that carry their parameters), ``sample``
(a grid from any model) and ``tune-grid`` (a few-step sigma grid fit to a model)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from ..provenance import watermark_enabled, watermark_noise
from ..provenance.png import read_png_parameters, save_png  # noqa: F401  (old import names, kept)
from .common import (
    DEFAULT_MODEL,
    UserError,
    at_least,
    output_dir,
    output_file,
    sampling_options,
    sampling_parent,
    show_progress,
)

MAX_IMAGES = 64     # generate: one batch
MAX_GRID = 1024     # sample: images in one PNG grid (more: --out-dir streams them)
MAX_PILOT = 1024


def add_commands(sub, fmt) -> None:
    gen = sub.add_parser("generate", help="generate images from a text prompt", formatter_class=fmt,
                         parents=[sampling_parent()])
    gen.add_argument("prompt", nargs="?", default="", help='the prompt ("" for unconditional samples)')
    gen.add_argument("--num-images", type=at_least(1), default=4, help=f"how many images (at most {MAX_IMAGES})")
    gen.add_argument("--model", default=None, help="model directory, or a Stable Diffusion 1.x / 2.x folder (diffusers "
                                                   "layout) or .safetensors file (default: the shipped shapes model)")
    gen.add_argument("--width", type=at_least(8), default=None,
                     help="Stable Diffusion models: image width in pixels, a multiple of 8 (default: the model's own)")
    gen.add_argument("--height", type=at_least(8), default=None,
                     help="Stable Diffusion models: image height in pixels (default: --width, or the model's own)")
    gen.add_argument("--prediction", choices=["eps", "v"], default=None,
                     help="Stable Diffusion models: what the U-Net predicts (default: the checkpoint's own; a single "
                          "SD 2 file without metadata or a .yaml beside it is taken as v, with a warning)")
    gen.add_argument("-o", "--output", default="out.png", help="output PNG (a grid for several images)")
    gen.add_argument("--out-dir", default=None, help="write one PNG per image into this folder instead")
    gen.add_argument("--from-png", default=None, help="reproduce the image(s) from a PNG's stored parameters")
    gen.add_argument("--layout", default="auto",
                     help="layout models: auto (plan object boxes from the prompt), none (the prompt alone), or "
                          "a JSON list (or .json file) of [phrase, [x0, y0, x1, y1]] in image fractions, y down")
    gen.add_argument("--no-watermark", action="store_true",
                     help="no Tree-Ring watermark in the start noise and no pixel watermark (the PNG says so; it is "
                          "still signed)")
    gen.add_argument("--timings", action="store_true",
                     help="print where the time went: since the process started, loading, generation in Pipeline, "
                          "writing")
    gen.set_defaults(func=generate)

    s = sub.add_parser("sample", help="sample a grid of images from a model directory", formatter_class=fmt,
                       parents=[sampling_parent()])
    s.add_argument("model", help="model directory (config.json + model.safetensors), checkpoint or run")
    s.add_argument("--n", type=at_least(1), default=16, help=f"number of images (a grid holds at most {MAX_GRID})")
    s.add_argument("--batch-size", type=at_least(1), default=64, help="images sampled at once")
    s.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    s.add_argument("-o", "--output", default="samples.png", help="output PNG grid")
    s.add_argument("--out-dir", default=None,
                   help="write one PNG per image into this folder instead, batch by batch (any --n)")
    s.add_argument("--no-watermark", action="store_true",
                   help="no Tree-Ring watermark in the start noise and no pixel watermark (the PNGs say so)")
    s.set_defaults(func=sample)

    tg = sub.add_parser("tune-grid", help="tune a few-step sigma grid to a model and a sampler", formatter_class=fmt,
                        parents=[sampling_parent()],  # its own: set_defaults on a shared parent changes them all
                        description="Choose the noise levels of a STEPS-step sampler for one model: the grid whose "
                                    "samples best match a fine-grid solve from the same pilot noise "
                                    "(reverie.samplers.tune_sigmas). Writes a JSON grid for sample/eval --grid.")
    tg.add_argument("model", nargs="?", default=None,
                    help="model, checkpoint or run directory (default: the shipped shapes model)")
    tg.add_argument("--pilot", type=at_least(1), default=16, help="pilot noise draws the grid is tuned on")
    tg.add_argument("--teacher-steps", type=at_least(1), default=100, help="steps of the fine reference solve")
    tg.add_argument("--teacher-grid", default=None,
                    help="grid kind of the reference solve (default: the model's own, e.g. karras, ddim-trailing)")
    tg.add_argument("--prompt", action="append", default=None,
                    help="text models: a prompt to tune under (repeatable; default: the config's sample prompts)")
    tg.add_argument("--device", default=None, help="cpu or cuda")
    tg.add_argument("-o", "--output", default="grid.json", help="grid file to write")
    tg.set_defaults(func=tune_grid, sampler="dpmpp_2m", steps=8, seed=10_000)


def layout_arg(value: str):
    """--layout: auto, none, or a JSON list of [phrase, [x0, y0, x1, y1]] (inline or a file) for every image."""
    if value in ("auto", "none"):
        return value
    from ..layout import check_layout

    is_file = Path(value).suffix == ".json" and Path(value).is_file()
    try:
        layout = json.loads(Path(value).read_text(encoding="utf-8") if is_file else value)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        if is_file:
            raise UserError(f"--layout {value}: the file is not valid JSON ({e})") from None
        raise UserError(f"--layout must be auto, none, or a JSON list like "
                        f"'[[\"red circle\", [0.1, 0.1, 0.4, 0.4]]]', got {value!r}") from None
    return [check_layout(layout, "--layout")]


def _request(args):
    """(prompt, number of images, index of one image to keep or None, SamplingOptions) of the command line,
    or of the PNG named by --from-png."""
    from ..sampling import SamplingOptions

    if not args.from_png:
        if args.num_images > MAX_IMAGES:
            raise UserError(f"--num-images must be between 1 and {MAX_IMAGES}, got {args.num_images}")
        return args.prompt or "", args.num_images, None, sampling_options(args, layout_arg(args.layout))
    meta = read_png_parameters(Path(args.from_png))
    options = SamplingOptions.from_metadata(meta, args.from_png)
    prompt, num, index = meta.get("prompt", ""), meta.get("num_images"), meta.get("index")
    if not isinstance(prompt, str):
        raise UserError(f"{args.from_png}: prompt must be a string, got {prompt!r}")
    if not isinstance(num, int) or isinstance(num, bool) or not 1 <= num <= MAX_IMAGES:
        raise UserError(f"{args.from_png}: num_images must be an integer from 1 to {MAX_IMAGES}, got {num!r}")
    if index is not None and (not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < num):
        raise UserError(f"{args.from_png}: index must be an integer from 0 to {num - 1}, got {index!r}")
    return prompt, num, index, options


def generate(args) -> int:
    from ..images import make_grid
    from ..sampling import check_batch

    prompt, num_images, index, options = _request(args)
    if args.out_dir:
        output_dir(args.out_dir)
    else:
        output_file(args.output, (".png",))
    made_by = read_png_parameters(Path(args.from_png)) if args.from_png else {}
    model = Path(args.model) if args.model else DEFAULT_MODEL
    t_load = time.perf_counter()
    pipe = _load_model(model, _prediction(args, made_by, model))
    t_load = time.perf_counter() - t_load
    size = _image_size(pipe, args, made_by)
    check_batch(pipe, num_images, option="--num-images", guided=pipe.conditioning != "none")
    if made_by.get("model_hash") and made_by["model_hash"] != pipe.weights_hash:
        print(f"reverie: warning: {args.from_png} was made by model {made_by.get('model')} "
              f"({made_by['model_hash']}), not {pipe.name} ({pipe.weights_hash})", file=sys.stderr)
    # the settings used, so that the file says what made it; a grid left out stays null (the model's own kind,
    # pinned by the model hash), as in every PNG since the first
    used = dataclasses.replace(options.resolve(pipe.cfg), grid=options.grid)
    marked = not args.no_watermark and (not args.from_png or watermark_enabled(made_by))
    noise, marks = watermark_noise(pipe, num_images, used.seed, enabled=marked)
    _check_key(made_by, marks, args.from_png)
    params = {"prompt": prompt, "num_images": num_images, **used.to_metadata(), "model": pipe.name,
              "model_hash": pipe.weights_hash, **size, "watermark": marks}
    if size:  # a Stable Diffusion model: what its U-Net predicts, which a single file may not say (--from-png)
        params["prediction"] = pipe.cfg.model.prediction
    start = time.perf_counter()
    images = pipe.generate(prompt, num_images, options, progress=show_progress(args), noise=noise)
    elapsed = time.perf_counter() - start
    t_write = time.perf_counter()
    numbers = range(len(images))
    if index is not None:  # reproducing one file of an --out-dir batch: it keeps its index
        images, numbers = [images[index]], [index]
        params["index"] = index
    if args.out_dir:
        for i, img in zip(numbers, images):
            save_png(img, Path(args.out_dir) / f"{i:03d}.png", {**params, "index": i})
        where = args.out_dir
    else:
        grid = images[0] if len(images) == 1 else make_grid(images, scale=max(1, 128 // images[0].size[0]))
        save_png(grid, Path(args.output), params)
        where = args.output
    print(f"generated {len(images)} image(s) in {elapsed:.2f} s -> {where}")
    if args.timings:
        since = since_process_start()
        total = f"{since:.2f} s since the process started" if since is not None else "process start unknown"
        print(f"timings: {total}; model load {t_load:.2f} s; generation in Pipeline {elapsed * 1e3:.1f} ms "
              f"({len(images)} image(s), {used.steps} step(s) of {used.sampler}); writing "
              f"{time.perf_counter() - t_write:.2f} s")
    return 0


def _prediction(args, made_by: dict, model: Path) -> str | None:
    """--prediction, else the one a --from-png file recorded for a Stable Diffusion model, else None."""
    from ..sd import is_stable_diffusion

    if args.prediction is not None or "prediction" not in made_by or not is_stable_diffusion(model):
        return args.prediction
    if made_by["prediction"] not in ("eps", "v"):
        raise UserError(f"{args.from_png}: prediction must be 'eps' or 'v', got {made_by['prediction']!r}")
    return made_by["prediction"]


def _load_model(path: Path, prediction: str | None):
    """``Pipeline.from_pretrained``, with ``--prediction`` for SD checkpoints; the loader's guess of eps or v
    (``reverie.sd.PredictionGuessWarning``) as one warning line."""
    import warnings

    from ..pipeline import Pipeline
    from ..sd import PredictionGuessWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PredictionGuessWarning)
        pipe = Pipeline.from_pretrained(path, **({} if prediction is None else {"prediction": prediction}))
    for w in caught:
        if issubclass(w.category, PredictionGuessWarning):
            print(f"reverie: warning: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return pipe


def since_process_start() -> float | None:
    """Seconds since this process started (Linux: ``/proc``, 10 ms resolution), so that a timing includes the
    interpreter's start and the imports; None where it cannot be read."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in clock ticks
    except (OSError, ValueError, IndexError):
        return None


def _image_size(pipe, args, made_by: dict) -> dict:
    """--width / --height (or a PNG's) applied to a Stable Diffusion pipeline; ``{width, height}`` for its PNG
    metadata ({} for reverie's own models, which make one size)."""
    from ..sd import FAMILY, set_image_size

    width = args.width if args.width is not None else made_by.get("width")
    height = args.height if args.height is not None else made_by.get("height", width)
    if pipe.info.get("family") != FAMILY:
        if width is not None or height is not None:
            side = pipe.image_shape[-1]
            raise UserError(f"--width / --height apply to Stable Diffusion models; {pipe.name} makes {side}x{side} "
                            f"images")
        return {}
    if width is not None or height is not None:
        width = width if width is not None else height
        set_image_size(pipe, width, height if height is not None else width)
    _, h, w = pipe.image_shape
    return {"width": w, "height": h}


def _check_key(made_by: dict, marks, source) -> None:
    """Warn when --from-png reproduces a file watermarked with another key (the noise, so the image, differs)."""
    old = (made_by.get("watermark") or {}) if isinstance(made_by.get("watermark"), dict) else {}
    old_id = (old.get("noise") or {}).get("key_id") if isinstance(old.get("noise"), dict) else None
    new_id = marks["noise"]["key_id"] if isinstance(marks, dict) else None
    if old_id and new_id and old_id != new_id:
        print(f"reverie: warning: {source} was watermarked with key {old_id}, yours is {new_id}: the start noise, "
              f"and so the image, will differ", file=sys.stderr)


def sample(args) -> int:
    """A grid of ``--n`` images, or with ``--out-dir`` one PNG per image written batch by batch, so that memory
    stays that of one batch whatever ``--n`` is. Every PNG is written by ``save_png`` (parameters, C2PA)."""
    import torch
    from tqdm.auto import tqdm

    from ..images import make_grid, to_pil
    from ..pipeline import Pipeline
    from ..sampling import check_batch

    options = sampling_options(args)
    if args.out_dir:
        out = output_dir(args.out_dir)
    elif args.n > MAX_GRID:
        raise UserError(f"--n {args.n} is too many for one grid image (at most {MAX_GRID}); write one PNG per image "
                        f"with --out-dir DIR, which streams them in batches of --batch-size")
    else:
        output_file(args.output, (".png",))
    pipe = Pipeline.from_pretrained(args.model, use_ema=not args.no_ema)
    if pipe.info.get("frames"):
        raise UserError(f"{pipe.name} is a video model: use reverie generate-video --num-videos N")
    batch = min(args.batch_size, args.n)
    check_batch(pipe, batch, guided=pipe.conditioning != "none")
    used = options.resolve(pipe.cfg)
    params = {"num_images": args.n, "batch_size": batch, **used.to_metadata(), "model": pipe.name,
              "model_hash": pipe.weights_hash}

    def draw(k: int, start: int):
        noise, marks = watermark_noise(pipe, min(batch, args.n - start), options.seed + k,
                                       enabled=not args.no_watermark)
        params["watermark"] = marks
        return pipe.sample(min(batch, args.n - start), options, seed=options.seed + k, noise=noise)

    if not args.out_dir:
        images = to_pil(torch.cat([draw(k, start) for k, start in enumerate(range(0, args.n, batch))]))
        save_png(make_grid(images, scale=max(1, 64 // images[0].size[0])), Path(args.output), params)
        print(f"wrote {args.n} samples to {args.output}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=args.n, desc="sample", unit="img", disable=not show_progress(args)) as bar:
        for k, start in enumerate(range(0, args.n, batch)):
            images = draw(k, start)
            for i, image in enumerate(to_pil(images)):
                save_png(image, out / f"{start + i:06d}.png", {**params, "seed": options.seed + k, "index": start + i})
            bar.update(len(images))
    print(f"wrote {args.n} samples to {out}/ (batches of {batch}, seeds {options.seed} + batch index)")
    return 0


def tune_grid(args) -> int:
    from ..pipeline import Pipeline
    from ..samplers import GRIDS
    from ..sampling import check_batch

    if args.grid is not None:
        raise UserError("tune-grid makes a grid: --grid does not apply (--teacher-grid sets the reference solve's)")
    if args.teacher_grid is not None and args.teacher_grid not in GRIDS:
        raise UserError(f"unknown --teacher-grid {args.teacher_grid!r}; choose one of {', '.join(GRIDS)}")
    if args.pilot > MAX_PILOT:
        raise UserError(f"--pilot must be at most {MAX_PILOT}, got {args.pilot} (a grid is tuned on a few dozen)")
    options = sampling_options(args)
    output_file(args.output, (".json",))
    pipe = Pipeline.from_pretrained(args.model or DEFAULT_MODEL, device=args.device or "cpu")
    check_batch(pipe, args.pilot, option="--pilot", guided=pipe.conditioning != "none")
    if args.prompt and pipe.conditioning != "text":
        raise UserError(f"model {pipe.name!r} is not text-conditioned; --prompt needs a text model")
    start = time.perf_counter()
    tuned = pipe.tune_grid(options.sampler, options.steps, pilot=args.pilot, seed=options.seed, prompts=args.prompt,
                           teacher_steps=args.teacher_steps, teacher_grid=args.teacher_grid,
                           progress=show_progress(args),
                           options=options)
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
