#!/usr/bin/env bash
# dsocr-mini CPU run (docs/training.md §4), phase 4: a fresh run started from the phase-3
# checkpoint (runs/mini-cpu-384/latest, step 900) with the character loss on (each
# global-view vision token, read through the final norm and lm_head, must name the characters
# drawn in its 64 px cell). Steps 0-500 ran with --char-loss 0.3 --vision-lr-scale 0.5 (the cells
# stayed at letter frequencies); from 500 this script runs (weight 1.0, encoder at the full rate).
LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 exec python -m dsocr.train.loop --model runs/mini-cpu-384/latest --tokenizer data/mini-cpu-384/tokenizer.json --data-corpus data/corpus --data-langs en --data-modes tiny --data-font-sizes 32 --data-fonts sans --data-min-chars 5 --data-max-chars 200 --data-scan-prob 0 --data-scramble-prob 0.5 --batch-size 16 --lr 1e-3 --log-every 10 --eval-every 100 --eval-batches 2 --save-every 50 --workers 1 --out runs/mini-cpu-char --steps 1700 --warmup 30 --char-loss 1.0 --vision-lr-scale 1.0 --max-minutes 60
