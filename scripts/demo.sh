#!/usr/bin/env bash
# Set up (venv + installs) and run the main job.
source "$(dirname "$0")/env.sh"
python -m reverie.demo "$@"
