"""Text models: ``generate-text`` (masked diffusion with prompts, infills and the EDLM sampler) and the text
branch of ``reverie eval`` (``--metrics nelbo,genppl``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import UserError, at_least, output_file, show_progress

DEFAULT_TEXT_MODEL = "shakespeare-mdlm"


def add_commands(sub, fmt) -> None:
    from ..discrete.sampling import CORRECTOR_BLOCK, MASKED_SAMPLERS

    t = sub.add_parser("generate-text", help="generate text with a masked diffusion language model",
                       formatter_class=fmt)
    t.add_argument("prompt_text", nargs="?", default=None, metavar="PROMPT", help="the text to start with")
    t.add_argument("--prompt", default=None, help="the text to start with (same as PROMPT)")
    t.add_argument("--model", default=DEFAULT_TEXT_MODEL, help="text model directory or shipped name")
    t.add_argument("--infill", default=None,
                   help="a passage whose [MASK] (one character) or [MASK*N] spans are filled from both sides")
    t.add_argument("--length", type=at_least(1), default=None, help="tokens in all (default: the model's)")
    t.add_argument("--steps", type=at_least(1), default=None, help="sampling steps (default: the model's)")
    t.add_argument("--sampler", choices=MASKED_SAMPLERS, default=None, help="default: the model's")
    t.add_argument("--k", type=at_least(1), default=None, help="edlm: candidates per step (default: the model's)")
    t.add_argument("--window", type=time_window, default=None, metavar="LO,HI",
                   help="edlm: the t range (1 = all masked) where candidates are importance-sampled; caching "
                        "outside it (default: the model's, 0,1 = every step)")
    t.add_argument("--energy", default=None,
                   help="edlm: the AR energy model (default: the model's, e.g. the shipped shakespeare-ar)")
    t.add_argument("--corrector", type=at_least(0), default=0, metavar="SWEEPS",
                   help="after sampling, sweeps of corrections over the generated positions, a block of tokens "
                        "redrawn at a time: kept by Metropolis-Hastings towards the AR energy's likelihood (with "
                        "--sampler edlm or --energy), always otherwise (Gibbs for blocks of 1)")
    t.add_argument("--corrector-block", type=at_least(1), default=CORRECTOR_BLOCK, metavar="TOKENS",
                   help="tokens redrawn together by a corrector move (with the shipped pair, infill judge "
                        "perplexity 5.02 after 16 sweeps of 6, 5.64 after 32 of 1)")
    t.add_argument("--n", type=at_least(1), default=1, help="number of samples")
    t.add_argument("--seed", type=at_least(0), default=0, help="same seed, same text")
    t.add_argument("--json", default=None, help="also write the texts and settings as JSON here")
    t.set_defaults(func=generate_text_command)


def time_window(text: str) -> tuple[float, float]:
    """An argparse type: ``LO,HI`` with 0 <= LO <= HI <= 1."""
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (two numbers in [0, 1]), got {text!r}") from None
    if not 0 <= lo <= hi <= 1:
        raise argparse.ArgumentTypeError(f"expected 0 <= LO <= HI <= 1, got {text!r}")
    return lo, hi


def load_energy(lm, name: str | None):
    from ..language import TextLM, resolve_text_model

    name = name or lm.config.get("sample", {}).get("energy") or None
    if not name:
        return None
    return TextLM.load(resolve_text_model(name, relative_to=lm.path))


def generate_text_command(args) -> int:
    from tqdm.auto import tqdm

    from ..discrete.sampling import EDLM_WINDOW
    from ..language import TextLM, generate_text

    if args.prompt_text is not None and args.prompt is not None:
        raise UserError("give the prompt once: as PROMPT or as --prompt")
    prompt = args.prompt if args.prompt is not None else (args.prompt_text or "")
    if args.infill is not None and prompt:
        raise UserError("--infill takes the whole passage; give no prompt with it")
    if args.json:
        output_file(args.json, (".json",), "--json")
    lm = TextLM.load(args.model)
    defaults = lm.config.get("sample", {})
    sampler = args.sampler or defaults.get("sampler", "caching")
    energy = load_energy(lm, args.energy) if sampler == "edlm" or (args.corrector and args.energy) else None
    settings = {"sampler": sampler, "steps": args.steps or defaults.get("steps", 128),
                "k": args.k or defaults.get("k", 4),
                "window": args.window or tuple(defaults.get("window", EDLM_WINDOW)),
                "length": args.length or defaults.get("length"), "seed": args.seed, "corrector": args.corrector,
                "corrector_block": args.corrector_block}
    total = settings["steps"] + args.corrector
    with tqdm(total=total, desc="generate-text", unit="step", disable=not show_progress(args), leave=False) as bar:
        def advance(i, z):  # sampling steps count down to 1, then corrector sweeps as 0, -1, ...
            bar.update(settings["steps"] - i + 1 - bar.n)

        texts, stats = generate_text(lm, prompt, settings["length"], settings["steps"], sampler, energy,
                                     settings["k"], settings["window"], args.seed, args.n, args.infill,
                                     callback=advance, corrector=args.corrector, corrector_block=args.corrector_block)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i}")
        print(text)
    if args.json:
        record = {"model": str(lm.path), "prompt": prompt, "infill": args.infill, **settings,
                  "energy": str(energy.path) if energy is not None else None, "texts": texts,
                  "denoiser_rows": stats.denoiser_rows, "energy_rows": stats.energy_rows,
                  "corrector_acceptance": stats.accepted / stats.proposals if stats.proposals else None}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0


def is_text_model(path: str | None) -> bool:
    """Whether ``path`` names a text model (a shipped name or a directory whose config says kind text)."""
    from ..language import SHIPPED_TEXT_MODELS

    if path is None:
        return False
    if path in SHIPPED_TEXT_MODELS:
        return True
    config = Path(path) / "config.json"
    try:
        return config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("kind") == "text"
    except (ValueError, OSError):
        return False  # the image branch reports a damaged config


def run_text_eval(args) -> int:
    """``reverie eval TEXT_MODEL --metrics nelbo,genppl``: test bits/char; samples under an AR judge."""
    from ..discrete.sampling import EDLM_WINDOW
    from ..eval.text import TEXT_METRICS, bits_per_char, generative_metrics, test_windows
    from ..language import TextLM, generate_text

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in TEXT_METRICS]
    if unknown:
        raise UserError(f"unknown text metric(s) {', '.join(unknown)}; choose from {', '.join(TEXT_METRICS)}")
    if args.json:
        output_file(args.json, (".json",), "--json")
    lm = TextLM.load(args.model)
    results: dict = {"model": str(lm.path), "objective": lm.objective}
    if "nelbo" in metrics:
        x = test_windows(lm, args.nll_n)
        results["test_bits_per_char"] = bits_per_char(lm, x)
        results["test_windows"] = len(x)
        kind = "NELBO bound" if lm.objective == "mdlm" else "exact"
        print(f"  test bits/char ({kind}, {len(x)} windows of {lm.max_len})  {results['test_bits_per_char']:.4f}")
    if "genppl" in metrics:
        if lm.objective != "mdlm":
            raise UserError("genppl scores samples of a masked diffusion model; this is an AR model")
        judge = TextLM.load(args.judge) if args.judge else load_energy(lm, None)
        if judge is None:
            raise UserError("genppl needs an AR judge: --judge MODEL")
        defaults = lm.config.get("sample", {})
        sampler = defaults.get("sampler", "caching")
        energy = load_energy(lm, None) if sampler == "edlm" else None
        steps = args.steps or defaults.get("steps", 128)
        texts, _ = generate_text(lm, "", None, steps, sampler, energy, defaults.get("k", 4),
                                 tuple(defaults.get("window", EDLM_WINDOW)), args.seed or 0, args.text_samples)
        import torch

        tokens = torch.stack([torch.tensor(lm.tokenizer.encode(t))[:lm.max_len] for t in texts])
        results.update(generative_metrics(tokens, judge, lm), sampler=sampler, steps=steps, judge=str(judge.path))
        print(f"  gen-ppl under {judge.path.name} ({sampler}, {steps} steps, {len(texts)} samples)  "
              f"{results['gen_ppl']:.2f} +- {results['gen_ppl_se']:.2f}   entropy {results['entropy_bits']:.3f} bits, "
              f"distinct-4 {results['distinct4']:.3f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0
