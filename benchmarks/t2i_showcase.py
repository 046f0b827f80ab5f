"""The README's picture: prompts (none of them a training caption verbatim) and what a model draws.

    python benchmarks/t2i_showcase.py                          # shipped model -> docs/t2i_grid.png
    python benchmarks/t2i_showcase.py --model runs/x/model --out /tmp/grid.png --guidance 7
    python benchmarks/t2i_showcase.py --layouts-out docs/t2i_layouts.png   # also: planned boxes vs images

One row per prompt, ``--per-prompt`` images per row (seeds 0, 1, ...), the prompt written on the left.
Also prints the generation time of each row. For a layout model, ``--layouts-out`` draws a second picture:
each image under the layout the planner drew for it (boxes filled with the phrase's color), the same
layouts ``generate`` used.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from PIL import Image, ImageDraw

from reverie.cli.common import DEFAULT_MODEL
from reverie.data.shapes import COLORS
from reverie.layout import get_planner, plan_layouts
from reverie.pipeline import Pipeline

PROMPTS = [
    "a red circle above a blue square",
    "a green star to the left of a white ring",
    "a small yellow triangle",
    "an orange diamond below a purple cross",
    "a cyan ring to the right of a pink circle",
    "one big blue star",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--out", default="docs/t2i_grid.png")
    p.add_argument("--per-prompt", type=int, default=6)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--scale", type=int, default=3, help="upscaling of each 32x32 image (NEAREST)")
    p.add_argument("--layouts-out", default=None, help="layout models: also draw planned boxes over images here")
    args = p.parse_args()
    pipe = Pipeline.from_pretrained(args.model)
    rows = []
    for prompt in PROMPTS:
        start = time.perf_counter()
        images = pipe.generate(prompt, num_images=args.per_prompt, steps=args.steps, sampler=args.sampler,
                               guidance_scale=args.guidance, seed=0)
        print(f"{time.perf_counter() - start:5.2f} s  {prompt}")
        rows.append((prompt, images))
    size = rows[0][1][0].size[0] * args.scale
    label_w, pad = 250, 4
    grid = Image.new("RGB", (label_w + args.per_prompt * (size + pad), len(rows) * (size + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for r, (prompt, images) in enumerate(rows):
        y = pad + r * (size + pad)
        draw.text((6, y + size // 2 - 6), prompt, fill=(0, 0, 0))
        for c, img in enumerate(images):
            grid.paste(img.resize((size, size), Image.NEAREST), (label_w + c * (size + pad), y))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(f"wrote {args.out} ({pipe.name}, {args.sampler} x {args.steps}, guidance {args.guidance})")
    if args.layouts_out:
        if not pipe.takes_layouts:
            raise SystemExit(f"{pipe.name} takes no layouts")
        layout_picture(pipe, rows, args, size, label_w, pad)


def sketch(layout, size: int) -> Image.Image:
    """A planned layout drawn as boxes filled with each phrase's color, the shape word inside."""
    img = Image.new("RGB", (size, size), (235, 235, 235))
    draw = ImageDraw.Draw(img)
    for phrase, (x0, y0, x1, y1) in layout or []:
        color, shape = phrase.split(" ", 1)
        box = [x0 * size, y0 * size, x1 * size - 1, y1 * size - 1]
        draw.rectangle(box, fill=COLORS.get(color, (128, 128, 128)), outline=(0, 0, 0))
        draw.text((box[0] + 2, box[1] + 2), shape[:4], fill=(0, 0, 0))
    return img


def layout_picture(pipe, rows, args, size: int, label_w: int, pad: int) -> None:
    """Two rows per prompt: the planned layouts, then the images generated with them."""
    planner = get_planner(pipe.cfg.data.name)
    grid = Image.new("RGB", (label_w + args.per_prompt * (size + pad), 2 * len(rows) * (size + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for r, (prompt, images) in enumerate(rows):
        layouts = plan_layouts(planner, [prompt] * len(images), seed=0)  # what generate(seed=0) planned
        y = pad + 2 * r * (size + pad)
        draw.text((6, y + size - 6), prompt, fill=(0, 0, 0))
        for c, (layout, img) in enumerate(zip(layouts, images)):
            x = label_w + c * (size + pad)
            grid.paste(sketch(layout, size), (x, y))
            grid.paste(img.resize((size, size), Image.NEAREST), (x, y + size + pad))
    grid.save(args.layouts_out)
    print(f"wrote {args.layouts_out}")


if __name__ == "__main__":
    main()
