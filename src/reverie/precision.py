"""Which floating-point precision and memory layout to run in: bf16 + channels_last where the CPU has bf16
matrix units, float32 elsewhere.

On a CPU with AMX (``amx_bf16``) or AVX512-BF16 (``avx512_bf16``), oneDNN's bf16 matmuls and channels-last
convolutions run 7-9x faster than float32 (measured on this project's 2-core Xeon: a 2048^2 matmul 2,270 vs
330 GFLOP/s, a 3x3 convolution 2,150 vs 236). Elsewhere bf16 is emulated and slower than float32. So the
precision ``"auto"`` (the default of training and sampling) resolves to ``"bf16"`` there and ``"fp32"``
everywhere else; CUDA keeps float32 unless asked (its own fast paths, TF32 and fp16/bf16, are a choice).

``torch.backends.cpu.get_cpu_capability()`` reports only the vector ISA ("AVX512" on an AMX machine), so the
flags come from ``/proc/cpuinfo`` (Linux). ``REVERIE_PRECISION=fp32`` (or ``bf16``) overrides what ``"auto"``
means, for a whole process: the test suite sets ``fp32`` because most tests compare with closed forms or
reference implementations at float32 tolerances; tests of the bf16 path ask for it explicitly.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

__all__ = ["PRECISIONS", "cpu_flags", "cpu_has_fast_bf16", "resolve_precision", "precision_dtype"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
ENV = "REVERIE_PRECISION"


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none: not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has bf16 matrix or dot-product instructions (AMX-BF16 or AVX512-BF16)."""
    return any(f in cpu_flags() for f in BF16_FLAGS)


def resolve_precision(precision: str = "auto", device: str | torch.device = "cpu") -> str:
    """``"fp32"``, ``"bf16"`` or ``"fp16"``: ``precision`` itself, or for ``"auto"`` the fast one on ``device``
    (module docstring); ``REVERIE_PRECISION`` decides ``"auto"`` when set."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    forced = os.environ.get(ENV, "").strip().lower()
    if forced:
        if forced not in PRECISIONS[1:]:
            raise ValueError(f"{ENV} must be one of {', '.join(PRECISIONS[1:])}, got {forced!r}")
        return forced
    return "bf16" if torch.device(device).type == "cpu" and cpu_has_fast_bf16() else "fp32"


def precision_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a resolved precision name."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
