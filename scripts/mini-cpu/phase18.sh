#!/usr/bin/env bash
# dsocr-mini CPU run (docs/training.md §4), phase 18: phase 17's recipe (phase 16's: the decoder
# stage on Tiny and Small pages, frozen SAM, character loss 0.3, CLIP and projector at 0.3x, 15%
# input noise) continued from the shipped phase-17 bundle (bfloat16, loaded as float32) on the same
# corpus, with the bundle's own tokenizer, a fresh optimizer, lr 2e-4, warmup 10, new pages
# (seed 14), into runs/mini-cpu-s15. Run with STEPS and MINUTES as for phase5.sh (run: MINUTES=95
# STEPS=2000).
set -euo pipefail
exec bash "$(dirname "$0")/phase5.sh" --model dsocr/assets/dsocr-mini --out runs/mini-cpu-s15 --seed 14 \
    --tokenizer dsocr/assets/dsocr-mini/tokenizer.json \
    --lr 2e-4 --warmup 10 --input-noise 0.15 --data-modes tiny,small "$@"
