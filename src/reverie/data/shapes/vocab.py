"""The words and colors of ``shapes``: the label vocabularies (``COLORS``, ``BACKGROUNDS``, ``SHAPES``,
``SIZES``, ``RELATIONS``, ``POSITIONS``), the words captions use for sizes and relations
(``SIZE_WORDS``, ``RELATION_WORDS``), the inverse of each relation (``INVERSE_RELATION``), and the
readable-color table (``READABLE``: which colors contrast with which background, by CIELAB distance).
Every other module of the package indexes into these tuples, so their order is part of the data.
"""

from __future__ import annotations

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (250, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 70),
    "cyan": (40, 210, 220),
    "blue": (30, 90, 240),
    "purple": (150, 45, 175),
    "pink": (250, 130, 190),
    "brown": (140, 90, 50),
    "white": (245, 245, 245),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "dark gray": (60, 60, 64),
    "navy": (25, 30, 60),
    "light gray": (200, 200, 200),
    "off-white": (245, 243, 238),
}
SHAPES = ("circle", "square", "triangle", "star", "ring", "diamond", "cross")
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")
# 3x3 grid cells, index = 3 * row + column (row 0 = top).
POSITIONS = (
    "in the top left", "at the top", "in the top right",
    "on the left", "in the center", "on the right",
    "in the bottom left", "at the bottom", "in the bottom right",
)

COLOR_NAMES = tuple(COLORS)
BACKGROUND_NAMES = tuple(BACKGROUNDS)
# INVERSE_RELATION[r]: the relation of b to a when a is RELATIONS[r] of b.
INVERSE_RELATION = (1, 0, 3, 2)
SIZE_WORDS = (("small", "little", "tiny"), ("large", "big"))
RELATION_WORDS = (
    ("left of", "to the left of", "on the left of"),
    ("right of", "to the right of", "on the right of"),
    ("above", "over"),
    ("below", "under", "beneath"),
)
_MIN_CONTRAST = 45.0  # CIELAB Delta-E between an object color and its background


def cielab(rgb: tuple[int, int, int]) -> np.ndarray:
    """sRGB (D65) -> CIELAB; only used to pick readable color/background pairs."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ c
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


# READABLE[b] = color indices with enough contrast on background b.
READABLE = tuple(
    tuple(
        c for c, rgb in enumerate(COLORS.values())
        if np.linalg.norm(cielab(rgb) - cielab(bg)) >= _MIN_CONTRAST
    )
    for bg in BACKGROUNDS.values()
)
