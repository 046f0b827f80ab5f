"""Image quality at equal training budget: a pixel-space and a latent-space text-to-image model.

Both sides train ``configs/shapes-t2i-scratch.yaml`` (same U-Net, text encoder, optimizer, constant LR,
EMA, bf16) on 64x64 ``shapes`` for the same wall-clock budget, one thread each, run at the same time
so that they share the machine alike; the latent side goes through the f4 VAE
(``reverie train-vae configs/vae-shapes-f4.yaml``), encoding every batch on the fly (the encoder's
cost counts against its budget). The U-Net keeps its attention at the same levels on both sides
(pixels 64 -> attention at 32 and 16; latents 16 -> at 8 and 4), the configuration of
``benchmarks/latent_vs_pixel.py``'s compute figures.

    python benchmarks/latent_vs_pixel_quality.py train --side pixel  --minutes 60 &
    python benchmarks/latent_vs_pixel_quality.py train --side latent --minutes 60 &
    wait
    python benchmarks/latent_vs_pixel_quality.py eval
    python benchmarks/latent_vs_pixel_quality.py picture     # docs/latent_vs_pixel.png: same prompts, both sides

``eval`` scores each side's EMA weights with ``reverie eval``'s metrics: FID against shapes drawn
with a held-out seed (``--n`` samples vs ``--ref-n`` images) and prompt adherence on the 72 held-out
prompts, all with the same sampler, steps, grid and guidance, and times generation per image.
Writes benchmarks/results/latent_vs_pixel_quality.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CONFIG = ROOT / "configs" / "shapes-t2i-scratch.yaml"
ATTENTION = {"pixel": "[32, 16]", "latent": "[8, 4]"}


def _cfg(args, side: str):
    from reverie.configs import load_config
    from reverie.train.config import TrainConfig

    overrides = [f"--data.resolution={args.resolution}", f"--train.out_dir={Path(args.run) / side}",
                 f"--train.time_limit_min={args.minutes}", "--train.steps=1000000", "--train.checkpoint_every=250",
                 "--train.threads=1", "--train.progress=false", "--sample.every=0",
                 f"--model.network_overrides.attention_resolutions={ATTENTION[side]}"]
    if side == "latent":
        overrides.append(f"--model.autoencoder={args.vae}")
    return load_config(TrainConfig, CONFIG, overrides)


def train_side(args) -> None:
    from reverie.train import train

    torch.set_num_threads(1)
    result = train(_cfg(args, args.side), resume="auto")
    print(f"{args.side}: {result.step} steps in the budget of {args.minutes} min -> {result.export_dir}")


def evaluate(args) -> None:
    from reverie.cli import main as cli

    torch.set_num_threads(args.threads)
    out = RESULTS / "latent_vs_pixel_quality.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.update({"resolution": args.resolution, "sampler": "dpmpp_2m", "steps": args.steps,
                    "grid": "ddim-trailing", "guidance": args.guidance, "n": args.n, "ref_n": args.ref_n,
                    "machine": platform.processor() or platform.machine(), "torch": torch.__version__})
    sides = results.setdefault("sides", {})
    for side in ("pixel", "latent"):
        run = Path(args.run) / side
        log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        tmp = Path(args.run) / f"eval-{side}.json"
        common = ["--steps", str(args.steps), "--grid", "ddim-trailing", "--guidance", str(args.guidance),
                  "--device", "cpu", "--seed", "0"]
        if cli(["eval", str(run / "model"), "--metrics", "fid,kid", "--n", str(args.n), "--ref-n", str(args.ref_n),
                *common, "--json", str(tmp)]) != 0:
            raise SystemExit(f"eval of {side} failed")
        fid = json.loads(tmp.read_text())
        if cli(["eval", str(run / "model"), "--metrics", "adherence", "--per-prompt", "2", *common,
                "--json", str(tmp)]) != 0:
            raise SystemExit(f"adherence of {side} failed")
        adherence = json.loads(tmp.read_text())["adherence"]
        from reverie.pipeline import Pipeline

        pipe = Pipeline.from_pretrained(run / "model")
        t0 = time.perf_counter()
        pipe.sample(4, steps=args.steps, sampler="dpmpp_2m", grid="ddim-trailing", prompts=["a red circle"],
                    guidance_scale=args.guidance)
        sides[side] = {"train_steps": log[-1]["step"], "train_elapsed_s": log[-1]["elapsed_s"],
                       "images_per_s_train": log[-1]["images_per_s"], "fid": fid["fid"], "kid": fid["kid"],
                       "n": fid["n"], "n_ref": fid["n_ref"],
                       "adherence": {k: adherence[k] for k in ("color_accuracy", "shape_accuracy",
                                                               "relation_accuracy", "all_correct", "num_images")},
                       "s_per_image_generate": (time.perf_counter() - t0) / 4}
        RESULTS.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print(side, json.dumps(sides[side]), flush=True)


def picture(args) -> None:
    """One row per prompt: ``--per-prompt`` pixel-model images, then the latent model's, from the same seeds."""
    from PIL import Image, ImageDraw

    from reverie.pipeline import Pipeline
    from t2i_showcase import PROMPTS

    torch.set_num_threads(args.threads)
    pipes = {side: Pipeline.from_pretrained(Path(args.run) / side / "model") for side in ("pixel", "latent")}
    k, size, pad, label_w, head = args.per_prompt, args.resolution * 2, 4, 250, 20
    gap = 3 * pad
    width = label_w + 2 * k * (size + pad) + gap
    grid = Image.new("RGB", (width, head + len(PROMPTS) * (size + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, side in enumerate(pipes):
        draw.text((label_w + i * (k * (size + pad) + gap), 4), f"{side} space", fill=(0, 0, 0))
    for r, prompt in enumerate(PROMPTS):
        y = head + pad + r * (size + pad)
        draw.text((6, y + size // 2 - 6), prompt, fill=(0, 0, 0))
        for i, pipe in enumerate(pipes.values()):
            images = pipe.generate(prompt, num_images=k, steps=args.steps, sampler="dpmpp_2m",
                                   guidance_scale=args.guidance, seed=0, grid="ddim-trailing")
            for c, img in enumerate(images):
                grid.paste(img.resize((size, size), Image.NEAREST),
                           (label_w + i * (k * (size + pad) + gap) + c * (size + pad), y))
    out = ROOT / "docs" / "latent_vs_pixel.png"
    grid.save(out)
    print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--side", choices=list(ATTENTION), required=True)
    t.add_argument("--minutes", type=float, default=60.0)
    t.add_argument("--vae", default=str(ROOT / "runs" / "vae-shapes-f4" / "model"))
    e = sub.add_parser("eval")
    e.add_argument("--n", type=int, default=500)
    e.add_argument("--ref-n", type=int, default=2000)
    pic = sub.add_parser("picture")
    pic.add_argument("--per-prompt", type=int, default=4)
    for q in (e, pic):
        q.add_argument("--steps", type=int, default=20)
        q.add_argument("--guidance", type=float, default=4.0)
        q.add_argument("--threads", type=int, default=2)
    for q in (t, e, pic):
        q.add_argument("--run", default=str(ROOT / "runs" / "lvp"))
        q.add_argument("--resolution", type=int, default=64)
    args = p.parse_args()
    {"train": train_side, "eval": evaluate, "picture": picture}[args.cmd](args)


if __name__ == "__main__":
    main()
