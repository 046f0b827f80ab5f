"""Adaptive noise schedules on MNIST at an equal training budget: bits/dim (continuous-time ELBO, and the
probability-flow ODE where asked) and FID for the fixed cosine schedule, loss-aware timesteps, VDM's learned
schedule and MuLAN's per-pixel, input-adaptive schedule (issue 27; the VDM trainer on a fixed cosine schedule,
configs/mnist-vdm-cosine.yaml, is an optional extra row: --models vdm-cosine=runs/mnist-vdm-cosine/model).

    # the four models (same network, data, batch, optimizer, EMA and steps; configs/mnist-*.yaml):
    reverie train configs/mnist-cosine.yaml ; reverie train configs/mnist-loss-aware.yaml
    reverie train configs/mnist-vdm.yaml ; reverie train configs/mnist-mulan.yaml
    python benchmarks/adaptive_schedules.py --fid-n 5000 --elbo-n 512 --ode-n 16
    # or one process per model (--out out/bench-NAME.json), then --plot-only --merge FILES

Per model (``--models name=MODEL_DIR ...``, defaults: runs/mnist-*/model):

* ``elbo_bpd``: the negative continuous-time ELBO (``reverie.vdm.continuous_elbo``) of ``--elbo-n`` MNIST
  test images, between the model's own endpoints: a VDM model's learned gamma_0 / gamma_1, a discrete
  model's sigma range (sigmas[0], sigmas[T-1]). t is drawn through the model's own schedule (VDM) or
  linearly in gamma (discrete models); by the ELBO's invariance either is unbiased. ``--num-t`` draws per
  image. The decoder is VDM's (no network) at sigma_0.
  For a VDM model the same bound is also estimated with t drawn linearly in gamma (``elbo_linear_t_*``):
  equal means, and the ratio of the standard errors is what the schedule did to the estimator's variance.
* ``ode_bpd`` (``--ode-n`` > 0): ``reverie.likelihood_ode`` (dequantized, Hutchinson, RK45 at ``--ode-rtol``).
* ``ddpm_elbo_bpd`` (``--ddpm-elbo-n`` > 0, discrete-time models only): the T = 1000-step ELBO of
  ``reverie.likelihood``, whose decoder uses the network (VDM's does not).
* ``fid`` / ``kid``: ``--fid-n`` samples, dpmpp_2m, 20 steps, karras grid over the model's sigma range,
  against the 10k MNIST test images, Inception in ``--fid-precision`` (default bf16).
* MuLAN rows: its own ELBO (``reverie.mulan.negative_elbo``, latent KL included, ``--num-t`` draws of latent, t
  and eps per image); loss per level along its reference level (linear in gamma between the shared
  endpoints); gamma(c, t) of prior latents as the mean over pixels with a 5-95% band; no ODE row (log p(x) would
  need an importance-weighted latent); samples with latents from the prior through ``reverie.mulan.MuLANDenoiser``.
* ``loss_per_level``: the ELBO's integrand per unit gamma, 0.5 e^-gamma E|x0 - D|^2 / (n ln 2) bits/dim, on a
  gamma grid inside the model's range (``--level-n`` images per level): where each model spends its bound.

Writes ``benchmarks/results/adaptive_schedules.json`` (each model stored as soon as it is done; ``--force``
recomputes) and ``adaptive_schedules.png`` (gamma(t) of linear, cosine, sigmoid and the learned schedule; the
loss per noise level of each model).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_MODELS = {"cosine": "runs/mnist-cosine/model", "loss-aware": "runs/mnist-loss-aware/model",
                  "vdm-learned": "runs/mnist-vdm/model", "mulan": "runs/mnist-mulan/model"}
LABELS = {"cosine": "cosine, L_simple (fixed)", "loss-aware": "cosine, L_simple, loss-aware t",
          "vdm-cosine": "VDM ELBO, cosine (fixed)", "vdm-learned": "VDM ELBO, learned schedule",
          "vdm-fast": "VDM ELBO, learned, speed 30", "mulan": "MuLAN ELBO, per-pixel adaptive",
          "mulan-fast": "MuLAN ELBO, per-pixel adaptive, speed 30"}


def bound(row: dict) -> tuple[float, float]:
    """The row's ELBO estimate with the smaller standard error (own schedule, or t linear in gamma)."""
    own = (row["elbo_bpd"], row["elbo_bpd_sem"])
    linear = (row.get("elbo_linear_t_bpd"), row.get("elbo_linear_t_sem"))
    return linear if linear[0] is not None and linear[1] < own[1] else own


def test_images(n: int) -> torch.Tensor:
    from reverie.data import get_dataset

    data = get_dataset("mnist", resolution=32, split="test")
    return torch.stack([data[i]["image"] for i in range(n)])


def eval_schedule(pipe):
    """The schedule whose endpoints bound the model and through which t is drawn (module docstring)."""
    from reverie.vdm import linear_gamma_between

    gamma = getattr(pipe.net, "gamma", None)
    if gamma is not None:
        return gamma
    return linear_gamma_between(pipe.schedule.sigma_min, pipe.schedule.sigma_max)


def is_mulan(pipe) -> bool:
    return hasattr(pipe.net, "mulan_config")


@torch.no_grad()
def mulan_elbo(pipe, x0: torch.Tensor, g: torch.Generator, num_t: int):
    """MuLAN's negative ELBO terms averaged over ``num_t`` draws of (latent, t, eps) per image."""
    from reverie.mulan import negative_elbo

    draws = [negative_elbo(pipe.net, x0, g) for _ in range(num_t)]
    mean = {k: sum(getattr(d, k) for d in draws) / num_t for k in ("prior", "reconstruction", "diffusion", "latent")}
    return type(draws[0])(mean["prior"], mean["reconstruction"], mean["diffusion"], draws[0].num_dims, mean["latent"])


def elbo(pipe, x0: torch.Tensor, num_t: int, batch: int = 64, schedule=None) -> dict:
    from reverie.vdm import continuous_elbo

    g = torch.Generator().manual_seed(0)
    if is_mulan(pipe):
        schedule = pipe.net.gamma
        parts = [mulan_elbo(pipe, x0[i:i + batch], g, num_t) for i in range(0, len(x0), batch)]
    else:
        schedule = schedule or eval_schedule(pipe)
        parts = [continuous_elbo(pipe.denoiser, x0[i:i + batch], schedule, g, num_t=num_t)
                 for i in range(0, len(x0), batch)]
    n_dims, ln2 = x0[0].numel(), math.log(2.0)
    out = {}
    for key in ("prior", "reconstruction", "diffusion", "latent"):
        if hasattr(parts[0], key):
            out[f"{key}_bpd"] = float(torch.cat([getattr(p, key) for p in parts]).mean()) / (n_dims * ln2)
    bpd = torch.cat([p.bits_per_dim() for p in parts])
    out.update(elbo_bpd=float(bpd.mean()), elbo_bpd_sem=float(bpd.std() / math.sqrt(len(bpd))), elbo_n=len(bpd),
               gamma_min=schedule.gamma_min, gamma_max=schedule.gamma_max)
    return out


@torch.no_grad()
def loss_per_level(pipe, x0: torch.Tensor, gammas: torch.Tensor) -> list[float]:
    """0.5 e^-gamma E|x0 - D(x0 + e^(gamma/2) eps)|^2 / (n ln 2) at each gamma (bits/dim per unit gamma)."""
    g, out, n_dims = torch.Generator().manual_seed(1), [], x0[0].numel()
    if is_mulan(pipe):
        return mulan_loss_per_level(pipe, x0, gammas, g)
    for gamma in gammas.tolist():
        sigma = math.exp(gamma / 2)
        eps = torch.randn(x0.shape, generator=g)
        x0_hat = pipe.denoiser(x0 + sigma * eps, torch.full((len(x0),), sigma))
        err = (x0_hat.double() - x0.double()).pow(2).flatten(1).sum(1).mean()
        out.append(float(0.5 * math.exp(-gamma) * err / (n_dims * math.log(2.0))))
    return out


@torch.no_grad()
def mulan_loss_per_level(pipe, x0: torch.Tensor, gammas: torch.Tensor, g: torch.Generator) -> list[float]:
    """MuLAN's integrand per unit of the reference gamma (linear in t between the shared endpoints), latents from
    q(c | x0): 0.5 E sum_i gamma_i'(t) / (gamma_1 - gamma_0) |eps_i - eps_hat_i|^2 / (n ln 2); its area over the
    reference range is the diffusion term, as for the scalar models."""
    from reverie.mulan import per_pixel_diffusion_loss

    net, out = pipe.net, []
    g0, g1 = net.gamma.gamma_min, net.gamma.gamma_max
    mu, var = net.latent_encoder(x0)
    latent = mu + var.sqrt() * torch.randn(mu.shape, generator=g)
    for ref in gammas.tolist():
        t = torch.full((len(x0),), (ref - g0) / (g1 - g0), dtype=torch.float64)
        gamma, dgamma = net.gamma_map(latent, t)
        eps = torch.randn(x0.shape, generator=g)
        alpha, sigma = torch.sigmoid(-gamma).sqrt().float(), torch.sigmoid(gamma).sqrt().float()
        eps_hat = net(alpha * x0 + sigma * eps, gamma, latent)
        loss = per_pixel_diffusion_loss(eps, eps_hat, dgamma / (g1 - g0)).mean()
        out.append(float(loss) / (x0[0].numel() * math.log(2.0)))
    return out


@torch.no_grad()
def mulan_gamma_band(pipe, num_latents: int = 16) -> dict:
    """gamma(c, t) of latents from the prior: the mean over pixels and latents, and the 5 / 95 % pixel quantiles."""
    t = torch.linspace(0, 1, 201, dtype=torch.float64)
    latent = torch.randn(num_latents, pipe.net.latent_dim, generator=torch.Generator().manual_seed(0))
    curves = torch.stack([pipe.net.gamma(latent, torch.full((num_latents,), float(s), dtype=torch.float64))
                          for s in t])  # [T, latents, pixels]
    flat = curves.reshape(len(t), -1)
    return {"gamma_curve": flat.mean(-1).tolist(), "gamma_q05": flat.quantile(0.05, dim=-1).tolist(),
            "gamma_q95": flat.quantile(0.95, dim=-1).tolist()}


def ode(pipe, x0: torch.Tensor, rtol: float) -> dict:
    from reverie.likelihood_ode import ode_nll

    t0 = time.perf_counter()
    res = ode_nll(pipe.denoiser, x0, rtol=rtol, atol=rtol, generator=torch.Generator().manual_seed(2))
    bpd = res.bits_per_dim
    return {"ode_bpd": float(bpd.mean()), "ode_bpd_sem": float(bpd.std() / math.sqrt(len(bpd))), "ode_n": len(bpd),
            "ode_nfe": res.nfe, "ode_rtol": rtol, "ode_s": time.perf_counter() - t0}


def ddpm_elbo(pipe, x0: torch.Tensor) -> dict:
    """The discrete T-step ELBO of a discrete-time model (``reverie.likelihood``: DDPM's decoder uses the network)."""
    from reverie.likelihood import nll_bits_per_dim

    t0 = time.perf_counter()
    bpd = nll_bits_per_dim(pipe.denoiser, x0, generator=torch.Generator().manual_seed(3))
    return {"ddpm_elbo_bpd": float(bpd.mean()), "ddpm_elbo_bpd_sem": float(bpd.std() / math.sqrt(len(bpd))),
            "ddpm_elbo_n": len(bpd), "ddpm_elbo_s": time.perf_counter() - t0}


def fid(pipe, n: int, ref_n: int, precision: str = "bf16") -> dict:
    """FID / KID of ``n`` samples against ``ref_n`` MNIST test images (as ``reverie eval`` computes them; the
    samples first, so that parallel runs find the reference statistics cached by then), Inception in
    ``precision`` (bf16: 2.4x faster on AMX, FIDs within ~1.5% of float32's; compare FIDs of one precision)."""
    from reverie.eval.fid import dataset_reference, evaluate_samples, get_inception, sample_features
    from reverie.sampling import SamplingOptions

    t0 = time.perf_counter()
    options = SamplingOptions(sampler="dpmpp_2m", steps=20, grid="karras", seed=0)
    feats = sample_features(lambda num, seed: pipe.sample(num, options, seed=seed), n, batch_size=100, seed=0,
                            extractor=get_inception("cpu", precision), progress=False)
    ref = dataset_reference("mnist", resolution=32, n=ref_n, split="test", precision=precision)
    res = evaluate_samples(feats, ref, ("fid", "kid"))
    return {"fid": res["fid"], "kid": res["kid"], "fid_n": n, "fid_ref_n": ref_n, "fid_precision": precision,
            "fid_s": time.perf_counter() - t0}


def measure(name: str, path: str, args, x0: torch.Tensor) -> dict:
    from reverie.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(path)
    row = {"model": path, "label": LABELS.get(name, name), "weights_hash": pipe.weights_hash,
           "train_steps": pipe.cfg.train.steps, "batch_size": pipe.cfg.data.batch_size}
    t0 = time.perf_counter()
    row.update(elbo(pipe, x0[:args.elbo_n], args.num_t))
    row["elbo_s"] = time.perf_counter() - t0
    if hasattr(pipe.net, "gamma") and not is_mulan(pipe):  # the bound drawn linearly in gamma: the variance
        from reverie.vdm import FixedGamma

        linear = elbo(pipe, x0[:args.elbo_n], args.num_t,
                      schedule=FixedGamma("linear", row["gamma_min"], row["gamma_max"]))
        row.update(elbo_linear_t_bpd=linear["elbo_bpd"], elbo_linear_t_sem=linear["elbo_bpd_sem"])
    lo, hi = row["gamma_min"], row["gamma_max"]
    gammas = torch.linspace(lo, hi, args.levels, dtype=torch.float64)
    row["levels_gamma"] = gammas.tolist()
    row["loss_per_level"] = loss_per_level(pipe, x0[:args.level_n], gammas)
    if args.ddpm_elbo_n and not hasattr(pipe.net, "gamma"):
        row.update(ddpm_elbo(pipe, x0[:args.ddpm_elbo_n]))
    if args.ode_n and not is_mulan(pipe):  # MuLAN's ODE likelihood would need an importance-weighted latent
        row.update(ode(pipe, x0[:args.ode_n], args.ode_rtol))
    if args.fid_n:
        row.update(fid(pipe, args.fid_n, args.ref_n, args.fid_precision))
    if is_mulan(pipe):
        row.update(mulan_gamma_band(pipe))
    elif hasattr(pipe.net, "gamma"):
        t = torch.linspace(0, 1, 201, dtype=torch.float64)
        with torch.no_grad():
            row["gamma_curve"] = pipe.net.gamma(t).tolist()
    return row


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from reverie.schedules import DiscreteVPSchedule

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.6))
    for name, style in (("linear", ":"), ("cosine", "--"), ("sigmoid", "-.")):
        s = DiscreteVPSchedule.from_name(name, 1000)
        a.plot(torch.linspace(0, 1, 1000), 2 * s.sigmas.log(), style, color="gray" if name != "cosine" else "k",
               label=f"{name} (DDPM betas, T=1000)")
    colors = {"cosine": "tab:blue", "loss-aware": "tab:orange", "vdm-cosine": "tab:green", "vdm-learned": "tab:red",
              "vdm-fast": "tab:purple", "mulan": "tab:green",
              "mulan-fast": "tab:brown"}
    for name, row in results["models"].items():
        if "gamma_curve" in row:
            t = torch.linspace(0, 1, len(row["gamma_curve"]))
            mean = " (mean over pixels, 5-95% band)" if "gamma_q05" in row else ""
            a.plot(t, row["gamma_curve"], color=colors.get(name), lw=2, label=f"{row['label']}{mean}")
            if "gamma_q05" in row:
                a.fill_between(t, row["gamma_q05"], row["gamma_q95"], color=colors.get(name), alpha=0.2)
        b.plot(row["levels_gamma"], row["loss_per_level"], color=colors.get(name),
               label=f"{row['label']}: {bound(row)[0]:.3f} bits/dim")
    a.set(xlabel="t", ylabel="gamma(t) = -log SNR", title="noise schedules")
    a.legend(fontsize=8)
    b.set(xlabel="gamma = -log SNR (= 2 log sigma)", ylabel="ELBO integrand, bits/dim per unit gamma",
          yscale="log", title="loss per noise level (area = diffusion term of the ELBO)")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=[f"{k}={v}" for k, v in DEFAULT_MODELS.items()])
    p.add_argument("--elbo-n", type=int, default=512)
    p.add_argument("--num-t", type=int, default=4)
    p.add_argument("--levels", type=int, default=24)
    p.add_argument("--level-n", type=int, default=128)
    p.add_argument("--ode-n", type=int, default=0)
    p.add_argument("--ddpm-elbo-n", type=int, default=0, help="images for the discrete T-step ELBO (discrete models)")
    p.add_argument("--ode-rtol", type=float, default=1e-3)
    p.add_argument("--fid-n", type=int, default=1000)
    p.add_argument("--ref-n", type=int, default=10_000, help="MNIST test images of the FID reference")
    p.add_argument("--fid-precision", choices=("fp32", "bf16"), default="bf16",
                   help="Inception precision (bf16: 2.4x faster on AMX, FIDs within ~1.5%% of float32's)")
    p.add_argument("--out", default=str(RESULTS / "adaptive_schedules.json"))
    p.add_argument("--force", action="store_true")
    p.add_argument("--plot-only", action="store_true")
    p.add_argument("--merge", nargs="*", default=[], help="result files of parallel runs to add to --out first")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.setdefault("models", {})
    for part in args.merge:
        results["models"].update(json.loads(Path(part).read_text())["models"])
    results.update(machine=platform.machine(), torch=torch.__version__,
                   reference=f"mnist test ({args.ref_n}), {args.fid_precision} Inception",
                   sampler="dpmpp_2m, 20 steps, karras grid, seed 0")
    if not args.plot_only:
        x0 = test_images(max(args.elbo_n, args.level_n, args.ode_n, args.ddpm_elbo_n))
        for spec in args.models:
            name, path = spec.split("=", 1)
            if name in results["models"] and not args.force:
                row = results["models"][name]
                if args.fid_n and "fid" not in row:  # a later pass adds FID to stored likelihoods
                    from reverie.pipeline import Pipeline

                    row.update(fid(Pipeline.from_pretrained(path), args.fid_n, args.ref_n, args.fid_precision))
                    out.write_text(json.dumps(results, indent=1))
                continue
            print(f"{name}: {path}", flush=True)
            results["models"][name] = measure(name, path, args, x0)
            out.write_text(json.dumps(results, indent=1))
            print({k: v for k, v in results["models"][name].items() if not isinstance(v, list)}, flush=True)
    rows = results["models"]
    if rows:
        for r in rows.values():
            r["label"] = LABELS.get(next(k for k, v in rows.items() if v is r), r["label"])
        best = min(rows, key=lambda k: bound(rows[k])[0])
        results["best_elbo"] = best
        fids = {k: r["fid"] for k, r in rows.items() if "fid" in r}
        results["best_fid"] = min(fids, key=fids.get) if fids else None
        out.write_text(json.dumps(results, indent=1))
        plot(results, out.with_suffix(".png"))
        for name, r in rows.items():
            mark = " *" if name == best else ""
            print(f"{r['label']:34s} ELBO {bound(r)[0]:.4f}±{bound(r)[1]:.4f}{mark}  "
                  f"ODE {r.get('ode_bpd', math.nan):.4f}  DDPM-ELBO {r.get('ddpm_elbo_bpd', math.nan):.4f}  "
                  f"FID {r.get('fid', math.nan):.2f}")


if __name__ == "__main__":
    main()
