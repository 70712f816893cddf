#!/usr/bin/env bash
# Quick start 1/2: install what is missing, then OCR the bundled sample page with the embedded
# default model (dsocr-mini) on the CPU, and print the page's true text beside it.
set -euo pipefail
source "$(dirname "$0")/setup.sh"
model=dsocr-mini
if [ ! -f dsocr/assets/dsocr-mini/config.json ]; then
    echo "NOTE: the bundled dsocr-mini weights are not trained yet (docs/training.md)."
    echo "      Running the same pipeline on random 'tiny' weights instead, to show the install"
    echo "      works; its text is meaningless. Pass --model /path/to/DeepSeek-OCR for real output."
    echo
    model=tiny
fi
echo "== dsocr ocr samples/austen-512.png --mode tiny --model $model"
dsocr ocr samples/austen-512.png --mode tiny --model "$model" --max-new-tokens 64 --device cpu
echo
echo "== dsocr tokens 512 512   (what the page costs in each mode)"
dsocr tokens 512 512
echo
echo "== the page's true text (samples/austen-512.txt)"
cat samples/austen-512.txt
