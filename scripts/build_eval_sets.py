"""Build the evaluation page sets under data/eval/ (data/ is gitignored; rebuild on each machine).

    python scripts/build_eval_sets.py                 # every set whose source is installed
    python scripts/build_eval_sets.py --rendered 20 --seed 1
    python scripts/build_eval_sets.py --sets pdf-debref-en --pdf-pages 133,140   # forced pages

- data/eval/pdf-debref-<lang>/ (lang en, de, fr, ja, zh-cn; Debian packages
  debian-reference-<lang>): N pages (default 10) of
  /usr/share/debian-reference/debian-reference.<lang>.pdf at 144 dpi, ground truth = the PDF
  text layer (PDFium). Pages are chosen from held-out text: per page, the text-layer lines
  (whitespace-normalised, > 25 characters) are looked up in data/corpus/train.jsonl and
  heldout.jsonl; a page qualifies with >= 3 lines in heldout, at least as many as in train, and
  at most 1 in train; pages with no train line are preferred; the N pages are spread evenly over
  the qualifying ones. For the English PDF this gives pages 133,135,137,139,140,142,143,145,146
  (chapter 6) and 261 (appendix A), none with a train line. Each manifest row records its
  page's counts (overlap_lines, train_overlap, heldout_overlap). --pdf-pages forces pages (one
  set only): pages with train lines are then kept with a warning and their counts recorded.
  A PDF that is not installed is skipped with a message.
- data/eval/rendered-en/: N clean pages of English held-out corpus text
  (data/corpus/heldout.jsonl, built by scripts/build_corpus.py), dsocr.render sans 16 px,
  fixed seed.
- data/eval/rendered-md-en/: N pages of English held-out documentation HTML (the heldout.jsonl
  rows' source files: debian-handbook, debian-reference-en, python3.11-doc) converted to light
  Markdown (headings, lists, pipe tables, fenced code) and drawn with dsocr.render's
  render_markdown, sans 16 px on 816x1056; ground truth = the Markdown on the page. Pages with
  structure are preferred; each row records its doc and structure. Skipped with a message when
  the corpus or the HTML is missing.

Each folder holds images/*.png and manifest.jsonl (id, image, text, source, lang, sha256 of the
PNG, text_sha256 of the ground truth); a rebuild replaces the folder as a whole. Exit status: 0
when at least one set was built, 1 when none was, 2 for a bad option.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from dsocr.eval.datasets import (
    PDF_SETS,
    CorpusText,
    build_markdown_set,
    build_pdf_set,
    build_rendered_set,
)
from dsocr.pipeline.providers import InputError

OTHER_SETS = ("rendered-en", "rendered-md-en")


def parse_pages(spec: str) -> tuple[int, ...]:
    """``"133,140"`` -> (133, 140); 1-based; ValueError for anything else."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        try:
            n = int(item)
        except ValueError:
            raise ValueError(f"--pdf-pages: {item!r} is not a page number") from None
        if n < 1:
            raise ValueError(f"--pdf-pages: page numbers are 1-based, got {n}")
        out.append(n)
    return tuple(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/eval")
    ap.add_argument(
        "--sets",
        default=",".join([*PDF_SETS, *OTHER_SETS]),
        help="comma list of sets to build (default: all)",
    )
    ap.add_argument("--pdf", default=None, help="PDF for the one PDF set in --sets")
    ap.add_argument("--pdf-pages", default=None, help="1-based page numbers, comma separated")
    ap.add_argument("--pdf-n", type=int, default=10, help="pages per PDF set (automatic choice)")
    ap.add_argument("--corpus-dir", default="data/corpus")
    ap.add_argument("--corpus", default=None, help="held-out JSONL for the rendered sets")
    ap.add_argument("--rendered", type=int, default=10, help="pages per rendered set")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        return build(args)
    except (ValueError, InputError, OSError) as e:
        print(f"build_eval_sets: error: {e}", file=sys.stderr)
        return 2


def build(args) -> int:
    names = [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = [s for s in names if s not in PDF_SETS and s not in OTHER_SETS]
    if unknown:
        raise ValueError(f"unknown set(s) {unknown}; choose from {[*PDF_SETS, *OTHER_SETS]}")
    pdf_names = [s for s in names if s in PDF_SETS]
    pages = parse_pages(args.pdf_pages) if args.pdf_pages else None
    if (pages or args.pdf) and len(pdf_names) != 1:
        raise ValueError("--pdf and --pdf-pages apply to one PDF set: give --sets <that set>")
    if args.pdf_n < 1 or args.rendered < 1:
        raise ValueError("--pdf-n and --rendered must be at least 1")
    built = 0
    corpus = None
    for name in pdf_names:
        pdf, lang = PDF_SETS[name]
        pdf = args.pdf or pdf
        if not os.path.isfile(pdf):
            package = f"debian-reference-{lang}" if pdf == PDF_SETS[name][0] else pdf
            print(f"skip {name}: {pdf} not found (apt-get install {package})", file=sys.stderr)
            continue
        if corpus is None and os.path.isdir(args.corpus_dir):
            corpus = CorpusText(args.corpus_dir)
        if corpus is None and pages is None:
            print(
                f"skip {name}: no corpus in {args.corpus_dir} to choose held-out pages from "
                "(run scripts/build_corpus.py, or force --pdf-pages)",
                file=sys.stderr,
            )
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m = build_pdf_set(
                os.path.join(args.out, name),
                pdf,
                pages,
                prefix=name.removeprefix("pdf-"),
                corpus=corpus,
                n_pages=args.pdf_n,
                lang=lang,
                allow_overlap=pages is not None,
            )
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
        print(f"wrote {m}")
        built += 1
    if "rendered-en" in names:
        held = args.corpus or os.path.join(args.corpus_dir, "heldout.jsonl")
        if os.path.isfile(held):
            m = build_rendered_set(
                os.path.join(args.out, "rendered-en"), held, n_pages=args.rendered, seed=args.seed
            )
            print(f"wrote {m}")
            built += 1
        else:
            print(
                f"skip rendered-en: {held} not found (run scripts/build_corpus.py)", file=sys.stderr
            )
    if "rendered-md-en" in names:
        held = args.corpus or os.path.join(args.corpus_dir, "heldout.jsonl")
        if not os.path.isfile(held):
            print(
                f"skip rendered-md-en: {held} not found (run scripts/build_corpus.py)",
                file=sys.stderr,
            )
        else:
            try:
                m = build_markdown_set(
                    os.path.join(args.out, "rendered-md-en"),
                    held,
                    n_pages=args.rendered,
                    seed=args.seed,
                )
            except FileNotFoundError as e:
                print(
                    f"skip rendered-md-en: {e} (apt-get install debian-handbook "
                    "debian-reference-en python3.11-doc)",
                    file=sys.stderr,
                )
            else:
                print(f"wrote {m}")
                built += 1
    if not built:
        print("build_eval_sets: nothing was built", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
