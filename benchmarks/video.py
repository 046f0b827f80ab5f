"""Text-to-video on moving shapes, measured per frame with the shipped detector and by tracking (issue 25).

Held-out captions: the first ``--clips`` clips of ``MovingShapesDataset(split="test", seed=1)``, whose every
(colour, shape, motion) combo was left out of training (``reverie.data.moving_shapes.is_held_out``: 73 of
560 combos, e.g. "green triangle up"); 30 % of them name two objects. Each caption is sampled once per model
and condition (one clip, seed = its index), with the model's own settings (dpmpp_2m, 20 steps, guidance 4).
The shipped detector (``reverie/assets/shapes-classifier``) reads every frame; each caption object is then
tracked: in each frame the detection with its expected colour and shape, else the detection nearest to its
previous centre. Per clip and object:

- **frames correct**: the frame holds a detection of the object's expected colour (the new colour from the
  middle frame on for "turns X") and shape; a frame counts when all its objects are found;
- **direction** (straight moves right / left / up / down): the tracked centre's displacement from the first
  to the last frame has the caption's dominant axis and sign, and is at least 0.1 of the side (the data's
  moves are 0.28-0.45); a clip counts when all its straight-moving objects are right;
- **motion** (every kind): direction as above; bounce: the centre goes down by >= 0.05 and then up by >= 0.05;
  grow / shrink: the object's area (pixels within 60 RGB units of its colour) changes by >= 1.5x the right way;
  turns X: the expected colour in the first and last frame;
- **identity kept**: the tracked detection has the same colour and shape in every frame (a "turns X" object:
  the same shape, and one colour per half);
- **background kept** (not an acceptance figure; frame-to-frame flicker): the median colour of every frame's
  1-px border stays within 30 RGB units of the first frame's.

Conditions: per-frame layouts planned from the caption (``layouts=auto``, the default of ``generate-video``) and
the prompt alone (``layouts=none``). The reference, measured in the same run on the same captions and seeds,
is the video model's starting point: the shipped image model (shapes-t2i) applied to every frame (the video
network with its temporal layers at zero). The rendered clips themselves are scored too: the ceiling of the
detector and tracker. Time per clip is the sampling wall time over a batch of
``--batch`` clips divided by the clips, one thread.

    python benchmarks/video.py --model src/reverie/assets/shapes-video --clips 48
        -> benchmarks/results/video.json, docs/video.gif (the README's), docs/video_frames.png
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from reverie import modeldir
from reverie.data.moving_shapes import DIRECTIONS, MOTIONS, MovingShapesDataset
from reverie.data.shapes import COLOR_NAMES, COLORS
from reverie.eval.attributes import load_classifier
from reverie.images import make_grid, to_pil
from reverie.pipeline import Pipeline
from reverie.sampling import SamplingOptions, sample_images
from reverie.video import clip_frames, save_video

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
IMAGE_MODEL = ROOT / "src" / "reverie" / "assets" / "shapes-t2i"
SHOWCASE = ["a red circle moves to the right", "a blue square falls while a yellow star rises",
            "a green triangle moves up", "a white ring turns pink", "an orange diamond grows",
            "a cyan cross bounces"]


def image_model_per_frame(video_dir: Path, image_dir: Path = IMAGE_MODEL) -> Pipeline:
    """The video network with the image model's weights and its temporal layers at zero: the image model on
    every frame (the video model's initialization)."""
    pipe = Pipeline.from_pretrained(video_dir)
    image = modeldir.read(image_dir).load_weights()
    state = modeldir.module_weights(pipe.net)
    missing = [k for k in state if k not in image and ".temporal." not in k]
    if missing:
        raise ValueError(f"{image_dir} lacks {missing[:3]}: not the image model of {video_dir}")
    modeldir.load_module_weights(pipe.net, {k: image[k] if k in image else torch.zeros_like(v)
                                            for k, v in state.items()})
    pipe.name, pipe.weights_hash = f"{image_dir.name} per frame", modeldir.file_hash(image_dir / "ema.safetensors") \
        if (image_dir / "ema.safetensors").is_file() else modeldir.file_hash(image_dir / "model.safetensors")
    return pipe


def color_area(frame: torch.Tensor, color: int) -> float:
    """Pixels of ``frame`` [3, H, W] in [-1, 1] within 60 RGB units of a named colour."""
    rgb = torch.tensor(COLORS[COLOR_NAMES[color]], dtype=torch.float32)[:, None, None]
    return float(((frame + 1) * 127.5 - rgb).norm(dim=0).lt(60).sum())


def score_object(det: dict, clip: torch.Tensor, b: int, truth: dict, frames: int) -> dict:
    """Frame hits, motion, direction and identity of one caption object in clip ``b`` (module docstring)."""
    expected = [truth["color"] if t < frames // 2 else truth["color_end"] for t in range(frames)]
    hits, track, attrs = [], [], []
    for t in range(frames):
        row = b * frames + t
        found = [k for k in range(det["color"].shape[1]) if det["color"][row, k] >= 0]
        match = [k for k in found
                 if int(det["color"][row, k]) == expected[t] and int(det["shape"][row, k]) == truth["shape"]]
        hits.append(bool(match))
        pick = match[0] if match else None
        if pick is None and found and track and track[-1] is not None:
            pick = min(found, key=lambda k: float((det["center"][row, k] - track[-1]).norm()))
        track.append(det["center"][row, pick] if pick is not None else None)
        attrs.append((int(det["color"][row, pick]), int(det["shape"][row, pick])) if pick is not None else None)
    name = MOTIONS[truth["motion"]]
    recolor = name == "recolor"
    halves = [attrs[: frames // 2], attrs[frames // 2:]] if recolor else [attrs]
    identity = None not in attrs and len({a[1] for a in attrs}) == 1 \
        and all(len({a[0] for a in h}) == 1 for h in halves)
    direction, motion = None, False
    ends = track[0] is not None and track[-1] is not None
    if name in DIRECTIONS:
        direction = False
        if ends:
            d = track[-1] - track[0]
            axis = 0 if abs(float(d[0])) >= abs(float(d[1])) else 1
            want = DIRECTIONS[name]
            direction = want[axis] != 0 and float(d[axis]) * want[axis] >= 0.1
        motion = direction
    elif name == "bounce" and None not in track:
        ys = [float(c[1]) for c in track]
        low = max(range(frames), key=lambda t: ys[t])
        motion = ys[low] - ys[0] >= 0.05 and ys[low] - ys[-1] >= 0.05
    elif name in ("grow", "shrink"):
        first, last = color_area(clip[:, 0], truth["color"]), color_area(clip[:, -1], truth["color"])
        ratio = (last + 1) / (first + 1)
        motion = ratio >= 1.5 if name == "grow" else ratio <= 1 / 1.5
    elif recolor:
        motion = hits[0] and hits[-1]
    return {"hits": hits, "identity": identity, "direction": direction, "motion": bool(motion), "kind": name}


def evaluate(pipe: Pipeline, items: list[dict], layouts: str, batch: int, seed: int, detector,
             steps: int | None = None, guidance: float | None = None, sampler: str | None = None,
             clip_denoised: bool = False, regional: bool | None = None) -> dict:
    clips, seconds = [], 0.0
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        options = SamplingOptions(layouts=layouts, seed=seed + start, steps=steps, guidance_scale=guidance,
                                  sampler=sampler, clip_denoised=clip_denoised,
                                  regional=None if layouts == "none" else regional)
        t0 = time.perf_counter()
        clips.append(sample_images(pipe, len(chunk), options, prompts=[it["text"] for it in chunk]))
        seconds += time.perf_counter() - t0
    clips = torch.cat(clips)
    records = score_clips(clips, items, detector)
    return {"summary": summarize(records, seconds), "clips": records, "videos": clips}


def score_clips(clips: torch.Tensor, items: list[dict], detector) -> list[dict]:
    """Per-clip records of ``clips`` (B, 3, T, H, W) against the ground truth of ``items`` (module docstring)."""
    frames = clips.shape[2]
    det = detector.predict(clips.transpose(1, 2).flatten(0, 1))
    records = []
    for b, it in enumerate(items):
        objs = it["objects"]
        truths = [{k: int(objs[k][i]) for k in ("shape", "color", "color_end", "motion")}
                  for i in range(it["num_objects"])]
        scored = [score_object(det, clips[b], b, truth, frames) for truth in truths]
        frame_ok = [all(s["hits"][t] for s in scored) for t in range(frames)]
        dirs = [s["direction"] for s in scored if s["direction"] is not None]
        records.append({"text": it["text"], "frames_correct": sum(frame_ok) / frames,
                        "background_kept": background_kept(clips[b]),
                        "direction": all(dirs) if dirs else None, "motion": all(s["motion"] for s in scored),
                        "identity": all(s["identity"] for s in scored), "kinds": [s["kind"] for s in scored]})
    return records


def background_kept(clip: torch.Tensor, tolerance: float = 30.0) -> bool:
    """Whether the background stays one colour: the median of the 1-px border of every frame (objects keep
    clear of the border) within ``tolerance`` RGB units of the first frame's."""
    border = torch.cat([clip[:, :, 0], clip[:, :, -1], clip[:, :, :, 0], clip[:, :, :, -1]], dim=-1)  # [3, T, 4W]
    medians = (border.median(dim=-1).values + 1) * 127.5  # [3, T]
    return bool((medians - medians[:, :1]).norm(dim=0).max() <= tolerance)


def summarize(records: list[dict], seconds: float) -> dict:
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    directed = [r["direction"] for r in records if r["direction"] is not None]
    by_kind = {}
    for r in records:
        for kind in set(r["kinds"]):
            by_kind.setdefault(kind, []).append(r["motion"])
    return {"clips": len(records), "frames_correct": mean([r["frames_correct"] for r in records]),
            "direction_correct": mean(directed), "direction_clips": len(directed),
            "motion_correct": mean([r["motion"] for r in records]),
            "identity_kept": mean([r["identity"] for r in records]),
            "background_kept": mean([r["background_kept"] for r in records]),
            "motion_by_kind": {k: {"correct": mean(v), "clips": len(v)} for k, v in sorted(by_kind.items())},
            "seconds_per_clip": seconds / len(records)}


def showcase(pipe: Pipeline, out_gif: Path, out_png: Path, seed: int = 0) -> None:
    options = SamplingOptions(seed=seed)
    clips = sample_images(pipe, len(SHOWCASE), options, prompts=SHOWCASE)
    frames = clip_frames(clips, scale=2, ncols=len(SHOWCASE))
    save_video(frames, out_gif, {"prompts": SHOWCASE, "model": pipe.name, "model_hash": pipe.weights_hash,
                                 **options.resolve(pipe.cfg).to_metadata()}, fps=4)
    rows = [img for b in range(clips.shape[0]) for img in to_pil(clips[b].transpose(0, 1))]
    make_grid(rows, ncols=clips.shape[2], scale=2).save(out_png)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "src" / "reverie" / "assets" / "shapes-video"))
    p.add_argument("--clips", type=int, default=48, help="held-out captions (one clip each)")
    p.add_argument("--batch", type=int, default=8, help="clips sampled at once")
    p.add_argument("--layouts", nargs="+", default=["auto", "none"], choices=["auto", "none"])
    p.add_argument("--no-reference", action="store_true", help="skip the image-model-per-frame reference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=1, help="draw of held-out captions (1: the README's 40 clips; "
                   "2: a second draw, whose 64 first clips hold 10 white objects to the first 40's one)")
    p.add_argument("--frame-noise-correlation", type=float, default=None,
                   help="start noise shared across frames at sampling (default: the model's config.json)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's 20)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's 4)")
    p.add_argument("--sampler", default=None, help="sampler (default: the model's dpmpp_2m)")
    p.add_argument("--clip-denoised", action="store_true", help="clamp every x0 estimate to [-1, 1]")
    p.add_argument("--regional", action=argparse.BooleanOptionalAction, default=None,
                   help="regional prompts: each object's box denoised under its own phrase (layouts=auto rows; "
                        "default: the model's setting)")
    p.add_argument("--out", default=str(RESULTS / "video.json"))
    p.add_argument("--showcase", action="store_true", help="also write docs/video.gif and docs/video_frames.png")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    data = MovingShapesDataset(split="test", seed=args.data_seed)
    items = [data[i] for i in range(args.clips)]
    detector = load_classifier()
    models = {"video": Pipeline.from_pretrained(args.model)}
    if not args.no_reference:
        models["image_per_frame"] = image_model_per_frame(Path(args.model))
    if args.frame_noise_correlation is not None:
        if not 0 <= args.frame_noise_correlation < 1:
            p.error("--frame-noise-correlation must be in [0, 1)")
        for pipe in models.values():  # the reference too: the same start noise for both
            pipe.cfg.model.frame_noise_correlation = args.frame_noise_correlation
    rho = models["video"].cfg.model.frame_noise_correlation
    result = {"split": f"moving_shapes test (held-out colour-shape-motion combos), seed {args.data_seed}",
              "clips": args.clips, "frame_noise_correlation": rho,
              "batch": args.batch, "steps": args.steps or "model default",
              "guidance": "model default" if args.guidance is None else args.guidance,
              "sampler": args.sampler or "model default", "clip_denoised": args.clip_denoised,
              "regional": "model default" if args.regional is None else args.regional,
              "threads": torch.get_num_threads(),
              "sampling": "the model's settings (dpmpp_2m, 20 steps, ddim-trailing, guidance 4) except where steps, "
              "guidance, sampler, clip_denoised or regional above say otherwise; seed = first clip index of the batch",
              "model": args.model, "model_hash": models["video"].weights_hash, "results": {}}
    if args.showcase:
        showcase(models["video"], ROOT / "docs" / "video.gif", ROOT / "docs" / "video_frames.png")
    real = torch.stack([it["image"] for it in items])  # the rendered clips: the scoring's ceiling
    result["results"]["real clips"] = summarize(score_clips(real, items, detector), 0.0)
    print("real clips", json.dumps(result["results"]["real clips"]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    # conditions by priority (each written as soon as it is measured): the model and its reference as shipped
    # (layouts planned), then the prompt alone
    for layouts in args.layouts:
        for name, pipe in models.items():
            out = evaluate(pipe, items, layouts, args.batch, args.seed, detector, args.steps, args.guidance,
                           args.sampler, args.clip_denoised, args.regional)
            result["results"][f"{name}/layouts={layouts}"] = {**out["summary"], "per_clip": out["clips"]}
            print(name, layouts, json.dumps(out["summary"]), flush=True)
            Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
