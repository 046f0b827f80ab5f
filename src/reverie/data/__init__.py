"""Datasets: procedural ``shapes``, ``mnist``, ``digits`` and a user's ``imagefolder``; one interface.

Every dataset is a map-style torch ``Dataset`` whose items are dicts::

    {"image": float32 [C, H, W] in [-1, 1], "text": caption str, "label": int class (-1 if none), ...}

plus dataset-specific structured labels (``shapes``: per-object shape/color/size/position, relations).
Items are pure functions of ``(seed, index)``, so any worker or process produces the same bytes.
``collate`` batches them for a ``DataLoader`` (images stacked, captions kept as a list of str).

    from reverie.data import get_dataset, collate
    ds = get_dataset("shapes", resolution=64)
    loader = torch.utils.data.DataLoader(ds, batch_size=32, collate_fn=collate, num_workers=2)
"""

from __future__ import annotations

from collections.abc import Callable

from torch.utils.data import Dataset, default_collate

from .digits import Digits
from .imagefolder import ImageFolder
from .mnist import MNIST
from .preview import preview_grid
from .shapes import ShapesDataset, parse_caption

DATASETS: dict[str, Callable[..., Dataset]] = {
    "shapes": ShapesDataset,
    "mnist": MNIST,
    "digits": Digits,
    "imagefolder": ImageFolder,
}


def register_dataset(name: str, factory: Callable[..., Dataset]) -> None:
    """Make ``get_dataset(name, **kwargs)`` call ``factory(**kwargs)``."""
    if name in DATASETS:
        raise ValueError(f"dataset {name!r} is already registered")
    DATASETS[name] = factory


def get_dataset(name: str, **kwargs) -> Dataset:
    """Build a registered dataset by name: ``get_dataset("imagefolder", root="photos", resolution=64)``."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](**kwargs)


def collate(batch: list[dict]) -> dict:
    """Batch dataset items: tensors and numbers are stacked, captions stay a ``list[str]`` and object
    layouts (``reverie.layout``; a different number of objects per image) a list of per-image lists."""
    shapes = {tuple(item["image"].shape) for item in batch}
    if len(shapes) > 1:
        raise ValueError(
            f"cannot batch images of different shapes {sorted(shapes)}; give the dataset a resolution "
            "(e.g. imagefolder's resolution=64) so every image has the same size"
        )
    if batch and "layout" in batch[0]:
        layouts = [item["layout"] for item in batch]
        out = default_collate([{k: v for k, v in item.items() if k != "layout"} for item in batch])
        return {**out, "layout": layouts}
    return default_collate(batch)


__all__ = [
    "DATASETS", "MNIST", "Digits", "ImageFolder", "ShapesDataset", "collate", "get_dataset",
    "parse_caption", "preview_grid", "register_dataset",
]
