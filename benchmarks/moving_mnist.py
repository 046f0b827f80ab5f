"""Unconditional Moving MNIST: how good are a video model's clips, frame by frame and in motion? (issue 25)

A model trained by ``reverie train configs/moving-mnist.yaml`` (two bouncing MNIST digits, 16 frames at 64x64)
samples ``--clips`` clips (seed = the first clip index of each batch, the model's own sampler settings unless
``--steps`` / ``--sampler`` say otherwise). They are compared with as many real clips of the test split (digits the
model never saw), and every figure is also computed for a second, disjoint set of real clips: the floor that
sampling noise alone gives. Figures:

- **frame FID**: the Fréchet Inception distance between the generated and the real frames (every frame of every
  clip; ``reverie.eval.fid``'s Inception, ``--fid-precision``). Quality of single frames, not of motion.
- **ink drift**, **motion** and **jerk** per clip (``reverie.eval.motion``): whether the digits keep their ink,
  how much the frames change, and whether the ink centroid moves on straight lines as the data's digits do.
- seconds per clip (sampling only, ``--threads``).

Each per-clip figure is reported as its mean over clips, for the generated clips and both real sets. Writes
``--out`` (JSON) and ``--picture`` (a PNG grid: one row of frames per clip, the first rows generated, the last
real).

    python benchmarks/moving_mnist.py --model DIR [--clips 64] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from reverie.data.moving_mnist import MovingMNIST
from reverie.eval.fid import FeatureStats, fid_from_stats, get_inception, image_features
from reverie.eval.motion import clip_statistics
from reverie.images import make_grid, to_pil
from reverie.pipeline import Pipeline
from reverie.sampling import SamplingOptions, sample_images

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def frame_stats(clips: torch.Tensor, precision: str, batch: int = 64) -> FeatureStats:
    """Inception statistics of every frame of ``clips`` (B, 1, T, H, W)."""
    frames = clips.transpose(1, 2).flatten(0, 1)  # (B*T, 1, H, W)
    feats = image_features((frames[i:i + batch] for i in range(0, len(frames), batch)),
                           get_inception(precision=precision), total=len(frames), desc="frame features")
    return FeatureStats.from_features(feats)


def summarize(stats: dict) -> dict:
    return {k: sum(v) / len(v) for k, v in stats.items()}


def real_clips(n: int, frames: int, resolution: int, seed: int) -> torch.Tensor:
    data = MovingMNIST("test", frames=frames, resolution=resolution, seed=seed, length=n)
    return torch.stack([data[i]["image"] for i in range(n)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a Moving MNIST model directory (reverie export)")
    p.add_argument("--clips", type=int, default=64, help="generated clips (and real clips in each real set)")
    p.add_argument("--batch", type=int, default=8, help="clips sampled at once")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--sampler", default=None, help="sampler (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--fid-precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--out", default=str(RESULTS / "moving_mnist.json"))
    p.add_argument("--picture", default=None, help="PNG grid of 4 generated and 2 real clips (default: beside --out)")
    args = p.parse_args(argv)
    if args.clips < 2 or args.batch < 1:
        p.error("--clips must be >= 2 and --batch >= 1")
    torch.set_num_threads(args.threads)
    try:
        pipe = Pipeline.from_pretrained(args.model)
    except (OSError, ValueError) as e:
        p.error(str(e))
    if pipe.cfg.data.name != "moving_mnist":
        p.error(f"{args.model} was trained on {pipe.cfg.data.name!r}, not moving_mnist")
    frames, resolution = int(pipe.info["frames"]), int(pipe.info["resolution"])
    options = SamplingOptions(seed=args.seed, steps=args.steps, sampler=args.sampler)
    generated, seconds = [], 0.0
    for start in range(0, args.clips, args.batch):
        n = min(args.batch, args.clips - start)
        t0 = time.perf_counter()
        generated.append(sample_images(pipe, n, SamplingOptions.make(options, seed=args.seed + start)).float())
        seconds += time.perf_counter() - t0
        print(f"sampled {start + n}/{args.clips} clips ({seconds / (start + n):.1f} s per clip)", flush=True)
    generated = torch.cat(generated)
    real_a = real_clips(args.clips, frames, resolution, seed=0)
    real_b = real_clips(args.clips, frames, resolution, seed=1)
    sets = {"generated": generated, "real": real_a, "real2": real_b}
    stats = {name: frame_stats(c, args.fid_precision) for name, c in sets.items()}
    per_clip = {name: summarize(clip_statistics(c)) for name, c in sets.items()}
    resolved = options.resolve(pipe.cfg)
    result = {
        "model": args.model, "model_hash": pipe.weights_hash,
        "clips": args.clips, "frames": frames, "resolution": resolution, "threads": args.threads,
        "sampling": {"sampler": resolved.sampler, "steps": resolved.steps, "grid": str(resolved.grid),
                     "seed": args.seed},
        "fid_precision": args.fid_precision,
        "frame_fid": {"generated_vs_real": fid_from_stats(stats["generated"], stats["real"]),
                      "real2_vs_real": fid_from_stats(stats["real2"], stats["real"])},
        "per_clip_means": per_clip,
        "seconds_per_clip": seconds / args.clips,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    picture = Path(args.picture) if args.picture else out.with_suffix(".png")
    rows = torch.cat([generated[:4], real_a[:2]])
    make_grid([img for b in range(rows.shape[0]) for img in to_pil(rows[b].transpose(0, 1))],
              ncols=frames, scale=1).save(picture)
    print(json.dumps({k: result[k] for k in ("frame_fid", "per_clip_means", "seconds_per_clip")}, indent=1))
    print(f"wrote {out} and {picture}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
