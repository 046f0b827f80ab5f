"""Time to quality: FID against wall-clock training time, reverie's trainer vs a plain diffusers loop.

Both sides train the same architecture on the same MNIST 32x32 data with the same batch size,
learning rate, warmup, cosine decay, bf16 autocast, gradient clipping and EMA, one intra-op thread
each. What differs is each side's recipe, on purpose: the ``reverie`` side trains
``configs/mnist-eps.yaml`` as shipped (eps, min-SNR-5 loss weighting, LR floor 0.1x), the
``reverie-edm`` side ``configs/mnist-edm.yaml`` (EDM preconditioning, lognormal noise levels, EDM
loss weight; otherwise identical), the diffusers side the plain MSE on eps of diffusers' examples
(LR to 0); the measured gap is trainer + recipe, not implementation speed alone (that one is
``benchmarks/train_throughput.py``). Run two ``train`` commands at a time, one per core, so they
share the machine alike:

    python benchmarks/time_to_quality.py train --side reverie-edm --run runs/ttq2 &
    python benchmarks/time_to_quality.py train --side diffusers   --run runs/ttq2 &
    wait
    python benchmarks/time_to_quality.py eval --n 500 --run runs/ttq2 --out benchmarks/results/time_to_quality_edm.json

Only sides trained in the same ``--run`` at the same time are compared: wall clocks of runs made at
different times on a shared machine are not comparable.

``reverie`` is the real ``reverie train configs/mnist-eps.yaml`` loop (checkpoints every
``--snapshot-every`` steps; its log records the wall clock). ``diffusers`` is the loop of
diffusers' training examples: UNet2DModel built from the same config, DDPMScheduler.add_noise,
MSE on eps, AdamW, get_cosine_schedule_with_warmup, EMAModel, saving the EMA weights and the wall
clock at the same steps. ``eval`` samples every snapshot's EMA weights with the same reverie
sampler (dpmpp_2m, 20 steps) and scores FID (and KID) against the cached MNIST-test Inception
statistics; it writes benchmarks/results/time_to_quality.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = {"reverie": ROOT / "configs" / "mnist-eps.yaml", "reverie-edm": ROOT / "configs" / "mnist-edm.yaml",
           "diffusers": ROOT / "configs" / "mnist-eps.yaml"}  # diffusers: the architecture, data and optimizer
SIDES = tuple(CONFIGS)
REVERIE_SIDES = tuple(side for side in SIDES if side != "diffusers")


def _cfg(args, side_dir: Path):
    from reverie.configs import load_config
    from reverie.train.config import TrainConfig

    return load_config(TrainConfig, CONFIGS[side_dir.name], [
        f"--train.steps={args.steps}", f"--train.out_dir={side_dir}", f"--train.checkpoint_every={args.snapshot_every}",
        "--train.keep_last=1000", "--sample.every=0", "--train.progress=false", "--train.threads=1"])


def train_reverie(args, side_dir: Path) -> None:
    from reverie.train import train

    train(_cfg(args, side_dir), resume=False)


def train_diffusers(args, side_dir: Path) -> None:
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel
    from safetensors.torch import save_file

    from reverie.build import build_dataset, build_network, dataset_info
    from reverie.data import collate
    from reverie.nets.unet import diffusers_unet2d_kwargs

    torch.set_num_threads(1)
    cfg = _cfg(args, side_dir)
    dataset = build_dataset(cfg)
    net_cfg = build_network(cfg, dataset_info(dataset)).config
    torch.manual_seed(cfg.train.seed)
    model = UNet2DModel(**diffusers_unet2d_kwargs(net_cfg, strict=False))
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    lr_sched = get_cosine_schedule_with_warmup(opt, cfg.optim.warmup_steps, args.steps)
    ema = EMAModel(model.parameters(), decay=cfg.ema.max_decay, use_ema_warmup=True, power=cfg.ema.power)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.data.batch_size, shuffle=True, drop_last=True,
                                         collate_fn=collate, generator=torch.Generator().manual_seed(0))
    side_dir.mkdir(parents=True, exist_ok=True)
    times, step, t0 = [], 0, time.perf_counter()
    model.train()
    while step < args.steps:
        for batch in loader:
            x0 = batch["image"]
            noise = torch.randn_like(x0)
            t = torch.randint(0, 1000, (x0.shape[0],))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                pred = model(sched.add_noise(x0, noise, t), t).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            opt.step()
            lr_sched.step()
            opt.zero_grad(set_to_none=True)
            ema.step(model.parameters())
            step += 1
            if step % args.snapshot_every == 0 or step == args.steps:
                elapsed = time.perf_counter() - t0
                shadow = UNet2DModel(**diffusers_unet2d_kwargs(net_cfg, strict=False))
                ema.copy_to(shadow.parameters())
                save_file({k: v.contiguous() for k, v in shadow.state_dict().items()},
                          str(side_dir / f"step-{step:08d}.safetensors"))
                times.append({"step": step, "elapsed_s": elapsed, "loss": loss.item()})
                (side_dir / "times.json").write_text(json.dumps(times, indent=1))
                print(f"diffusers step {step} {elapsed:.0f}s loss {loss.item():.4f}", flush=True)
            if step >= args.steps:
                break


def _snapshots(run: Path) -> dict[str, list[dict]]:
    """{side: [{step, elapsed_s, path}]} for the snapshots written by ``train``."""
    out = {}
    for side in REVERIE_SIDES:
        if not (run / side / "log.jsonl").is_file():
            continue
        log = [json.loads(line) for line in (run / side / "log.jsonl").read_text().splitlines()]
        at = {r["step"]: r["elapsed_s"] for r in log}
        rev = []
        for ckpt in sorted((run / side / "checkpoints").glob("ckpt-*")):
            step = int(ckpt.name.split("-")[1].split(".")[0])
            if step in at:
                rev.append({"step": step, "elapsed_s": at[step], "path": str(ckpt)})
        out[side] = rev
    times = json.loads((run / "diffusers" / "times.json").read_text())
    out["diffusers"] = [{**t, "path": str(run / "diffusers" / f"step-{t['step']:08d}.safetensors")} for t in times]
    return out


def _reverie_pipeline(args, ckpt: str):
    from reverie.pipeline import Pipeline
    from reverie.train import export_checkpoint

    side = Path(ckpt).parent.parent.name
    out = Path(args.run) / "exported" / (Path(ckpt).name if side == "reverie" else f"{side}-{Path(ckpt).name}")
    if not (out / "config.json").exists():
        export_checkpoint(ckpt, out)
    return Pipeline.from_pretrained(out)


class _DiffusersNet(torch.nn.Module):
    """UNet2DModel behind reverie's network call ``net(x, c_noise, **cond)`` (c_noise = timestep)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, c_noise, **cond):
        return self.unet(x, c_noise).sample


def _diffusers_pipeline(args, path: str):
    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    from reverie.build import build_dataset, build_network, dataset_info
    from reverie.nets.unet import diffusers_unet2d_kwargs
    from reverie.pipeline import Pipeline

    cfg = _cfg(args, Path(args.run) / "diffusers")
    info = dataset_info(build_dataset(cfg))
    model = UNet2DModel(**diffusers_unet2d_kwargs(build_network(cfg, info).config, strict=False))
    model.load_state_dict(load_file(path))
    return Pipeline(_DiffusersNet(model), cfg, info, name=Path(path).stem)


def _draw(pipe, num: int, seed: int, grid: str | None = None) -> torch.Tensor:
    return pipe.sample(num, steps=20, sampler="dpmpp_2m", seed=seed, grid=grid)


def evaluate(args) -> None:
    from reverie.eval.fid import dataset_reference, evaluate_samples, sample_features

    torch.set_num_threads(args.threads)
    run = Path(args.run)
    loaded = {}

    def reference():  # loaded after the first snapshot's samples (sampling overlaps its computation)
        if "ref" not in loaded:
            if args.wait_reference:
                from samplers_fid import wait_for_reference

                wait_for_reference(32, args.ref_n)
            loaded["ref"] = dataset_reference("mnist", resolution=32, split="test", n=args.ref_n)
        return loaded["ref"]

    results = {"n": args.n, "reference": f"mnist test, {args.ref_n} images", "sampler": "dpmpp_2m", "steps": 20,
               "grid": args.grid or "each model's config (karras)",
               "recipes": {"reverie": "configs/mnist-eps.yaml as is: min-SNR-5 loss weighting, cosine LR to 0.1 x, "
                                      "EMA warmup (power 0.75, max 0.9995), bf16, clip 1",
                           "reverie-edm": "configs/mnist-edm.yaml: EDM preconditioning, lognormal noise levels, EDM "
                                          "loss weight; otherwise as configs/mnist-eps.yaml",
                           "diffusers": "plain MSE on eps (its training examples), get_cosine_schedule_with_warmup "
                                        "(to 0), EMAModel (same decay settings), bf16, clip 1"},
               "machine": platform.processor() or platform.machine(), "torch": torch.__version__, "curves": {}}
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    done = {(side, p["step"]): p for side, curve in previous.get("curves", {}).items() for p in curve
            if previous.get("n") == args.n}
    for side, snaps in _snapshots(run).items():
        if not snaps:
            raise SystemExit(f"no {side} snapshots found under {run}")
        curve = []
        results["curves"][side] = curve
        for snap in snaps:
            if (side, snap["step"]) in done:  # each point is saved when done: a rerun resumes
                curve.append(done[(side, snap["step"])])
                continue
            if args.only_steps and snap["step"] not in args.only_steps:
                continue
            load = _diffusers_pipeline if side == "diffusers" else _reverie_pipeline
            pipe = load(args, snap["path"])
            grid = None if pipe.cfg.model.prediction == "edm" else args.grid  # EDM: sigma grids only (karras)
            feats = sample_features(partial(_draw, pipe, grid=grid), n=args.n, seed=args.seed,
                                    desc=f"{side} step {snap['step']}")
            point = {"step": snap["step"], "elapsed_s": snap["elapsed_s"],
                     **evaluate_samples(feats, reference(), ("fid", "kid"))}
            print(f"{side:9s} step {snap['step']:5d} {snap['elapsed_s']:7.0f}s  FID {point['fid']:.2f}", flush=True)
            curve.append(point)
            RESULTS.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2))
    budget = min(c[-1]["elapsed_s"] for c in results["curves"].values())
    at_budget = {}
    for side, curve in results["curves"].items():
        within = [p for p in curve if p["elapsed_s"] <= budget * 1.02]  # same steps, wall clocks within 2%
        at_budget[side] = within[-1] if within else None
    results["budget_s"] = budget
    results["at_budget"] = at_budget
    for side in REVERIE_SIDES:
        if at_budget.get(side) and at_budget.get("diffusers"):
            results[f"fid_ratio_{side}_over_diffusers"] = at_budget[side]["fid"] / at_budget["diffusers"]["fid"]
    out.write_text(json.dumps(results, indent=2))
    _plot(results, out.with_suffix(".png"))
    print(json.dumps(at_budget, indent=1))


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for side, curve in results["curves"].items():
        ax.plot([p["elapsed_s"] / 60 for p in curve], [p["fid"] for p in curve], "o-", label=side)
    ax.set_xlabel("training wall-clock (minutes, 1 CPU thread each)")
    ax.set_ylabel(f"FID ({results['n']} samples)")
    ax.set_yscale("log")
    ax.set_title("MNIST 32x32: FID vs training time")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--side", choices=SIDES, required=True)
    e = sub.add_parser("eval")
    e.add_argument("--n", type=int, default=1000)
    e.add_argument("--ref-n", type=int, default=10000)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--only-steps", type=int, nargs="*", default=None, help="evaluate only these snapshots")
    e.add_argument("--wait-reference", action="store_true", help="wait for another process to cache the reference")
    e.add_argument("--out", default=str(RESULTS / "time_to_quality.json"), help="results JSON (plot beside it)")
    e.add_argument("--grid", default=None, help="sigma grid of the VP sides (default: the config's, karras); "
                                                "EDM models keep karras (their sigmas are not a VP table)")
    for q in (t, e):
        q.add_argument("--run", default=str(ROOT / "runs" / "ttq"))
        q.add_argument("--steps", type=int, default=2400)
        q.add_argument("--snapshot-every", type=int, default=400)
    args = p.parse_args()
    if args.cmd == "train":
        side_dir = Path(args.run) / args.side
        (train_diffusers if args.side == "diffusers" else train_reverie)(args, side_dir)
    else:
        evaluate(args)


if __name__ == "__main__":
    main()
