#!/usr/bin/env bash
# dsocr-mini CPU run (docs/training.md §4), phase 6: the two stages of phase 5 once more, continued
# from phase 5c instead of restarted. Phase 6a trains the encoder alone on the character loss with
# the final norm and lm_head frozen (so the decoder's text readout stays valid); phase 6b is
# phase5.sh's decoder stage from there, into runs/mini-cpu-s3. Run with STEPS and MINUTES as for
# phase5.sh; ENC_STEPS sets 6a's length (skipped when runs/enc-char2/latest exists). Seed 1
# gives 6b new pages (phase 5b saw seed 0's); it also moves the loop's eval pages.
set -euo pipefail
if [ ! -f runs/enc-char2/latest/config.json ]; then
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 python scripts/mini-cpu/encoder_char_pretrain.py \
        runs/mini-cpu-s2/latest --freeze-head --seed 6 --steps "${ENC_STEPS:-1400}" --every 100 \
        --min-chars 150 --max-chars 350 --save runs/enc-char2/latest
fi
exec bash "$(dirname "$0")/phase5.sh" --model runs/enc-char2/latest --out runs/mini-cpu-s3 --seed 1 "$@"
