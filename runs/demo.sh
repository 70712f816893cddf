#!/usr/bin/env bash
# Quick start 1/2: install what is missing, then run the main job, document conversion, on the
# bundled sample page with the embedded default model (dsocr-mini) on the CPU, and print the
# page's true text beside what came out.
set -euo pipefail
source "$(dirname "$0")/setup.sh"
model=dsocr-mini
if [ ! -f dsocr/assets/dsocr-mini/config.json ]; then
    echo "NOTE: the bundled dsocr-mini weights are missing (docs/training.md)."
    echo "      Running the same pipeline on random 'tiny' weights instead, to show the install"
    echo "      works; its text is meaningless. Pass --model /path/to/DeepSeek-OCR for real output."
    echo
    model=tiny
fi
out=out/demo
rm -rf "$out"  # a rerun would otherwise skip the finished page (resume) and print nothing new
echo "== dsocr convert samples/austen-512.png -o $out --model $model --device cpu"
dsocr convert samples/austen-512.png -o "$out" --model "$model" --device cpu --max-new-tokens 160
echo
echo "== $out/austen-512/austen-512.md (what the model read)"
cat "$out/austen-512/austen-512.md"
echo
echo "== samples/austen-512.txt (the page's true text)"
cat samples/austen-512.txt
echo
echo "== dsocr tokens 512 512   (what the page costs in each mode)"
dsocr tokens 512 512
