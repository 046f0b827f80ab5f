"""The one on-disk format of every reverie model: a directory of ``config.json`` + safetensors.

::

    config.json          {"format": "reverie-model", "version": 1, "kind": KIND, ...}
    model.safetensors    the weights
    ema.safetensors      EMA weights (diffusion models; used by default when present)
    autoencoder/         a latent diffusion model's own copy of its VAE (a model directory of kind "vae")

``kind`` is ``"diffusion"`` (the default when absent: files written before kinds existed), ``"vae"``,
``"classifier"`` and, as they arrive, the text and audio models. What else ``config.json`` holds is
the kind's business (``reverie.build`` turns it back into networks); this module only reads and
writes directories, checks that weights fit the network they are loaded into, and hashes weights.
Loading never executes code: JSON and safetensors only, never pickle.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .weights import load_weights

FORMAT = "reverie-model"
VERSION = 1
KINDS = ("diffusion", "vae", "classifier", "text")
AUTOENCODER_DIR = "autoencoder"
# The shapes classifier was stored under its own format name before model kinds existed.
_LEGACY_FORMATS = {"reverie-shapes-classifier": "classifier"}


@dataclass
class ModelDir:
    """A model directory as read from disk: its path, parsed ``config.json`` and kind."""

    path: Path
    config: dict
    kind: str

    def weights_file(self, use_ema: bool = True) -> Path:
        """``ema.safetensors`` when asked for and present, else ``model.safetensors``."""
        ema = self.path / "ema.safetensors"
        weights = ema if use_ema and ema.is_file() else self.path / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{self.path} has no model.safetensors")
        return weights

    def load_weights(self, use_ema: bool = True) -> dict[str, torch.Tensor]:
        return load_weights(self.weights_file(use_ema))

    def hash(self, use_ema: bool = True) -> str:
        return file_hash(self.weights_file(use_ema))


@contextmanager
def parsing(source: str | Path, what: str = ""):
    """Turn what a damaged file makes config-parsing code raise (a missing key, a wrong type) into one
    ValueError that names the file; wrap only the code that reads the file's contents."""
    try:
        yield
    except KeyError as e:
        raise ValueError(f"{source} is damaged: {what}missing {e.args[0]!r}") from None
    except (TypeError, AttributeError, IndexError, ValueError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if str(source) in message:
            raise ValueError(message) from None
        raise ValueError(f"{source} is damaged: {what}{message}") from None


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; a syntax error names the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not valid JSON: it is not UTF-8 text") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def read(path: str | Path, kind: str | None = None) -> ModelDir:
    """Read a model directory's ``config.json``; with ``kind``, refuse a model of another kind."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not path.is_dir():
        what = "a file" if path.exists() else "not found"
        raise FileNotFoundError(f"{path} is not a reverie model directory ({what})")
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} is not a reverie model directory (no config.json)")
    config = read_json(cfg_file)
    fmt = config.get("format")
    if fmt in _LEGACY_FORMATS:
        found = _LEGACY_FORMATS[fmt]
    elif fmt == FORMAT:
        found = config.get("kind") or "diffusion"
    else:
        raise ValueError(f"{cfg_file} is not a reverie model config (format={fmt!r})")
    if found not in KINDS:
        raise ValueError(f"{cfg_file}: unknown model kind {found!r}; known: {', '.join(KINDS)}")
    if kind is not None and found != kind:
        raise ValueError(f"{path} is a {found} model, not a {kind} model")
    return ModelDir(path, config, found)


def write(path: str | Path, kind: str, config: dict, weights: dict[str, dict[str, torch.Tensor]]) -> Path:
    """Write ``weights`` (file stem -> state dict, e.g. ``{"model": ..., "ema": ...}``) as safetensors,
    then ``config.json`` with the format header; returns the directory."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(KINDS)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for stale in ("model", "ema"):  # an earlier model in this directory: loaders would prefer its EMA weights
        if stale not in weights:
            (path / f"{stale}.safetensors").unlink(missing_ok=True)
    for stem, state in weights.items():
        tensors = {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}
        save_file(tensors, str(path / f"{stem}.safetensors"))
    header = {"format": FORMAT, "version": VERSION} if kind == "diffusion" else \
        {"format": FORMAT, "version": VERSION, "kind": kind}
    (path / "config.json").write_text(json.dumps({**header, **config}, indent=2))
    return path


def copy_model(source: str | Path, target: str | Path) -> Path:
    """Copy a model directory's ``config.json`` and ``model.safetensors`` (e.g. a VAE into a latent model)."""
    source, target = Path(source), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    if source.resolve() != target.resolve():
        for name in ("config.json", "model.safetensors"):
            shutil.copyfile(source / name, target / name)
    return target


def module_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a checkpoint or model file stores (a frozen text encoder is left out)."""
    if hasattr(module, "trainable_state_dict"):
        return module.trainable_state_dict()
    return module.state_dict()


def load_module_weights(module: torch.nn.Module, state: dict, source: str | None = None) -> None:
    """Load ``state`` into ``module``; with ``source``, first check names and shapes and name ``source``
    in the error."""
    if source is not None:
        check_state_dict(module_weights(module), state, source)
    if hasattr(module, "load_trainable_state_dict"):
        module.load_trainable_state_dict(state)
    else:
        module.load_state_dict(state)


def check_state_dict(expected: dict, found: dict, source: str) -> None:
    """Raise a ValueError naming missing, unexpected and mis-shaped tensors."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [f"{k}: file {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(found)) if found[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{label}: {', '.join(items[:5])}{more}")
        raise ValueError(f"{source} does not match its config.json: " + "; ".join(parts))


def file_hash(path: str | Path) -> str:
    """Short SHA-256 of a weights file (recorded in generated images' metadata)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
