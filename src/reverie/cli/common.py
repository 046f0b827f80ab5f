"""What the commands share: the one-line error parser, value types checked while parsing, and the
parent parser of the sampling options (one flag per ``SamplingOptions`` field)."""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "assets" / "shapes-t2i"
GRID_HELP = "sigma grid: karras, ddim-trailing, ..., or a grid file from tune-grid (default: the model's)"


class UserError(ValueError):
    """A mistake in what the user asked for: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with reverie's error contract: one line on stderr, exit status 2, no usage dump."""

    def error(self, message: str):
        if message.startswith("argument "):  # "argument --steps: must be ..." -> "--steps: must be ..."
            message = message[len("argument "):]
        print(f"reverie: error: {message}", file=sys.stderr)
        sys.exit(2)


def at_least(low: int):
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def number_in(low: float, high: float):
    """An argparse type: a finite number in [low, high]."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def sampler_name(text: str) -> str:
    from ..samplers import check_sampler

    try:
        return check_sampler(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def sampling_parent() -> argparse.ArgumentParser:
    """The sampling options every generating command takes; None means the model's own setting."""
    from ..limits import MAX_GUIDANCE, MAX_STEPS

    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("sampling options (default: the model's own settings)")
    g.add_argument("--sampler", type=sampler_name, default=None, help="sampler name (ddim, dpmpp_2m, unipc, ...)")
    g.add_argument("--steps", type=at_least(1), default=None,
                   help=f"sampling steps, at most {MAX_STEPS} (a grid file fixes them)")
    g.add_argument("--grid", default=None, help=GRID_HELP)
    g.add_argument("--guidance-scale", "--guidance", dest="guidance_scale", type=number_in(0, MAX_GUIDANCE),
                   default=None, help="classifier-free guidance scale (1: none)")
    g.add_argument("--guidance-rescale", type=number_in(0, 1), default=0.0, help="guidance rescale phi")
    g.add_argument("--negative-prompt", default="", help="what to steer away from (text models)")
    g.add_argument("--seed", type=at_least(0), default=0, help="random seed")
    g.add_argument("--corrector-steps", type=at_least(0), default=None,
                   help="--sampler pc: Langevin corrector steps per level (default 1)")
    g.add_argument("--snr", type=number_in(1e-6, 10), default=None,
                   help="--sampler pc: the corrector's signal-to-noise ratio (default 0.16)")
    g.add_argument("--clip-denoised", action="store_true",
                   help="clamp every x0 estimate to [-1, 1] (DDPM's clip_denoised; pixel-space models)")
    g.add_argument("--regional", action=argparse.BooleanOptionalAction, default=None,
                   help="layout models: denoise each object's box under its own phrase (regional prompts; one more "
                        "network pass per object; default: the model's own setting)")
    return p


def sampling_options(args, layouts="auto"):
    """The ``SamplingOptions`` of parsed arguments; ``--grid FILE`` (from ``tune-grid``) gives its sigmas, and
    its step count unless ``--steps`` says otherwise (an error)."""
    from ..samplers import GRIDS, TunedGrid
    from ..sampling import SamplingOptions

    grid, steps = args.grid, args.steps
    if grid is not None and grid not in GRIDS:
        if not grid.endswith(".json") and not Path(grid).is_file():
            raise UserError(f"unknown sigma grid {grid!r}; choose one of {', '.join(GRIDS)}, or a .json grid file "
                            f"from reverie tune-grid")
        tuned = TunedGrid.load(grid)
        if steps is not None and steps != tuned.steps:
            raise UserError(f"{grid} is a grid of {tuned.steps} steps; leave out --steps (or pass {tuned.steps})")
        if args.sampler is not None and args.sampler != tuned.sampler:
            print(f"reverie: warning: {grid} was tuned for {tuned.sampler}, not {args.sampler}", file=sys.stderr)
        grid = tuned.sigmas
    return SamplingOptions(sampler=args.sampler, steps=steps, grid=grid, guidance_scale=args.guidance_scale,
                           guidance_rescale=args.guidance_rescale, negative_prompt=args.negative_prompt,
                           layouts=layouts, seed=args.seed, corrector_steps=getattr(args, "corrector_steps", None),
                           snr=getattr(args, "snr", None), clip_denoised=getattr(args, "clip_denoised", False),
                           regional=getattr(args, "regional", None))


def show_progress(args) -> bool:
    """Progress bars on a terminal, unless --quiet."""
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def writable_dir(directory: Path, option: str) -> Path:
    """``directory`` after checking, without creating anything, that the command will be able to make it (if
    missing) and write in it: its nearest existing ancestor is a directory that takes a new file."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{option}: {directory} cannot be a directory: {existing} is a file")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".reverie-write-test-"):
            pass
    except OSError as e:
        raise UserError(f"{option}: cannot write in {existing}: {e.strerror}") from None
    return directory


def output_file(path: str, suffixes: tuple[str, ...], option: str = "-o") -> Path:
    """A file path the command will be able to write, checked before any work: not a directory, with one of
    ``suffixes``, in a directory that exists (or can be made) and is writable."""
    target = Path(path)
    if target.is_dir():
        raise UserError(f"{option} {path} is a directory; give a file name ending in {suffixes[0]}")
    if target.suffix.lower() not in suffixes:
        raise UserError(f"{option} {path}: the file name must end in {' or '.join(suffixes)}")
    writable_dir(target.parent, option)
    return target


def output_dir(path: str, option: str = "--out-dir") -> Path:
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise UserError(f"{option} {path} is a file, not a directory")
    return writable_dir(target, option)
