#!/usr/bin/env bash
# Quick start 1/2: install what is missing, then run the main job, document conversion, on the
# bundled sample pages with the embedded default model (dsocr-mini) on the CPU, and print the
# pages' true text beside what came out (austen-sans32 is in the one style the CPU dsocr-mini
# was trained on, austen-512 is not).
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
echo "== dsocr convert samples/austen-sans32.png samples/austen-512.png -o $out --model $model --device cpu --max-new-tokens 160"
dsocr convert samples/austen-sans32.png samples/austen-512.png -o "$out" --model "$model" --device cpu \
    --max-new-tokens 160
for page in austen-sans32 austen-512; do
    echo
    echo "== $out/$page/$page.md (what the model read)"
    cat "$out/$page/$page.md"
    echo
    echo "== samples/$page.txt (the page's true text)"
    cat "samples/$page.txt"
done
echo
echo "== dsocr tokens 512 512   (what the page costs in each mode)"
dsocr tokens 512 512
