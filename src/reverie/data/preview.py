"""``preview_grid``: a PNG contact sheet of dataset items with their captions, to check data by eye."""

from __future__ import annotations

import math
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .transforms import to_pil

_PAD = 6
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


def preview_grid(dataset, n: int = 16, path=None, seed: int = 0, *, columns: int | None = None,
                 min_side: int = 128, max_side: int = 256, font_size: int = 12,
                 max_lines: int = 4) -> Image.Image:
    """Draw ``n`` items picked by ``seed`` in a grid, each image above its wrapped caption; save to ``path``
    (PNG) when given, and return the grid image."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    indices = sorted(random.Random(seed).sample(range(len(dataset)), min(n, len(dataset))))
    items = [dataset[i] for i in indices]
    tiles = [_tile(item["image"], min_side, max_side) for item in items]
    cell_w = max(t.width for t in tiles)
    tile_h = max(t.height for t in tiles)
    font = _font(font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    captions = [_wrap(item.get("text") or f"(no caption; label {item.get('label', -1)})", measure, font,
                      cell_w, max_lines) for item in items]
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (font_size, 2)
    line_h = ascent + descent + 1
    cell_h = tile_h + _PAD // 2 + line_h * max(len(c) for c in captions)
    columns = columns or math.ceil(math.sqrt(len(items)))
    rows = math.ceil(len(items) / columns)
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
