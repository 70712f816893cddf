#!/usr/bin/env bash
# dsocr-mini CPU run (docs/training.md §4), phase 7: the two stages of phase 6 once more, from 6b.
# Phase 7a trains the encoder alone on the character loss, head frozen, as 6a did: 200 steps at
# seed 7 from runs/mini-cpu-s3/latest into runs/enc-char3/latest, then ENC_STEPS (default 500)
# more at seed 8, with a fresh optimizer, into runs/enc-char4/latest (each skipped when its output
# exists; the run that made the bundle was launched with 800 and stopped after the step-500 save,
# which gives the same weights: the rate is constant). Phase 7b is phase5.sh's decoder stage from
# there, into runs/mini-cpu-s4, at seed 2 (new pages). Run with STEPS and MINUTES as for
# phase5.sh (the bundle: MINUTES=60 STEPS=1600).
set -euo pipefail
ENC=(--freeze-head --every 100 --min-chars 150 --max-chars 350)
run_enc() { LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 python scripts/mini-cpu/encoder_char_pretrain.py "$@"; }
if [ ! -f runs/enc-char3/latest/config.json ]; then
    run_enc runs/mini-cpu-s3/latest "${ENC[@]}" --seed 7 --steps 200 --save runs/enc-char3/latest
fi
if [ ! -f runs/enc-char4/latest/config.json ]; then
    run_enc runs/enc-char3/latest "${ENC[@]}" --seed 8 --steps "${ENC_STEPS:-500}" --save runs/enc-char4/latest
fi
exec bash "$(dirname "$0")/phase5.sh" --model runs/enc-char4/latest --out runs/mini-cpu-s4 --seed 2 "$@"
