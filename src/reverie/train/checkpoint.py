"""Crash-safe checkpoints in safetensors + JSON (never pickle).

A checkpoint is a directory ``ckpt-00001000/`` holding ``tensors.safetensors`` (every tensor of the
training state: model, EMA, optimizer moments, RNG states) and ``state.json`` (the rest: step, data
position, optimizer hyperparameters, LR scheduler counters, with tensors replaced by references).
It is written into ``ckpt-00001000.tmp/``, each file fsynced, then renamed into place, and the
``latest`` pointer file is replaced atomically; so killing the process at any moment (kill -9
included) leaves either the previous or the new checkpoint as ``latest``, never a half-written one.
Only the last ``keep_last`` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..modeldir import parsing, read_json
from ..weights import load_weights

_TENSOR = "__tensor__"
_TUPLE = "__tuple__"
_CKPT_RE = re.compile(r"^ckpt-(\d{8})$")


def flatten_state(obj, prefix: str = "", tensors: dict | None = None):
    """Split a nested structure into ``(json_skeleton, {key: tensor})``."""
    tensors = {} if tensors is None else tensors
    if isinstance(obj, torch.Tensor):
        key = prefix or "root"
        tensors[key] = obj.detach().cpu().clone().contiguous()  # no shared storage
        return {_TENSOR: key}, tensors
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            # JSON keys are strings: remember int keys (optimizer state is keyed by param index).
            jk = f"int:{k}" if isinstance(k, int) else str(k)
            out[jk], _ = flatten_state(v, f"{prefix}.{jk}" if prefix else jk, tensors)
        return out, tensors
    if isinstance(obj, (list, tuple)):
        items = [flatten_state(v, f"{prefix}.{i}", tensors)[0] for i, v in enumerate(obj)]
        return ({_TUPLE: items} if isinstance(obj, tuple) else items), tensors
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj, tensors
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix!r} in a checkpoint")


def unflatten_state(obj, tensors: dict):
    """Inverse of :func:`flatten_state`."""
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            return tensors[obj[_TENSOR]]
        if set(obj) == {_TUPLE}:
            return tuple(unflatten_state(v, tensors) for v in obj[_TUPLE])
        return {(int(k[4:]) if k.startswith("int:") else k): unflatten_state(v, tensors)
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    return obj


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _CKPT_RE.match(p.name)]
    return sorted(found, key=lambda p: p.name)


def save_checkpoint(root: str | Path, step: int, state: dict, keep_last: int = 3) -> Path:
    """Atomically write ``state`` as checkpoint ``step`` under ``root``; returns its directory."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"ckpt-{step:08d}"
    tmp = root / f"ckpt-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    skeleton, tensors = flatten_state(state)
    save_file(tensors, str(tmp / "tensors.safetensors"))
    (tmp / "state.json").write_text(json.dumps(skeleton))
    for name in ("tensors.safetensors", "state.json"):
        _fsync_file(tmp / name)
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer_tmp = root / "latest.tmp"
    pointer_tmp.write_text(final.name)
    _fsync_file(pointer_tmp)
    os.replace(pointer_tmp, root / "latest")
    _fsync_dir(root)
    for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint named by ``latest`` (falling back to the newest complete one)."""
    root = Path(root)
    pointer = root / "latest"
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if (cand / "state.json").is_file() and (cand / "tensors.safetensors").is_file():
            return cand
    complete = list_checkpoints(root)
    return complete[-1] if complete else None


def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is a checkpoint, else the latest one of a run directory (or of its
    ``checkpoints/`` folder)."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path} not found" if not path.exists() else f"{path} is a file, not a run "
                                f"directory or checkpoint")
    found = latest_checkpoint(path / "checkpoints") or latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"no checkpoint found in {path}")
    return found


def newest_first(root: str | Path) -> list[Path]:
    """The checkpoints to try when resuming: the one ``latest`` names, then the others, newest first."""
    root = Path(root)
    found = list(reversed(list_checkpoints(root)))
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text(errors="replace").strip()
        if named in found:
            found.remove(named)
            found.insert(0, named)
    return found


def load_checkpoint(path: str | Path, required: tuple[str, ...] = ()) -> dict:
    """Read a checkpoint directory back into the nested state dict it was saved from; a damaged one
    (truncated tensors, a broken ``state.json``, a ``required`` top-level key missing) is a ValueError
    naming the file."""
    path = Path(path)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{path} is not a reverie checkpoint (no state.json)")
    skeleton = read_json(path / "state.json")
    tensors = load_weights(path / "tensors.safetensors")
    with parsing(path / "state.json"):
        state = unflatten_state(skeleton, tensors)
    missing = [key for key in required if key not in state]
    if missing:
        raise ValueError(f"{path / 'state.json'} is damaged: missing {', '.join(missing)}")
    return state
