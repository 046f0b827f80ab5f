"""Commands that describe: ``inspect`` (a model directory, checkpoint or run) and ``data preview``."""

from __future__ import annotations

import math
from pathlib import Path

from .common import at_least, output_file


def add_commands(sub, fmt) -> None:
    i = sub.add_parser("inspect", help="describe a model directory, checkpoint or run", formatter_class=fmt)
    i.add_argument("path")
    i.set_defaults(func=inspect)

    d = sub.add_parser("data", help="dataset tools", formatter_class=fmt)
    dsub = d.add_subparsers(dest="data_command", required=True)
    pv = dsub.add_parser("preview", help="write a PNG grid of a dataset with captions", formatter_class=fmt)
    pv.add_argument("name", help="shapes, mnist, digits or imagefolder")
    pv.add_argument("--n", type=at_least(1), default=16, help="number of images")
    pv.add_argument("--resolution", type=at_least(8), default=64, help="image size")
    pv.add_argument("--seed", type=at_least(0), default=0, help="which images")
    pv.add_argument("--root", default=None, help="image folder (for imagefolder)")
    pv.add_argument("-o", "--output", default="preview.png", help="output PNG")
    pv.set_defaults(func=data_preview)


def _describe_model(found) -> None:
    from .. import modeldir

    config = found.config
    header = modeldir.check_safetensors(found.weights_file(use_ema=False))
    n = sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    with modeldir.parsing(found.path / "config.json"):
        _print_model(found, config, n)


def _print_model(found, config: dict, n: int) -> None:
    print(f"model directory {found.path}")
    print(f"  kind:       {found.kind}")
    print(f"  network:    {config['network'].get('arch')} ({n:,} parameters)")
    if found.kind != "diffusion":
        return
    model = config["train_config"]["model"]
    print(f"  prediction: {model['prediction']}")
    if model.get("conditioning", "none") != "none":
        encoder = f" ({model['text_encoder']} encoder)" if model["conditioning"] == "text" else ""
        layout = f", + object layouts ({model['layout_channels']} channels)" if model.get("layout_channels") else ""
        print(f"  condition:  {model['conditioning']}{encoder}{layout}")
    print(f"  schedule:   {config['train_config']['schedule']['name']}")
    print(f"  data:       {config['train_config']['data']['name']} {config['data']}")
    print(f"  ema:        {'yes' if (found.path / 'ema.safetensors').is_file() else 'no'}")


def inspect(args) -> int:
    from .. import modeldir
    from ..train.checkpoint import find_checkpoint, load_checkpoint

    path = Path(args.path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        _describe_model(modeldir.read(path))
        return 0
    ckpt = find_checkpoint(path)
    state = load_checkpoint(ckpt)
    data = state["data"]
    print(f"checkpoint {ckpt}")
    print(f"  step:     {state['step']}  (data epoch {data['epoch']}, batch {data['batch']})")
    print(f"  params:   {sum(v.numel() for v in state['model'].values()):,}")
    print(f"  skipped non-finite steps: {state.get('nonfinite_total', 0)}")
    return 0


def data_preview(args) -> int:
    from ..data import get_dataset
    from ..data.preview import preview_grid

    output_file(args.output, (".png",))
    options = {"resolution": args.resolution}
    if args.root:
        options["root"] = args.root
    preview_grid(get_dataset(args.name, **options), n=args.n, path=args.output, seed=args.seed)
    print(f"wrote a preview of {args.n} {args.name} images to {args.output}")
    return 0
