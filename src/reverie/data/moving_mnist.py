"""``moving_mnist``: Moving MNIST (Srivastava et al. 2015), built from the MNIST digits reverie already has.

Each clip holds ``digits`` 28x28 MNIST digits in a ``resolution`` (64) square frame, each moving in a straight
line at a constant speed and bouncing off the edges (the position is reflected into ``[0, resolution - 28]``);
overlapping digits are combined by a pixel-wise maximum, as in the original set. Velocities: a uniform
direction and a speed of 2-5 px per frame (the original: a fixed speed per sequence, here drawn per digit).
Clip ``i`` is a pure function of ``(split, seed, i)``: the digits come from that MNIST split (train: the 60k
training images; test: the 10k test images), so a model trained on ``split="train"`` never saw the test
clips' digits. Unconditional: ``text`` is "" and ``label`` -1; the digit classes and per-frame top-left
positions ride along (``digits``, ``positions`` [digits, T, 2] as (x, y) in pixels).

    ds = get_dataset("moving_mnist", frames=16)    # ds[0]["image"]: [1, 16, 64, 64] in [-1, 1]
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from torch.utils.data import Dataset

from .mnist import load_mnist

_DIGIT = 28


def bounce(start: float, velocity: float, steps: int, span: float) -> list[float]:
    """Positions of a point moving at ``velocity`` from ``start``, reflected into ``[0, span]``."""
    out = []
    for k in range(steps):
        p = (start + velocity * k) % (2 * span)
        out.append(p if p <= span else 2 * span - p)
    return out


class MovingMNIST(Dataset):
    """Bouncing MNIST digits: ``{"image": [1, T, R, R] in [-1, 1], "text": "", "label": -1, "digits" [n],
    "positions" [n, T, 2]}`` (module docstring)."""

    def __init__(self, split: str = "train", frames: int = 16, resolution: int = 64, digits: int = 2,
                 seed: int = 0, length: int = 10_000):
        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split!r}; valid splits: train, test")
        if not isinstance(frames, int) or not 2 <= frames <= 64:
            raise ValueError(f"frames must be an integer from 2 to 64, got {frames!r}")
        if not isinstance(resolution, int) or resolution < _DIGIT:
            raise ValueError(f"resolution must be an integer >= {_DIGIT} (the digits are 28x28), got {resolution!r}")
        if not 1 <= digits <= 4 or length < 1:
            raise ValueError(f"digits must be 1 to 4 and length >= 1, got {digits}, {length}")
        self.images, self.labels = load_mnist()[split]
        self.split, self.frames, self.resolution, self.digits = split, frames, resolution, digits
        self.seed, self.length = seed, length

    @property
    def image_shape(self) -> tuple[int, int, int, int]:
        return (1, self.frames, self.resolution, self.resolution)

    @property
    def num_classes(self) -> int:
        return 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        index = range(self.length)[index]
        rng = random.Random(f"reverie.moving_mnist/{self.split}/{self.seed}/{index}")
        span = self.resolution - _DIGIT
        canvas = np.zeros((self.frames, self.resolution, self.resolution), dtype=np.uint8)
        picks, positions = [], []
        for _ in range(self.digits):
            k = rng.randrange(len(self.labels))
            angle, speed = rng.uniform(0, 2 * math.pi), rng.uniform(2.0, 5.0)
            xs = bounce(rng.uniform(0, span), speed * math.cos(angle), self.frames, span)
            ys = bounce(rng.uniform(0, span), speed * math.sin(angle), self.frames, span)
            for t, (x, y) in enumerate(zip(xs, ys)):
                c, r = round(x), round(y)
                window = canvas[t, r:r + _DIGIT, c:c + _DIGIT]
                np.maximum(window, self.images[k], out=window)
            picks.append(int(self.labels[k]))
            positions.append(list(zip(xs, ys)))
        image = torch.from_numpy(canvas).float().div(127.5).sub(1)[None]
        return {"image": image, "text": "", "label": -1, "digits": torch.tensor(picks),
                "positions": torch.tensor(positions, dtype=torch.float32)}
