#!/usr/bin/env bash
# Quick start 2/2: install what is missing, then lint and run the test suite (CPU, no network).
set -euo pipefail
source "$(dirname "$0")/setup.sh"
ruff check dsocr tests bench
python -m pytest "$@"
