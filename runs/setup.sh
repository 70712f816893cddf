# Sourced by runs/demo.sh and runs/test.sh: make .venv with what dsocr needs, once.
# torch is pinned to the local CPU build (2.13.0): an open range would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
    pip install --quiet --disable-pip-version-check torch==2.13.0
fi
if ! python -c "import dsocr, pytest, ruff" 2>/dev/null || [ pyproject.toml -nt .venv/.dsocr-installed ]; then
    pip install --quiet --disable-pip-version-check -e ".[dev]"
    touch .venv/.dsocr-installed
fi
