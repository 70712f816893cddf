"""Copy a trained checkpoint into the package as the embedded default model (dsocr-mini).

    python scripts/bundle_model.py runs/mini-cpu/best                # -> dsocr/assets/dsocr-mini
    python scripts/bundle_model.py runs/mini/best --dtype float32

Writes config.json, model-*.safetensors shards of at most 15 MB (the repository's limit per file),
tokenizer.json and meta.json (the training metadata, minus the optimizer state), replacing the
folder atomically, and meta.json's "defaults" (the mode and task the CLI picks for this model when
not told). Refuses a bundle over 60 MB. The default dtype is bfloat16, the official
checkpoint's storage type; CPU loads cast it back to float32.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from dsocr.configs import get_mode
from dsocr.language.tokenizer import Tokenizer
from dsocr.weights import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
MAX_FILE = 15_000_000
MAX_TOTAL = 60_000_000


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("checkpoint", help="a training checkpoint folder (runs/<name>/best)")
    ap.add_argument("--out", default=str(ROOT / "dsocr" / "assets" / "dsocr-mini"))
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument(
        "--default-mode",
        help="mode the CLI uses for this model (default: the largest mode it was trained on)",
    )
    ap.add_argument(
        "--default-task",
        help="task the CLI uses (default: free when it was only "
        "trained on plain text, else markdown)",
    )
    args = ap.parse_args(argv)
    src, out = Path(args.checkpoint), Path(args.out)
    model = load_checkpoint(src, device="cpu", dtype=torch.float32)
    tok = Tokenizer.from_folder(src)
    meta = json.loads((src / "meta.json").read_text()) if (src / "meta.json").is_file() else {}
    meta["bundled_from"] = str(src)
    meta["bundled_dtype"] = args.dtype
    recipe = meta.get("data_recipe", {})
    trained_modes = [m for m in recipe.get("modes", []) if isinstance(m, str)]
    largest = max(trained_modes, key=lambda m: get_mode(m).base_size, default="base")
    only_free = set(recipe.get("prompts", ["free"])) == {"free"}
    meta["defaults"] = {
        "mode": args.default_mode or largest,
        "task": args.default_task or ("free" if only_free else "markdown"),
    }
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(
        model,
        tmp,
        max_shard_bytes=MAX_FILE,
        dtype=getattr(torch, args.dtype),
        tokenizer=tok,
        meta=meta,
    )
    sizes = {p.name: p.stat().st_size for p in tmp.iterdir()}
    big = [n for n, s in sizes.items() if s > MAX_FILE]
    if big or sum(sizes.values()) > MAX_TOTAL:
        shutil.rmtree(tmp)
        raise SystemExit(f"bundle too large: {sizes} (files <= {MAX_FILE}, total <= {MAX_TOTAL})")
    load_checkpoint(tmp, device="cpu")  # strict reload: every key and shape
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(json.dumps({"out": str(out), "files": sizes, "step": meta.get("step")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
