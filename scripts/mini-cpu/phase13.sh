#!/usr/bin/env bash
# dsocr-mini CPU run (docs/training.md §4), phase 13: phase 12 (the decoder stage on Tiny and Small
# pages: frozen SAM, character loss 0.3, CLIP and projector at 0.3x, 15% input noise) continued
# from its bundled weights (dsocr/assets/dsocr-mini as shipped at a08c555: bfloat16, loaded as
# float32; phase 12's float32 checkpoint did not survive its machine), a fresh optimizer and a
# lower peak (lr 2e-4, warmup 10), new pages (seed 8), into runs/mini-cpu-s10. Run with STEPS and
# MINUTES as for phase5.sh. Once phase 13 ships, dsocr/assets/dsocr-mini holds it, so to reproduce
# first put phase 12's bundle back: `git checkout a08c555 -- dsocr/assets/dsocr-mini`.
set -euo pipefail
exec bash "$(dirname "$0")/phase5.sh" --model dsocr/assets/dsocr-mini --out runs/mini-cpu-s10 --seed 8 \
    --lr 2e-4 --warmup 10 --input-noise 0.15 --data-modes tiny,small "$@"
