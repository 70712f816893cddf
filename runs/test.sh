#!/usr/bin/env bash
# Quick start 2/2: install what is missing, then lint and run the test suite (CPU, no network).
set -euo pipefail
source "$(dirname "$0")/setup.sh"
# The eval tests score Tesseract as a peer: it needs Debian's English language data.
if [ ! -d /usr/share/tesseract-ocr/5/tessdata ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        tesseract-ocr tesseract-ocr-eng >/dev/null
fi
ruff check dsocr tests bench
python -m pytest "$@"
