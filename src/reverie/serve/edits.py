"""img2img, inpainting and prompt edits for the server (``/sdapi/v1/img2img``, ``/v1/jobs/img2img``; ``/v1/edit``,
``/v1/jobs/edit``), on ``reverie.editing``.

A1111's fields: ``init_images`` (the first is the image every output starts from), ``denoising_strength``
(img2img's strength: how many of the steps run, diffusers' convention), ``mask`` (white = repaint, black =
keep; ``inpainting_mask_invert=1`` swaps them). The image is resized to the model's size (the mask with
nearest-neighbour), as A1111's ``resize_mode=0`` does. Image ``i`` uses seed ``seed + i``, like txt2img;
an edit job runs alone (it is never batched with others). ``mask_blur`` is accepted and not used: the
mask is binary (RePaint pastes the kept pixels back exactly). A prompt edit (:class:`EditRequest`) inverts the
image under ``from_prompt`` and regenerates it under ``prompt`` (``reverie edit --from-prompt --to-prompt``); its
progress counts the regeneration's steps (the inversion before them is not shown).
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import torch
from PIL import Image as PILImage

from ..images import to_pil
from .images import decode_image
from .schemas import EditRequest, Img2ImgRequest
from .worker import Job, JobError


def to_tensor(image: PILImage.Image, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """A PIL image as ``[1, C, H, W]`` in [-1, 1] at ``size`` (width, height)."""
    image = image.convert("L" if channels == 1 else "RGB").resize(size, PILImage.LANCZOS)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()) / 127.5 - 1
    return (x[None, None] if channels == 1 else x.permute(2, 0, 1)[None]).contiguous()


def mask_tensor(mask: PILImage.Image, size: tuple[int, int], invert: bool) -> torch.Tensor:
    """``[1, 1, H, W]`` of 0 (keep) and 1 (repaint) at ``size``."""
    m = np.asarray(mask.convert("L").resize(size, PILImage.NEAREST)) > 127
    m = ~m if invert else m
    return torch.from_numpy(m.astype(np.float32))[None, None]


def make_edit_job(server, req: Img2ImgRequest | EditRequest, make_job) -> Job:
    """The job of an img2img / inpainting request or a prompt edit; every problem (an unreadable image, a
    strength that runs no step, an empty or full mask, local blending on a model without layouts) is a 4xx
    before anything is queued."""
    from .. import editing

    images = [decode_image(text, f"init_images[{i}]") for i, text in enumerate(req.init_images)]
    mask = decode_image(req.mask, "mask") if getattr(req, "mask", None) is not None else None
    job = make_job(server, req)
    pipe = server.pipes[job.model_name]
    channels, height, width = pipe.image_shape
    if job.sample_size is not None:
        width, height = job.sample_size
    init = to_tensor(images[0], channels, (width, height))
    if isinstance(req, EditRequest):
        return _prompt_edit(job, pipe, req, init)
    strength = float(req.denoising_strength)
    try:
        job.steps = editing.strength_steps(strength, job.options.steps)
        m = mask_tensor(mask, (width, height), bool(req.inpainting_mask_invert)) if mask is not None else None
        if m is not None:
            editing.check_mask(pipe, m, 1)
    except ValueError as e:
        raise JobError(422, "InvalidRequest", str(e)) from None
    job.extra = {"mode": "inpaint" if m is not None else "img2img", "strength": strength,
                 "init_image_sha256": _digest(init)}

    def one(prompt, options, callback):
        if m is None:
            return editing.img2img(pipe, init, prompt, strength, options=options, callback=callback)
        return editing.inpaint(pipe, init, m, prompt, options=options, strength=strength, callback=callback)

    return _each_image(job, one)


def _digest(init: torch.Tensor) -> str:
    return hashlib.sha256(init.numpy().tobytes()).hexdigest()[:16]


def _each_image(job: Job, one) -> Job:
    """Make ``job`` run ``one(prompt, options, callback)`` (an image tensor) per image, with the image's seed and
    layout."""

    def run(callback) -> list:
        out = []
        for spec in job.images:
            layouts = [spec.layout] if isinstance(spec.layout, list) else spec.layout
            out += to_pil(one(spec.prompt, dataclasses.replace(job.options, seed=spec.seed, layouts=layouts), callback))
        return out

    job.custom = run
    return job


def _prompt_edit(job: Job, pipe, req: EditRequest, init: torch.Tensor) -> Job:
    from .. import editing

    if req.local_blend and not pipe.takes_layouts:
        raise JobError(422, "InvalidRequest", f"local_blend needs a layout-conditioned model (its boxes are the mask); "
                                              f"{pipe.name!r} takes no layouts")
    if pipe.conditioning != "text" and req.from_prompt:
        raise JobError(422, "InvalidRequest", f"model {pipe.name!r} is not text-conditioned; leave from_prompt empty")
    local_blend = "auto" if req.local_blend is None else req.local_blend
    job.extra = {"mode": "prompt_edit", "from_prompt": req.from_prompt, "fresh_noise": float(req.fresh_noise),
                 "local_blend": local_blend, "init_image_sha256": _digest(init)}
    return _each_image(job, lambda prompt, options, callback: editing.edit(
        pipe, init, req.from_prompt, prompt, options, local_blend=local_blend, fresh_noise=float(req.fresh_noise),
        callback=callback))
