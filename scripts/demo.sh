#!/usr/bin/env bash
# Set up (venv + installs) and run the main job: text-to-image with the shipped model (a signed, watermarked PNG,
# then checked by reverie verify), text from the shipped masked diffusion LM, and the sampler demo on an exact
# Gaussian-mixture denoiser. Extra arguments go to `reverie generate`.
source "$(dirname "$0")/env.sh"
mkdir -p out
reverie generate "a red circle above a blue square" --num-images 4 --steps 20 --sampler dpmpp_2m \
    --guidance-scale 4 --seed 0 -o out/generate.png "$@"
reverie verify out/generate.png
reverie generate-text "ROMEO:" --sampler caching --steps 64 --seed 0
python -m reverie.demo --out out/samplers.png
