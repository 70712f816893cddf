"""Data-engine throughput: training pages per second per core, and per day on this machine.

A page here is one finished training sample: text cut from the corpus, rendered in a random style
(maybe degraded like a scan), preprocessed to the mode's tensors and tokenized with its labels;
or, in the PDF cases (``DataRecipe.pdf_share``, when the corpus has a PDF page index from
scripts/build_pdf_pages.py), a real PDF page rasterised at 144 dpi with its text layer.

    python bench/data.py --corpus data/corpus --tokenizer data/mini/tokenizer.json

Writes docs/benchmarks/data.md. The paper's data engine produced 200,000+ pages/day; the goal is at
least that many training pages a day on this 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

from dsocr.configs import CONFIGS
from dsocr.language.tokenizer import Tokenizer, byte_tokenizer
from dsocr.train.data import DataRecipe, StepBatches, batch_stream

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def pages_per_s(recipe, tok, cfg, workers: int, batches: int, batch_size: int) -> float:
    """Steady-state pages/s of ``batches`` batches after each worker has delivered one."""
    dataset = StepBatches(recipe, tok, cfg, start_step=0, rank=0, batch_size=batch_size, seed=0)
    stream = batch_stream(dataset, workers=workers)
    for _ in range(max(1, workers)):  # start-up (spawn, corpus load, first batch) not counted
        next(stream)
    t = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batches * batch_size / (time.perf_counter() - t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--corpus", default=None, help="built corpus folder (default: toy strings)")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--pdf-index",
        default=None,
        help="PDF page index (default: <corpus>/pdf_pages.jsonl; no PDF cases without one)",
    )
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "data.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    tok = Tokenizer.from_file(args.tokenizer) if args.tokenizer else Tokenizer(byte_tokenizer())
    cfg = CONFIGS["mini"]
    recipes = {
        "tiny+small, 40-1500 chars (default)": DataRecipe(corpus=args.corpus),
        "tiny, 20-300 chars": DataRecipe(
            corpus=args.corpus, modes=("tiny",), min_chars=20, max_chars=300
        ),
        "base, 200-3000 chars": DataRecipe(
            corpus=args.corpus, modes=("base",), min_chars=200, max_chars=3000
        ),
    }
    index = args.pdf_index or (args.corpus and str(Path(args.corpus) / "pdf_pages.jsonl"))
    if index and Path(index).is_file():
        for share in (0.2, 1.0):
            name = f"tiny+small, 40-1500 chars, {share:.0%} real PDF pages"
            recipes[name] = DataRecipe(corpus=args.corpus, pdf_share=share, pdf_index=index)
    else:
        print("no PDF page index (scripts/build_pdf_pages.py): PDF cases skipped")
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    rows = []
    for name, recipe in recipes.items():
        one = pages_per_s(recipe, tok, cfg, 0, args.batches, args.batch_size)
        many = pages_per_s(recipe, tok, cfg, cores, args.batches, args.batch_size)
        rows.append((name, one, many))
        print(
            f"{name}: {one:.1f} pages/s in-process, {many:.1f} with {cores} workers "
            f"({many / cores:.1f} per core)"
        )
    cmd = "python bench/data.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Data engine throughput",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {cpu_name()}, {cores} cores, torch {torch.__version__}  ",
        f"Date: {date.today().isoformat()}; load average at start {load:.2f} "
        "(other jobs on the machine slow these numbers down)",
        "",
        "A page is one finished sample: text cut from the corpus, rendered in a random style "
        "(25% degraded like a scan), preprocessed to the mode's tensors, tokenized with labels. "
        "In the PDF rows that share of pages is instead a real PDF page (a Debian Reference "
        "training page from the corpus's pdf_pages.jsonl) rasterised at 144 dpi, labelled with "
        "its text layer.",
        "",
        f"| recipe | pages/s, 1 process | pages/s, {cores} workers "
        f"| pages/s per core, {cores} workers | pages/day, {cores} workers |",
        "|---|---|---|---|---|",
    ]
    for name, one, many in rows:
        lines.append(
            f"| {name} | {one:.1f} | {many:.1f} | {many / cores:.1f} | {many * 86400:,.0f} |"
        )
    lines += ["", "The paper's data engine: 200,000+ pages/day.", ""]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
