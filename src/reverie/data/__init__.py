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

import difflib
import inspect
from collections.abc import Callable

from torch.utils.data import Dataset, default_collate

from .digits import Digits
from .imagefolder import ImageFolder
from .mnist import MNIST
from .moving_mnist import MovingMNIST
from .moving_shapes import MovingShapesDataset
from .preview import preview_grid
from .shapes import ShapesDataset, parse_caption
from .sounds import SoundsDataset
from .speech import SpeechDataset

DATASETS: dict[str, Callable[..., Dataset]] = {
    "shapes": ShapesDataset,
    "mnist": MNIST,
    "digits": Digits,
    "imagefolder": ImageFolder,
    "sounds": SoundsDataset,
    "speech": SpeechDataset,
    "moving_shapes": MovingShapesDataset,  # clips: "image" is [C, T, H, W]
    "moving_mnist": MovingMNIST,  # unconditional clips
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
    _check_options(name, DATASETS[name], kwargs)
    return DATASETS[name](**kwargs)


def _check_options(name: str, factory: Callable[..., Dataset], kwargs: dict) -> None:
    """Raise a ValueError naming the dataset, its missing or unknown options and the valid ones when
    ``kwargs`` do not fit ``factory``'s signature (checked before the call, so a TypeError raised inside
    the constructor is never mistaken for a user's mistake)."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # no signature to read (some builtins): let the call decide
        return
    params = list(signature.parameters.values())
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    valid = [p.name for p in named]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    missing = [p.name for p in params if p.default is p.empty and p.name not in kwargs
               and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [] if takes_any else [k for k in kwargs if k not in valid]
    if not missing and not unknown:
        return
    problems = []
    if missing:
        example = ", ".join(f"{m}: {'DIR' if m == 'root' else 'VALUE'}" for m in missing)
        where = f"--data.options='{{{example}}}'"
        if "root" in missing:
            where += " or, for reverie data preview, --root DIR"
        plural = len(missing) > 1
        problems.append(f"needs option{'s' if plural else ''} {', '.join(missing)} "
                        f"(set {'them' if plural else 'it'} with {where})")
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, valid, n=1)
            hints.append(f"{key} (did you mean {close[0]}?)" if close else key)
        problems.append(f"has no option{'s' if len(unknown) > 1 else ''} {', '.join(hints)}")
    listed = ", ".join(valid) + (", ..." if takes_any else "") if valid else "none"
    raise ValueError(f"dataset {name!r} {' and '.join(problems)}; its options: {listed}")


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
    "DATASETS", "MNIST", "Digits", "ImageFolder", "MovingMNIST", "MovingShapesDataset", "ShapesDataset", "collate",
    "get_dataset", "parse_caption", "preview_grid", "register_dataset",
]
