"""Latent diffusion training: VAE encoding on the fly vs latents cached once (``data.cache_latents``).

    python benchmarks/latent_cache.py --vae runs/vae-shapes-f4/model

Both runs train the same latent text-to-image model (``configs/shapes-t2i-scratch.yaml`` at 64x64 through the
given autoencoder) for ``--steps`` steps on the same finite ``shapes`` subset (``--items`` images),
one thread, alternating in ``--rounds``. Reported: training images/s (the median of the logged rates
after the first ``--warmup`` steps) and, for the cached run, the one-off time to encode the subset.
Writes benchmarks/results/latent_cache.json.
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

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def run(args, cache: bool) -> dict:
    from reverie.configs import load_config
    from reverie.train import train
    from reverie.train.config import TrainConfig

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(TrainConfig, ROOT / "configs" / "shapes-t2i-scratch.yaml", [
            f"--data.resolution={args.resolution}", f"--model.autoencoder={args.vae}",
            f"--data.cache_latents={str(cache).lower()}", f"--data.options={{max_objects: 2, length: {args.items}}}",
            f"--train.steps={args.steps}", f"--train.out_dir={tmp}", "--train.checkpoint_every=0",
            "--sample.every=0", "--train.progress=false", "--train.log_every=1", "--train.threads=1"])
        t0 = time.perf_counter()
        train(cfg, resume=False)
        total = time.perf_counter() - t0
        log = [json.loads(line) for line in (Path(tmp) / "log.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in log[args.warmup:]]
    train_time = log[-1]["elapsed_s"]
    return {"images_per_s": statistics.median(rates), "train_seconds": train_time,
            "setup_seconds": total - train_time}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", required=True)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--items", type=int, default=2048)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "latent_cache.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    runs = {"on_the_fly": [], "cached": []}
    for r in range(args.rounds):
        for cache in ((False, True) if r % 2 == 0 else (True, False)):
            res = run(args, cache)
            runs["cached" if cache else "on_the_fly"].append(res)
            print(f"round {r} {'cached' if cache else 'on the fly':10s} {res['images_per_s']:6.1f} images/s, "
                  f"setup {res['setup_seconds']:.1f} s", flush=True)
    med = {k: statistics.median(x["images_per_s"] for x in v) for k, v in runs.items()}
    result = {"vae": args.vae, "resolution": args.resolution, "items": args.items, "steps": args.steps, "runs": runs,
              "median_images_per_s": med, "speedup_cached": med["cached"] / med["on_the_fly"],
              "cache_build_seconds": statistics.median(x["setup_seconds"] for x in runs["cached"])
              - statistics.median(x["setup_seconds"] for x in runs["on_the_fly"]),
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"on the fly {med['on_the_fly']:.1f} images/s, cached {med['cached']:.1f} images/s "
          f"({result['speedup_cached']:.2f}x); encoding {args.items} images once: "
          f"{result['cache_build_seconds']:.0f} s")


if __name__ == "__main__":
    main()
