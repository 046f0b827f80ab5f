"""The request bodies of the API, with every bound a request may not cross.

Field names follow AUTOMATIC1111's API (``prompt``, ``negative_prompt``, ``steps``, ``cfg_scale``,
``sampler_name``, ``seed``, ``batch_size``, ``n_iter``, ``width``, ``height``, ``denoising_strength``,
``init_images``, ``mask``), so that its clients work unchanged; fields reverie does not use are accepted
and ignored, as A1111 itself ignores settings a script does not read. reverie's own fields (``model``,
``layout``, ``grid``, ``guidance_rescale``) come after them. Types are strict (``"20"`` is not a number
of steps) and every number, string and list is bounded here, before any work is queued.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from ..editing import FRESH_NOISE
from ..limits import MAX_GUIDANCE, MAX_STEPS

MAX_PROMPT_CHARS = 2000      # the text encoder reads far fewer tokens; longer is a mistake or an attack
MAX_IMAGES = 16              # batch_size * n_iter of one request
MAX_SIDE = 2048              # width / height of a reply image, and of an uploaded one
MAX_PIXELS = 2048 * 2048     # an uploaded image, checked from its header before it is decoded
MAX_BODY_BYTES = 16 * 2**20  # a request body (two base64 images of the largest size fit)
MAX_GRID_POINTS = MAX_STEPS + 1
MAX_LAYOUT_OBJECTS = 16
MAX_TEXT_LENGTH = 4096       # tokens of a generated text (a model's own context bounds it further)
MAX_TEXT_K = 16              # edlm candidates per step
MAX_TEXT_CORRECTOR = 64      # corrector sweeps after sampling (32 take ~10 s per 24-character infill on one thread)

Prompt = Annotated[StrictStr, Field(max_length=MAX_PROMPT_CHARS)]
Name = Annotated[StrictStr, Field(max_length=200)]
Number = Annotated[StrictFloat, Field(allow_inf_nan=False)]
Box = Annotated[list[Number], Field(min_length=4, max_length=4)]
LayoutItem = Annotated[tuple[Annotated[StrictStr, Field(max_length=200)], Box], Field()]
Base64Image = Annotated[StrictStr, Field(max_length=MAX_BODY_BYTES)]


class Txt2ImgRequest(BaseModel):
    """``POST /sdapi/v1/txt2img``: A1111's fields, then reverie's own."""

    model_config = ConfigDict(extra="ignore")

    prompt: Prompt = ""
    negative_prompt: Prompt = ""
    steps: Annotated[StrictInt, Field(ge=1, le=MAX_STEPS)] | None = None
    cfg_scale: Annotated[Number, Field(ge=0, le=MAX_GUIDANCE)] | None = None
    sampler_name: Name | None = None
    sampler_index: Name | None = None  # older A1111 clients send the sampler here
    scheduler: Name | None = None
    seed: Annotated[StrictInt, Field(ge=-1, le=2**63 - 1)] = -1
    batch_size: Annotated[StrictInt, Field(ge=1, le=MAX_IMAGES)] = 1
    n_iter: Annotated[StrictInt, Field(ge=1, le=MAX_IMAGES)] = 1
    width: Annotated[StrictInt, Field(ge=8, le=MAX_SIDE)] | None = None
    height: Annotated[StrictInt, Field(ge=8, le=MAX_SIDE)] | None = None
    send_images: StrictBool = True
    save_images: StrictBool = False
    override_settings: dict | None = None
    # reverie's own
    model: Name | None = None
    guidance_rescale: Annotated[Number, Field(ge=0, le=1)] = 0.0
    layout: Annotated[StrictStr, Field(max_length=10)] | Annotated[
        list[LayoutItem], Field(max_length=MAX_LAYOUT_OBJECTS)] = "auto"
    grid: Name | Annotated[list[Annotated[Number, Field(ge=0)]], Field(min_length=2, max_length=MAX_GRID_POINTS)] \
        | None = None


class Img2ImgRequest(Txt2ImgRequest):
    """``POST /sdapi/v1/img2img``: txt2img's fields plus the image to start from and an optional mask."""

    init_images: Annotated[list[Base64Image], Field(min_length=1, max_length=MAX_IMAGES)]
    denoising_strength: Annotated[Number, Field(ge=0, le=1)] = 0.75
    mask: Base64Image | None = None
    inpainting_mask_invert: Annotated[StrictInt, Field(ge=0, le=1)] = 0
    mask_blur: Annotated[StrictInt, Field(ge=0, le=64)] = 0
    resize_mode: Annotated[StrictInt, Field(ge=0, le=3)] = 0


class EditRequest(Txt2ImgRequest):
    """``POST /v1/edit``: a prompt edit of ``init_images[0]`` (``reverie.editing.edit``): inverted under
    ``from_prompt`` (its ``layout`` is the image's, on a layout model), then regenerated under ``prompt``.
    ``local_blend`` (layout models; null: on) regenerates only the boxes whose phrase changes, with
    ``fresh_noise`` of the start noise's variance drawn anew there."""

    init_images: Annotated[list[Base64Image], Field(min_length=1, max_length=MAX_IMAGES)]
    from_prompt: Prompt
    fresh_noise: Annotated[Number, Field(ge=0, le=1)] = FRESH_NOISE
    local_blend: StrictBool | None = None


class OptionsRequest(BaseModel):
    """``POST /sdapi/v1/options``: only the model choice is a setting here."""

    model_config = ConfigDict(extra="ignore")

    sd_model_checkpoint: Name | None = None


class LayoutRequest(BaseModel):
    """``POST /v1/layout``: the boxes the model's planner draws for a prompt."""

    model_config = ConfigDict(extra="forbid")

    prompt: Prompt
    seed: Annotated[StrictInt, Field(ge=0, le=2**63 - 1)] = 0
    model: Name | None = None


class PngInfoRequest(BaseModel):
    """``POST /sdapi/v1/png-info``: the parameters stored in a PNG."""

    model_config = ConfigDict(extra="ignore")

    image: Base64Image


class TextRequest(BaseModel):
    """``POST /v1/text``: text from a masked diffusion text model. ``prompt``: the fixed start of ``length``
    tokens; or ``infill``: a whole passage whose ``[MASK]`` / ``[MASK*N]`` spans are written. Missing fields are
    the model's own (``GET /v1/text/models``); ``seed`` -1 draws one (the reply says which). ``corrector``
    sweeps in blocks of ``corrector_block`` tokens then redraw the written text: Metropolis-Hastings towards the
    model's AR energy where it has one (the best infills measured), Gibbs on the model alone otherwise."""

    model_config = ConfigDict(extra="forbid")

    prompt: Prompt = ""
    infill: Prompt | None = None
    length: Annotated[StrictInt, Field(ge=1, le=MAX_TEXT_LENGTH)] | None = None
    steps: Annotated[StrictInt, Field(ge=1, le=MAX_STEPS)] | None = None
    sampler: Annotated[StrictStr, Field(max_length=20)] | None = None
    k: Annotated[StrictInt, Field(ge=1, le=MAX_TEXT_K)] | None = None
    corrector: Annotated[StrictInt, Field(ge=0, le=MAX_TEXT_CORRECTOR)] | None = None
    corrector_block: Annotated[StrictInt, Field(ge=1, le=MAX_TEXT_LENGTH)] | None = None
    seed: Annotated[StrictInt, Field(ge=-1, le=2**63 - 1)] = -1
    model: Name | None = None
