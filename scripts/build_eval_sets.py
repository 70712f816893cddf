"""Build the evaluation page sets under data/eval/ (data/ is gitignored; rebuild on each machine).

    python scripts/build_eval_sets.py                 # both sets, defaults below
    python scripts/build_eval_sets.py --rendered 20 --seed 1

- data/eval/pdf-debref-en/: pages 24,26,35,50,65,80,100,120,200,230 of
  /usr/share/debian-reference/debian-reference.en.pdf (Debian package debian-reference-en) at
  144 dpi, ground truth = the PDF text layer (PDFium).
- data/eval/rendered-en/: N clean pages of English held-out corpus text
  (data/corpus/heldout.jsonl, built by scripts/build_corpus.py), dsocr.render sans 16 px,
  fixed seed.

Each folder holds images/*.png and manifest.jsonl (id, image, text, source, sha256).
"""

from __future__ import annotations

import argparse
import os
import sys

from dsocr.eval.datasets import DEFAULT_PDF, DEFAULT_PDF_PAGES, build_pdf_set, build_rendered_set


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/eval")
    ap.add_argument("--pdf", default=DEFAULT_PDF)
    ap.add_argument(
        "--pdf-pages",
        default=",".join(map(str, DEFAULT_PDF_PAGES)),
        help="1-based page numbers, comma separated",
    )
    ap.add_argument("--corpus", default="data/corpus/heldout.jsonl")
    ap.add_argument("--rendered", type=int, default=10, help="number of rendered pages")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    if os.path.isfile(args.pdf):
        pages = tuple(int(x) for x in args.pdf_pages.split(","))
        m = build_pdf_set(os.path.join(args.out, "pdf-debref-en"), args.pdf, pages)
        print(f"wrote {m}")
    else:
        print(
            f"skip PDF set: {args.pdf} not found (apt-get install debian-reference-en)",
            file=sys.stderr,
        )
    if os.path.isfile(args.corpus):
        m = build_rendered_set(
            os.path.join(args.out, "rendered-en"),
            args.corpus,
            n_pages=args.rendered,
            seed=args.seed,
        )
        print(f"wrote {m}")
    else:
        print(
            f"skip rendered set: {args.corpus} not found (run scripts/build_corpus.py)",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
