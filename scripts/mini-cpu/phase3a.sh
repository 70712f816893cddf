#!/usr/bin/env bash
# dsocr-mini CPU run (docs/training.md §4), second lineage: a 384-token byte-level BPE, so that
# each output class is seen often enough to be learned from pixels. Run from the repository root
# with .venv active, after
#   python scripts/train_tokenizer.py --corpus data/corpus --vocab-size 384 --langs en --out data/mini-cpu-384
#   python scripts/resize_vocab.py runs/mini-cpu/latest --tokenizer data/mini-cpu-384/tokenizer.json --out runs/mini-cpu-384-start
# (runs/mini-cpu/latest at step 1900 of phase 2). Phase 3a: steps 0-150 with SAM and CLIP frozen,
# while the new embeddings and lm_head learn.
LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 exec python -m dsocr.train.loop --model runs/mini-cpu-384-start --tokenizer data/mini-cpu-384/tokenizer.json --data-corpus data/corpus --data-langs en --data-modes tiny --data-font-sizes 32 --data-fonts sans --data-min-chars 5 --data-max-chars 200 --data-scan-prob 0 --data-scramble-prob 0.5 --out runs/mini-cpu-384 --steps 2000 --batch-size 16 --lr 1e-3 --warmup 50 --log-every 10 --eval-every 100 --eval-batches 2 --save-every 50 --workers 1 --freeze sam,clip --stop-at 150
