"""Sampler quality vs NFE on Gaussian mixtures with the exact denoiser: reverie vs diffusers.

For each dimension (a 5x5 grid of small Gaussians in 2-D; a fixed random 8-component anisotropic
mixture in 64-D, axis-aligned so that its exact denoiser costs O(N K D) rather than O(N K D^2):
samplers are equivariant under a global rotation and sliced W2 is too, so this loses nothing but
per-component orientations) and each NFE, every reverie sampler and four diffusers schedulers draw
``--samples`` samples driven by the *same exact* denoiser E[x0 | x]; the error is the sliced
Wasserstein-2 distance to fresh samples of the true mixture. A 1000-step DDPM run on the linear
1000-step schedule is the quality bar; the script prints, per method, the smallest NFE whose error
is within 10% of it.

    python benchmarks/samplers_gmm.py                  # full settings (writes benchmarks/results/)
    python benchmarks/samplers_gmm.py --quick          # 2-D, 4000 samples, NFE 4 8 15 50
    python benchmarks/samplers_gmm.py --device cuda    # same numbers, faster on a GPU

Choices (also written into the JSON under "notes"):

* Grids. reverie runs every sampler twice: on ``karras`` (rho 7, sigma 0.002 .. 80; EDM's grid, the
  best for these solvers) and on exactly the discrete grid diffusers uses (linear 1000-step VP
  schedule, ``trailing`` spacing: t = 999, ..., sigma 157 .. ; apples to apples).
* diffusers: DPMSolverMultistep (dpmsolver++, order 2), UniPCMultistep (bh2, order 2),
  EulerDiscrete and DDIM (eta 0, clip_sample off: clipping to [-1, 1] would change the target),
  all with ``timestep_spacing="trailing"`` (Lin et al. 2023: starts at t = 999, unlike DDIM's
  default "leading"), plus DPM-Solver++ and UniPC with ``use_karras_sigmas=True``, diffusers'
  own best few-step setting. The schedule is ``linear`` (DDPM's betas), not ``scaled_linear``:
  its sigma range 0.01 .. 157 covers EDM's 0.002 .. 80 at the top and nearly at the bottom,
  whereas scaled_linear (0.029 .. 14.6) stops at a noise level comparable to the 2-D components'
  std (0.05) and starts where the data is still visible, which would handicap diffusers.
* The exact denoiser is wrapped as an eps-network of that discrete schedule, which sees only an
  integer (or, for EulerDiscrete, float) timestep, as a trained network would:
  x_ve = x_vp / alpha_t, sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), eps = (x_ve - D) / sigma_t.
* Target. Every method ends with a step to sigma = 0 (its output is D(x, sigma_last)), so every
  method targets the data distribution p_0 itself, which is what the errors are measured against;
  the 1000-step DDPM's last step goes from sigma 0.01 to 0 the same way. (The one exception is
  diffusers' DDIM when 1000 is not a multiple of the step count: its last step ends at t = 0,
  sigma 0.01, leaving noise of std 0.01, as DDIM does there; negligible next to the errors here.)
* Start. Every run starts from an exact sample of the noised marginal p_sigma_top at its grid's
  top noise level (x0 + sigma_top n, the same x0 and n for every method: common random numbers),
  so no method pays for a prior mismatch and differences are the solvers' alone.
* NFE is the number of denoiser (model) calls, counted; Heun gets (NFE + 1) // 2 steps.
* The metric has a sampling-noise floor: two independent sets of 20k true samples are ~0.012 apart
  in 2-D and ~0.021 in 64-D, and a single such distance varies by +-30% (2-D: the 25 modes'
  sample counts are multinomial) and +-8% (64-D) from draw to draw, more than the 10% tolerance.
  So besides the requested criterion (SW2 <= 1.1 x the 1000-step DDPM's single-run SW2,
  "nfe_to_ref") the script reports "nfe_to_floor": SW2 <= 1.1 x the floor's mean over 16 pairs, the
  expected SW2 of a perfect sampler, which the 1000-step DDPM's value should match. Common random
  numbers (same start states, same generator seeds) make the curves comparable with each other
  even where their absolute level is noisy: the deterministic solvers on a grid all converge to
  one shared value.
* Tuned grids (``reverie:{dpmpp_2m,unipc}@tuned``): :func:`reverie.samplers.tune_sigmas` chooses
  each NFE's grid for that sampler by matching, on 512 pilot start states drawn with other seeds
  than the evaluation's, the outputs of a 200-step dpmpp_2m Karras solve from the same states
  (derivative-free coordinate search; levels kept in [0.002, 80]). Its cost (sampler runs,
  denoiser calls on the pilot batch, seconds) is recorded per NFE under "tuning": a one-off per
  model, sampler and NFE, not part of the NFE. Tuned up to ``--tune-max-nfe`` (20): above it the
  plain Karras grids already reach the floor.
* Why some diffusers curves stop improving: the discrete ``trailing`` grid of n steps ends at
  t = 1000/n - 1 and then jumps to sigma 0 with one denoiser call, x0 = D(x, sigma(t)); that is
  sigma 0.34 at 10 steps and still 0.024 at 200, where E[x0 | x] is narrower than the 0.05-std
  components. This belongs to the grid, not to the solver: reverie on the same grid gives the
  same numbers to about 3 digits.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from reverie.gmm import grid2d, random_mixture, sliced_w2, sorted_projections
from reverie.samplers import SAMPLERS, get_sigmas, sample, tune_sigmas
from reverie.schedules import DiscreteVPSchedule

RESULTS = Path(__file__).resolve().parent / "results"
CALLS_PER_STEP = {"heun": 2}  # Heun: 2 calls per step, the last step 1
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
# Karras grids by (sigma_min, sigma_max): EDM's default for every sampler, and for the two best
# solvers also one that stops at 0.01 (the linear schedule's sigma_min): below the 2-D components'
# std (0.05) EDM's 0.002 .. 0.01 steps are nearly identity maps, wasted at very low NFE.
KARRAS = {"karras": (SIGMA_MIN, SIGMA_MAX), "karras(0.01..80)": (0.01, SIGMA_MAX)}
TUNED = ("dpmpp_2m", "unipc")
TUNE_MAX_NFE = 20  # grids are tuned up to this NFE; above it the Karras grids already reach the floor
PILOT = 512  # pilot start states per tuning (seeds apart from the evaluation's)
REF_STEPS = 1000
TOL = 0.10  # "within 10% of the 1000-step reference"


def mixture_for(dim: int):
    if dim == 2:
        return "5x5 grid of isotropic Gaussians, spacing 0.5, std 0.05", grid2d(5, 0.5, 0.05)
    return (f"random {dim}-D mixture, 8 axis-aligned anisotropic components (stds 0.03..0.3), seed 0",
            random_mixture(dim, rotate=False))


def start_state(gmm, sigma_top: float, n: int, device) -> torch.Tensor:
    """An exact sample of p_sigma_top = p_0 * N(0, sigma_top^2 I), same randomness for every method."""
    x0 = gmm.sample(n, torch.Generator().manual_seed(1000))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1001), dtype=torch.float64)
    return (x0 + sigma_top * noise).to(device)


class Counted:
    """A denoiser that counts its calls (NFE)."""

    def __init__(self, denoiser):
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, x, sigma, **cond):
        self.calls += 1
        return self.denoiser(x, sigma, **cond)


def pilot_state(gmm, n: int, device) -> torch.Tensor:
    """Start states for tuning grids: like :func:`start_state`, other seeds (held out from evaluation)."""
    x0 = gmm.sample(n, torch.Generator().manual_seed(5))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    return (x0 + SIGMA_MAX * noise).to(device)


def run_reverie(name, gmm, grid: str, nfe: int, schedule, n, device, seed=7, pilot=PILOT):
    """(samples, denoiser calls, tuning record or None) of one reverie sampler at one NFE."""
    per = CALLS_PER_STEP.get(name, 1)
    steps = max(1, nfe if per == 1 else (nfe + 1) // per)
    tuning = None
    if grid == "tuned":
        t0 = time.perf_counter()
        tuned = tune_sigmas(gmm, pilot_state(gmm, pilot, device), name, steps, SIGMA_MIN, SIGMA_MAX)
        tuning = {**tuned.to_dict(), "seconds": time.perf_counter() - t0}
        sigmas = tuned.sigmas
    elif grid in KARRAS:
        sigmas = get_sigmas("karras", steps, *KARRAS[grid])
    else:
        sigmas = get_sigmas("ddim-trailing", steps, schedule=schedule)
    den = Counted(gmm)
    x = start_state(gmm, float(sigmas[0]), n, device)
    out = sample(name, den, x, sigmas.to(device), generator=torch.Generator(device).manual_seed(seed))
    return out, den.calls, tuning


def diffusers_schedulers(prediction_type: str = "epsilon"):
    """(class, kwargs) of each diffusers anchor: trailing grids on DDPM's linear 1000-step schedule."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    base = {"num_train_timesteps": 1000, "beta_schedule": "linear", "timestep_spacing": "trailing",
            "prediction_type": prediction_type}
    return {
        "dpmpp_2m": (DPMSolverMultistepScheduler, {**base, "algorithm_type": "dpmsolver++", "solver_order": 2}),
        "unipc": (UniPCMultistepScheduler, {**base, "solver_order": 2, "solver_type": "bh2"}),
        "euler": (EulerDiscreteScheduler, base),
        "ddim": (DDIMScheduler, {**base, "clip_sample": False, "set_alpha_to_one": True}),
        "dpmpp_2m+karras": (DPMSolverMultistepScheduler, {**base, "algorithm_type": "dpmsolver++",
                                                          "use_karras_sigmas": True}),
        "unipc+karras": (UniPCMultistepScheduler, {**base, "solver_order": 2, "use_karras_sigmas": True}),
    }


def run_diffusers(key, gmm, nfe: int, schedule, n, device):
    """A diffusers scheduler loop over the exact denoiser wrapped as an eps-network (module docstring)."""
    cls, kwargs = diffusers_schedulers()[key]
    sch = cls(**kwargs)
    sch.set_timesteps(nfe, device=device)
    calls = 0

    def eps_model(x_vp, t):
        nonlocal calls
        calls += 1
        sigma = float(schedule.sigma_from_t(float(t)))
        x_ve = x_vp.to(torch.float64) * math.sqrt(1 + sigma**2)  # x_vp / alpha_t
        return ((x_ve - gmm(x_ve, sigma)) / sigma).to(x_vp.dtype)

    sigma_top = float(schedule.sigma_from_t(float(sch.timesteps[0])))
    x_ve = start_state(gmm, sigma_top, n, device)
    # A scheduler's start is noise * init_noise_sigma: 1 for the VP ones (state x_vp = alpha x_ve),
    # sqrt(sigma_top^2 + 1) for EulerDiscrete (state x_ve). Scaling x_vp by it covers both.
    x = x_ve / math.sqrt(1 + sigma_top**2) * float(sch.init_noise_sigma)
    for t in sch.timesteps:
        eps = eps_model(sch.scale_model_input(x, t), t)
        x = sch.step(eps, t, x).prev_sample
    return x.to(torch.float64), calls


def methods(include_diffusers: bool):
    """(key, library, sampler, grid) for every curve; reverie's come from SAMPLERS at run time."""
    out = []
    for name in sorted(SAMPLERS):
        out.append((f"reverie:{name}@karras", "reverie", name, "karras"))
        out.append((f"reverie:{name}@trailing", "reverie", name, "trailing"))
        if name in TUNED:
            out.append((f"reverie:{name}@karras(0.01..80)", "reverie", name, "karras(0.01..80)"))
            out.append((f"reverie:{name}@tuned", "reverie", name, "tuned"))
    if include_diffusers:
        for key in diffusers_schedulers():
            grid = "karras(0.01..157)" if key.endswith("+karras") else "trailing"
            out.append((f"diffusers:{key}", "diffusers", key, grid))
    return out


def reference(gmm, schedule, n, device):
    """1000-step DDPM on the linear schedule (euler_ancestral if ddpm is not registered)."""
    name = "ddpm" if "ddpm" in SAMPLERS else "euler_ancestral"
    sigmas = get_sigmas("ddim-trailing", REF_STEPS, schedule=schedule)  # every t = 999 .. 0, then 0
    x = start_state(gmm, float(sigmas[0]), n, device)
    out = sample(name, gmm, x, sigmas.to(device), generator=torch.Generator(device).manual_seed(11))
    return name, out


def nfe_to_reach(nfes, errs, target):
    hits = [k for k, e in zip(nfes, errs) if e <= target]
    return min(hits) if hits else None


def bench_dim(dim, args, device, bar):
    desc, gmm_cpu = mixture_for(dim)
    gmm = gmm_cpu.to(device)
    schedule = DiscreteVPSchedule.from_name("linear", num_timesteps=1000)
    n, proj = args.samples, args.projections
    true = sorted_projections(gmm_cpu.sample(n, torch.Generator().manual_seed(123)).to(device), proj)

    def err(x):
        return sliced_w2(x, num_projections=proj, y_sorted=true)

    floors = [err(gmm_cpu.sample(n, torch.Generator().manual_seed(200 + r)).to(device))
              for r in range(args.floor_repeats)]
    t0 = time.perf_counter()
    ref_name, ref_out = reference(gmm, schedule, n, device)
    ref_err = err(ref_out)
    bar.update(1)
    floor = sum(floors) / len(floors)
    res = {"mixture": desc, "floor_mean": floor, "floor_all": floors,
           "reference": {"sampler": ref_name, "schedule": "linear, 1000 steps", "nfe": REF_STEPS,
                         "sw2": ref_err, "seconds": time.perf_counter() - t0},
           "methods": {}}
    for key, lib, name, grid in methods(not args.no_diffusers):
        entry = {"library": lib, "sampler": name, "grid": grid, "nfe": [], "sw2": [], "seconds": 0.0}
        if grid == "tuned":
            entry["tuning"] = []
        for nfe in args.nfe:
            bar.set_postfix_str(f"{dim}-D {key} NFE {nfe}")
            if grid == "tuned" and nfe > args.tune_max_nfe:
                bar.update(1)
                continue
            t0 = time.perf_counter()
            if lib == "reverie":
                out, calls, tuning = run_reverie(name, gmm, grid, nfe, schedule, n, device)
                if tuning is not None:
                    entry["tuning"].append(tuning)
            else:
                out, calls = run_diffusers(name, gmm, nfe, schedule, n, device)
            entry["seconds"] += time.perf_counter() - t0
            entry["nfe"].append(calls)
            entry["sw2"].append(err(out))
            bar.update(1)
        entry["nfe_to_ref"] = nfe_to_reach(entry["nfe"], entry["sw2"], (1 + TOL) * ref_err)
        entry["nfe_to_floor"] = nfe_to_reach(entry["nfe"], entry["sw2"], (1 + TOL) * floor)
        res["methods"][key] = entry
    return res


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = list(results)
    fig, axes = plt.subplots(1, len(dims), figsize=(7.5 * len(dims), 7), squeeze=False)
    names = sorted({m["sampler"].split("+")[0] for r in results.values() for m in r["methods"].values()})
    colors = {s: plt.cm.tab10(i % 10) for i, s in enumerate(names)}
    for ax, dim in zip(axes[0], dims):
        r = results[dim]
        for key, m in r["methods"].items():
            base = m["sampler"].split("+")[0]
            if m["library"] == "reverie":
                style = {"karras": "-", "trailing": ":", "tuned": "-"}.get(m["grid"], (0, (5, 1, 1, 1, 1, 1)))
            else:
                style = "--" if "+karras" not in m["sampler"] else "-."
            tuned = m["grid"] == "tuned"
            ax.plot(m["nfe"], m["sw2"], linestyle=style, color=colors[base], marker="s" if tuned else "o",
                    ms=5 if tuned else 3, lw=2.8 if tuned else 1.4, alpha=1.0 if tuned else 0.8, label=key)
        ref = r["reference"]
        ax.axhline(ref["sw2"], color="k", lw=1.5, label=f"{ref['sampler']} {ref['nfe']} steps (reference)")
        lo, hi = min(r["floor_all"]), max(r["floor_all"])
        ax.axhspan(lo, hi, color="0.85", alpha=0.6, lw=0)
        ax.axhline(r["floor_mean"], color="0.5", lw=1, ls=(0, (1, 3)),
                   label=f"noise floor: true vs true, mean and range of {len(r['floor_all'])}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        top = max(e for m in r["methods"].values() for e in m["sw2"])
        if top > 1.0:  # Heun with 1-4 steps from sigma 80 diverges; keep the interesting range readable
            ax.set_ylim(top=1.0)
            ax.text(0.98, 0.98, f"off the top: up to {top:.3g}", transform=ax.transAxes, ha="right",
                    va="top", fontsize=7, color="0.3")
        ax.set_xlabel("NFE (denoiser calls)")
        ax.set_ylabel("sliced W2 to true mixture")
        ax.set_title(f"{dim}-D: {r['mixture']}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, ncol=5, loc="lower center", frameon=False)
    fig.suptitle("Exact GMM denoiser. reverie: solid = karras 0.002..80, thick with squares = tuned grid, "
                 "dotted = diffusers' trailing grid, dash-dot-dot = karras 0.01..80;\n"
                 "diffusers: dashed = trailing, dash-dot = karras sigmas", fontsize=10)
    rows = math.ceil(len(labels) / 5)
    fig.tight_layout(rect=(0, 0.035 * rows, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_samples(results, path, nfe: int = 6, n: int = 4000):
    """2-D samples at one small NFE: the true mixture, diffusers' best few-step scheduler, reverie's unipc on
    the Karras grid and on its tuned grid (the sigmas recorded in the JSON), all from the same start states."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = results.get("2")
    records = (r or {}).get("methods", {}).get("reverie:unipc@tuned", {}).get("tuning", [])
    if not records:
        print("no tuned 2-D unipc grids in the results; skipping the sample plot")
        return
    tuned = next((t for t in records if t["steps"] == nfe), records[0])  # else the smallest NFE tuned
    nfe = tuned["steps"]
    _, gmm = mixture_for(2)
    schedule = DiscreteVPSchedule.from_name("linear", num_timesteps=1000)
    err = {k: dict(zip(m["nfe"], m["sw2"])).get(nfe) for k, m in r["methods"].items()}
    panels = [("true mixture", gmm.sample(n, torch.Generator().manual_seed(123)), None)]
    out, _ = run_diffusers("unipc+karras", gmm, nfe, schedule, n, "cpu")
    panels.append(("diffusers UniPC, Karras sigmas", out, err.get("diffusers:unipc+karras")))
    out, _, _ = run_reverie("unipc", gmm, "karras", nfe, schedule, n, "cpu")
    panels.append(("reverie unipc, Karras grid", out, err.get("reverie:unipc@karras")))
    sigmas = torch.tensor(tuned["sigmas"], dtype=torch.float64)
    out = sample("unipc", gmm, start_state(gmm, float(sigmas[0]), n, "cpu"), sigmas,
                 generator=torch.Generator().manual_seed(7))
    panels.append(("reverie unipc, tuned grid", out, err.get("reverie:unipc@tuned")))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.3))
    for ax, (title, x, e) in zip(axes, panels):
        x = x.cpu().numpy()
        ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.35, color="k", lw=0)
        ax.set_title(title + ("" if e is None else f"\nsliced W2 {e:.3f} (benchmark run)"), fontsize=9)
        ax.set_xlim(-1.4, 1.4)
        ax.set_ylim(-1.4, 1.4)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    floor = r["floor_mean"]
    fig.suptitle(f"{nfe} denoiser calls from sigma 80 (exact denoiser; true vs true: sliced W2 {floor:.3f})",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(results):
    for dim, r in results.items():
        ref = r["reference"]
        print(f"\n{dim}-D  {r['mixture']}\n  reference {ref['sampler']} x{ref['nfe']}: SW2 {ref['sw2']:.4g}; "
              f"noise floor {r['floor_mean']:.4g} (range {min(r['floor_all']):.4g} .. {max(r['floor_all']):.4g})")
        print("  NFE@ref: smallest NFE with SW2 <= 1.1 x the reference's; NFE@floor: <= 1.1 x the floor mean")
        nfes = max((m["nfe"] for m in r["methods"].values()), key=len)
        print(f"{'method':38s} {'NFE@ref':>7s} {'NFE@floor':>9s}  " + " ".join(f"{k:>7d}" for k in nfes))
        order = sorted(r["methods"].items(), key=lambda kv: (kv[1]["nfe_to_floor"] or 10**9,
                                                             kv[1]["nfe_to_ref"] or 10**9, kv[0]))
        for key, m in order:
            hits = ["-" if v is None else str(v) for v in (m["nfe_to_ref"], m["nfe_to_floor"])]
            errs = m["sw2"] + [None] * (len(nfes) - len(m["sw2"]))  # tuned curves stop at --tune-max-nfe
            print(f"{key:38s} {hits[0]:>7s} {hits[1]:>9s}  "
                  + " ".join(f"{e:7.4f}" if e is not None else f"{'':7s}" for e in errs))
        for crit in ("nfe_to_ref", "nfe_to_floor"):
            for lib in ("reverie", "diffusers"):
                hits = [(m[crit], k) for k, m in r["methods"].items() if m["library"] == lib and m[crit]]
                best = min(hits) if hits else None
                print(f"  {crit:12s} best {lib:9s}: " + (f"NFE {best[0]} ({best[1]})" if best else "never"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--samples", type=int, default=20000, help="samples per run (and per true set)")
    p.add_argument("--dims", type=int, nargs="+", default=None, help="dimensions (default 2 64; --quick: 2)")
    p.add_argument("--nfe", type=int, nargs="+", default=[4, 6, 8, 10, 15, 20, 50, 100, 1000],
                   help="numbers of denoiser calls to test")
    p.add_argument("--tune-max-nfe", type=int, default=TUNE_MAX_NFE, help="tune grids up to this NFE")
    p.add_argument("--projections", type=int, default=256, help="sliced-W2 directions (fixed seed)")
    p.add_argument("--floor-repeats", type=int, default=16, help="true-vs-true pairs for the noise floor")
    p.add_argument("--quick", action="store_true", help="4000 samples, NFE 4 8 15 50, 2-D only")
    p.add_argument("--no-diffusers", action="store_true", help="reverie samplers only")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    p.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    p.add_argument("--replot", action="store_true", help="redraw the PNG and table from the JSON in --out")
    args = p.parse_args(argv)
    if args.replot:
        results = json.loads((args.out / "samplers_gmm.json").read_text())["results"]
        plot(results, args.out / "samplers_gmm.png")
        plot_samples(results, args.out / "samplers_gmm_samples.png")
        print_table(results)
        return
    if args.quick:
        args.samples, args.nfe = 4000, [4, 8, 15, 50]
    args.dims = args.dims or ([2] if args.quick else [2, 64])
    device = torch.device(args.device)
    if "ddpm" not in SAMPLERS:
        print("note: reverie 'ddpm' is not registered; the reference is euler_ancestral x1000")

    runs_per_dim = 1 + len(methods(not args.no_diffusers)) * len(args.nfe)
    t0 = time.perf_counter()
    config = {"samples": args.samples, "dims": args.dims, "nfe": args.nfe, "projections": args.projections,
              "device": str(device), "tolerance": TOL, "reverie_samplers": sorted(SAMPLERS)}
    notes = __doc__.split("Choices (also written into the JSON under \"notes\"):")[1].strip()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    with tqdm(total=runs_per_dim * len(args.dims), desc="samplers_gmm") as bar:
        for d in args.dims:
            results[str(d)] = bench_dim(d, args, device, bar)
            config["seconds"] = time.perf_counter() - t0
            out = {"config": config, "notes": notes, "results": results}  # saved after every dimension
            (args.out / "samplers_gmm.json").write_text(json.dumps(out, indent=1))
    plot(results, args.out / "samplers_gmm.png")
    plot_samples(results, args.out / "samplers_gmm_samples.png")
    print_table(results)
    print(f"\nwrote {args.out / 'samplers_gmm.json'} and {args.out / 'samplers_gmm.png'} "
          f"({config['seconds']:.0f} s)")

if __name__ == "__main__":
    main()
