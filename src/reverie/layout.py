"""Layout conditioning: where each object of a prompt goes, given to the network as a painted map.

A *layout* is what a caption leaves implicit: a list of ``(phrase, box)`` per image, ``box = (x0, y0,
x1, y1)`` as fractions of the image side, ``x`` to the right and ``y`` down. The network sees it as a
spatio-textual map (SpaText, Avrahami et al. 2023, Sec. 3): each pixel inside an object's box holds a
learned projection of that phrase's text embedding, pixels outside hold zero, and the map enters the
U-Net beside its input (``UNetConfig.spatial_channels``, a zero-initialized convolution, so a model
fine-tuned from a text-only one starts out exactly as that model). Every pixel then knows locally which
object it belongs to, which a convolutional network learns in a few thousand steps; learning the same
from the words "above" or "left of" alone is the binding problem that the caption probe found unsolved
(``reverie.eval.probe``).

Where the layout comes from at generation time: a *planner* turns a prompt into a layout, as the first
stage of LLM-grounded diffusion (Lian et al. 2023) does with a language model. For ``shapes`` the
planner reads the caption grammar back (``reverie.data.shapes.plan_layout``) and draws boxes from the
data's own placement rules, so every stated relation and position holds; users can also pass boxes.
Training drops the layout at random (``train.layout_dropout``) so the model also generates from the
prompt alone, and always with the caption (the unconditional model of guidance has neither); it can also
drop the caption and keep the layout (``train.layout_only``), so that the map alone must say which object
goes where rather than only where objects go (measured in the README: without it, a fine-tuned model put
objects in the boxes but still took their colours from the caption).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .data.moving_shapes import plan_motion_layout
from .data.shapes import plan_layout
from .data.sounds import plan_sound_layout

Box = tuple[float, float, float, float]
Layout = Sequence[tuple[str, Box]]  # one image's objects: (phrase, (x0, y0, x1, y1))


def check_layout(layout, where: str = "layout") -> list[tuple[str, Box]]:
    """A validated copy of one image's layout; a ValueError names the first bad entry."""
    if isinstance(layout, (str, bytes)) or not isinstance(layout, Sequence):
        raise ValueError(f"{where} must be a list of (phrase, (x0, y0, x1, y1)) pairs, got {layout!r}")
    out = []
    for k, item in enumerate(layout):
        try:
            phrase, box = item
            box = tuple(float(v) for v in box)
        except (TypeError, ValueError):
            raise ValueError(f"{where}[{k}] must be (phrase, (x0, y0, x1, y1)), got {item!r}") from None
        if not isinstance(phrase, str) or not phrase.strip():
            raise ValueError(f"{where}[{k}]: the phrase must be a non-empty string, got {phrase!r}")
        if len(box) != 4 or not all(math.isfinite(v) for v in box) or not (box[0] < box[2] and box[1] < box[3]):
            raise ValueError(f"{where}[{k}]: box must be 4 finite fractions with x0 < x1 and y0 < y1, got {box}")
        out.append((phrase, box))
    return out


def box_masks(boxes: Tensor, size: Sequence[int]) -> Tensor:
    """(B, N, 4) boxes -> (B, N, H, W) float masks: 1 where a pixel's center lies inside the box."""
    H, W = size
    ys = (torch.arange(H, device=boxes.device, dtype=boxes.dtype) + 0.5) / H
    xs = (torch.arange(W, device=boxes.device, dtype=boxes.dtype) + 0.5) / W
    x0, y0, x1, y1 = (boxes[..., i, None, None] for i in range(4))  # (B, N, 1, 1) each
    inside_x = (xs >= x0) & (xs < x1)  # (B, N, 1, W)
    inside_y = (ys[:, None] >= y0) & (ys[:, None] < y1)  # (B, N, H, 1)
    return (inside_x & inside_y).to(boxes.dtype)


class LayoutEncoder(nn.Module):
    """Phrase embeddings + boxes -> the (B, channels, H, W) spatio-textual map.

    ``map[b, :, h, w] = sum_n mask[b, n] * inside(box[b, n], h, w) * W phrase[b, n]``: a linear projection
    of each phrase's pooled text embedding painted into its box (objects do not overlap in ``shapes``;
    where boxes overlap their codes add up)."""

    def __init__(self, phrase_dim: int, channels: int):
        super().__init__()
        if channels < 1:
            raise ValueError(f"layout channels must be >= 1, got {channels}")
        self.channels = channels
        self.proj = nn.Linear(phrase_dim, channels)

    def forward(self, phrases: Tensor, boxes: Tensor, mask: Tensor, size: Sequence[int]) -> Tensor:
        """(B, N, ...) inputs -> (B, channels, H, W); a clip's (B, T, N, ...) -> (B, channels, T, H, W)."""
        codes = self.proj(phrases) * mask[..., None].to(phrases.dtype)  # (B, [T,] N, channels)
        out = torch.einsum("...nc,...nhw->...chw", codes, box_masks(boxes.to(codes.dtype), size))
        return out.transpose(1, 2) if out.ndim == 5 else out


def pad_layouts(layouts: Sequence[Layout | None], max_objects: int) -> tuple[list[list[str]], Tensor, Tensor]:
    """Per-image layouts (None or [] = no layout) -> phrases padded with "" to ``max_objects``, boxes
    (B, max_objects, 4) and mask (B, max_objects); more objects than ``max_objects`` is an error."""
    phrases, boxes = [], torch.zeros(len(layouts), max_objects, 4)
    mask = torch.zeros(len(layouts), max_objects, dtype=torch.bool)
    for b, layout in enumerate(layouts):
        items = check_layout(layout, f"layouts[{b}]") if layout else []
        if len(items) > max_objects:
            raise ValueError(f"layouts[{b}] has {len(items)} objects; this model takes at most {max_objects}")
        phrases.append([p for p, _ in items] + [""] * (max_objects - len(items)))
        for n, (_, box) in enumerate(items):
            boxes[b, n] = torch.tensor(box)
            mask[b, n] = True
    return phrases, boxes, mask


def is_clip_layout(layout) -> bool:
    """Whether ``layout`` is a clip's: a list of per-frame layouts (each a layout, or None / [] for none),
    rather than one image's list of (phrase, box) pairs."""
    if isinstance(layout, (str, bytes)) or not isinstance(layout, Sequence) or not layout:
        return False
    return all(frame is None or (isinstance(frame, Sequence) and not isinstance(frame, (str, bytes))
                                 and (not frame or not isinstance(frame[0], str))) for frame in layout)


def pad_clip_layouts(layouts, max_objects: int) -> tuple[list[list[str]], Tensor, Tensor]:
    """Per-clip layouts (each a list of per-frame layouts, or None for none) -> phrases of every (clip, frame)
    row, clip-major, boxes (B, T, max_objects, 4) and mask (B, T, max_objects); every clip has T frames."""
    frames = {len(lay) for lay in layouts if lay}
    if len(frames) != 1:
        raise ValueError(f"every clip layout needs the same number of frames, got {sorted(frames) or 'none'}")
    (t,) = frames
    per_frame = [frame for lay in layouts for frame in (lay if lay else [None] * t)]
    phrases, boxes, mask = pad_layouts(per_frame, max_objects)
    return phrases, boxes.view(len(layouts), t, max_objects, 4), mask.view(len(layouts), t, max_objects)


def object_regions(layouts: Sequence) -> list[list[tuple[str, object] | None]]:
    """Each image's (or clip's) layout split into its objects, for regional prompting
    (:class:`reverie.guidance.RegionalDenoiser`): ``regions[j][b] = (phrase, layout)`` with ``layout`` object j of
    image b alone, or None where image b has fewer than j + 1 objects (or no layout). A clip's object j is the j-th
    entry of every frame (the planners keep one order across frames); its phrase is None when the frames name it
    differently (an object that changes colour: no one phrase describes it, so the caller keeps the prompt)."""
    count = 0
    for lay in layouts:
        frames = lay if is_clip_layout(lay) else [lay]
        count = max([count, *(len(f) for f in frames if f)])
    regions: list[list[tuple[str, object] | None]] = [[] for _ in range(count)]
    for lay in layouts:
        clip = is_clip_layout(lay)
        frames = lay if clip else [lay]
        for j in range(count):
            alone = [[f[j]] if f and len(f) > j else None for f in frames]
            named = {f[0][0] for f in alone if f}
            if not named:
                regions[j].append(None)
            else:
                regions[j].append((named.pop() if len(named) == 1 else None, alone if clip else alone[0]))
    return regions


def region_weights(regions: list[list[tuple[str, object] | None]], shape: Sequence[int], margin: int = 1) -> Tensor:
    """``(J, B, 1, [T,] H, W)`` weights of each object's estimate for :func:`object_regions`' ``regions``: 1
    inside object j's box grown by ``margin`` pixels, shared equally where grown boxes overlap (so the weights
    of a pixel sum to at most 1; the rest goes to the whole prompt's estimate). ``shape`` is the sample's
    ``(B, C, [T,] H, W)``."""
    batch, spatial = shape[0], tuple(shape[2:])
    frames, (h, w) = (spatial[0] if len(spatial) == 3 else None), spatial[-2:]
    out = torch.zeros(len(regions), batch, 1, *spatial)
    for j, row in enumerate(regions):
        for b, item in enumerate(row):
            if item is None:
                continue
            per_frame = item[1] if frames is not None else [item[1]]
            if frames is not None and len(per_frame) != frames:
                raise ValueError(f"a clip layout has {len(per_frame)} frames; the model makes {frames}")
            for t, frame in enumerate(per_frame):
                if not frame:
                    continue
                m = box_masks(torch.tensor([[frame[0][1]]], dtype=torch.float32), (h, w))[0]
                if margin > 0:
                    m = torch.nn.functional.max_pool2d(m[None], 2 * margin + 1, stride=1, padding=margin)[0]
                if frames is None:
                    out[j, b] = m
                else:
                    out[j, b, :, t] = m
    return out / out.sum(0, keepdim=True).clamp(min=1.0)


# A planner: (prompt, random.Random) -> layout, or None when it cannot read the prompt.
Planner = Callable[[str, random.Random], "list[tuple[str, Box]] | None"]


PLANNERS: dict[str, Planner] = {"shapes": plan_layout, "moving_shapes": plan_motion_layout,  # the latter: per frame
                                 "sounds": plan_sound_layout}  # piano rolls (notes' rows and times)


def get_planner(data_name: str) -> Planner | None:
    """The layout planner that comes with a dataset's caption grammar (None if it has none)."""
    return PLANNERS.get(data_name)


def plan_layouts(planner: Planner | None, prompts: Sequence[str], seed: int) -> list[list[tuple[str, Box]] | None]:
    """One planned layout per prompt, from a generator seeded by (seed, image index, prompt): the same
    seed gives the same layouts, and images of one batch get different ones."""
    if planner is None:
        return [None] * len(prompts)
    return [planner(p, planner_rng(seed, i, p)) if p else None for i, p in enumerate(prompts)]


def planner_rng(seed: int, index: int, prompt: str) -> random.Random:
    """The generator :func:`plan_layouts` gives the planner for image ``index`` of a batch (to replay a plan)."""
    return random.Random(f"reverie.layout/{seed}/{index}/{prompt}")
