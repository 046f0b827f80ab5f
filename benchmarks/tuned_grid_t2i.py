"""Few-step generation with a tuned grid on a real model: the shipped text-to-image model, its own grid vs
a grid tuned to it (``Pipeline.tune_grid``), scored by prompt adherence on the held-out prompts.

    python benchmarks/tuned_grid_t2i.py                      # -> benchmarks/results/tuned_grid_t2i.json
                                                             #    and docs/tuned_grid_t2i.png
    python benchmarks/tuned_grid_t2i.py --steps 4 --per-prompt 1 --out /tmp/t   # quicker

For each step count the grid is tuned for dpmpp_2m (the generate default) on ``--pilot`` noise draws under
the config's four sample prompts (none of them an evaluation prompt) at guidance 4, with a seed apart from
the evaluation's. Then the 72 held-out adherence prompts, ``--per-prompt`` images each, are generated with
the model's own grid (ddim-trailing) and with the tuned one, from the same noise; plus the 20-step
default as the reference. The picture shows four prompts (same seed per column) under each setting.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from PIL import Image, ImageDraw

from reverie.cli.common import DEFAULT_MODEL
from reverie.eval.adherence import evaluate_adherence
from reverie.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]
SHOW = ["a red circle above a blue square", "a green star to the left of a white ring",
        "an orange diamond below a purple cross", "one big blue star"]
KEYS = ("color_accuracy", "shape_accuracy", "relation_accuracy", "all_correct")


def adherence(pipe, args, steps=None, grid=None) -> dict:
    res = evaluate_adherence(pipe, num_per_prompt=args.per_prompt, steps=steps or 20, sampler=args.sampler,
                             guidance_scale=args.guidance, grid=grid, progress=False)
    return {k: res[k] for k in KEYS} | {"num_images": res["num_images"]}


def picture(pipe, settings, args, path: Path) -> None:
    """Rows: prompts; column blocks: settings (label on top), two seeds each."""
    seeds, scale, pad, label_h = (0, 1), 3, 4, 18
    blocks = []
    for label, kw in settings:
        imgs = [[pipe.generate(p, num_images=1, seed=s, sampler=args.sampler, guidance_scale=args.guidance, **kw)[0]
                 for s in seeds] for p in SHOW]
        blocks.append((label, imgs))
    size = blocks[0][1][0][0].size[0] * scale
    block_w = len(seeds) * (size + pad) + 3 * pad
    out = Image.new("RGB", (len(blocks) * block_w + pad, label_h + len(SHOW) * (size + pad) + pad), "white")
    draw = ImageDraw.Draw(out)
    for b, (label, imgs) in enumerate(blocks):
        x0 = pad + b * block_w
        draw.text((x0, 3), label, fill="black")
        for r, row in enumerate(imgs):
            for c, im in enumerate(row):
                out.paste(im.resize((size, size), Image.NEAREST), (x0 + c * (size + pad), label_h + r * (size + pad)))
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--steps", type=int, nargs="+", default=[4, 6])
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--pilot", type=int, default=8)
    p.add_argument("--teacher-steps", type=int, default=50)
    p.add_argument("--per-prompt", type=int, default=2, help="images per held-out prompt")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                   help="folder for tuned_grid_t2i.json and the grid files")
    p.add_argument("--picture", type=Path, default=ROOT / "docs" / "tuned_grid_t2i.png")
    args = p.parse_args()
    pipe = Pipeline.from_pretrained(args.model)
    own = pipe.cfg.sample.grid
    results = {"model": pipe.name, "model_hash": pipe.weights_hash, "sampler": args.sampler,
               "guidance": args.guidance, "per_prompt": args.per_prompt, "own_grid": own, "steps": {}}
    t0 = time.perf_counter()
    results["reference_20_steps"] = adherence(pipe, args)
    print(f"20 steps ({own}): {results['reference_20_steps']}")
    settings = [(f"{own}, 20 steps", {"steps": 20})]
    for steps in args.steps:
        start = time.perf_counter()
        tuned = pipe.tune_grid(args.sampler, steps, pilot=args.pilot, guidance_scale=args.guidance,
                               teacher_steps=args.teacher_steps, progress=True)
        seconds = time.perf_counter() - start
        tuned.save(args.out / f"tuned_grid_t2i_{steps}.json")
        entry = {"tuning_seconds": seconds, "sigmas": [float(s) for s in tuned.sigmas], "loss": tuned.loss,
                 "own_grid_loss": tuned.start_losses.get(own), "karras_loss": tuned.start_losses["karras"],
                 "evaluations": tuned.evaluations, "denoiser_calls": tuned.denoiser_calls,
                 "own": adherence(pipe, args, steps=steps), "tuned": adherence(pipe, args, grid=tuned.sigmas)}
        results["steps"][str(steps)] = entry
        print(f"{steps} steps: tuned in {seconds:.0f} s, loss {tuned.loss:.4g} (own grid {entry['own_grid_loss']:.4g})"
              f"\n  own   {entry['own']}\n  tuned {entry['tuned']}")
        settings += [(f"{own}, {steps} steps", {"steps": steps}), (f"tuned, {steps} steps", {"grid": tuned.sigmas})]
    results["seconds"] = time.perf_counter() - t0
    (args.out / "tuned_grid_t2i.json").write_text(json.dumps(results, indent=1))
    picture(pipe, settings, args, args.picture)
    print(f"wrote {args.out / 'tuned_grid_t2i.json'} and {args.picture}")


if __name__ == "__main__":
    main()
