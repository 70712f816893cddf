#!/usr/bin/env bash
# dsocr-mini CPU run (docs/training.md §4), phase 8: phase 7b's decoder stage continued. Phase 7b's
# eval loss was still falling when its cosine reached the floor (1.04 -> 1.01 over its last 200
# steps), so phase 8 restarts the schedule from runs/mini-cpu-s4/latest at half the peak rate
# (5e-4, short warmup) on new pages (seed 3), into runs/mini-cpu-s5. Run with STEPS and MINUTES as
# for phase5.sh (the bundle: MINUTES=80 STEPS=2100, which the time limit stopped at step 2021;
# add --stop-at 2021 to reproduce it on any machine).
set -euo pipefail
exec bash "$(dirname "$0")/phase5.sh" --model runs/mini-cpu-s4/latest --out runs/mini-cpu-s5 --seed 3 \
    --lr 5e-4 --warmup 20 "$@"
