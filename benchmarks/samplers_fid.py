"""FID against NFE for reverie's samplers on a trained MNIST model, with diffusers' schedulers as anchors.

    python benchmarks/samplers_fid.py --model runs/ttq/reverie/model          # all methods, NFE 4..50
    python benchmarks/samplers_fid.py --model M --methods reverie:dpmpp_2m@karras diffusers:dpmpp_2m+karras --nfe 10
    python benchmarks/samplers_fid.py --model M --plot-only --merge part2.json   # combine parallel runs

Every method draws ``--n`` images from the same network (reverie's eps-prediction U-Net trained by
``configs/mnist-eps.yaml``) starting from the same pure-noise states (common random numbers: image
``i`` always starts from the same x_T), and is scored by FID (and KID) against the cached Inception
statistics of the 10k MNIST test images. A 1000-step DDPM (ancestral, every timestep) is the quality
bar. diffusers' schedulers drive the very same network: its eps output at their integer timesteps.

Methods are ``library:sampler@grid``: reverie runs each sampler on the ``karras`` grid spanning the
schedule's whole sigma range (0.01 .. 157 for DDPM's linear schedule) and on ``trailing`` (diffusers'
discrete grid, t = 999 ...); diffusers runs DPMSolverMultistep (dpmsolver++, order 2), UniPC (bh2),
EulerDiscrete and DDIM with ``timestep_spacing="trailing"``, and DPM-Solver++ / UniPC with
``use_karras_sigmas`` (its best few-step setting). NFE counts network calls; Heun gets
(NFE + 1) // 2 steps. Each finished point is stored at once in the results JSON, so an interrupted run
resumes where it stopped and later runs add points (``--force`` recomputes).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from functools import partial
from pathlib import Path

import torch

from samplers_gmm import Counted, diffusers_schedulers  # the same anchors and NFE counter as the GMM study

RESULTS = Path(__file__).resolve().parent / "results"
CALLS_PER_STEP = {"heun": 2}
REVERIE = ["dpmpp_2m", "unipc", "euler", "heun", "ddim", "ddpm", "euler_ancestral", "dpmpp_2m_sde"]
DIFFUSERS = ["dpmpp_2m", "unipc", "euler", "ddim", "dpmpp_2m+karras", "unipc+karras"]


SAMPLER_COLORS = {"dpmpp_2m": "tab:blue", "unipc": "tab:orange", "ddim": "tab:green", "euler": "tab:red",
                  "heun": "tab:purple", "ddpm": "tab:brown", "euler_ancestral": "tab:pink", "dpmpp_2m_sde": "tab:gray"}


def all_methods() -> list[str]:
    out = [f"reverie:{s}@{g}" for s in REVERIE for g in ("karras", "trailing")]
    return out + [f"diffusers:{k}" for k in DIFFUSERS]


def diffusers_scheduler(key: str, prediction: str = "eps"):
    """A fresh diffusers anchor scheduler (the table shared with samplers_gmm.py) for an eps or v model."""
    if prediction not in ("eps", "v"):
        raise SystemExit(f"diffusers anchors need an eps or v model, not {prediction!r}")
    cls, kwargs = diffusers_schedulers("epsilon" if prediction == "eps" else "v_prediction")[key]
    return cls(**kwargs)


def _noise(num: int, seed: int, shape) -> torch.Tensor:
    return torch.randn((num, *shape), generator=torch.Generator().manual_seed(seed))


def draw_reverie(pipe, sampler: str, grid: str, nfe: int, calls: list, num: int, seed: int) -> torch.Tensor:
    from reverie.samplers import get_sigmas, sample

    steps = max(1, nfe if CALLS_PER_STEP.get(sampler, 1) == 1 else (nfe + 1) // CALLS_PER_STEP[sampler])
    sigmas = get_sigmas("karras" if grid == "karras" else "ddim-trailing", steps, schedule=pipe.schedule)
    x_vp = _noise(num, seed, pipe.image_shape)
    x = x_vp * math.sqrt(1 + float(sigmas[0]) ** 2)  # pure noise at the top of the grid, VE coordinates
    den = Counted(pipe.denoiser)
    out = sample(sampler, den, x, sigmas, generator=torch.Generator().manual_seed(seed + 1))
    calls.append(den.calls)
    return out.clamp(-1, 1)


def draw_diffusers(pipe, key: str, nfe: int, calls: list, num: int, seed: int) -> torch.Tensor:
    sch = diffusers_scheduler(key, pipe.cfg.model.prediction)
    sch.set_timesteps(nfe)
    net = Counted(pipe.net)
    x = _noise(num, seed, pipe.image_shape) * float(sch.init_noise_sigma)
    with torch.no_grad():
        for t in sch.timesteps:
            eps = net(sch.scale_model_input(x, t), t.float().expand(num))
            x = sch.step(eps, t, x).prev_sample
    calls.append(net.calls)
    return x.clamp(-1, 1)


def draw_reference(pipe, steps: int, calls: list, num: int, seed: int) -> torch.Tensor:
    return draw_reverie(pipe, "ddpm", "trailing", steps, calls, num, seed)


def wait_for_reference(resolution: int, n: int) -> None:
    """Block until another process has cached the MNIST-test statistics (``--wait-reference``)."""
    from reverie.eval.fid import cache_dir

    while not list(cache_dir().glob(f"mnist-{resolution}-{n}-*.safetensors")):
        time.sleep(20)


def run_point(pipe, ref, method: str, nfe: int, args) -> dict:
    from reverie.eval.fid import evaluate_samples, sample_features

    calls: list[int] = []
    if method == "reference:ddpm":
        fn = partial(draw_reference, pipe, nfe, calls)
    else:
        lib, rest = method.split(":")
        if lib == "reverie":
            sampler, grid = rest.split("@")
            fn = partial(draw_reverie, pipe, sampler, grid, nfe, calls)
        else:
            fn = partial(draw_diffusers, pipe, rest, nfe, calls)
    t0 = time.perf_counter()
    feats = sample_features(fn, args.n, batch_size=args.batch_size, seed=args.seed, desc=f"{method} nfe {nfe}")
    res = evaluate_samples(feats, ref() if callable(ref) else ref, ("fid", "kid"))
    return {"method": method, "nfe": nfe, "measured_nfe": max(calls), "fid": res["fid"], "kid": res["kid"],
            "kid_std": res["kid_std"], "n": res["n"], "seconds": time.perf_counter() - t0}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    by: dict[str, list] = {}
    for p in results["points"]:
        by.setdefault(p["method"], []).append(p)
    for method, pts in sorted(by.items()):
        if method == "reference:ddpm":
            for p in pts:
                ax.axhline(p["fid"], color="k", ls=":", lw=1, label=f"DDPM {p['nfe']} steps")
                ax.axhline(1.1 * p["fid"], color="k", ls=":", lw=0.6, alpha=0.5)
            continue
        pts = sorted(pts, key=lambda p: p["nfe"])
        lib, rest = method.split(":")
        sampler = rest.split("@")[0].split("+")[0]
        karras = "karras" in rest
        # one colour per sampler; reverie solid with dots, diffusers dashed with crosses (the two often coincide)
        kw = {"color": SAMPLER_COLORS.get(sampler, "k"), "ls": ":" if karras else ("-" if lib == "reverie" else "--"),
              "marker": "o" if lib == "reverie" else "x", "ms": 4 if lib == "reverie" else 7,
              "mfc": "none" if karras else None}
        ax.plot([p["measured_nfe"] for p in pts], [p["fid"] for p in pts], label=method, **kw)
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import ScalarFormatter

    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel("NFE (network evaluations)")
    ax.set_ylabel(f"FID ({results['n']} samples vs MNIST test)")
    ax.set_title("Samplers on one MNIST U-Net: FID vs NFE")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def summarize(results: dict) -> dict:
    pts = results["points"]
    ref = [p for p in pts if p["method"] == "reference:ddpm"]
    out: dict = {}
    at10 = [p for p in pts if p["nfe"] == 10]
    rev = [p for p in at10 if p["method"].startswith("reverie")]
    dif = [p for p in at10 if p["method"].startswith("diffusers")]
    if rev:
        best = min(rev, key=lambda p: p["fid"])
        out["reverie_best_at_10"] = {"method": best["method"], "fid": best["fid"]}
    if dif:
        best = min(dif, key=lambda p: p["fid"])
        out["diffusers_best_at_10"] = {"method": best["method"], "fid": best["fid"]}
    if ref:
        out["reference_fid"] = ref[0]["fid"]
        if rev:
            out["reverie_best_at_10_over_reference"] = out["reverie_best_at_10"]["fid"] / ref[0]["fid"]
    if rev and dif:
        out["reverie_over_diffusers_at_10"] = out["reverie_best_at_10"]["fid"] / out["diffusers_best_at_10"]["fid"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory of an unconditional eps/v MNIST model")
    p.add_argument("--methods", nargs="*", default=None, help="default: every method; see --list")
    p.add_argument("--nfe", type=int, nargs="*", default=[4, 6, 10, 20, 50])
    p.add_argument("--reference-steps", type=int, default=1000, help="DDPM steps of the reference (0: skip)")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--ref-n", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--force", action="store_true", help="recompute points already in the results")
    p.add_argument("--wait-reference", action="store_true", help="wait for another process to cache the reference")
    p.add_argument("--plot-only", action="store_true")
    p.add_argument("--merge", nargs="*", default=[], help="results files of parallel runs to merge into --out")
    p.add_argument("--list", action="store_true", help="list the methods and exit")
    p.add_argument("--out", default=str(RESULTS / "samplers_fid.json"))
    args = p.parse_args()
    if args.list:
        print("\n".join(all_methods()))
        return
    from reverie.eval.fid import dataset_reference
    from reverie.pipeline import Pipeline

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    if results and results.get("n") != args.n:
        raise SystemExit(f"{out} holds n={results.get('n')} points; use --out for a different --n")
    pipe = Pipeline.from_pretrained(args.model)
    if pipe.vae is not None or pipe.conditioning != "none":
        raise SystemExit("samplers_fid needs an unconditional pixel-space model")
    if pipe.cfg.schedule.name != "linear" or pipe.cfg.schedule.zero_terminal_snr or \
            pipe.cfg.schedule.num_timesteps != 1000:
        raise SystemExit("the diffusers anchors assume DDPM's linear 1000-step schedule; this model uses "
                         f"{pipe.cfg.schedule}")
    for key, value in (("model_hash", pipe.weights_hash), ("seed", args.seed), ("ref_n", args.ref_n)):
        if results.get(key, value) != value:
            raise SystemExit(f"{out} holds points with {key}={results[key]!r}, not {value!r}; use --out")
    results.update({"model": str(args.model), "model_hash": pipe.weights_hash, "n": args.n, "seed": args.seed,
                    "ref_n": args.ref_n,
                    "machine": platform.processor() or platform.machine(), "torch": torch.__version__})
    results.setdefault("points", [])
    for other in args.merge:  # points of runs made in parallel (one process per core, each its own --out)
        theirs = json.loads(Path(other).read_text())
        if (theirs.get("model_hash"), theirs.get("n")) != (pipe.weights_hash, args.n):
            raise SystemExit(f"{other} was made with another model or n")
        keys = {(q["method"], q["nfe"]) for q in theirs["points"]}
        results["points"] = [q for q in results["points"] if (q["method"], q["nfe"]) not in keys] + theirs["points"]
    if not args.plot_only:
        loaded = {}

        def ref():  # loaded after the first point's samples, so sampling can overlap the reference's computation
            if "ref" not in loaded:
                if args.wait_reference:
                    wait_for_reference(pipe.image_shape[-1], args.ref_n)
                loaded["ref"] = dataset_reference("mnist", resolution=pipe.image_shape[-1], n=args.ref_n,
                                                  split="test")
            return loaded["ref"]

        results["reference"] = f"mnist test, {args.ref_n} images"
        todo = [(m, k) for m in (args.methods or all_methods()) for k in args.nfe]
        if args.reference_steps:
            todo.insert(0, ("reference:ddpm", args.reference_steps))
        for method, nfe in todo:
            done = [q for q in results["points"] if q["method"] == method and q["nfe"] == nfe]
            if done and not args.force:
                continue
            point = run_point(pipe, ref, method, nfe, args)
            results["points"] = [q for q in results["points"] if not (q["method"] == method and q["nfe"] == nfe)]
            results["points"].append(point)
            results["summary"] = summarize(results)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2))
            print(f"{method:32s} NFE {nfe:4d} ({point['measured_nfe']:4d} calls)  FID {point['fid']:8.3f}  "
                  f"KID {point['kid']:.5f}  {point['seconds']:.0f}s", flush=True)
    results["summary"] = summarize(results)
    out.write_text(json.dumps(results, indent=2))
    plot(results, out.with_suffix(".png"))
    print(json.dumps(results["summary"], indent=2))


if __name__ == "__main__":
    main()
