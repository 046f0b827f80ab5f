"""``imagefolder``: a user's folder of images (searched recursively), with optional captions.

Captions follow the Hugging Face imagefolder convention, a ``metadata.jsonl`` (in the root or any
sub-folder) of lines ``{"file_name": "relative/to/this/jsonl.png", "text": "a caption"}``, or a ``.txt``
sidecar with the image's stem next to it; metadata wins when both exist; no caption gives ``""``.
When every image lies inside a first-level sub-folder, the sorted sub-folder names are the classes
(``label``), as in torchvision's ImageFolder; otherwise ``label`` is -1.

Robustness: files are checked at scan time with ``PIL.Image.verify()`` (reads headers and, for PNG,
checksums; cheap), or fully decoded with ``verify="full"``. Unreadable ones are skipped and reported in
one warning (count and the first few names); hidden files are ignored silently and other non-image
files (neither images nor captions) are reported as ignored. A file that passes the scan but fails to
decode later (a truncated JPEG, typically) is replaced by the next readable index, counted in
``load_failures`` (per process: each DataLoader worker holds its own copy) and warned about once, so an
epoch never crashes. Random flips draw from ``(seed, epoch, index)``; call ``set_epoch`` before each
epoch (with non-persistent DataLoader workers the new epoch reaches them).
"""

from __future__ import annotations

import json
import os
import random
import warnings
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from .transforms import center_crop, random_hflip, resize_shorter, to_rgb, to_tensor

IMAGE_EXTENSIONS = frozenset({
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga",
})
METADATA_FILE = "metadata.jsonl"
_SHOW = 5  # how many skipped names a warning lists


def _readable(path: Path, full: bool) -> bool:
    """Whether PIL can open (and, if ``full``, decode) the file."""
    try:
        with Image.open(path) as image:
            image.verify()
        if full:
            with Image.open(path) as image:
                image.load()
    # Broken files raise many types (OSError, SyntaxError, struct.error, EOFError, ValueError, ...).
    except Exception:
        return False
    return True


def _read_metadata(path: Path, caption_key: str) -> dict[Path, str]:
    """Captions from one metadata.jsonl, keyed by resolved image path; malformed lines are warned about."""
    captions, bad = {}, 0
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise ValueError(f"{str(path)!r} is not UTF-8 text (line {line}, byte {error.start}: {error.reason}); "
                         "save it as UTF-8, one JSON object per line") from None
    except OSError as error:
        raise ValueError(f"cannot read {str(path)!r}: {error.strerror or error}") from None
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            captions[(path.parent / record["file_name"]).resolve()] = str(record[caption_key])
        except (json.JSONDecodeError, KeyError, TypeError):
            bad += 1
    if bad:
        warnings.warn(f"{path}: ignored {bad} line(s) without valid 'file_name' and {caption_key!r}",
                      stacklevel=3)
    return captions


def _root_dir(root) -> Path:
    """``root`` as an existing directory, or a ValueError naming it and saying what is wrong."""
    if not isinstance(root, (str, os.PathLike)) or not str(root).strip():
        raise ValueError(f"imagefolder needs root, a directory of images (got {root!r})")
    path = Path(root)
    try:
        path = path.expanduser()
    except RuntimeError:  # '~user' with no such user: report the path as given
        pass
    if not path.exists():
        raise ValueError(f"image folder {str(path)!r} does not exist (root must be a directory of images)")
    if not path.is_dir():
        raise ValueError(f"image folder {str(path)!r} is not a directory (root must be a directory of images)")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ValueError(f"image folder {str(path)!r} cannot be read (permission denied)")
    return path


def _names(paths: list[str]) -> str:
    more = f", ... ({len(paths) - _SHOW} more)" if len(paths) > _SHOW else ""
    return ", ".join(paths[:_SHOW]) + more


class ImageFolder(Dataset):
    """Images under ``root``: ``{"image": [3, H, W] in [-1, 1], "text": caption, "label": class or -1,
    "path": path relative to root}``.

    ``resolution`` resizes the shorter side (Lanczos), then ``center_crop`` takes the central square;
    ``resolution=None`` keeps the original size (batch with batch_size=1 then). ``random_flip`` mirrors
    half the images, deterministically per ``(seed, epoch, index)``.
    """

    def __init__(self, root, resolution: int | None = None, center_crop: bool = True,
                 random_flip: bool = False, seed: int = 0, verify: str = "fast", caption_key: str = "text",
                 class_labels: bool = True):
        if verify not in ("fast", "full"):
            raise ValueError(f"unknown verify {verify!r}; valid choices: fast, full")
        if resolution is not None and (not isinstance(resolution, int) or resolution < 1):
            raise ValueError(f"resolution must be a positive integer or None, got {resolution!r}")
        self.root = _root_dir(root)
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.seed, self.epoch, self.load_failures = seed, 0, 0
        self._failed: set[int] = set()
        self._scan(verify == "full", caption_key)
        if not self.files:
            unreadable = f"; skipped unreadable: {_names(self.skipped)}" if self.skipped else ""
            raise ValueError(f"no readable images in folder {str(self.root)!r} (looked recursively for "
                             f"{', '.join(sorted(IMAGE_EXTENSIONS))}{unreadable})")
        self._assign_labels(class_labels)
        self._report()

    def _scan(self, full: bool, caption_key: str) -> None:
        found = sorted(p for p in self.root.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(self.root).parts))
        candidates = [p for p in found if p.suffix.lower() in IMAGE_EXTENSIONS]
        captions: dict[Path, str] = {}
        for path in found:
            if path.name == METADATA_FILE:
                captions.update(_read_metadata(path, caption_key))
        self.files, self.skipped = [], []
        for path in candidates:
            (self.files if _readable(path, full) else self.skipped).append(path)
        stems = {p.with_suffix("") for p in candidates}
        sidecars = {p for p in found if p.suffix == ".txt" and p.with_suffix("") in stems}
        self.ignored = [self._relative(p) for p in found if p.suffix.lower() not in IMAGE_EXTENSIONS
                        and p.name != METADATA_FILE and p not in sidecars]
        self.skipped = [self._relative(p) for p in self.skipped]
        self.captions = [self._caption(p, captions) for p in self.files]

    @staticmethod
    def _caption(path: Path, captions: dict[Path, str]) -> str:
        caption = captions.get(path.resolve())
        if caption is None and path.with_suffix(".txt").is_file():
            caption = path.with_suffix(".txt").read_text(encoding="utf-8", errors="replace").strip()
        return caption or ""

    def _assign_labels(self, class_labels: bool) -> None:
        parts = [Path(self._relative(p)).parts for p in self.files]
        if class_labels and all(len(p) > 1 for p in parts):
            self.classes = sorted({p[0] for p in parts})
            index = {name: k for k, name in enumerate(self.classes)}
            self.labels = [index[p[0]] for p in parts]
        else:
            self.classes, self.labels = [], [-1] * len(self.files)

    def _report(self) -> None:
        notes = []
        if self.skipped:
            notes.append(f"skipped {len(self.skipped)} unreadable image file(s): {_names(self.skipped)}")
        if self.ignored:
            notes.append(f"ignored {len(self.ignored)} non-image file(s): {_names(self.ignored)}")
        if notes:
            warnings.warn(f"ImageFolder({str(self.root)!r}): " + "; ".join(notes), stacklevel=3)

    def _relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        """``(3, R, R)`` with a resolution and center crop; None when image sizes may differ."""
        return (3, self.resolution, self.resolution) if self.resolution and self.center_crop else None

    @property
    def num_classes(self) -> int:
        """Number of first-level sub-folder classes (0 when ``label`` is -1)."""
        return len(self.classes)

    def set_epoch(self, epoch: int) -> None:
        """Select the random flips of ``epoch`` (flips are a pure function of seed, epoch and index)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, i: int, index: int):
        with Image.open(self.files[i]) as image:
            image = to_rgb(image)
            image.load()
        if self.resolution is not None:
            image = resize_shorter(image, self.resolution)
            if self.center_crop:
                image = center_crop(image, self.resolution)
        if self.random_flip:
            rng = random.Random(f"reverie.imagefolder/{self.seed}/{self.epoch}/{index}")
            image = random_hflip(image, rng)
        return to_tensor(image)

    def __getitem__(self, index: int) -> dict:
        index = range(len(self))[index]  # IndexError when out of range; negative indices wrap
        for offset in range(len(self)):
            i = (index + offset) % len(self)
            if i in self._failed:
                continue
            try:
                image = self._load(i, index)
            except Exception as error:  # any decoding failure: substitute the next image, never crash
                self._failed.add(i)
                self.load_failures += 1
                warnings.warn(f"ImageFolder: cannot load {self._relative(self.files[i])} ({error}); "
                              "using the next image instead", stacklevel=2)
                continue
            return {"image": image, "text": self.captions[i], "label": self.labels[i],
                    "path": self._relative(self.files[i])}
        raise RuntimeError(f"none of the {len(self)} images in {str(self.root)!r} could be loaded")
