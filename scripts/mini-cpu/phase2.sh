#!/usr/bin/env bash
# dsocr-mini CPU run (docs/training.md §4). Run from the repository root with .venv active;
# each phase resumes runs/mini-cpu/latest.
# Phase 2: the look of phase 1 (Tiny, DejaVu Sans 32 px) with up to 300 characters (up to a full
# page: about 5x the target tokens per page, for the same encoder cost), a warm restart of the
# schedule at step 1600, encoder at 1/5 of the decoder rate.
LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 exec python -m dsocr.train.loop --model mini-cpu --tokenizer data/mini-cpu/tokenizer.json --data-corpus data/corpus --data-langs en --data-modes tiny --data-font-sizes 32 --data-fonts sans --data-min-chars 5 --data-max-chars 300 --data-scan-prob 0 --data-scramble-prob 0.5 --out runs/mini-cpu --schedule-start 1600 --steps 3600 --batch-size 16 --lr 1e-3 --vision-lr-scale 0.2 --warmup 50 --log-every 10 --eval-every 100 --eval-batches 2 --save-every 50 --workers 1 --max-minutes 100
