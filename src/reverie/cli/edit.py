"""Commands that edit an image (``reverie.editing``): ``edit`` (img2img with ``--strength``, or a prompt edit
with ``--from-prompt`` / ``--to-prompt``), ``inpaint`` (``--mask`` or ``--box``) and ``invert`` (to start
noise in a safetensors file).

Input images are read with PIL (any format it reads) and brought to the model's size: a different size is
resized (bicubic) with a warning line, so a 512 px photo works on a 32 px model. Masks: white = repaint,
black = keep (diffusers' convention); a mask must have the input image's size. The output PNG records the
source image's SHA-256 (and the mask's), the command and every parameter; ``--from-png OUT.png`` reproduces
the edit from the recorded parameters and the source image (its path as recorded, or IMAGE if given),
refusing a source whose hash differs.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from .common import (
    DEFAULT_MODEL,
    UserError,
    at_least,
    number_in,
    output_file,
    sampling_options,
    sampling_parent,
    show_progress,
)
from .generate import layout_arg, read_png_parameters, save_png


def add_commands(sub, fmt) -> None:
    e = sub.add_parser("edit", help="edit an image: img2img (--strength) or a prompt edit (--from/--to-prompt)",
                       formatter_class=fmt, parents=[sampling_parent(), _common()])
    e.add_argument("prompt", nargs="?", default=None, help="img2img: the prompt for the new image")
    e.add_argument("--strength", type=number_in(0, 1), default=None,
                   help="img2img: how much to change, in (0, 1] (diffusers' convention; default 0.6)")
    e.add_argument("--from-prompt", default=None, help="prompt edit: the prompt the image was made with")
    e.add_argument("--to-prompt", default=None, help="prompt edit: the prompt to change it to")
    e.add_argument("--method", choices=("exact", "ddim"), default="exact",
                   help="prompt edit: inversion method (exact keeps what the edit does not name)")
    e.add_argument("--local-blend", action=argparse.BooleanOptionalAction, default=None,
                   help="prompt edit, layout models: regenerate only the layout boxes whose phrase changes and keep "
                        "every other pixel (default: on for a layout model)")
    e.add_argument("--fresh-noise", type=number_in(0, 1), default=None,
                   help="prompt edit with local blending: share of the start noise's variance drawn anew inside "
                        "the changed boxes (0: the inverted noise only; default 0.75)")
    e.set_defaults(func=edit_command)

    i = sub.add_parser("inpaint", help="repaint the white part of a mask (or a box) under a prompt",
                       formatter_class=fmt, parents=[sampling_parent(), _common(
                           "model directory (default: the shipped shapes model); a mask-aware model (trained with "
                           "configs/shapes-inpaint.yaml) is used through its mask channels")])
    i.add_argument("prompt", nargs="?", default=None, help="what to paint")
    i.add_argument("--mask", default=None, help="mask image of the input's size: white = repaint, black = keep")
    i.add_argument("--box", default=None, help="repaint this box instead: x0,y0,x1,y1 in pixels of the input image")
    i.add_argument("--strength", type=number_in(0, 1), default=1.0, help="1: the masked region starts from noise")
    i.add_argument("--jump-length", type=at_least(1), default=5, help="RePaint: steps per resampling block")
    i.add_argument("--resample", type=at_least(1), default=3, help="RePaint: passes per block (1: no resampling)")
    i.add_argument("--eta", type=number_in(0, 1), default=1.0, help="step noise (1: DDPM as RePaint, 0: DDIM)")
    i.add_argument("--method", choices=("auto", "repaint", "model"), default="auto",
                   help="model: a mask-aware model's mask channels (any --sampler); "
                        "repaint: training-free RePaint (--jump-length, --resample, --eta), any model; auto: model "
                        "when the model has mask channels, else repaint")
    i.set_defaults(func=inpaint_command)

    v = sub.add_parser("invert", help="invert an image to start noise (safetensors)", formatter_class=fmt,
                       parents=[sampling_parent()])
    v.add_argument("image", help="input image")
    v.add_argument("--prompt", default="", help="the prompt to invert under (text models)")
    v.add_argument("--model", default=None, help="model directory (default: the shipped shapes model)")
    v.add_argument("--method", choices=("exact", "ddim"), default="ddim",
                   help="ddim: noise only; exact: also the per-step residuals (reconstruction to float precision)")
    v.add_argument("--layout", default="none", help="layout models: none, auto or a JSON layout (see generate)")
    v.add_argument("-o", "--output", default="noise.safetensors", help="output .safetensors")
    v.set_defaults(func=invert_command)


def _common(model_help: str = "model directory (default: the shipped shapes model)"):
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("image", nargs="?", default=None, help="input image (with --from-png: default the recorded one)")
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--layout", default="auto", help="layout models: auto, none, or a JSON layout (see generate)")
    p.add_argument("-o", "--output", default="edit.png", help="output PNG")
    p.add_argument("--from-png", default=None, help="reproduce the edit recorded in this PNG")
    return p


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_image(path: str, pipe, what: str = "image", mode: str | None = None):
    """The PIL image at ``path`` in ``mode`` (default: the model's L or RGB); one line for a missing or
    non-image file."""
    from PIL import Image, UnidentifiedImageError

    src = Path(path)
    if not src.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    try:
        with Image.open(src) as im:
            im.load()
            image = im.convert(mode or ("L" if pipe.image_shape[0] == 1 else "RGB"))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise UserError(f"{path} is not an image PIL can read") from None
    return image


def to_tensor(image, size: tuple[int, int], name: str, resample=None):
    """``[1, C, H, W]`` in [-1, 1] at ``size``: resized (bicubic) with a warning line, or with ``resample`` quietly."""
    import numpy as np
    import torch
    from PIL import Image

    if image.size != size:
        if resample is None:
            print(f"reverie: warning: {name} is {image.size[0]}x{image.size[1]}; resized to the model's "
                  f"{size[0]}x{size[1]}", file=sys.stderr)
        image = image.resize(size, Image.BICUBIC if resample is None else resample)
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
    arr = arr[None] if arr.ndim == 2 else arr.permute(2, 0, 1)
    return (arr / 127.5 - 1)[None]


def _source(args, made_by: dict, key: str = "source", option: str = "IMAGE") -> Path:
    """The source image: the command line's, or with --from-png the recorded one, checked by hash."""
    given = args.image if key == "source" else getattr(args, "mask", None)
    path = Path(given or made_by.get(key) or "")
    if not given and not made_by.get(key):
        raise UserError(f"give the input {option}")
    if made_by:
        if not path.is_file():
            raise FileNotFoundError(f"{path} (the recorded {key} of {args.from_png}) not found; give it as {option}")
        want = made_by.get(f"{key}_sha256")
        if want and file_sha256(path) != want:
            raise UserError(f"{path} is not the {key} image {args.from_png} was made from (SHA-256 {want[:16]}...)")
    return path


def _recorded(args, names: tuple[str, ...]) -> dict:
    """``--from-png``: the recorded command parameters (over the command line's), else {}."""
    if not args.from_png:
        return {}
    made_by = read_png_parameters(Path(args.from_png))
    if made_by.get("command") != args.command_name:
        raise UserError(f"{args.from_png} was not made by reverie {args.command_name} "
                        f"({made_by.get('command') or 'generate'})")
    for name in names:
        if name in made_by:
            setattr(args, name, made_by[name])
    return made_by


def _model_dir(args, made_by: dict, default: Path) -> Path:
    """--model; else, reproducing a PNG, the shipped model it names (if there is one); else ``default``."""
    if args.model:
        return Path(args.model)
    named = str(made_by.get("model") or "")
    if named and Path(named).name == named and (DEFAULT_MODEL.parent / named / "config.json").is_file():
        return DEFAULT_MODEL.parent / named
    return default


def _setup(args, names: tuple[str, ...]):
    """(pipeline, options, image tensor, source path, recorded params) of an edit command."""
    from ..pipeline import Pipeline
    from ..sampling import SamplingOptions

    made_by = _recorded(args, names)
    output_file(args.output, (".png",))
    source = _source(args, made_by)
    options = SamplingOptions.from_metadata(made_by, args.from_png) if made_by else \
        sampling_options(args, layout_arg(args.layout))
    pipe = Pipeline.from_pretrained(_model_dir(args, made_by, DEFAULT_MODEL))
    if made_by.get("model_hash") and made_by["model_hash"] != pipe.weights_hash:
        print(f"reverie: warning: {args.from_png} was made by model {made_by.get('model')}, not {pipe.name}",
              file=sys.stderr)
    _, h, w = pipe.image_shape
    original = load_image(str(source), pipe)
    return pipe, options, original, to_tensor(original, (w, h), str(source)), source, made_by


def _save(args, pipe, images, options, source: Path, params: dict, start: float) -> int:
    import dataclasses
    import time

    from ..images import to_pil

    used = dataclasses.replace(options.resolve(pipe.cfg), grid=options.grid)
    meta = {"command": args.command_name, "source": str(source), "source_sha256": file_sha256(source), **params,
            **used.to_metadata(), "model": pipe.name, "model_hash": pipe.weights_hash}
    save_png(to_pil(images)[0], Path(args.output), meta)
    print(f"{args.command_name}: {time.perf_counter() - start:.2f} s -> {args.output}")
    return 0


def _prompt_check(pipe, *prompts) -> None:
    if pipe.conditioning != "text" and any(prompts):
        raise UserError(f"model {pipe.name!r} is not text-conditioned; give no prompt")


def edit_command(args) -> int:
    import dataclasses
    import time

    from .. import editing

    args.command_name = "edit"
    pipe, options, _, image, source, made_by = _setup(args, ("prompt", "strength", "from_prompt", "to_prompt",
                                                             "method", "local_blend", "fresh_noise"))
    start = time.perf_counter()
    if args.from_prompt is not None or args.to_prompt is not None:
        if args.from_prompt is None or args.to_prompt is None:
            raise UserError("a prompt edit needs both --from-prompt and --to-prompt")
        if args.strength is not None or args.prompt:
            raise UserError("give either PROMPT [--strength] (img2img) or --from-prompt/--to-prompt, not both")
        _prompt_check(pipe, args.from_prompt, args.to_prompt)
        if args.local_blend and not pipe.takes_layouts:
            raise UserError(f"--local-blend needs a layout-conditioned model (its boxes are the mask); {pipe.name!r} "
                            f"takes no layouts")
        local_blend = "auto" if args.local_blend is None else args.local_blend
        # an edit recorded before fresh noise existed reproduces without it
        fresh_noise = args.fresh_noise if args.fresh_noise is not None else 0.0 if made_by else editing.FRESH_NOISE
        if options.sampler is None:  # invert's default, recorded as such so that --from-png reproduces the edit
            options = dataclasses.replace(options, sampler="ddim")
        out = editing.edit(pipe, image, args.from_prompt, args.to_prompt, options, method=args.method,
                           local_blend=local_blend, fresh_noise=fresh_noise, progress=show_progress(args))
        params = {"from_prompt": args.from_prompt, "to_prompt": args.to_prompt, "method": args.method,
                  "local_blend": local_blend, "fresh_noise": fresh_noise}
    else:
        strength = 0.6 if args.strength is None else args.strength
        _prompt_check(pipe, args.prompt)
        out = editing.img2img(pipe, image, args.prompt or "", strength, options, progress=show_progress(args))
        params = {"prompt": args.prompt or "", "strength": strength}
    return _save(args, pipe, out, options, source, params, start)


def parse_box(text: str, width: int, height: int) -> tuple[float, ...]:
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4:
        raise UserError(f"--box must be x0,y0,x1,y1 in pixels, got {text!r}")
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise UserError(f"--box {text} must satisfy 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height} "
                        f"(the input image is {width}x{height})")
    return box


def _mask(args, made_by, original, size):
    """The mask tensor [1, 1, h, w] (0/1 at the model's size) from --mask or --box, checked against the input."""
    from PIL import Image

    if (args.mask is None) == (args.box is None) and not made_by:
        raise UserError("give the region to repaint with --mask MASK.png or --box x0,y0,x1,y1")
    if args.box is not None and not args.mask:
        x0, y0, x1, y1 = parse_box(args.box, *original.size)
        mask = Image.new("L", original.size, 0)
        mask.paste(255, (round(x0), round(y0), round(x1), round(y1)))
        if mask.getbbox() is None:
            raise UserError(f"--box {args.box} covers no whole pixel")
        path = None
    else:
        path = _source(args, made_by, "mask", "--mask")
        with_pil = load_image(str(path), None, "mask", mode="L")
        if with_pil.size != original.size:
            raise UserError(f"the mask {path} is {with_pil.size[0]}x{with_pil.size[1]}, the image "
                            f"{original.size[0]}x{original.size[1]}: they must be the same size")
        mask = with_pil
    m = to_tensor(mask, size, "mask", resample=Image.NEAREST)
    return (m > 0).float(), path


def inpaint_command(args) -> int:
    import time

    from .. import editing

    args.command_name = "inpaint"
    pipe, options, original, image, source, made_by = _setup(
        args, ("prompt", "box", "strength", "jump_length", "resample", "eta", "method"))
    _, h, w = pipe.image_shape
    mask, mask_path = _mask(args, made_by, original, (w, h))
    _prompt_check(pipe, args.prompt)
    method = editing.inpaint_method(pipe, args.method)
    start = time.perf_counter()
    out = editing.inpaint(pipe, image, mask, args.prompt or "", options, strength=args.strength,
                          jump_length=args.jump_length, resample=args.resample, eta=args.eta, method=method,
                          progress=show_progress(args))
    params = {"prompt": args.prompt or "", "strength": args.strength, "method": method}
    if method == "repaint":
        params.update(jump_length=args.jump_length, resample=args.resample, eta=args.eta)
    if mask_path is not None:
        params.update(mask=str(mask_path), mask_sha256=file_sha256(mask_path))
    else:
        params["box"] = args.box
    return _save(args, pipe, out, options, source, params, start)


def invert_command(args) -> int:
    import json
    import time

    from safetensors.torch import save_file

    from .. import editing
    from ..pipeline import Pipeline

    output_file(args.output, (".safetensors",))
    pipe = Pipeline.from_pretrained(Path(args.model) if args.model else DEFAULT_MODEL)
    _prompt_check(pipe, args.prompt)
    _, h, w = pipe.image_shape
    image = to_tensor(load_image(args.image, pipe), (w, h), args.image)
    options = sampling_options(args, layout_arg(args.layout))
    start = time.perf_counter()
    inv = editing.invert(pipe, image, args.prompt, options, method=args.method, progress=show_progress(args))
    tensors = {"noise": inv.noise.contiguous()}
    for i, r in enumerate(inv.residuals or []):
        tensors[f"residual.{i:04d}"] = r.float().cpu().contiguous()
    meta = {"source": args.image, "source_sha256": file_sha256(Path(args.image)), "prompt": args.prompt,
            "method": args.method, "model": pipe.name, "model_hash": pipe.weights_hash,
            "options": inv.options.to_metadata()}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, args.output, metadata={"reverie": json.dumps(meta)})
    print(f"invert: {time.perf_counter() - start:.2f} s, noise std {float(inv.noise.std()):.3f} -> {args.output}")
    return 0
