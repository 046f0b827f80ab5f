"""Commands that train: ``train`` (a diffusion model), ``train-vae`` (its autoencoder) and ``export``
(a checkpoint to a model directory)."""

from __future__ import annotations

import json


def add_commands(sub, fmt) -> None:
    for name, what, example in (("train", "a diffusion model from a YAML/JSON config", "--optim.lr=2e-4"),
                                ("train-vae", "a KL autoencoder for latent diffusion from a config (kind: vae)",
                                 "--loss.kl_weight=1e-6")):
        t = sub.add_parser(name, help=f"train {what}", formatter_class=fmt)
        t.add_argument("config", help="config file (see configs/)")
        t.add_argument("overrides", nargs="*", help=f"config overrides, e.g. {example} --train.steps=100")
        t.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
        t.add_argument("--resume", default="auto", help="auto (latest checkpoint in out_dir), no, or a path")
        t.set_defaults(func=train if name == "train" else train_vae)

    ex = sub.add_parser("export", help="turn a checkpoint or run directory into a model directory, or a model into "
                        "ONNX graphs (--format onnx)", formatter_class=fmt)
    ex.add_argument("checkpoint", help="checkpoint directory, or a run directory (its latest checkpoint); with "
                    "--format onnx also a model directory")
    ex.add_argument("-o", "--output", default=None, help="directory to write (needed for --format reverie; onnx: "
                    "default NAME-onnx)")
    ex.add_argument("--format", choices=("reverie", "onnx"), default="reverie",
                    help="reverie: a model directory; onnx: graphs for python -m reverie.onnx_runtime")
    ex.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    ex.add_argument("--half", action="store_true", help="store the weights in float16 (half the size; reverie format)")
    ex.add_argument("--int8", action="store_true", help="onnx: also write statically quantized int8 (QDQ) graphs")
    ex.add_argument("--steps", default=None, help="onnx: step counts the runner may use, e.g. 20,10 "
                    "(default: the model's own)")
    ex.add_argument("--calibration-prompts", type=int, default=16, help="onnx --int8: training captions to "
                    "calibrate on (2 images each)")
    ex.set_defaults(func=export)


def _config(cls, args):
    from ..configs import load_config, to_dict

    overrides = list(args.overrides) + (["--train.progress=false"] if args.quiet else [])
    cfg = load_config(cls, args.config, overrides)
    if args.dry_run:
        print(json.dumps(to_dict(cfg), indent=2))
        return None
    return cfg


def _resume(args):
    return {"auto": "auto", "no": False}.get(args.resume, args.resume)


def _run(args, cls, run, what: str, figure=lambda result: "") -> int:
    """Load ``cls`` from the config (or print it with --dry-run), train with ``run`` and say where the model went."""
    cfg = _config(cls, args)
    if cfg is not None:
        result = run(cfg, resume=_resume(args))
        print(f"{what} written to {result.export_dir}{figure(result)}")
    return 0


def train(args) -> int:
    from ..configs import read_config_file

    raw = read_config_file(args.config)
    if raw.get("kind") == "text":  # a text model (reverie.train.text)
        from ..train.text import TextTrainConfig, train_text
        return _run(args, TextTrainConfig, train_text, "text model", lambda r: "" if r.validation_bpc is None
                    else f" (validation {r.validation_bpc:.3f} bits/char)")
    if "vdm" in raw:  # a learned log-SNR schedule trained with the network (reverie.train.vdm)
        from ..train.vdm import VDMTrainConfig, train_vdm
        return _run(args, VDMTrainConfig, train_vdm, "model")
    if "mulan" in raw:  # an input-adaptive per-pixel schedule with a latent (reverie.train.mulan)
        from ..train.mulan import MuLANTrainConfig, train_mulan
        return _run(args, MuLANTrainConfig, train_mulan, "model")
    from ..train import TrainConfig
    from ..train import train as run_training
    return _run(args, TrainConfig, run_training, "model")


def train_vae(args) -> int:
    from ..train import VAETrainConfig
    from ..train import train_vae as run_training

    return _run(args, VAETrainConfig, run_training, "autoencoder",
                lambda r: "" if r.psnr_db is None else f" (held-out PSNR {r.psnr_db:.2f} dB)")


def export(args) -> int:
    import torch

    from ..train import export_checkpoint
    from .common import output_dir

    if args.format == "onnx":
        return export_onnx(args)
    if args.int8 or args.steps:
        raise ValueError("--int8 and --steps are options of --format onnx")
    if args.output is None:
        raise ValueError("-o/--output is required: the model directory to write")
    output_dir(args.output, "-o")  # checked, not created: a damaged checkpoint leaves nothing behind
    out = export_checkpoint(args.checkpoint, args.output, use_ema=not args.no_ema,
                            dtype=torch.float16 if args.half else torch.float32)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 2**20
    print(f"exported {args.checkpoint} -> {out} ({size:.1f} MiB)")
    return 0


def export_onnx(args) -> int:
    from pathlib import Path

    from ..export import export_onnx as run_export
    from ..pipeline import Pipeline
    from .common import output_dir

    if args.half:
        raise ValueError("--half is an option of the reverie format; ONNX graphs are float32 (or --int8)")
    steps = None
    if args.steps:
        try:
            steps = [int(s) for s in args.steps.split(",")]
        except ValueError:
            raise ValueError(f"--steps must be comma-separated integers, got {args.steps!r}") from None
        if min(steps) < 1:
            raise ValueError(f"--steps must be at least 1, got {args.steps}")
    if args.calibration_prompts < 1:
        raise ValueError(f"--calibration-prompts must be at least 1, got {args.calibration_prompts}")
    pipe = Pipeline.from_pretrained(args.checkpoint, use_ema=not args.no_ema, precision="fp32")
    out = Path(args.output or f"{Path(args.checkpoint).resolve().name}-onnx")
    output_dir(str(out), "-o")
    report = run_export(pipe, out, steps=steps, int8=args.int8, calibration_prompts=args.calibration_prompts,
                        progress=not args.quiet, name=pipe.name)
    checks = ", ".join(f"{k} {v:.1e}" for k, v in report.max_error.items())
    print(f"exported {args.checkpoint} -> {out}: {report.megabytes():.1f} MB fp32"
          + (f", {report.megabytes(int8=True):.1f} MB int8" if args.int8 else "")
          + f"; largest |ONNX - PyTorch|: {checks} (tolerance 1e-3)")
    if report.int8_error:
        print("int8 vs fp32 on a calibration input: " + ", ".join(f"{k} {v:.2g}" for k, v in report.int8_error.items()))
    print(f'run it: python -m reverie.onnx_runtime {out} "a red circle" -o out.png' + (" --int8" if args.int8 else ""))
    return 0
