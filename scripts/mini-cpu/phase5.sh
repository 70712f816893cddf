#!/usr/bin/env bash
# dsocr-mini CPU run (docs/training.md §4), phase 5: the paper's stage 2 at our scale. Starts from
# runs/enc-char/latest (phase 4's checkpoint after encoder-only training on the character loss,
# scripts/mini-cpu/encoder_char_pretrain.py), freezes SAM and the compressor, keeps a little of the
# character loss so the vision tokens stay readable through lm_head, and trains the decoder (CLIP
# and the projector at 0.3x) on the text loss.
LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 exec python -m dsocr.train.loop --model runs/enc-char/latest --tokenizer data/mini-cpu-384/tokenizer.json --data-corpus data/corpus --data-langs en --data-modes tiny --data-font-sizes 32 --data-fonts sans --data-min-chars 5 --data-max-chars 300 --data-scan-prob 0 --data-scramble-prob 0.5 --batch-size 16 --lr 1e-3 --warmup 30 --log-every 10 --eval-every 100 --eval-batches 2 --save-every 50 --workers 1 --out runs/mini-cpu-s2 --steps "${STEPS:-2300}" --freeze sam --char-loss 0.3 --vision-lr-scale 0.3 --max-minutes "${MINUTES:-70}" "$@"
