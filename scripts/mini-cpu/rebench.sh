#!/usr/bin/env bash
# Re-bundle the CPU dsocr-mini from a checkpoint (default runs/mini-cpu/latest; phase 19 used
# runs/mini-cpu-s16/latest --corpus data/corpus: arguments after the first go to bundle_model.py)
# and regenerate every report that measures it (docs/training.md §4). Run
# from the repository root with .venv active, on an otherwise idle machine (the reports time
# things). About 13 minutes on 2 cores (2026-12-08: mini.md 2, eval.md 10, the rest 1). The
# hand-written notes of compression.md, memory.md and eval.md (their <!-- notes: ... --> blocks)
# are kept, so check their numbers against the new tables afterwards.
set -euo pipefail
pip install --quiet --disable-pip-version-check -e ".[eval]"  # the peers: tesserocr, rapidocr
# every eval set scripts/build_eval_sets.py built (rendered-en, rendered-md-en, pdf-debref-<lang>)
sets=()
for d in data/eval/rendered-en data/eval/rendered-md-en data/eval/pdf-debref-*; do [ -d "$d" ] && sets+=(--dataset "$d"); done
# Without a set's Tesseract language data `dsocr eval` skips that peer (exit 3) after minutes of
# work, so ask the peer's own lookup for every set's language first.
python - "${sets[@]}" <<'PY'
import sys

from dsocr.eval.datasets import load_datasets
from dsocr.eval.peers import TesseractPeer

langs = sorted({p.lang for p in load_datasets(sys.argv[2::2], limit=1)})
missing = [why for ok, why in map(TesseractPeer().use_language, langs) if not ok]
if missing:
    sys.exit("rebench.sh: " + "; ".join(missing))
PY
# The default mode is measured on held-out pages of every trained mode (bundle_model.py; phase 12
# shipped with an explicit --default-mode tiny before that rule existed).
python scripts/bundle_model.py "${1:-runs/mini-cpu/latest}" "${@:2}"
# 256 pages per mode (2 minutes): 32 could not tell phases 17 and 18 apart, 256 could.
python bench/mini.py --pages 256 --table2-pages 1 --pdf-pages 5
dsocr eval --model dsocr-mini --mode tiny,small,base --max-new-tokens 512 "${sets[@]}" \
    --peers tesseract,rapidocr -o docs/benchmarks/eval.md --json docs/benchmarks/eval.json
python bench/compression.py --pages-per-bucket 1 --scrambled 2 --long-tokens 2000
python bench/memory.py --turns 10
