"""Training throughput: reverie's trainer vs a plain diffusers training loop, same data, same model.

    python benchmarks/train_throughput.py                  # unet-tiny, shapes 32x32, batch 32, 2 threads
    python benchmarks/train_throughput.py --steps 30 --rounds 3 --network unet-small

Both sides train the same architecture (reverie's ``unet-tiny`` and diffusers' ``UNet2DModel`` built
from ``diffusers_unet2d_kwargs`` of the same config) on the same ``shapes`` batches with AdamW,
eps prediction and a linear 1000-step schedule. The reverie side is the real ``reverie.train``
loop (accelerate, EMA, logging, everything on; checkpoints and sample grids off); the diffusers
side is the loop of its training examples: DDPMScheduler.add_noise, UNet2DModel(...).sample, MSE,
backward, clip, AdamW step, plus an EMA (diffusers' EMAModel) so both do the same work. Each
round runs both, alternating which goes first; the reported images/s is the median over rounds,
excluding the first ``--warmup`` steps of each run. Writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _reverie_run(args, out_dir: str) -> float:
    from reverie.configs import load_config
    from reverie.train import train
    from reverie.train.config import TrainConfig

    cfg = load_config(TrainConfig, None, [
        f"--model.network={args.network}", "--model.prediction=eps", "--schedule.name=linear",
        f"--data.resolution={args.resolution}", f"--data.batch_size={args.batch}",
        f"--train.steps={args.steps}", f"--train.out_dir={out_dir}", "--train.checkpoint_every=0",
        "--sample.every=0", "--train.progress=false", "--train.log_every=1", "--optim.warmup_steps=0",
        f"--train.mixed_precision={args.precision}"])
    train(cfg, resume=False)
    log = [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]
    # log_every=1: each record's rate covers one step
    rates = [r["images_per_s"] for r in log[args.warmup:]]
    return args.batch * len(rates) / sum(args.batch / r for r in rates)


def _diffusers_run(args) -> float:
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

    from reverie.data import collate, get_dataset
    from reverie.nets import PRESETS
    from reverie.nets.unet import diffusers_unet2d_kwargs

    cfg = PRESETS[args.network].replace(in_channels=3, out_channels=3, sample_size=args.resolution)
    torch.manual_seed(0)
    model = UNet2DModel(**diffusers_unet2d_kwargs(cfg, strict=False))
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
    ema = EMAModel(model.parameters(), decay=0.999, use_ema_warmup=True, power=0.75)
    data = torch.utils.data.DataLoader(get_dataset("shapes", resolution=args.resolution),
                                       batch_size=args.batch, collate_fn=collate)
    it = iter(data)
    times = []
    model.train()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        x0 = next(it)["image"]
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (x0.shape[0],))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            pred = model(sched.add_noise(x0, noise, t), t).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.step(model.parameters())
        times.append(time.perf_counter() - t0)
    kept = times[args.warmup:]
    return args.batch * len(kept) / sum(kept)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--network", default="unet-tiny")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", choices=["no", "bf16"], default="no")
    p.add_argument("--out", default=str(RESULTS / "train_throughput_cpu.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rev, dif = [], []
    for r in range(args.rounds):
        order = ("reverie", "diffusers") if r % 2 == 0 else ("diffusers", "reverie")
        for side in order:
            if side == "reverie":
                with tempfile.TemporaryDirectory() as tmp:
                    rev.append(_reverie_run(args, tmp))
            else:
                dif.append(_diffusers_run(args))
            print(f"round {r}: {side:9s} {(rev if side == 'reverie' else dif)[-1]:7.1f} images/s", flush=True)
    result = {
        "network": args.network, "resolution": args.resolution, "batch": args.batch, "steps": args.steps,
        "threads": args.threads, "precision": args.precision, "rounds": args.rounds,
        "reverie_images_per_s": rev, "diffusers_images_per_s": dif,
        "reverie_median": statistics.median(rev), "diffusers_median": statistics.median(dif),
        "ratio_reverie_over_diffusers": statistics.median(rev) / statistics.median(dif),
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"reverie {result['reverie_median']:.1f} images/s, diffusers {result['diffusers_median']:.1f} images/s, "
          f"ratio {result['ratio_reverie_over_diffusers']:.2f} -> {args.out}")


if __name__ == "__main__":
    main()
