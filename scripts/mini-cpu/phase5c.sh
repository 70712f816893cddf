#!/usr/bin/env bash
# dsocr-mini CPU run (docs/training.md §4), phase 5c (not shipped; phase 6 starts from it):
# resumes phase 5b (runs/mini-cpu-s2 at step 1788) with a warm restart at half the peak rate; same
# data and frozen parts. Run with MINUTES=18 STEPS=2300. The later flags override phase5.sh's (argparse keeps the
# last value).
exec bash "$(dirname "$0")/phase5.sh" --lr 5e-4 --warmup 20 --schedule-start 1788 "$@"
