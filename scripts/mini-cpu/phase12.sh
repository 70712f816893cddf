#!/usr/bin/env bash
# dsocr-mini CPU run (docs/training.md §4), phase 12: phase 10's decoder stage (frozen SAM,
# character loss 0.3, CLIP and projector at 0.3x, 15% input noise) continued, with Small pages
# (640 px, 100 vision tokens) beside the Tiny ones: every phase since 5 trained on Tiny only, and
# Small, the same 32 px text on a larger page, came back at CER 0.72 against Tiny's 0.33. From the
# bundled phase-10 weights (dsocr/assets/dsocr-mini: bfloat16, loaded as float32; phase 11's
# float32 checkpoint did not survive its machine), a fresh optimizer and schedule (lr 3e-4, warmup
# 20), new pages (seed 7), into runs/mini-cpu-s9. Run with STEPS and MINUTES as for phase5.sh
# (this session: MINUTES=120 STEPS=1800). dsocr/assets/dsocr-mini holds phase 12 itself since it
# shipped, so to reproduce, first put phase 10's bundle back there: `git checkout ed1c8c3 --
# dsocr/assets/dsocr-mini` (or `bash scripts/mini-cpu/rebench.sh runs/mini-cpu-s7/latest`).
set -euo pipefail
exec bash "$(dirname "$0")/phase5.sh" --model dsocr/assets/dsocr-mini --out runs/mini-cpu-s9 --seed 7 \
    --lr 3e-4 --warmup 20 --input-noise 0.15 --data-modes tiny,small "$@"
