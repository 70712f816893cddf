#!/usr/bin/env bash
# dsocr-mini CPU run (docs/training.md §4), phase 9: end-to-end fine-tuning. Phases 5b-8 trained the
# decoder on a frozen SAM and compressor; by phase 8 the image is worth 4 nats per token to the
# decoder (the reading gap), so the early collapse (image tokens turned into a constant prefix by a
# decoder that could not read yet) has no reason to recur. Phase 9 unfreezes everything from
# runs/mini-cpu-s5/latest, the encoder at 0.3x of a 3e-4 peak, the character loss kept at 0.3, on
# new pages (seed 4), into runs/mini-cpu-s6. Run with STEPS and MINUTES as for phase5.sh (phase 10
# starts from the step-400 checkpoint of MINUTES=80 STEPS=1500; add --stop-at 400 to reproduce it).
set -euo pipefail
exec bash "$(dirname "$0")/phase5.sh" --model runs/mini-cpu-s5/latest --out runs/mini-cpu-s6 --seed 4 \
    --lr 3e-4 --warmup 20 --freeze "" "$@"
