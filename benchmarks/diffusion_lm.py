"""Masked diffusion LM vs AR on Shakespeare (issue 19): likelihood, samples, infilling.

1. Test-split bits per character: the MDLM NELBO (an upper bound) beside the AR model's exact value (same
   width, depth, tokens and steps), and the T-step discrete-time bound for several T.
2. Generative perplexity under a separately trained, larger AR judge (with its bootstrap standard error over
   the samples), the samples' unigram entropy and distinct word 4-grams, against sampling steps, for
   ancestral, caching and EDLM (k = 2, 4, 8; importance sampling over ``--edlm-window``, by default every
   step), with wall-clock seconds per sample; the test text's entropy as the reference. One plot.
3. Infilling: on held-out lines, a masked span filled by the MDLM from both sides (caching, and EDLM with
   ``--infill-k`` candidates weighted by the AR model's likelihood of the whole window) vs the AR model's
   left-to-right continuation of the prefix, scored by the judge on span + right side given the left.

    python benchmarks/diffusion_lm.py --mdlm M --ar A --judge J [--samples 256] [--edlm-window 0,1]

Writes benchmarks/results/diffusion_lm.json and .png. Every draw is seeded.

4. The training curve: test bits per character of every kept checkpoint of the runs against their
   training time (the MDLM's NELBO bound and the AR model's exact value), and each checkpoint's bits per
   character on the first 64 validation windows (other plays: what picks a checkpoint), into
   diffusion_lm_curve.json/.png (or ``--out``):

    python benchmarks/diffusion_lm.py --curve RUN_MDLM,RUN_AR [--curve-ckpts DIR_MDLM,DIR_AR] [--windows 128]
    python benchmarks/diffusion_lm.py --curve RUN_AR --out FILE.json     # one run

   RUN_* are the training runs' out_dir (their ``model`` directory gives network and tokenizer); checkpoints
   are read from ``--curve-ckpts`` (default RUN/checkpoints; a run prunes to its last few, so keep copies).

5. Pairs of finished models (e.g. the end points of longer runs, each decayed to its own end): test bits per
   character of each MDLM / AR pair at its training steps, and with ``--judge`` the two infilling rows:

    python benchmarks/diffusion_lm.py --pairs M1,A1 M2,A2 ... [--judge J] [--nelbo-draws 32] --out FILE

   The NELBO is a Monte Carlo estimate (4 draws of times and masks); ``--nelbo-draws N`` adds N independent
   one-draw estimates, their mean and standard error.

6. Infilling with corrector sweeps (``reverie.discrete.sampling``): the caching infill, then S sweeps of
   Metropolis-Hastings towards the AR model's likelihood of the window (``--infill-sweeps``) or of Gibbs on the
   MDLM's own conditionals (``--infill-gibbs``), each row beside the same AR continuation:

    python benchmarks/diffusion_lm.py --infill-only --judge J [--infill-sweeps 0,2,8,32] [--infill-gibbs 2,8]
        [--infill-block B] [--out benchmarks/results/diffusion_lm_infill.json]

   ``--infill-block`` B: blocks of B adjacent span tokens redrawn together (a chain of B MDLM calls; MH also
   scores the old block under the same chain), where single tokens must pass through misspellings. The
   output's ``true_span``: each model's bits per character on the true spans (the MDLM by the chain rule with
   both sides, the AR model from the left only).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from reverie.cli.text import time_window
from reverie.discrete import sample_masked
from reverie.discrete.sampling import EDLM_WINDOW
from reverie.eval.text import bits_per_char, generative_metrics, test_windows, unigram_entropy
from reverie.language import TextLM, ar_sample

RESULTS = Path(__file__).resolve().parent / "results"


def likelihoods(mdlm: TextLM, ar: TextLM, windows: int, bound_steps: list[int], nelbo_draws: int = 0) -> dict:
    """AR exact and MDLM NELBO bits per character on the first ``windows`` test windows; the NELBO is a Monte
    Carlo estimate over random times and masks (4 draws, seed 0). With ``nelbo_draws`` N, also N independent
    one-draw estimates (seeds 0..N-1): their mean and its standard error, the estimate's own noise."""
    x = test_windows(mdlm, windows)
    out = {"windows": len(x), "window_len": mdlm.max_len,
           "ar_exact_bpc": bits_per_char(ar, x), "mdlm_nelbo_bpc": bits_per_char(mdlm, x, draws=4)}
    out["ratio"] = out["mdlm_nelbo_bpc"] / out["ar_exact_bpc"]
    if nelbo_draws:
        est = torch.tensor([bits_per_char(mdlm, x, draws=1, seed=s) for s in range(nelbo_draws)], dtype=torch.float64)
        mean, se = float(est.mean()), float(est.std() / nelbo_draws ** 0.5)
        out["mdlm_nelbo_draws"] = {"draws": nelbo_draws, "mean_bpc": mean, "se_bpc": se,
                                   "ratio": mean / out["ar_exact_bpc"]}
    out["mdlm_bound_by_steps"] = {str(T): bits_per_char(mdlm, x, draws=2, steps=T) for T in bound_steps}
    print(json.dumps(out, indent=1), flush=True)
    return out


def sample_run(mdlm: TextLM, ar: TextLM, judge: TextLM, sampler: str, steps: int, k: int, n: int, seed: int,
               window: tuple[float, float] = EDLM_WINDOW) -> dict:
    z = torch.full((n, mdlm.max_len), mdlm.mask_id)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    tokens, stats = sample_masked(mdlm.denoise, z, steps, mdlm.mask_id, g, sampler=sampler,
                                  energy_model=ar.log_likelihood if sampler == "edlm" else None, k=k, window=window)
    wall = time.perf_counter() - t0
    edlm = sampler == "edlm"
    row = {"sampler": sampler, "steps": steps, "k": k if edlm else None, "window": list(window) if edlm else None,
           "seconds_per_sample": wall / n, "denoiser_rows_per_sample": stats.denoiser_rows / n,
           "energy_rows_per_sample": stats.energy_rows / n, **generative_metrics(tokens, judge, mdlm)}
    print(json.dumps(row), flush=True)
    return row


def infill_lines(mdlm: TextLM, lines: int, span: int) -> list[tuple[torch.Tensor, int]]:
    """The first ``lines`` test windows with a line start within 16 tokens of the middle that leaves room for
    ``span`` tokens and 8 more: (window, span start) pairs."""
    nl = mdlm.tokenizer.encode("\n")[0]
    half, L = mdlm.max_len // 2, mdlm.max_len
    rows = []
    for w in test_windows(mdlm, None):
        starts = [i + 1 for i in range(half - 16, half + 16) if w[i] == nl and i + 1 + span < L - 8]
        if starts:
            rows.append((w, starts[0]))
        if len(rows) == lines:
            break
    return rows


@torch.no_grad()
def true_span_bits(mdlm: TextLM, ar: TextLM, lines: int, span: int) -> dict:
    """How well each model predicts the true span of the infill lines, bits per character: the MDLM by the
    chain rule with both sides visible (the span unmasked left to right, one token a call) and the AR model
    from the left side only."""
    rows = infill_lines(mdlm, lines, span)
    x = torch.stack([w for w, _ in rows])
    starts = torch.tensor([s for _, s in rows])
    idx = torch.arange(len(rows))
    z = x.clone()
    for j in range(span):
        z[idx, starts + j] = mdlm.mask_id
    t = torch.ones(len(rows), dtype=torch.float64)
    mdlm_nats = 0.0
    for j in range(span):
        log_p = torch.log_softmax(mdlm.denoise(z, t).double(), -1)
        mdlm_nats -= float(log_p[idx, starts + j, x[idx, starts + j]].sum())
        z[idx, starts + j] = x[idx, starts + j]
    ar_nats = -sum(float(ar.log_likelihood(w[None, :s + span])[0] - ar.log_likelihood(w[None, :s])[0])
                   for w, s in rows)
    n = len(rows) * span * math.log(2)
    out = {"lines": len(rows), "span": span, "mdlm_chain_both_sides_bpc": mdlm_nats / n,
           "ar_left_only_bpc": ar_nats / n}
    print(json.dumps(out), flush=True)
    return out


def infill_run(mdlm: TextLM, ar: TextLM, judge: TextLM, lines: int, span: int, steps: int, seed: int,
               sampler: str = "caching", k: int = 4, window: tuple[float, float] = EDLM_WINDOW,
               corrector: int = 0, corrector_energy: bool = True, corrector_block: int = 1) -> dict:
    """Windows of the test plays whose masked span starts at a line start after a left context of half the
    window; score -log p_judge(span, right | left) per character for both methods. With ``sampler`` edlm the
    MDLM's candidates are weighted by the AR model's likelihood of the whole window, both sides included. With
    ``corrector`` S, S sweeps over the span follow: Metropolis-Hastings towards the AR model's likelihood of the
    window (``corrector_energy``) or Gibbs on the MDLM's own conditionals."""
    rows, L = infill_lines(mdlm, lines, span), mdlm.max_len
    g = torch.Generator().manual_seed(seed)
    z = torch.stack([w.clone() for w, _ in rows])
    for i, (_, s) in enumerate(rows):
        z[i, s:s + span] = mdlm.mask_id
    t0 = time.perf_counter()
    use_ar = sampler == "edlm" or (corrector and corrector_energy)
    filled, stats = sample_masked(mdlm.denoise, z, steps, mdlm.mask_id, g, sampler=sampler, k=k, window=window,
                                  energy_model=ar.log_likelihood if use_ar else None, corrector=corrector,
                                  corrector_block=corrector_block)
    t_mdlm = time.perf_counter() - t0
    continued = torch.stack([w.clone() for w, _ in rows])
    g_ar = torch.Generator().manual_seed(seed + 1)  # its own draws: the same baseline beside every MDLM row
    t0 = time.perf_counter()
    for i, (w, s) in enumerate(rows):  # the AR model sees only the left side
        continued[i, s:s + span] = ar_sample(ar, w[None, :s], span, g_ar)[0, s:]
    t_ar = time.perf_counter() - t0

    chars = torch.tensor([L - s for _, s in rows], dtype=torch.float64)

    def line_nats(seqs):
        full = judge.log_likelihood(seqs)
        return torch.stack([judge.log_likelihood(seqs[i:i + 1, :s])[0] - full[i]
                            for i, (_, s) in enumerate(rows)]).double()

    def score(nats):
        return math.exp(float(nats.sum() / chars.sum()))

    nats_mdlm, nats_ar = line_nats(filled), line_nats(continued)
    # paired bootstrap over lines of log(ppl_mdlm / ppl_ar): negative when the infill wins
    gb = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(rows), (2000, len(rows)), generator=gb)
    boot = (nats_mdlm[idx].sum(1) - nats_ar[idx].sum(1)) / chars[idx].sum(1)

    edlm = sampler == "edlm"
    out = {"lines": len(rows), "span": span, "steps": steps, "sampler": sampler, "k": k if edlm else None,
           "window": list(window) if edlm else None, "corrector_sweeps": corrector, "corrector_block": corrector_block,
           "corrector": None if not corrector else ("mh-ar" if corrector_energy else "gibbs"),
           "corrector_acceptance": stats.accepted / stats.proposals if stats.proposals else None,
           "denoiser_rows_per_line": stats.denoiser_rows / len(rows),
           "energy_rows_per_line": stats.energy_rows / len(rows),
           "mdlm_infill_ppl": score(nats_mdlm),
           "ar_continuation_ppl": score(nats_ar), "original_ppl": score(line_nats(torch.stack([w for w, _ in rows]))),
           "log_ppl_ratio": float((nats_mdlm.sum() - nats_ar.sum()) / chars.sum()),
           "log_ppl_ratio_se": float(boot.std()),
           "mdlm_seconds": t_mdlm, "ar_seconds": t_ar,
           "examples": [{"left": mdlm.decode(w[:s].tolist())[-60:], "original": mdlm.decode(w[s:s + span].tolist()),
                         "mdlm": mdlm.decode(filled[i, s:s + span].tolist()),
                         "ar": mdlm.decode(continued[i, s:s + span].tolist()),
                         "right": mdlm.decode(w[s + span:].tolist())[:40]}
                        for i, (w, s) in enumerate(rows[:4])]}
    print(json.dumps({k: v for k, v in out.items() if k != "examples"}), flush=True)
    return out


def pair_run(pair: str, a, judge: TextLM | None) -> dict:
    """Likelihood (``a.windows`` test windows, no T-step bounds) and, with a ``judge``, the caching and EDLM
    infilling rows of one MDLM,AR pair of model directories, with the steps each was trained for."""
    mdlm, ar = (TextLM.load(path) for path in pair.split(","))
    row = {"mdlm": str(mdlm.path), "ar": str(ar.path),
           **{f"{lm.objective}_{key}": (lm.config.get("metrics") or {}).get(key)
              for lm in (mdlm, ar) for key in ("steps", "validation_bpc")},
           "likelihood": likelihoods(mdlm, ar, a.windows, [], a.nelbo_draws)}
    if judge is not None:
        row["infill"] = infill_run(mdlm, ar, judge, a.lines, span=24, steps=24, seed=2)
        row["infill_edlm"] = infill_run(mdlm, ar, judge, a.lines, span=24, steps=24, seed=2, sampler="edlm",
                                        k=a.infill_k, window=a.edlm_window)
    return row


CURVE_VALIDATION_WINDOWS = 64  # as many as a text run's own final validation (train.eval_windows)


def training_curve(runs: list[Path], ckpt_dirs: list[Path], windows: int) -> dict:
    """Test bits per character at each checkpoint of each run, with the training seconds it had taken."""
    from reverie.modeldir import load_module_weights
    from reverie.train.checkpoint import list_checkpoints, load_checkpoint

    out = {"windows": windows, "validation_windows": CURVE_VALIDATION_WINDOWS}
    for run, ckpts in zip(runs, ckpt_dirs):
        lm = TextLM.load(run / "model")
        x = test_windows(lm, windows)
        v = test_windows(lm, CURVE_VALIDATION_WINDOWS, split="validation")
        points = []
        for ckpt in list_checkpoints(ckpts):
            state = load_checkpoint(ckpt, ("step", "model"))
            load_module_weights(lm.net, state["model"], source=str(ckpt))
            points.append({"step": state["step"], "train_seconds": state.get("elapsed_s"),
                           "test_bpc": bits_per_char(lm, x, draws=4),
                           "validation_bpc": bits_per_char(lm, v, draws=4)})
            print(json.dumps({"objective": lm.objective, **points[-1]}), flush=True)
        out[lm.objective] = points
    return out


def plot_curve(curve: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for objective, label in (("mdlm", "MDLM (NELBO bound)"), ("ar", "AR (exact)")):
        points = curve.get(objective, [])
        if not points:
            continue
        bpc = [p["test_bpc"] for p in points]
        minutes, steps = [p["train_seconds"] / 60 for p in points], [p["step"] for p in points]
        for ax, xs in zip(axes, (minutes, steps)):
            line, = ax.plot(xs, bpc, "o-", ms=3, label=f"{label}, test")
            if all("validation_bpc" in p for p in points):  # curves written before it have none
                ax.plot(xs, [p["validation_bpc"] for p in points], "--", color=line.get_color(),
                        label=f"{label}, validation")
    xlabels = ("training minutes (1 CPU thread, shared machine)", "optimizer steps (32 x 128 characters)")
    for ax, xlabel in zip(axes, xlabels):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("bits per character")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    series = {}
    for r in result["samples"]:
        label = r["sampler"] + (f" k={r['k']}" if r["k"] else "")
        series.setdefault(label, []).append(r)
    for label, rs in series.items():
        rs = sorted(rs, key=lambda r: r["steps"])
        steps = [r["steps"] for r in rs]
        axes[0].errorbar(steps, [r["gen_ppl"] for r in rs], yerr=[r.get("gen_ppl_se", 0.0) for r in rs],
                         fmt="o-", capsize=2, label=label)
        axes[1].plot(steps, [r["entropy_bits"] for r in rs], "o-", label=label)
        axes[2].plot(steps, [r["seconds_per_sample"] for r in rs], "o-", label=label)
    axes[1].axhline(result["test_entropy_bits"], color="k", ls="--", lw=1, label="test text")
    titles = ("gen-ppl per char under the judge", "unigram entropy (bits)", "wall seconds per sample")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mdlm", default="shakespeare-mdlm")
    p.add_argument("--ar", default="shakespeare-ar")
    p.add_argument("--judge")
    p.add_argument("--curve", help="RUN_MDLM,RUN_AR: only the training curve (docstring, item 4)")
    p.add_argument("--curve-ckpts", help="DIR_MDLM,DIR_AR: where the runs' checkpoints are kept")
    p.add_argument("--pairs", nargs="+", metavar="MDLM,AR", help="only likelihood (and infilling with --judge) of "
                   "each pair of model directories (docstring, item 5)")
    p.add_argument("--samples", type=int, default=256, help="samples per generation row (64: gen-ppl +- ~0.5)")
    p.add_argument("--windows", type=int, default=256, help="test windows for bits per character")
    p.add_argument("--steps", default="8,32,128,1024", help="ancestral/caching step counts")
    p.add_argument("--edlm-steps", default="8,16,32,64")
    p.add_argument("--ks", default="2,4,8")
    p.add_argument("--edlm-window", type=time_window, default=EDLM_WINDOW, metavar="LO,HI",
                   help="t range of EDLM's importance sampling")
    p.add_argument("--infill-k", type=int, default=8, help="EDLM candidates per step for infilling")
    p.add_argument("--infill-only", action="store_true", help="only the infilling rows with corrector sweeps "
                   "(docstring, item 6)")
    p.add_argument("--infill-sweeps", default="0,2,8,32", help="MH sweeps towards the AR likelihood (item 6)")
    p.add_argument("--infill-gibbs", default="2,8", help="Gibbs sweeps on the MDLM alone (item 6; '' for none)")
    p.add_argument("--infill-block", type=int, default=1, help="tokens per corrector move (item 6)")
    p.add_argument("--nelbo-draws", type=int, default=0, metavar="N", help="--pairs: also N one-draw NELBO "
                   "estimates, their mean and standard error (the Monte Carlo noise of the bound)")
    p.add_argument("--lines", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="default: results/diffusion_lm.json (diffusion_lm_infill.json with "
                   "--infill-only; --pairs needs one)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    window = a.edlm_window
    if a.nelbo_draws == 1 or a.nelbo_draws < 0:
        p.error("--nelbo-draws takes N >= 2 (a standard error needs two estimates), or 0 for none")
    if a.curve:
        runs = [Path(r) for r in a.curve.split(",")]
        ckpts = [Path(c) for c in a.curve_ckpts.split(",")] if a.curve_ckpts else [r / "checkpoints" for r in runs]
        if len(runs) not in (1, 2) or len(ckpts) != len(runs):
            p.error("--curve takes RUN_MDLM,RUN_AR or one run (and --curve-ckpts with as many directories)")
        missing = [str(r / "model") for r in runs if not (r / "model" / "config.json").is_file()]
        if missing:
            p.error(f"--curve: no model directory at {', '.join(missing)} (a run writes it when it finishes)")
        curve = training_curve(runs, ckpts, a.windows)
        out = Path(a.out) if a.out else RESULTS / "diffusion_lm_curve.json"
        out.write_text(json.dumps(curve, indent=1))
        plot_curve(curve, out.with_suffix(".png"))
        print(f"wrote {out} and {out.with_suffix('.png')}")
        return
    if a.pairs:
        if any(len(pair.split(",")) != 2 for pair in a.pairs):
            p.error("--pairs takes MDLM,AR model directories, a pair per argument")
        judge = TextLM.load(a.judge) if a.judge else None
        if not a.out:
            p.error("--pairs needs --out FILE (the main results file is not theirs)")
        result = {"pairs": [pair_run(pair, a, judge) for pair in a.pairs]}
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")
        return
    if not a.judge:
        p.error("--judge is required (a separately trained AR model directory)")
    mdlm, ar, judge = TextLM.load(a.mdlm), TextLM.load(a.ar), TextLM.load(a.judge)
    if a.infill_only:
        sweeps = [(int(x), True) for x in a.infill_sweeps.split(",") if x.strip()]
        sweeps += [(int(x), False) for x in a.infill_gibbs.split(",") if x.strip()]
        result = {"mdlm": str(mdlm.path), "ar": str(ar.path), "judge": str(judge.path), "threads": a.threads,
                  "true_span": true_span_bits(mdlm, ar, a.lines, span=24),
                  "infill": [infill_run(mdlm, ar, judge, a.lines, span=24, steps=24, seed=2, corrector=n,
                                        corrector_energy=mh, corrector_block=a.infill_block) for n, mh in sweeps]}
        out = Path(a.out or RESULTS / "diffusion_lm_infill.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")
        return
    result = {"mdlm": str(mdlm.path), "ar": str(ar.path), "judge": str(judge.path),
              "mdlm_metrics": mdlm.config.get("metrics"), "ar_metrics": ar.config.get("metrics"),
              "judge_metrics": judge.config.get("metrics"), "threads": a.threads}
    result["likelihood"] = likelihoods(mdlm, ar, a.windows, [1, 4, 16, 64, 256])
    test_texts = [mdlm.decode(w.tolist()) for w in test_windows(mdlm, a.samples)]
    result["test_entropy_bits"] = unigram_entropy(test_texts)
    result["test_reference"] = generative_metrics(test_windows(mdlm, a.samples), judge, mdlm)
    result["samples"] = []
    steps = [int(s) for s in a.steps.split(",")]
    for s in steps:
        for sampler in ("ancestral", "caching"):
            if sampler == "ancestral" and s > 128:
                continue  # same samples as caching (same draws), 1 network call per step: too slow here
            result["samples"].append(sample_run(mdlm, ar, judge, sampler, s, 0, a.samples, seed=1))
    for k in [int(x) for x in a.ks.split(",")]:
        for s in [int(x) for x in a.edlm_steps.split(",")]:
            result["samples"].append(sample_run(mdlm, ar, judge, "edlm", s, k, a.samples, seed=1, window=window))
    result["infill"] = infill_run(mdlm, ar, judge, a.lines, span=24, steps=24, seed=2)
    result["infill_edlm"] = infill_run(mdlm, ar, judge, a.lines, span=24, steps=24, seed=2, sampler="edlm",
                                       k=a.infill_k, window=window)
    out = Path(a.out or RESULTS / "diffusion_lm.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
