#!/usr/bin/env bash
# Set up (venv + installs) and run the linter and the whole default test suite.
source "$(dirname "$0")/env.sh"
ruff check src tests benchmarks
python -m pytest -n 2 "$@"
