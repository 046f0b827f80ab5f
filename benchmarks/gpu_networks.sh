#!/usr/bin/env bash
# One-shot GPU run of benchmarks/networks.py: reverie's U-Net vs diffusers' UNet2DModel on CUDA
# (batch 128; fp32, bf16 autocast, bf16 + torch.compile; both configs), finishing within ~6 minutes.
#
#   bash benchmarks/gpu_networks.sh            # results in $OUT (if set) or benchmarks/results/
#
# Works on a fresh machine with only this repository copied: it uses whatever python/torch is
# installed (set PYTHON to choose), imports reverie from src/ without installing it, tries
# `pip install diffusers==0.42.1 --no-deps` when diffusers is missing, and otherwise times reverie
# alone. Every eager mode of both configs runs before any compilation; compilations that would not
# fit the time budget are skipped, and the JSON is rewritten after every mode, so a run cut short
# still leaves its measurements. Exit status is 0 whenever a JSON file was written.
set -u
cd "$(dirname "$0")/.."
START=$(date +%s)
TOTAL_S=${TOTAL_S:-345}            # hard wall-clock limit for the whole script
DEST=${OUT:-benchmarks/results}
mkdir -p "$DEST"
LOG="$DEST/networks_cuda.log"
exec > >(tee -a "$LOG") 2>&1

PY=${PYTHON:-}
if [ -z "$PY" ]; then
    for cand in python python3 .venv/bin/python; do
        if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import torch' >/dev/null 2>&1; then
            PY=$cand
            break
        fi
    done
fi
if [ -z "$PY" ]; then echo "no python with torch found (set PYTHON=...)"; exit 1; fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 DIFFUSERS_NO_ADVISORY_WARNINGS=1

"$PY" - <<'EOF' || { echo "torch cannot use a CUDA device here"; exit 1; }
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
assert torch.cuda.is_available()
print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
EOF
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
        > "$DEST/nvidia_smi.csv" 2>/dev/null
fi

DIFFUSERS_FLAG=""
if ! "$PY" -c 'import diffusers' >/dev/null 2>&1; then
    echo "diffusers not importable; trying pip install diffusers==0.42.1 --no-deps"
    timeout 40 "$PY" -m pip install --quiet --no-deps --retries 0 --timeout 5 diffusers==0.42.1 \
        >/dev/null 2>&1
    if ! "$PY" -c 'import diffusers' >/dev/null 2>&1; then
        echo "diffusers still not importable (offline or missing dependencies): timing reverie alone"
        DIFFUSERS_FLAG="--no-diffusers"
    fi
fi

ELAPSED=$(( $(date +%s) - START ))
LEFT=$(( TOTAL_S - ELAPSED ))
if [ "$LEFT" -lt 90 ]; then LEFT=90; fi   # (`timeout 0` would mean no limit at all)
# The python run gets what is left minus a margin; its own budget (for skipping compilations) a bit less.
timeout --signal=INT --kill-after=10 $(( LEFT - 10 )) "$PY" benchmarks/networks.py --device cuda \
    --configs ddpm-cifar10,small --modes fp32,bf16,bf16-compile --batch 128 --repeats 5 --iters 10 \
    --extra-variants --budget-s $(( LEFT - 25 )) $DIFFUSERS_FLAG --out "$DEST/networks_cuda.json"
STATUS=$?
echo "benchmark exit status $STATUS after $(( $(date +%s) - START )) s"
if [ -f "$DEST/networks_cuda.json" ]; then
    echo "results: $DEST/networks_cuda.json (log: $LOG)"
    exit 0
fi
exit "$STATUS"
