#!/usr/bin/env bash
# dsocr-mini CPU run (docs/training.md §4), phase 16: phase 14's recipe (the decoder stage on Tiny
# and Small pages: frozen SAM, character loss 0.3, CLIP and projector at 0.3x, 15% input noise)
# continued from the shipped phase-14 bundle (bfloat16, loaded as float32) on the 2026-12-06 corpus
# (data/corpus with the plain-text Debian documentation, fortunes and the KJV Bible; phases 0-15 saw
# only the HTML documentation), a fresh optimizer, lr 2e-4, warmup 10, new pages (seed 11), into
# runs/mini-cpu-s13. Run with STEPS and MINUTES as for phase5.sh (run: MINUTES=100 STEPS=2000, all
# 2000 steps in 89 min). Shipped: held-out Tiny CER 0.381 to 0.347, Small 0.390 to 0.361.
set -euo pipefail
exec bash "$(dirname "$0")/phase5.sh" --model dsocr/assets/dsocr-mini --out runs/mini-cpu-s13 --seed 11 \
    --lr 2e-4 --warmup 10 --input-noise 0.15 --data-modes tiny,small "$@"
