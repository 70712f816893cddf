#!/usr/bin/env bash
# dsocr-mini CPU run (docs/training.md §4), phase 3b: resumes runs/mini-cpu-384/latest at step
# 150 with the encoder trainable at 1/5 of the decoder rate, to step 2000.
LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 exec python -m dsocr.train.loop --model runs/mini-cpu-384-start --tokenizer data/mini-cpu-384/tokenizer.json --data-corpus data/corpus --data-langs en --data-modes tiny --data-font-sizes 32 --data-fonts sans --data-min-chars 5 --data-max-chars 200 --data-scan-prob 0 --data-scramble-prob 0.5 --out runs/mini-cpu-384 --steps 2000 --batch-size 16 --lr 1e-3 --warmup 50 --log-every 10 --eval-every 100 --eval-batches 2 --save-every 50 --workers 1 --vision-lr-scale 0.2 --max-minutes 110
