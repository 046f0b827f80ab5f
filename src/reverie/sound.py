"""Generating sound with a spectrogram diffusion model: sample its log-mel images, turn them into waveforms.

An audio model is an ordinary diffusion model (``reverie.build.DiffusionModel``, trained by the diffusion
trainer on ``sounds`` or ``speech``) whose data description carries an ``audio`` entry: the
``reverie.audio.MelSpec`` of its images. :func:`generate_audio` samples with the shared
``SamplingOptions`` and inverts the spectrograms by Griffin-Lim; :func:`spectrogram_png` draws them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .audio import MelSpec
from .build import DiffusionModel
from .sampling import SamplingOptions, sample_images

GRIFFIN_LIM_ITERS = 64


def audio_spec(model: DiffusionModel) -> MelSpec:
    """The spectrogram settings of an audio model; a ValueError for an image model."""
    audio = model.info.get("audio")
    if not isinstance(audio, dict) or audio.get("kind") != "mel":
        raise ValueError("this model makes images, not sound (its config.json has no audio section); use "
                         "reverie generate, or pass an audio model to --model")
    return MelSpec.from_dict(audio["mel"])


@torch.no_grad()
def generate_audio(model: DiffusionModel, prompt: str | list[str] = "", num_clips: int = 1,
                   options: SamplingOptions | None = None,
                   class_labels: torch.Tensor | None = None, griffin_lim_iters: int = GRIFFIN_LIM_ITERS,
                   progress: bool = False) -> tuple[np.ndarray, torch.Tensor, int]:
    """``(waveforms [num_clips, samples] float32, spectrogram images [num_clips, 1, n_mels, frames], sample rate)``.
    ``prompt``: one for every clip, or a list repeated over the clips. Each clip's phase is seeded by
    ``options.seed`` and its index, so a seed reproduces the waveforms."""
    mel = audio_spec(model)
    if model.conditioning == "text":
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        images = sample_images(model, num_clips, options, prompts=prompts, progress=progress)
    else:
        if prompt:
            raise ValueError(f"this model is conditioned on {model.conditioning} labels, not text: leave the prompt "
                             f"out" + (" and pass --label" if model.conditioning == "class" else ""))
        images = sample_images(model, num_clips, options, class_labels=class_labels, progress=progress)
    seed = (options or SamplingOptions()).seed
    waves = torch.stack([mel.decode(img.cpu(), iters=griffin_lim_iters, seed=seed + i) for i, img in enumerate(images)])
    return waves.numpy(), images.cpu(), mel.sample_rate


def spectrogram_png(images: torch.Tensor, mel: MelSpec, path: str | Path, titles: list[str] | None = None) -> Path:
    """The log-mel spectrograms ``[N, 1, n_mels, frames]`` side by side (time in s, frequency in mel bands
    labelled in Hz), as a PNG drawn by matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = images.shape[0]
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 2.8), squeeze=False)
    edges = mel.centers()
    ticks = [k for k in (0, 15, 31, 47, 63) if k < mel.n_mels]
    for i, ax in enumerate(axes[0]):
        db = (images[i, 0].float().numpy() - 1) * (mel.db_range / 2)
        ax.imshow(db, origin="lower", aspect="auto", cmap="magma", vmin=-mel.db_range, vmax=0,
                  extent=(0, mel.seconds, -0.5, mel.n_mels - 0.5))
        ax.set_yticks(ticks, [f"{edges[k]:.0f}" for k in ticks])
        ax.set_xlabel("time (s)")
        if i == 0:
            ax.set_ylabel(f"frequency (Hz, {mel.scale} scale)")
        if titles:
            ax.set_title(_wrap(titles[i % len(titles)]), fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _wrap(text: str, width: int = 36) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return "\n".join(lines + [line])
