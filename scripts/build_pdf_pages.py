"""Build the index of real PDF pages that training may use (``DataRecipe.pdf_share``).

A page is indexed when its text layer has at least ``--min-chars`` characters, at least
``--min-train`` of its lines (whitespace-normalised, longer than 25 characters) occur in the
corpus's train.jsonl, and none occurs in heldout.jsonl (``dsocr/train/pdf_pages.py``). The
``pdf-debref-*`` eval sets take only pages with at least 3 held-out lines
(``dsocr/eval/datasets.py``), so no eval page and no held-out text is ever trained on.

Sources: the Debian Reference PDFs (packages debian-reference-{en,de,fr,ja,zh-cn}) by default, or
``--pdf PATH[=LANG]`` (repeatable; LANG is the corpus language code, default from a
``name.<lang>.pdf`` file name). Each PDF is copied into ``--pdf-dir`` (default data/pdfs, beside
the corpus; gitignored), so the index (rows: pdf relative to the index's folder, its sha256,
0-based page, lang, text layer, line counts) and the copies travel together, e.g. to a GPU
machine::

    python scripts/build_pdf_pages.py --corpus data/corpus     # -> data/corpus/pdf_pages.jsonl

Needs the corpus's uncompressed train.jsonl and heldout.jsonl (scripts/build_corpus.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from dsocr.eval.datasets import DEBREF, CorpusText, _norm_line
from dsocr.fileio import sha256_file
from dsocr.train.pdf_pages import (
    INDEX_NAME,
    LANG_CODES,
    MIN_CHARS,
    MIN_TRAIN_LINES,
    select_training_pages,
)

DEFAULT_PDFS = [DEBREF.format(x) for x in ("en", "de", "fr", "ja", "zh-cn")]


def pdf_lang(spec: str) -> tuple[Path, str]:
    """``PATH[=LANG]`` -> (path, corpus language code)."""
    path, _, lang = spec.partition("=")
    if not lang:
        stem = Path(path).stem  # debian-reference.zh-cn
        lang = stem.rsplit(".", 1)[-1] if "." in stem else ""
    return Path(path), LANG_CODES.get(lang, lang)


def train_text_by_lang(corpus: Path) -> dict[str, str]:
    """Each language's train rows as one searchable string (normalised as ``CorpusText``)."""
    parts: dict[str, list[str]] = {}
    with open(corpus / "train.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                parts.setdefault(row.get("lang", ""), []).append(_norm_line(row["text"]))
    return {k: "\n".join(v) for k, v in parts.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--corpus", default="data/corpus", help="corpus folder (default: %(default)s)")
    ap.add_argument("--pdf", action="append", help="PATH[=LANG] (default: the Debian Reference)")
    ap.add_argument("--out", default=None, help=f"index (default: <corpus>/{INDEX_NAME})")
    ap.add_argument(
        "--pdf-dir", default=None, help="where the PDFs are copied (default: <corpus>/../pdfs)"
    )
    ap.add_argument("--min-chars", type=int, default=MIN_CHARS, help="default: %(default)s")
    ap.add_argument(
        "--min-train",
        type=int,
        default=MIN_TRAIN_LINES,
        help="train lines a page needs (default: %(default)s)",
    )
    args = ap.parse_args(argv)
    corpus = Path(args.corpus)
    out = Path(args.out) if args.out else corpus / INDEX_NAME
    pdf_dir = Path(args.pdf_dir) if args.pdf_dir else corpus.parent / "pdfs"
    specs = [pdf_lang(s) for s in (args.pdf or DEFAULT_PDFS)]
    for path, lang in specs:
        if not path.is_file():
            sys.exit(f"error: {path}: no such PDF")
        if not lang:
            sys.exit(f"error: {path}: no language; pass --pdf {path}=LANG")
    t0 = time.time()
    text = CorpusText(corpus)
    by_lang = train_text_by_lang(corpus)
    pdf_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for path, lang in specs:
        copy = pdf_dir / path.name
        if not copy.exists() or sha256_file(copy) != sha256_file(path):
            shutil.copyfile(path, copy)
        sha = sha256_file(copy)
        rel = os.path.relpath(copy.resolve(), out.parent.resolve())
        pages = select_training_pages(
            copy,
            text,
            lang,
            min_chars=args.min_chars,
            min_train=args.min_train,
            train_text=by_lang.get(lang, ""),
        )
        rows += [{"pdf": rel, "sha256": sha, **r} for r in pages]
        print(f"{path}: {len(pages)} training pages ({lang})")
    tmp = out.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(out)
    print(f"wrote {out}: {len(rows)} pages in {time.time() - t0:.0f} s; PDFs in {pdf_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
