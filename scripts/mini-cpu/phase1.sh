#!/usr/bin/env bash
# dsocr-mini CPU run (docs/training.md §4). Run from the repository root with .venv active;
# each phase resumes runs/mini-cpu/latest.
# Phase 1: one look (Tiny, DejaVu Sans 32 px, 5-24 characters), encoder at 1/5 of the decoder rate (resumed at step 800).
# It changes the data recipe of the run it resumes, so it says --new-phase (the loop refuses a
# changed recipe in a resumed --out otherwise).
LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 exec python -m dsocr.train.loop --model mini-cpu --tokenizer data/mini-cpu/tokenizer.json --data-corpus data/corpus --data-langs en --data-modes tiny --data-font-sizes 32 --data-fonts sans --data-min-chars 5 --data-max-chars 24 --data-scan-prob 0 --data-scramble-prob 0.5 --out runs/mini-cpu --steps 1600 --batch-size 16 --lr 1e-3 --vision-lr-scale 0.2 --warmup 50 --log-every 10 --eval-every 50 --eval-batches 2 --save-every 50 --workers 1 --max-minutes 150 --new-phase
