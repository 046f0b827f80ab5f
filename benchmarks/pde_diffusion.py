"""PDE diffusion on MNIST at equal training budget: score SDEs (VP, sub-VP, VE with PC / Euler-Maruyama /
reverse-diffusion / probability-flow ODE samplers), heat-equation models (IHDM, blurring diffusion), PFGM++
(D = 128, 2048) and the existing eps / EDM models, in one FID / NFE / time table; bits/dim through the ODE
(and the ELBO of the SDE's discretization) for VP and sub-VP; the coarse-to-fine picture; and, with the exact
score of a Gaussian mixture, the PC sampler against Euler-Maruyama at equal NFE.

    python benchmarks/pde_diffusion.py --stages train --resolution 32 --train-steps 600 --batch-size 32 --out out/pde32
    python benchmarks/pde_diffusion.py --stages fid --resolution 32 --out out/pde32 --models M --n 5000 \
        --n-extra 5000 --ode-n 0 --snr 0.6 --pc-grid uniform-t --results out/pde32/fid5k/M.json  # the README's
        # n = 5,000 rows, one model M per process (then --merge); --sde-heun adds a 35-NFE ODE row at --ode-n
    python benchmarks/pde_diffusion.py --resolution 32 --train-steps 2400 --batch-size 64 --n 5000  # configs' budget

Stages (``--stages``, default all): ``train`` (``reverie train`` each config with the same budget overrides
into ``OUT/<name>``, skipped when ``OUT/<name>/model`` exists), ``fid``, ``nll``, ``picture``, ``gmm``. Results
go to benchmarks/results/pde_diffusion.json (merged stage by stage) and the picture to
benchmarks/results/pde_coarse_to_fine.png. NFE counts network calls per image; time is wall-clock seconds
per image of the sampler alone (Inception excluded), on whatever else the machine was running.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "pde_diffusion.json"
PICTURE = ROOT / "benchmarks" / "results" / "pde_coarse_to_fine.png"
RESULTS_FILE = RESULTS

# name -> (run directory under --out, config, extra overrides)
MODELS = {
    "vp-sde": ("vp-sde", "mnist-vp-sde", []),
    "subvp-sde": ("subvp-sde", "mnist-subvp-sde", []),
    "ve-sde": ("ve-sde", "mnist-ve-sde", []),
    "heat (IHDM)": ("heat", "mnist-heat", []),
    "blurring": ("blurring", "mnist-blurring", []),
    "pfgm++ D=128": ("pfgm128", "mnist-pfgmpp", ["--model.pfgm_d=128"]),
    "pfgm++ D=2048": ("pfgm2048", "mnist-pfgmpp", ["--model.pfgm_d=2048"]),
    "edm (D=inf)": ("edm", "mnist-edm", []),
    "eps (DDPM)": ("eps", "mnist-eps", []),
}


def run_dir(out: Path, name: str) -> Path:
    return out / MODELS[name][0]


def rows_for(name: str, args) -> list[tuple[str, dict]]:
    """(sampler label, sampling settings) to evaluate per model, the model's main row first (FID at ``--n``;
    the others at ``--n-extra``, the ODE at ``--ode-n``): the SDEs get PC, Euler-Maruyama at the same NFE and the
    ODE. Every Gaussian row clips the x0 estimate to [-1, 1] (the sampling option ``clip_denoised``: an eps network's
    x0 estimate x - sigma eps_hat carries sigma times its eps error, RMS 5 at sigma 150 after this budget);
    blurring's sampler clips too."""
    levels, clip = args.levels, {"clip_denoised": True}
    if name.endswith("sde"):
        pc = {"sampler": "pc", "steps": levels, "corrector_steps": 1, "snr": args.snr, "grid": args.pc_grid, **clip}
        em = {"sampler": "euler_maruyama", "steps": 2 * levels, "grid": args.pc_grid, **clip}
        rows = [(f"pc {levels}x(1+1) snr {args.snr:g} {args.pc_grid}", pc),
                (f"euler_maruyama {2 * levels} {args.pc_grid}", em),
                ("ode rk45 1e-3", {"sampler": "ode", "rtol": 1e-3, "atol": 1e-3, **clip})]
        if args.sde_heun:  # the probability-flow ODE by Heun's 2nd order on the EDM grid: 35 NFE (RK45: ~100)
            rows.append(("ode heun 18 (35 NFE)", {"sampler": "heun", "steps": 18, "grid": "karras", **clip}))
        return rows
    if name == "blurring":
        return [(f"ancestral {s} clip {c}", {"steps": s, "clip": c}) for s, c in args.blurring_rows]
    if name.startswith("heat"):
        return [("ihdm noisy (K)", {})]
    if name.startswith("eps"):
        return [(f"dpmpp_2m {levels}", {"sampler": "dpmpp_2m", "steps": levels, **clip})]
    return [("heun 18 (35 NFE)", {"sampler": "heun", "steps": 18, "grid": "karras", **clip})]


def resize(args) -> list[str]:
    """MNIST digits are padded to 32 px; other resolutions resize them."""
    return [] if args.resolution == 32 else ["--data.options={mode: resize}"]


def stage_train(args) -> None:
    for name in selected(args):
        _, config, extra = MODELS[name]
        target = run_dir(args.out, name)
        if (target / "model" / "config.json").is_file():
            print(f"{name}: trained ({target}/model)")
            continue
        cmd = [sys.executable, "-m", "reverie", "train", str(ROOT / "configs" / f"{config}.yaml"),
               f"--train.steps={args.train_steps}", f"--data.batch_size={args.batch_size}",
               f"--data.resolution={args.resolution}", f"--optim.warmup_steps={min(200, args.train_steps // 6)}",
               f"--train.threads={args.threads}", "--sample.every=0", *resize(args),
               f"--train.checkpoint_every={args.checkpoint_every}", f"--train.out_dir={target}", "--quiet", *extra]
        print(" ".join(cmd[2:]), flush=True)
        start = time.time()
        subprocess.run(cmd, check=True)
        print(f"{name}: {time.time() - start:.0f} s")


class Counter:
    """Counts the network's forward calls (a hook on the top module)."""

    def __init__(self, net):
        self.calls = 0
        self.handle = net.register_forward_hook(self)

    def __call__(self, *_):
        self.calls += 1


def explicit_grid(pipe, steps: int, grid: str) -> torch.Tensor:
    """The sigma grid of ``steps`` levels; ``uniform-t``: sigma(t) at t uniform from t_max to t_min, as Song
    et al. sample their SDEs (geometric sigmas for VE)."""
    from reverie.sampling import sigma_grid

    if grid != "uniform-t":
        return sigma_grid(pipe, steps, grid)
    sde = pipe.schedule
    t = torch.linspace(sde.t_max, sde.t_min, steps, dtype=torch.float64)
    return torch.cat([sde.sigma_from_t(t).to(torch.float64), torch.zeros(1, dtype=torch.float64)])


DIRECT = ("rtol", "atol")  # the ODE's tolerances: not sampling options, passed to ``sample`` as they are


def draw_fn(pipe, settings: dict, timing: dict):
    """``draw(num, seed)``: images in [-1, 1] with the settings; NFE and sampler time accumulate in ``timing``."""
    from reverie.heat import BlurringSchedule, blurring_sample
    from reverie.samplers import sample
    from reverie.sampling import (
        SamplingOptions,
        blurring_bounds,
        guided_denoiser,
        heat_images,
        run_sampler,
        start_noise,
    )

    opts = SamplingOptions(**{k: v for k, v in settings.items() if k not in (*DIRECT, "clip", "grid")})
    kwargs = {k: settings[k] for k in DIRECT if k in settings}
    counter = Counter(pipe.net)

    def generate(num: int, options: SamplingOptions) -> torch.Tensor:
        g = torch.Generator().manual_seed(options.seed)
        if pipe.cfg.model.process == "blurring":
            h = pipe.cfg.heat
            noise = torch.randn(num, pipe.cfg.model.network_overrides.get("in_channels", 1), pipe.cfg.data.resolution,
                                pipe.cfg.data.resolution, generator=g)
            mode = settings.get("clip", "freq")  # freq: per-DCT-coefficient bounds, then pixels (sampling's default)
            return blurring_sample(pipe.net, noise, BlurringSchedule(blur_max=h.blur_max, d_min=h.d_min),
                                   options.steps, generator=g, clip=mode != "off",
                                   u0_bounds=blurring_bounds(pipe) if mode == "freq" else None)
        if pipe.cfg.model.process != "gaussian":
            return heat_images(pipe, num, options)
        sigmas = explicit_grid(pipe, options.steps, settings.get("grid", options.grid))
        x = start_noise(pipe, num, float(sigmas[0]), g)
        if kwargs:  # the ODE's tolerances go to ``sample`` directly (unconditional models: no guidance)
            return sample(options.sampler, guided_denoiser(pipe, options, {}), x, sigmas, generator=g, **kwargs,
                          **options.sampler_options())
        return run_sampler(pipe, x, sigmas, options, generator=g)

    def draw(num: int, seed: int) -> torch.Tensor:
        options = SamplingOptions.make(opts, seed=seed).resolve(pipe.cfg)
        before, start = counter.calls, time.perf_counter()
        with torch.no_grad():
            images = generate(num, options).clamp(-1, 1)
        timing["seconds"] += time.perf_counter() - start
        timing["calls"] += counter.calls - before
        timing["images"] += num
        return images

    return draw


def stage_fid(args, results: dict) -> None:
    """One row per (model, sampler) of :func:`rows_for`: FID (or sliced W2, ``--metric``), NFE, seconds per image;
    each row is saved as soon as it is measured (a stopped run resumes where it was)."""
    from reverie.pipeline import Pipeline

    table = results.setdefault(args.metric, {})
    score = make_scorer(args)
    for name in selected(args):
        path = run_dir(args.out, name) / "model"
        if not path.is_dir():
            print(f"{name}: not trained, skipped")
            continue
        pipe = Pipeline.from_pretrained(path)
        for i, (label, settings) in enumerate(rows_for(name, args)):
            key = f"{name} | {label}"
            n = args.n if i == 0 else args.ode_n if label.startswith("ode") else args.n_extra
            if n <= 0 or key in table and table[key]["n"] >= n:
                continue
            timing = {"seconds": 0.0, "calls": 0, "images": 0}
            value = score(draw_fn(pipe, settings, timing), n)
            batches = math.ceil(n / args.eval_batch)
            table[key] = row = {"model": name, "sampler": label, "nfe": timing["calls"] / batches,
                                "s_per_image": timing["seconds"] / timing["images"], "n": n, **value}
            print(f"{key}: {args.metric} {row[args.metric]:.4g}  NFE {row['nfe']:.0f}  "
                  f"{row['s_per_image'] * 1000:.0f} ms/image (n = {n})", flush=True)
            save(results)


def make_scorer(args):
    """``score(draw, n) -> dict``: FID against the MNIST test split (bf16 or fp32 Inception, ``--ref-n``
    images, the shared cached statistics), or sliced W2 in pixel space to ``n`` test images (with its floor:
    two disjoint sets of n test images)."""
    if args.metric == "sw2":
        from reverie.gmm import sliced_w2

        def sw2(draw, n):
            test = test_images(args, 2 * n)
            images = torch.cat([draw(min(args.eval_batch, n - i), i) for i in range(0, n, args.eval_batch)])
            return {"sw2": sliced_w2(images, test[:n]), "sw2_floor": sliced_w2(test[n:], test[:n])}
        return sw2

    from reverie.eval.fid import dataset_reference, evaluate_samples, get_inception, sample_features

    extractor = get_inception("cpu", args.fid_precision)
    ref = {}

    def fid(draw, n):
        feats = sample_features(draw, n, batch_size=args.eval_batch, seed=0, extractor=extractor, progress=False)
        if not ref:  # after the first samples: another process may still be computing the cached statistics
            options = {} if args.resolution == 32 else {"mode": "resize"}
            ref["stats"] = dataset_reference("mnist", resolution=args.resolution, n=args.ref_n, split="test",
                                             precision=args.fid_precision, **options)
        res = evaluate_samples(feats, ref["stats"], ("fid",))
        return {"fid": res["fid"], "n_ref": res["n_ref"], "fid_precision": args.fid_precision}
    return fid


def test_images(args, n: int) -> torch.Tensor:
    """``n`` MNIST test images at the run's resolution, a fixed-seed subset."""
    from reverie.data import get_dataset

    options = {} if args.resolution == 32 else {"mode": "resize"}
    data = get_dataset("mnist", resolution=args.resolution, split="test", **options)
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:n].tolist()
    return torch.stack([data[i]["image"] for i in idx])


def stage_nll(args, results: dict) -> None:
    from reverie.eval.evaluate import EvalSettings, nll_metrics
    from reverie.pipeline import Pipeline

    out = results.setdefault("nll", {})
    for name in [m for m in ("vp-sde", "subvp-sde") if m in selected(args)]:
        path = run_dir(args.out, name) / "model"
        if not path.is_dir():
            continue
        start = time.time()
        # fp32 by default: the adaptive RK45 at rtol 1e-5 takes many more steps on a bf16 network's rounding noise
        pipe = Pipeline.from_pretrained(path, precision=args.nll_precision)
        res = nll_metrics(pipe, EvalSettings(nll_n=args.nll_n, batch_size=args.nll_n, progress=False))
        res["precision"] = args.nll_precision
        res["seconds"] = time.time() - start
        out[name] = res
        print(f"{name}: ODE {res['ode_bpd']:.3f} +- {res['ode_bpd_sem']:.3f} bits/dim, ELBO (T=1000) "
              f"{res['elbo_bpd']:.3f} +- {res['elbo_bpd_sem']:.3f} ({res['n']} test images)", flush=True)
        save(results)


def band_energy(images: torch.Tensor, bands: int = 4) -> torch.Tensor:
    """Mean DCT energy [bands] of images [B, 1, H, W] in rings of k + l (low to high frequency)."""
    from reverie.heat import dct2

    u = dct2(images.to(torch.float64)).pow(2).mean((0, 1))
    h = u.shape[-1]
    ring = torch.arange(h)[:, None] + torch.arange(h)[None]
    edges = torch.linspace(0, 2 * h - 1, bands + 1)
    return torch.stack([u[(ring >= edges[i]) & (ring < edges[i + 1])].sum() for i in range(bands)])


def trajectory(pipe, name: str, num: int, points: int, seed: int = 3) -> list[torch.Tensor]:
    """``points`` snapshots of the current estimate of the image along sampling (x0_hat for Gaussian and
    blurring models, the state for IHDM), evenly spaced over the sampler's steps."""
    from reverie.sampling import SamplingOptions, heat_images, sample_images

    snaps = []
    if name.startswith("heat"):
        options = SamplingOptions(seed=seed).resolve(pipe.cfg)
        heat_images(pipe, num, options, callback=lambda k, u: snaps.append(u.clamp(-1, 1).cpu()))
    elif name == "blurring":
        options = SamplingOptions(steps=100, seed=seed).resolve(pipe.cfg)
        heat_images(pipe, num, options, callback=lambda i, x0: snaps.append(x0.clamp(-1, 1).cpu()))
    else:
        options = SamplingOptions(sampler="dpmpp_2m", steps=50, seed=seed)
        sample_images(pipe, num, options, callback=lambda step: snaps.append(step.denoised.clamp(-1, 1).cpu()))
    idx = torch.linspace(0, len(snaps) - 1, points).round().long().tolist()
    return [snaps[i] for i in idx]


def stage_picture(args, results: dict) -> None:
    from reverie.images import save_grid
    from reverie.pipeline import Pipeline

    rows, settle = [], {}
    for name in ("heat (IHDM)", "blurring", "eps (DDPM)"):
        path = run_dir(args.out, name) / "model"
        if not path.is_dir():
            continue
        snaps = trajectory(Pipeline.from_pretrained(path), name, 4, args.points)
        rows += [torch.stack([s[i] for s in snaps]) for i in range(4)]
        final = band_energy(snaps[-1])
        # share of the final energy of each frequency band reached by each snapshot (4 bands, low to high)
        settle[name] = [(band_energy(s) / final).tolist() for s in snaps]
    if rows:
        save_grid(torch.cat(rows), PICTURE, ncols=args.points)
        results["coarse_to_fine"] = {"picture": str(PICTURE.relative_to(ROOT)), "rows": "4 images each of IHDM, "
                                     "blurring, eps (dpmpp_2m 50); columns: evenly spaced sampling steps",
                                     "band_energy_fraction": settle}
        save(results)
        print(f"wrote {PICTURE}")


def stage_gmm(args, results: dict) -> None:
    """PC vs Euler-Maruyama vs reverse diffusion at equal NFE with the exact score of the 8-ring (2-D)."""
    from reverie.gmm import ring2d, sliced_w2
    from reverie.samplers import get_sigmas, sample
    from reverie.sde import get_sde

    ring = ring2d(k=8, radius=1.0, std=0.08)
    ref = ring.sample(3000, torch.Generator().manual_seed(11))
    floor = sliced_w2(ring.sample(3000, torch.Generator().manual_seed(12)), ref)
    out = {"floor": floor, "rows": []}
    for sde_name in ("vp-sde", "ve-sde"):
        sde = get_sde(sde_name)
        z = torch.randn(3000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        x = ring.sample(3000, torch.Generator().manual_seed(100)) + z * sde.sigma_max
        for nfe in (10, 20, 40, 80):
            row = {"sde": sde_name, "nfe": nfe}
            for label, name, steps in (("pc", "pc", nfe // 2), ("euler_maruyama", "euler_maruyama", nfe),
                                       ("reverse_diffusion", "reverse_diffusion", nfe)):
                sigmas = get_sigmas("karras", steps, sde.sigma_min, sde.sigma_max)
                row[label] = sliced_w2(sample(name, ring, x, sigmas, generator=torch.Generator().manual_seed(1)), ref)
            out["rows"].append(row)
            print(row, flush=True)
    results["gmm_exact_score"] = out
    save(results)


def selected(args) -> list[str]:
    """The models of ``--models`` (run directory names), all by default."""
    if not args.models:
        return list(MODELS)
    wanted = args.models.split(",")
    return [name for name, (d, _, _) in MODELS.items() if d in wanted]


def merge(paths: list[Path]) -> dict:
    """Results of several partial runs (``--results``), merged section by section."""
    results: dict = {}
    for path in paths:
        for key, value in json.loads(path.read_text()).items():
            if isinstance(value, dict) and isinstance(results.get(key), dict):
                results[key].update(value)
            else:
                results[key] = value
    return results


def save(results: dict) -> None:
    RESULTS_FILE.write_text(json.dumps(results, indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default="train,fid,nll,picture,gmm")
    p.add_argument("--out", type=Path, default=ROOT / "out" / "pde")
    p.add_argument("--resolution", type=int, default=16, help="MNIST resolution (the configs' is 32)")
    p.add_argument("--train-steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--n", type=int, default=200, help="generated images per FID (the issue asks 5000)")
    p.add_argument("--metric", choices=("fid", "sw2"), default="fid",
                   help="sw2: sliced W2 in pixel space to as many test images (when Inception is too slow)")
    p.add_argument("--ref-n", type=int, default=10000, help="MNIST test images of the FID reference")
    p.add_argument("--fid-precision", choices=("fp32", "bf16"), default="bf16",
                   help="Inception precision (bf16: 2.4x faster on AMX, FIDs within ~1.5%% of fp32's)")
    p.add_argument("--eval-batch", type=int, default=100)
    p.add_argument("--n-extra", type=int, default=None, help="images per FID of the rows after each model's first "
                   "(default: --n)")
    p.add_argument("--ode-n", type=int, default=None, help="images per FID of the ODE rows (default: --n-extra; "
                   "0 skips them)")
    p.add_argument("--sde-heun", action="store_true", help="also the SDEs' probability-flow ODE by Heun 18 steps "
                   "(35 NFE, at --ode-n images)")
    p.add_argument("--levels", type=int, default=20, help="PC levels (NFE 2x); Euler-Maruyama gets 2x steps")
    p.add_argument("--snr", type=float, default=0.16, help="the PC sampler's Langevin signal-to-noise ratio")
    p.add_argument("--pc-grid", default="karras", help="grid of the PC and Euler-Maruyama rows (uniform-t: Song et "
                   "al.'s uniform time steps)")
    p.add_argument("--blurring-rows", default="100:freq", help="blurring rows, steps:clip, comma-separated; clip: off, "
                   "on (x0 in pixels) or freq (per DCT coefficient to the training data's mean -+ 3 std, then pixels)")
    p.add_argument("--nll-n", type=int, default=16)
    p.add_argument("--nll-precision", choices=("fp32", "bf16"), default="fp32", help="the network's precision for NLL")
    p.add_argument("--points", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--checkpoint-every", type=int, default=200, help="training checkpoints (a stopped run resumes)")
    p.add_argument("--models", default="", help="run directories to evaluate (default: all)")
    p.add_argument("--results", type=Path, default=RESULTS, help="JSON file (parallel partial runs: one each)")
    p.add_argument("--merge", type=Path, nargs="*", default=None, help="merge these partial JSON files into RESULTS")
    args = p.parse_args()
    args.n_extra = args.n if args.n_extra is None else args.n_extra
    args.ode_n = args.n_extra if args.ode_n is None else args.ode_n
    try:
        args.blurring_rows = [(int(r.split(":")[0]), r.split(":")[1]) for r in args.blurring_rows.split(",")]
    except (ValueError, IndexError):
        p.error(f"--blurring-rows: steps:off|on|freq, comma-separated, not {args.blurring_rows!r}")
    if any(c not in ("off", "on", "freq") for _, c in args.blurring_rows):
        p.error(f"--blurring-rows: the clip is off, on or freq, not {args.blurring_rows!r}")
    global RESULTS_FILE
    RESULTS_FILE = args.results
    if args.merge:
        RESULTS_FILE = RESULTS
        save(merge([RESULTS, *args.merge] if RESULTS.is_file() else args.merge))
        return
    torch.set_num_threads(args.threads)
    results = json.loads(RESULTS_FILE.read_text()) if RESULTS_FILE.is_file() else {}
    results["budget"] = {"train_steps": args.train_steps, "batch_size": args.batch_size, "n": args.n,
                         "resolution": args.resolution,
                         "machine": "shared 2-core Xeon (AMX), torch " + torch.__version__}
    stages = args.stages.split(",")
    if "train" in stages:
        stage_train(args)
    for stage, fn in (("gmm", stage_gmm), ("fid", stage_fid), ("nll", stage_nll), ("picture", stage_picture)):
        if stage in stages:
            fn(args, results)


if __name__ == "__main__":
    main()
