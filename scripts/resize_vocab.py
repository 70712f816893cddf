"""Give a checkpoint a new tokenizer: every weight is kept except the token embeddings and the
``lm_head``, which are re-initialised for the new vocabulary.

    python scripts/resize_vocab.py runs/mini-cpu/latest --tokenizer data/mini-cpu-384/tokenizer.json \
        --out runs/mini-cpu-384-start

The result is a start folder for ``python -m dsocr.train.loop --model <out>``: a fresh run (step
0, no optimizer state) whose encoder and decoder layers carry what the source learned. The
tokenizer must keep the dsocr id layout (specials 0..14, ``<image>`` at the model's
``image_token_id``), as every tokenizer from ``scripts/train_tokenizer.py`` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from dsocr.language.tokenizer import Tokenizer
from dsocr.weights import build_model, load_checkpoint, save_checkpoint

RESIZED = ("model.embed_tokens.weight", "lm_head.weight")


def resize_vocab(src: str | Path, tok: Tokenizer, seed: int = 0):
    """The model of ``src`` with ``len(tok)`` vocabulary rows, new rows ~ N(0, 0.02)."""
    old = load_checkpoint(src, dtype=torch.float32)
    if tok.image_id != old.config.image_token_id:
        raise ValueError(f"tokenizer <image> id {tok.image_id} != {old.config.image_token_id}")
    lang = dataclasses.replace(old.config.language, vocab_size=len(tok))
    cfg = dataclasses.replace(old.config, language=lang)
    new = build_model(cfg, dtype=torch.float32, seed=seed)
    keep = {k: v for k, v in old.state_dict().items() if k not in RESIZED}
    missing, unexpected = new.load_state_dict(keep, strict=False)
    assert sorted(missing) == sorted(RESIZED) and not unexpected, (missing, unexpected)
    return new


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("src", help="checkpoint folder")
    ap.add_argument("--tokenizer", required=True, help="the new tokenizer.json")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    tok = Tokenizer.from_file(args.tokenizer)
    model = resize_vocab(args.src, tok, args.seed)
    src_meta = Path(args.src) / "meta.json"
    meta = {
        "resized_from": str(args.src),
        "source_step": json.loads(src_meta.read_text()).get("step") if src_meta.is_file() else None,
        "tokenizer_sha256": tok.sha256,
    }
    save_checkpoint(model, args.out, tokenizer=tok, meta=meta)
    print(
        f"wrote {args.out}: vocab {len(tok)}, {sum(p.numel() for p in model.parameters())} params"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
