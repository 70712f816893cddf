#!/usr/bin/env bash
# dsocr-mini CPU run (docs/training.md §4), phase 19: phase 17's recipe (phase 16's: the decoder
# stage on Tiny and Small pages, frozen SAM, character loss 0.3, CLIP and projector at 0.3x, 15%
# input noise) continued from the shipped phase-17 bundle with new text: data/corpus-wiki, the
# reports' eight sources plus Wikipedia's lead sections (training.md §1; its rows of the eight
# sources, train and held-out, are byte-identical to data/corpus). The bundle's own tokenizer, a
# fresh optimizer, lr 2e-4, warmup 10, new pages (seed 15), into runs/mini-cpu-s16. Run with STEPS
# and MINUTES as for phase5.sh (run: MINUTES=95 STEPS=2000).
set -euo pipefail
exec bash "$(dirname "$0")/phase5.sh" --model dsocr/assets/dsocr-mini --out runs/mini-cpu-s16 --seed 15 \
    --tokenizer dsocr/assets/dsocr-mini/tokenizer.json --data-corpus data/corpus-wiki \
    --lr 2e-4 --warmup 10 --input-noise 0.15 --data-modes tiny,small "$@"
