"""``reverie generate-video``: text to an animated GIF (or APNG, or MP4 with ffmpeg) that carries its parameters."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from .common import UserError, at_least, number_in, output_file, sampling_options, sampling_parent, show_progress
from .generate import layout_arg

DEFAULT_VIDEO_MODEL = Path(__file__).resolve().parent.parent / "assets" / "shapes-video"
MAX_VIDEOS = 16


def add_commands(sub, fmt) -> None:
    v = sub.add_parser("generate-video", help="generate a short video (animated GIF) from a text prompt",
                       formatter_class=fmt, parents=[sampling_parent()])
    v.add_argument("prompt", nargs="?", default="", help='the prompt, e.g. "a green triangle moves up"')
    v.add_argument("-o", "--output", default="out.gif",
                   help="output file: .gif (parameters in its comment), .png (APNG) or .mp4 (needs ffmpeg; "
                        "parameters in a sidecar .json)")
    v.add_argument("--num-videos", type=at_least(1), default=1, help=f"clips, side by side (at most {MAX_VIDEOS})")
    v.add_argument("--model", default=None, help="video model directory (default: the shipped shapes-video)")
    v.add_argument("--fps", type=number_in(0.5, 50), default=4.0, help="frames per second")
    v.add_argument("--scale", type=at_least(1), default=4, help="pixel upscaling of the frames (nearest)")
    v.add_argument("--layout", default="auto",
                   help="auto (plan per-frame object boxes from the prompt's motion) or none (the prompt alone)")
    v.add_argument("--from-file", default=None, help="reproduce a clip from the parameters stored in a GIF / APNG")
    v.set_defaults(func=generate_video)


def _request(args):
    """(prompt, number of clips, SamplingOptions) of the command line or of the file named by --from-file."""
    from ..sampling import SamplingOptions
    from ..video import read_video_parameters

    if args.from_file:
        meta = read_video_parameters(Path(args.from_file))
        prompt, num = meta.get("prompt", ""), meta.get("num_videos")
        if not isinstance(prompt, str):
            raise UserError(f"{args.from_file}: prompt must be a string, got {prompt!r}")
        if not isinstance(num, int) or isinstance(num, bool) or not 1 <= num <= MAX_VIDEOS:
            raise UserError(f"{args.from_file}: num_videos must be an integer from 1 to {MAX_VIDEOS}, got {num!r}")
        return prompt, num, SamplingOptions.from_metadata(meta, args.from_file), meta
    if args.num_videos > MAX_VIDEOS:
        raise UserError(f"--num-videos must be between 1 and {MAX_VIDEOS}, got {args.num_videos}")
    layout = layout_arg(args.layout)
    if not isinstance(layout, str):
        raise UserError("--layout for videos is auto or none (per-frame boxes come from the motion planner)")
    return args.prompt or "", args.num_videos, sampling_options(args, layout), {}


def generate_video(args) -> int:
    from ..pipeline import Pipeline
    from ..sampling import check_batch
    from ..video import clip_frames, generate_video, is_video_model, save_video

    prompt, num, options, made_by = _request(args)
    output_file(args.output, (".gif", ".png", ".apng", ".mp4"))
    pipe = Pipeline.from_pretrained(Path(args.model) if args.model else DEFAULT_VIDEO_MODEL)
    if not is_video_model(pipe):
        raise UserError(f"{pipe.name} is an image model; generate-video needs a video model (e.g. the shipped "
                        f"shapes-video)")
    if pipe.conditioning != "text" and prompt:
        raise UserError(f"model {pipe.name!r} is not text-conditioned; leave out the prompt")
    if made_by.get("model_hash") and made_by["model_hash"] != pipe.weights_hash:
        print(f"reverie: warning: {args.from_file} was made by model {made_by.get('model')} "
              f"({made_by['model_hash']}), not {pipe.name} ({pipe.weights_hash})")
    check_batch(pipe, num, option="--num-videos", guided=pipe.conditioning != "none")
    used = dataclasses.replace(options.resolve(pipe.cfg), grid=options.grid)
    start = time.perf_counter()
    clips = generate_video(pipe, prompt, num, options, progress=show_progress(args))
    elapsed = time.perf_counter() - start
    params = {"prompt": prompt, "num_videos": num, "frames": int(clips.shape[2]), "fps": args.fps,
              **used.to_metadata(), "model": pipe.name, "model_hash": pipe.weights_hash}
    save_video(clip_frames(clips, scale=args.scale), args.output, params, fps=args.fps)
    print(f"generated {num} clip(s) of {clips.shape[2]} frames in {elapsed:.2f} s -> {args.output}")
    return 0
