"""Text-to-video on top of a :class:`reverie.pipeline.Pipeline`: clips, and the files they are written to.

A video model is a diffusion model whose ``info`` has ``frames`` (``reverie.data.moving_shapes`` clips,
``reverie.nets.video.VideoUNet``): ``Pipeline.sample`` already returns its clips ``(B, C, T, H, W)`` in
[-1, 1], since the start noise has the clip's shape (``reverie.sampling.noise_shape``) and every sampler
works on any shape. This module adds what only videos need:

- :func:`generate_video`: clips for a prompt, with the same :class:`reverie.sampling.SamplingOptions` as
  ``generate`` (per-frame layouts planned from the prompt by the data's motion planner unless ``layouts="none"``);
- :func:`clip_frames`: clips -> one PIL frame per time step, the clips side by side (NEAREST upscaling);
- :func:`save_video` / :func:`read_video_parameters`: an animated GIF whose *comment extension* holds the
  generation parameters as JSON (``reverie generate-video --from-file`` reads them back), or an APNG (``.png``)
  with them in a ``reverie`` text chunk as PNGs have, or an MP4 when ``ffmpeg`` is on the PATH (no
  parameters inside; a sidecar ``.json`` beside it). GIFs and APNGs carry no watermark or C2PA manifest yet.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import torch
from PIL import Image

from .images import make_grid, to_pil
from .sampling import SamplingOptions

VIDEO_SUFFIXES = (".gif", ".png", ".apng", ".mp4")
GIF_KEY = "reverie:"  # the comment starts with it, then the JSON parameters


def is_video_model(model) -> bool:
    return bool(model.info.get("frames"))


def generate_video(pipe, prompt: str = "", num_videos: int = 1, options: SamplingOptions | None = None, *,
                   progress: bool = False, noise: torch.Tensor | None = None, **settings) -> torch.Tensor:
    """``num_videos`` clips ``(B, C, T, H, W)`` in [-1, 1] for ``prompt`` (``settings``: SamplingOptions fields)."""
    if not is_video_model(pipe):
        raise ValueError(f"model {pipe.name!r} makes images, not videos: use reverie generate")
    if pipe.conditioning != "text" and prompt:
        raise ValueError(f"model {pipe.name!r} is not text-conditioned (conditioning={pipe.conditioning})")
    return pipe.sample(num_videos, options, prompts=[prompt], progress=progress, noise=noise, **settings)


def clip_frames(clips: torch.Tensor, scale: int = 4, ncols: int | None = None, pad: int = 2) -> list[Image.Image]:
    """``(B, C, T, H, W)`` clips in [-1, 1] -> T PIL frames, each a grid of the B clips at that time step."""
    if clips.ndim != 5:
        raise ValueError(f"expected clips (B, C, T, H, W), got shape {tuple(clips.shape)}")
    if clips.shape[0] == 1 and pad:
        pad = 0  # one clip: no grid border
    return [make_grid(to_pil(clips[:, :, t]), ncols or clips.shape[0], pad=pad, scale=scale)
            for t in range(clips.shape[2])]


def save_video(frames: list[Image.Image], path: str | Path, params: dict, fps: float = 4.0) -> Path:
    """Write ``frames`` as an animated GIF, APNG or MP4 (by the suffix) carrying ``params`` (module docstring)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"{path}: the file name must end in {', '.join(VIDEO_SUFFIXES)}")
    duration = round(1000 / fps)
    text = json.dumps(params, sort_keys=True)
    if suffix == ".gif":
        # one palette of the whole clip, no dithering: flat shapes keep flat colours in every frame
        strip = Image.new("RGB", (frames[0].width, frames[0].height * len(frames)))
        for k, frame in enumerate(frames):
            strip.paste(frame.convert("RGB"), (0, k * frames[0].height))
        palette = strip.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        paletted = [f.convert("RGB").quantize(palette=palette, dither=Image.Dither.NONE) for f in frames]
        paletted[0].save(path, save_all=True, append_images=paletted[1:], duration=duration, loop=0,
                         comment=(GIF_KEY + text).encode(), optimize=False, disposal=1)
    elif suffix in (".png", ".apng"):
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("reverie", text)
        frames[0].save(path, format="PNG", save_all=True, append_images=frames[1:], duration=duration, loop=0,
                       pnginfo=info)
    else:
        _save_mp4(frames, path, fps)
        path.with_suffix(".json").write_text(text)
    return path


def _save_mp4(frames: list[Image.Image], path: Path, fps: float) -> None:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise ValueError("writing .mp4 needs ffmpeg on the PATH; write a .gif or .png (APNG) instead")
    w, h = frames[0].size
    w2, h2 = w + w % 2, h + h % 2  # yuv420p needs even sides
    raw = b"".join(f.convert("RGB").resize((w2, h2), Image.NEAREST).tobytes() for f in frames)
    cmd = [ffmpeg, "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w2}x{h2}",
           "-r", str(fps), "-i", "-", "-pix_fmt", "yuv420p", "-c:v", "libx264", str(path)]
    subprocess.run(cmd, input=raw, check=True)


def read_video_parameters(path: str | Path) -> dict:
    """The generation parameters stored in a GIF's comment, an APNG's text chunk or an MP4's sidecar JSON."""
    path = Path(path)
    if path.suffix.lower() == ".mp4":
        sidecar = path.with_suffix(".json")
        if not sidecar.is_file():
            raise ValueError(f"{path} has no sidecar {sidecar.name} with its parameters")
        text = sidecar.read_text()
    else:
        try:
            with Image.open(path) as im:
                info = dict(im.info)
        except (OSError, SyntaxError) as e:
            raise ValueError(f"{path} is not a readable GIF or PNG ({e})") from None
        comment = info.get("comment", b"")
        comment = comment.decode("utf-8", "replace") if isinstance(comment, bytes) else str(comment)
        text = comment[len(GIF_KEY):] if comment.startswith(GIF_KEY) else info.get("reverie")
        if not text:
            raise ValueError(f"{path} holds no reverie generation parameters")
    try:
        params = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: its parameters are not valid JSON ({e})") from None
    if not isinstance(params, dict):
        raise ValueError(f"{path}: its parameters must be a JSON object")
    return params


def read_frames(path: str | Path) -> list[Image.Image]:
    """Every frame of an animated GIF or APNG, as RGB images."""
    with Image.open(path) as im:
        frames = []
        for k in range(getattr(im, "n_frames", 1)):
            im.seek(k)
            frames.append(im.convert("RGB"))
    return frames
