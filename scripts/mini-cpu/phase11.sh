#!/usr/bin/env bash
# dsocr-mini CPU run (docs/training.md §4), phase 11: phase 10 continued (it was still improving
# when its time limit stopped it): the same decoder stage with 15% input noise, from
# runs/mini-cpu-s7/latest (step 1980), a fresh optimizer and schedule at half phase 10's peak (2e-4,
# warmup 10), new pages (seed 6), into runs/mini-cpu-s8. Run with STEPS and MINUTES as for
# phase5.sh (this session: MINUTES=30 STEPS=850).
set -euo pipefail
exec bash "$(dirname "$0")/phase5.sh" --model runs/mini-cpu-s7/latest --out runs/mini-cpu-s8 --seed 6 \
    --lr 2e-4 --warmup 10 --input-noise 0.15 "$@"
