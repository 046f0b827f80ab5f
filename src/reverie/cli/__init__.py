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
from . import evaluate, generate, info, train
from .common import Parser, UserError

__all__ = ["main", "build_parser", "UserError"]


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = Parser(prog="reverie", description="Diffusion models: train, sample, evaluate, inspect.", formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for group in (train, generate, evaluate, info):
        group.add_commands(sub, fmt)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # config overrides look like options: --train.lr=2e-4
        if args.command not in ("train", "train-vae") or not all(u.startswith("--") and "=" in u for u in unknown):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides = list(args.overrides) + unknown
    from ..train.errors import TrainingError

    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError, TrainingError) as e:
        if os.environ.get("REVERIE_DEBUG"):
            raise
        print(f"reverie: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, TrainingError) else 2
    except KeyboardInterrupt:
        print("reverie: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
