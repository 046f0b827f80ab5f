"""``preview_grid``: a PNG contact sheet of dataset items with their captions, to check data by eye."""

from __future__ import annotations

import math
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .transforms import to_pil

_PAD = 6
MAX_IMAGES = 4096  # most images in one preview grid
MAX_BYTES = 512 * 2**20  # most memory one preview grid may take (grid and tiles, RGB)
_INK, _PAPER = (20, 20, 20), (255, 255, 255)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # scalable font (Pillow >= 10.1 with FreeType)
    except (TypeError, AttributeError, OSError):
        return ImageFont.load_default()


def _wrap(text: str, draw: ImageDraw.ImageDraw, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; over-long words are split; the last kept line gets '...'."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(candidate, font=font) <= width:
            lines[-1] = candidate
            continue
        while draw.textlength(word, font=font) > width and len(word) > 1:
            cut = len(word) - 1
            while cut > 1 and draw.textlength(word[:cut], font=font) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and draw.textlength(last + "...", font=font) > width:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last + "..."]
    return lines


def _tile(image, min_side: int, max_side: int) -> Image.Image:
    """Tensor item image -> RGB tile; small images are enlarged by an integer factor with NEAREST so their
    pixels stay visible, large ones are shrunk to ``max_side``."""
    if image.ndim == 4:  # a clip [C, T, H, W]: its frames side by side
        image = image.permute(0, 2, 1, 3).flatten(2)
    tile = to_pil(image).convert("RGB")
    longest = max(tile.size)
    if longest < min_side:
        factor = math.ceil(min_side / longest)
        tile = tile.resize((tile.width * factor, tile.height * factor), Image.Resampling.NEAREST)
    elif longest > max_side:
        scale = max_side / longest
        tile = tile.resize((max(1, round(tile.width * scale)), max(1, round(tile.height * scale))),
                           Image.Resampling.LANCZOS)
    return tile


def _grid_bytes(count: int, columns: int | None, cell_w: int, cell_h: int, tile_w: int, tile_h: int) -> int:
    """Memory a grid of ``count`` cells takes while it is drawn: the RGB grid plus the RGB tiles."""
    columns = columns or math.ceil(math.sqrt(count))  # as preview_grid lays it out
    rows = math.ceil(count / columns)
    grid = (columns * (cell_w + _PAD) + _PAD) * (rows * (cell_h + _PAD) + _PAD)
    return 3 * (grid + count * tile_w * tile_h)


def preview_grid(dataset, n: int = 16, path=None, seed: int = 0, *, columns: int | None = None,
                 min_side: int = 128, max_side: int = 256, font_size: int = 12,
                 max_lines: int = 4) -> Image.Image:
    """Draw ``n`` items picked by ``seed`` in a grid, each image above its wrapped caption; save to ``path``
    (PNG) when given, and return the grid image.

    ``n`` is at most ``MAX_IMAGES``, and a grid whose estimated memory (grid and tiles, from the first
    item's tile size) is over ``MAX_BYTES`` is refused with a ValueError naming the largest ``n`` that fits.
    """
    if not 1 <= n <= MAX_IMAGES:
        raise ValueError(f"n must be between 1 and {MAX_IMAGES} images for one preview grid, got {n}")
    if len(dataset) == 0:
        raise ValueError("cannot preview an empty dataset")
    indices = sorted(random.Random(seed).sample(range(len(dataset)), min(n, len(dataset))))
    font = _font(font_size)
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (font_size, 2)
    line_h = ascent + descent + 1
    item = dataset[indices[0]]
    first, first_text = _tile(item["image"], min_side, max_side), _caption(item)
    tile_w, tile_h = first.size
    if getattr(dataset, "image_shape", None) is None:  # sizes may differ: any tile may be up to this large
        tile_w, tile_h = max(tile_w, max_side), max(tile_h, max_side)
    cell_h = tile_h + _PAD // 2 + line_h * max_lines

    def estimate(count: int) -> int:
        return _grid_bytes(count, columns, tile_w, cell_h, tile_w, tile_h)

    if estimate(len(indices)) > MAX_BYTES:
        fits = max((k for k in range(1, len(indices)) if estimate(k) <= MAX_BYTES), default=0)
        raise ValueError(
            f"a preview grid of {len(indices)} images of {tile_w}x{tile_h} pixels would take about "
            f"{estimate(len(indices)) / 2**20:.0f} MB; at most {MAX_BYTES // 2**20} MB is allowed, so n <= {fits} "
            "at this resolution (or use a lower resolution)")
    tiles, texts = [first], [first_text]
    for i in indices[1:]:  # keep only the tile and caption of each item, not its (possibly large) tensor
        item = dataset[i]
        tiles.append(_tile(item["image"], min_side, max_side))
        texts.append(_caption(item))
    cell_w = max(t.width for t in tiles)
    tile_h = max(t.height for t in tiles)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    captions = [_wrap(text, measure, font, cell_w, max_lines) for text in texts]
    cell_h = tile_h + _PAD // 2 + line_h * max(len(c) for c in captions)
    columns = columns or math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    grid = Image.new("RGB", (columns * (cell_w + _PAD) + _PAD, rows * (cell_h + _PAD) + _PAD), _PAPER)
    draw = ImageDraw.Draw(grid)
    for k, (tile, lines) in enumerate(zip(tiles, captions)):
        left = _PAD + (k % columns) * (cell_w + _PAD)
        top = _PAD + (k // columns) * (cell_h + _PAD)
        grid.paste(tile, (left + (cell_w - tile.width) // 2, top))
        for j, line in enumerate(lines):
            draw.text((left, top + tile_h + _PAD // 2 + j * line_h), line, fill=_INK, font=font)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        grid.save(path, format="PNG")
    return grid


def _caption(item: dict) -> str:
    return item.get("text") or f"(no caption; label {item.get('label', -1)})"
