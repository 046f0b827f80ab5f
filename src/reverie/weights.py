"""Reading safetensors files that may be damaged: the header is checked against the file before parsing.

Every weights file reverie reads goes through :func:`load_weights` (model directories, checkpoints, the
text encoder, cached FID statistics), so a truncated or garbage file is one ValueError naming it, never a
parser error from deep inside.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file

MAX_HEADER = 100 * 2**20  # a safetensors header of more than 100 MB is not one reverie wrote
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "U64": 8, "U32": 4, "U16": 2, "C64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def check_safetensors(path: str | Path) -> dict:
    """The header of a safetensors file, after checking it against the file's size: a header length that
    fits, valid JSON, known dtypes, and every tensor's byte range inside the file and matching its shape.
    Raises a ValueError naming the file and what is wrong (a truncated or garbage file)."""
    path = Path(path)
    size = path.stat().st_size

    def damaged(why: str) -> ValueError:
        return ValueError(f"{path} is damaged or not a safetensors file: {why}")

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise damaged(f"only {size} bytes")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER, size - 8):
            raise damaged(f"its header claims {n} bytes, the file has {size}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise damaged("its header is not JSON") from None
    if not isinstance(header, dict):
        raise damaged("its header is not a JSON object")
    data = size - 8 - n
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = info["data_offsets"]
            expected = math.prod(info["shape"]) * DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise damaged(f"tensor {name!r} has no valid dtype, shape and offsets") from None
        if not (isinstance(begin, int) and isinstance(stop, int) and 0 <= begin <= stop <= data):
            raise damaged(f"tensor {name!r} lies outside the file (truncated?)")
        if stop - begin != expected:
            raise damaged(f"tensor {name!r} has {stop - begin} bytes, its shape needs {expected}")
        end = max(end, stop)
    if end != data:
        raise damaged(f"its tensors cover {end} of {data} data bytes")
    return header


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, parsed by safetensors only after :func:`check_safetensors`."""
    check_safetensors(path)
    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError is a bare Exception: damage the header check did not catch
        if type(e).__name__ != "SafetensorError":
            raise
        raise ValueError(f"{path} is damaged or not a safetensors file: {e}") from None
