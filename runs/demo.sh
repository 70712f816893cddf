#!/usr/bin/env bash
# Quick start 1/2: install what is missing, then OCR the bundled sample page with the embedded
# default model (dsocr-mini) on the CPU, and print the page's true text beside it.
set -euo pipefail
source "$(dirname "$0")/setup.sh"
echo "== dsocr ocr samples/austen-512.png --mode tiny   (model: bundled dsocr-mini)"
dsocr ocr samples/austen-512.png --mode tiny --max-new-tokens 160
echo
echo "== the page's true text (samples/austen-512.txt)"
cat samples/austen-512.txt
