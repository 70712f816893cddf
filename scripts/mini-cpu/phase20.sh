#!/usr/bin/env bash
# dsocr-mini CPU run (docs/training.md §4), phase 20, a probe: phase 19's recipe continued from the
# shipped phase-19 bundle with five font sizes instead of one (20, 24, 28, 32, 36 px; the bundle
# reads 32 px only: recall 52% at 32 px, 5% at 28 px, training.md §5), on data/corpus-wiki, a fresh
# optimizer, lr 2e-4, warmup 10, new pages (seed 16), into runs/mini-cpu-s17. Run with STEPS and
# MINUTES as for phase5.sh (run: MINUTES=30 STEPS=900).
set -euo pipefail
exec bash "$(dirname "$0")/phase5.sh" --model dsocr/assets/dsocr-mini --out runs/mini-cpu-s17 --seed 16 \
    --tokenizer dsocr/assets/dsocr-mini/tokenizer.json --data-corpus data/corpus-wiki \
    --data-font-sizes 20,24,28,32,36 \
    --lr 2e-4 --warmup 10 --input-noise 0.15 --data-modes tiny,small "$@"
