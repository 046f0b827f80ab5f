"""``reverie eval``: parse, run ``reverie.eval.evaluate`` and print its table (and JSON)."""

from __future__ import annotations

import json
from pathlib import Path

from .common import DEFAULT_MODEL, UserError, at_least, output_file, sampling_options, sampling_parent, show_progress

MAX_EVAL = 50_000


def add_commands(sub, fmt) -> None:
    from ..eval import EVAL_METRICS

    ev = sub.add_parser("eval", help="evaluate a model: FID, KID, precision/recall, NLL, prompt adherence",
                        formatter_class=fmt, parents=[sampling_parent()])
    ev.add_argument("model", nargs="?", default=None,
                    help="model, checkpoint or run directory (default: the shipped shapes model)")
    ev.add_argument("--metrics", default="fid", help=f"comma-separated metrics: {', '.join(EVAL_METRICS)}")
    ev.add_argument("--n", type=at_least(1), default=2000, help="generated images for fid/kid/pr")
    ev.add_argument("--ref", default=None, help="reference dataset (default: the model's training data)")
    ev.add_argument("--ref-split", default="test", help="reference split, for datasets that have splits")
    ev.add_argument("--ref-root", default=None, help="image folder of an imagefolder reference")
    ev.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ev.add_argument("--compile", action="store_true",
                    help="torch.compile the denoising network first (Pipeline.compile; pays off for long runs)")
    ev.add_argument("--ref-n", type=at_least(1), default=10000, help="reference images (statistics are cached)")
    ev.add_argument("--fid-precision", choices=("fp32", "bf16"), default="fp32",
                    help="the Inception network's precision: fp32 (the standard) or bf16 (2.4x faster on a CPU with "
                         "AMX, FID within ~1.5%%; compare FIDs only within one precision)")
    ev.add_argument("--batch-size", type=at_least(1), default=100, help="images per sampling batch")
    ev.add_argument("--per-prompt", type=at_least(1), default=4, help="images per prompt for adherence")
    ev.add_argument("--layout", choices=("auto", "none", "only"), default="auto",
                    help="adherence of a layout model: auto (boxes planned from each prompt), none (prompt alone) "
                         "or only (the planned boxes under an empty caption: what the layout map alone conveys)")
    ev.add_argument("--paraphrase", action="store_true",
                    help="adherence: show the model synonyms of the color and shape words (crimson disc, ...)")
    ev.add_argument("--nll-n", type=at_least(1), default=64, help="reference images for nll")
    ev.add_argument("--probe-n", type=at_least(1), default=256,
                    help="real shapes images per caption probe (probe metric)")
    ev.add_argument("--judge", default=None,
                    help="text models' genppl: the AR judge model (default: the model's energy model)")
    ev.add_argument("--text-samples", type=at_least(1), default=64, help="text models' genppl: samples")
    ev.add_argument("--watermark", action="store_true",
                    help="fid / adherence: sample from the Tree-Ring-watermarked start noise of your key, as reverie "
                         "generate does (default: the seed's plain noise; the same seeds either way, so two runs pair)")
    ev.add_argument("--json", default=None, help="also write the results as JSON here")
    ev.set_defaults(func=run_eval)


def run_eval(args) -> int:
    import torch

    from ..eval.evaluate import EvalSettings, evaluate, parse_metrics, result_rows
    from ..pipeline import Pipeline
    from ..sampling import check_batch
    from .text import is_text_model, run_text_eval

    if is_text_model(args.model):  # nelbo, genppl (reverie.eval.text)
        return run_text_eval(args)
    metrics = parse_metrics(args.metrics)
    for option, value in (("--n", args.n), ("--ref-n", args.ref_n)):
        if value > MAX_EVAL:
            raise UserError(f"{option} must be at most {MAX_EVAL:,} (FID's standard sample size), got {value:,}")
    options = sampling_options(args)
    if args.json:
        output_file(args.json, (".json",), "--json")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = EvalSettings(n=args.n, batch_size=args.batch_size, ref=args.ref, ref_split=args.ref_split,
                            ref_root=args.ref_root, ref_n=args.ref_n, device=device, per_prompt=args.per_prompt,
                            fid_precision=args.fid_precision,
                            layout=args.layout, paraphrase=args.paraphrase, nll_n=args.nll_n, probe_n=args.probe_n,
                            progress=show_progress(args), watermark=args.watermark)
    pipe = Pipeline.from_pretrained(args.model or DEFAULT_MODEL, device=device, compile=args.compile)
    check_batch(pipe, args.batch_size, guided=pipe.conditioning != "none")
    results = evaluate(pipe, metrics, options, settings)
    if args.grid is not None:
        results["grid"] = args.grid
    guidance = results["guidance"]
    extra = f", guidance {guidance}" if guidance is not None else ""
    extra += ", Tree-Ring watermark" if args.watermark else ""
    print(f"{pipe.name} ({results['sampler']}, {results['steps']} steps on the {results['grid']} grid, "
          f"seed {results['seed']}{extra})")
    rows = result_rows(results, settings, pipe.takes_layouts)
    width, vwidth = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    for label, value, where in rows:
        print(f"  {label:{width}s}  {value:>{vwidth}s}   {where}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0
