"""Train the dsocr-mini tokenizer (byte-level BPE, specials at ids 0..14) on the corpus train split.

    python scripts/train_tokenizer.py --corpus data/corpus --vocab-size 8192 --out data/mini
    python scripts/train_tokenizer.py --corpus data/corpus --vocab-size 4096 --langs en \
        --out data/mini-cpu          # the CPU stand-in's tokenizer (English only)

Only the train split is read, so held-out text never shapes the vocabulary. Deterministic for the
same corpus (its manifest sha256 is printed beside the tokenizer's).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dsocr.language.tokenizer import Tokenizer, train_tokenizer
from dsocr.train.data import recipe_docs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--corpus", default="data/corpus")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--out", default="data/mini")
    ap.add_argument("--langs", default="", help="comma list of corpus lang codes (default: all)")
    args = ap.parse_args(argv)
    langs = tuple(x for x in args.langs.split(",") if x)
    try:
        rows = recipe_docs(args.corpus, "train", langs)
    except (OSError, ValueError) as e:  # no corpus, no train split, no rows in --langs
        print(f"error: {e}", file=sys.stderr)
        return 2
    tok = Tokenizer(train_tokenizer((r["text"] for r in rows), args.vocab_size))
    path = tok.save(args.out)
    manifest = Path(args.corpus) / "manifest.json"
    corpus_hash = json.loads(manifest.read_text())["files"] if manifest.is_file() else None
    print(
        json.dumps(
            {
                "tokenizer": str(path),
                "size": len(tok),
                "sha256": tok.sha256,
                "image_id": tok.image_id,
                "corpus_files": corpus_hash,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
