"""The ``reverie`` command, grouped by job: ``generate.py`` (generate, sample, tune-grid), ``train.py``
(train, train-vae, export), ``evaluate.py`` (eval), ``info.py`` (inspect, data preview); ``common.py``
holds the one-line error parser and the sampling options every generating command shares.

User mistakes (bad config keys or values, missing or damaged files, unknown samplers) print one line
``reverie: error: ...`` and exit with status 2; they never show a traceback (``REVERIE_DEBUG=1``
shows it). A real bug still shows its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..configs import ConfigError
from ..optional import MissingExtra
from . import audio, edit, evaluate, generate, info, serve, text, train, verify
from . import video as video_cli
from .common import Parser, UserError

__all__ = ["main", "build_parser", "UserError"]


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    from .. import __version__

    p = Parser(prog="reverie", description="Diffusion models: train, sample, evaluate, inspect.", formatter_class=fmt)
    p.add_argument("--version", action="version", version=f"reverie {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for group in (train, generate, edit, evaluate, info, serve, verify, text, audio):
        group.add_commands(sub, fmt)
    video_cli.add_commands(sub, fmt)  # generate-video
    for command in _leaf_parsers(sub):
        command.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def _leaf_parsers(sub) -> list:
    leaves = []
    for parser in sub.choices.values():
        nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        leaves += _leaf_parsers(nested[0]) if nested else [parser]
    return leaves


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    for name in ("image", "prompt"):  # `inpaint IMAGE --box B PROMPT`: argparse ends optional positionals at an option
        if unknown and getattr(args, name, "") is None and not unknown[0].startswith("-"):
            setattr(args, name, unknown.pop(0))
    if unknown:  # config overrides look like options: --train.lr=2e-4
        if args.command not in ("train", "train-vae") or not all(u.startswith("--") and "=" in u for u in unknown):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides = list(args.overrides) + unknown
    from ..train.errors import RunChanged, RunInUse, TrainingError, TrainingInterrupted

    try:
        return args.func(args)
    except (ConfigError, ValueError, OSError, TrainingError, MissingExtra) as e:
        if os.environ.get("REVERIE_DEBUG"):
            raise
        print(f"reverie: error: {one_line(e)}", file=sys.stderr)
        ran_and_failed = isinstance(e, TrainingError) and not isinstance(e, (RunInUse, RunChanged))
        return 1 if ran_and_failed else 2
    except TrainingInterrupted as e:  # a checkpoint was written at the step where it stopped
        print(f"reverie: {e}", file=sys.stderr)
        return 128 + int(e.signum)
    except KeyboardInterrupt:
        print("reverie: interrupted", file=sys.stderr)
        return 130


def one_line(error: BaseException) -> str:
    """The error as one line; an OSError names its file (disk full, permission denied, not a directory)."""
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror}"
    text = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
    return text or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
