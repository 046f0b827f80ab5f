#!/usr/bin/env bash
# One-shot GPU run of benchmarks/sd_speed.py: the full SD 1.5 architecture (random weights), 512x512,
# 20 DPM-Solver++(2M) steps, guidance 7.5, reverie vs diffusers in fp16 (and bf16), seconds per image and peak
# GPU memory. Published anchor: diffusers SD 1.5 at 512x512 runs roughly 20-40 it/s on an A100 in fp16.
#
#   bash benchmarks/gpu_sd.sh            # results in $OUT (if set) or benchmarks/results/
#
# Needs torch with CUDA, diffusers and transformers (the `sd` and `dev` extras); builds the random-weight
# model folder once (about 4 GB) under $SD_DIR (default out/sd15-random). Exit status 0 when a JSON was written.
set -u
cd "$(dirname "$0")/.."
DEST=${OUT:-benchmarks/results}
mkdir -p "$DEST"
exec > >(tee -a "$DEST/sd_speed_cuda.log") 2>&1
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    for cand in .venv/bin/python python python3; do
        if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import torch' >/dev/null 2>&1; then PY=$cand; break; fi
    done
fi
if [ -z "$PY" ]; then echo "no python with torch found (set PYTHON=...)"; exit 1; fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 DIFFUSERS_NO_ADVISORY_WARNINGS=1
"$PY" -c 'import torch; assert torch.cuda.is_available(); print(torch.__version__, torch.cuda.get_device_name())' \
    || { echo "torch cannot use a CUDA device here"; exit 1; }
for pkg in transformers diffusers; do
    if ! "$PY" -c "import $pkg" >/dev/null 2>&1; then
        echo "$pkg missing: trying pip install (offline machines cannot)"
        timeout 60 "$PY" -m pip install --quiet --retries 0 --timeout 5 "$pkg" >/dev/null 2>&1 \
            || { echo "$pkg not installable here: no SD benchmark"; exit 1; }
    fi
done
timeout "${TOTAL_S:-540}" "$PY" benchmarks/sd_speed.py --device cuda --timed-steps 20 \
    --configs reverie-fp16,diffusers-fp16,reverie-bf16-cl,diffusers-bf16-cl \
    --model-dir "${SD_DIR:-out/sd15-random}" --out "$DEST/sd_speed_cuda.json"
test -s "$DEST/sd_speed_cuda.json"
