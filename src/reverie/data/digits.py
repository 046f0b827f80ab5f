"""``digits``: scikit-learn's 1797 bundled 8x8 handwritten digits (no download), upsampled on request.

The data file inside the scikit-learn package is read directly (``sklearn.datasets.load_digits`` is
the fallback), which skips the seconds that importing scikit-learn takes.

scikit-learn ships no split, so one is fixed here: every fifth image (index % 5 == 4) is ``test``
(359 images), the rest ``train`` (1438); ``"all"`` keeps all 1797. Pixel values 0..16 map to [-1, 1].
"""

from __future__ import annotations

import functools
import importlib.util
import random
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..optional import require
from .mnist import digit_caption
from .transforms import to_tensor

_UPSAMPLING = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
               "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}


def _bundled_csv() -> Path | None:
    """scikit-learn's own copy of the data (``sklearn/datasets/data/digits.csv.gz``), found without
    importing scikit-learn, whose import takes seconds."""
    spec = importlib.util.find_spec("sklearn")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


@functools.lru_cache(maxsize=1)
def load_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [1797, 8, 8] scaled 0..16 -> 0..255, int64 labels [1797])."""
    path = _bundled_csv()
    if path is not None:  # rows: 64 pixel values 0..16, then the label
        table = np.loadtxt(path, delimiter=",", dtype=np.float64)
        pixels, labels = table[:, :64].reshape(-1, 8, 8), table[:, 64]
    else:  # a scikit-learn that keeps the file elsewhere: ask it
        bunch = require("sklearn.datasets", "the digits dataset").load_digits()
        pixels, labels = bunch.images, bunch.target
    images = np.rint(pixels * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


class Digits(Dataset):
    """8x8 digits: ``{"image": [C, R, R] in [-1, 1] (white on black), "text", "label": 0..9}``.

    ``resolution`` must be a multiple of 8; larger ones are upsampled with ``upsample`` (nearest keeps
    the 8x8 blocks; bilinear/bicubic/lanczos smooth them).
    """

    def __init__(self, split: str = "train", resolution: int = 8, upsample: str = "nearest",
                 channels: int = 1, seed: int = 0):
        if split not in ("train", "test", "all"):
            raise ValueError(f"unknown split {split!r}; valid splits: train, test, all")
        if not isinstance(resolution, int) or resolution < 8 or resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {resolution!r}")
        if upsample not in _UPSAMPLING:
            raise ValueError(f"unknown upsample {upsample!r}; valid choices: {', '.join(_UPSAMPLING)}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        images, labels = load_digits_uint8()
        keep = np.arange(len(labels))
        if split != "all":
            keep = keep[(keep % 5 == 4) == (split == "test")]
        self.images, self.labels = images[keep], labels[keep]
        self.split, self.resolution, self.upsample, self.channels, self.seed = (
            split, resolution, upsample, channels, seed)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.resolution, self.resolution)

    @property
    def num_classes(self) -> int:
        return 10

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        index = range(len(self))[index]  # IndexError when out of range; negative indices wrap
        label = int(self.labels[index])
        image = Image.fromarray(self.images[index], "L")
        if self.resolution != 8:
            image = image.resize((self.resolution, self.resolution), _UPSAMPLING[self.upsample])
        tensor = to_tensor(image)
        rng = random.Random(f"reverie.digits/{self.seed}/{self.split}/{index}")
        return {"image": tensor.expand(self.channels, -1, -1).contiguous() if self.channels == 3 else tensor,
                "text": digit_caption(label, rng), "label": label}
