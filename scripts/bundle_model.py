"""Copy a trained checkpoint into the package as the embedded default model (dsocr-mini).

    python scripts/bundle_model.py runs/mini-cpu/best                # -> dsocr/assets/dsocr-mini
    python scripts/bundle_model.py runs/mini/best --dtype float32

Writes config.json, model-*.safetensors shards of at most 15 MB (the repository's limit per file),
tokenizer.json and meta.json (the training metadata, minus the optimizer state), and meta.json's
"defaults" (the mode and task the CLI picks for this model when not told). Refuses a bundle over
60 MB, and an ``--out`` that holds anything but an earlier bundle (a folder whose meta.json has
"bundled_from"), so it never deletes files it did not write. The new bundle is built beside
``--out`` and swapped in (old renamed away, new renamed in, old deleted; a failed swap puts the old
one back), so ``--out`` is always a complete bundle. The default dtype is bfloat16, the official
checkpoint's storage type; CPU loads cast it back to float32.

The default mode, unless ``--default-mode`` names one, is measured: for a model trained on several
modes, held-out pages are drawn from its data recipe in each trained mode (``--measure-pages``
per mode, from the recipe corpus's held-out split), every page set is read greedily in every
trained mode, and the mode with the lowest mean CER over all the pages wins (ties: the cheaper
mode). A user's page is not drawn at the size a mode expects, so the default must read pages of
every trained size; "the largest trained mode" failed that (a model trained on 32 px text in Tiny
and Small reads a 512 px page in Small as 40 px text, and gave noise). The table goes into
meta.json's "defaults.measured".
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from dsocr.api import OCR
from dsocr.compress.accounting import readback_budget
from dsocr.configs import get_mode
from dsocr.eval.metrics import cer
from dsocr.language.tokenizer import PROMPTS, Tokenizer
from dsocr.train.data import DataRecipe, make_sample, recipe_docs, sample_seed
from dsocr.weights import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
MAX_FILE = 15_000_000
MAX_TOTAL = 60_000_000


def measure_modes(ocr: OCR, recipe: DataRecipe, pages: int, seed: int = 0) -> dict:
    """Mean greedy CER of held-out pages drawn in each of ``recipe.modes``, read in each of them:
    {"pages": per mode, "cer": {read_mode: {page_mode: cer}}, "mean": {read_mode: cer}}."""
    docs = recipe_docs(recipe.corpus, "heldout", tuple(recipe.langs))
    sets = {}
    for m in recipe.modes:
        r = replace(recipe, modes=(m,), scan_prob=0.0)
        sets[m] = [
            make_sample(r, random.Random(sample_seed(seed, "bundle", 0, 0, i)), docs)
            for i in range(pages)
        ]
    limit = ocr.model.config.language.max_position_embeddings
    budgets = {
        m: [readback_budget(ocr.tokenizer, s.target, limit) for s in samples]
        for m, samples in sets.items()
    }
    table = {}
    for read in recipe.modes:
        table[read] = {}
        for m, samples in sets.items():
            refs = [s.target for s in samples]
            results = ocr.run_many(
                [s.image for s in samples], PROMPTS["free"], read, budgets[m], batch_size=8
            )
            scores = [
                cer(x.text.strip(), t, normalize_whitespace=True) for x, t in zip(results, refs)
            ]
            table[read][m] = round(statistics.fmean(scores), 4)
    means = {read: round(statistics.fmean(row.values()), 4) for read, row in table.items()}
    return {"pages": pages, "seed": seed, "cer": table, "mean": means}


def check_out(out: Path) -> None:
    """Refuse (SystemExit, one line) an ``--out`` that is a file, or a non-empty folder that is
    not a bundle this script wrote: replacing it would delete someone's files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise SystemExit(f"error: --out {out}: is a file, not a bundle folder")
    if not any(out.iterdir()):
        return
    meta = out / "meta.json"
    try:
        ours = (out / "config.json").is_file() and "bundled_from" in json.loads(meta.read_text())
    except (OSError, ValueError, TypeError):
        ours = False
    if not ours:
        raise SystemExit(
            f"error: --out {out}: holds files that are not a bundle of this script (no config.json "
            "and meta.json with bundled_from); choose an empty or new folder"
        )


def replace_folder(new: Path, out: Path) -> None:
    """Put the folder ``new`` at ``out``: the old ``out`` is renamed away, ``new`` renamed in,
    then the old one deleted; if the second rename fails, the old folder goes back."""
    old = out.with_name(f".{out.name}.{os.getpid()}.old")  # a name no one else uses
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    try:
        new.rename(out)
    except BaseException:
        if old.exists() and not out.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def pick_mode(means: dict[str, float]) -> str:
    """The mode of lowest mean CER; ties go to the mode with fewer pixels (fewer vision tokens)."""
    return min(means, key=lambda m: (means[m], get_mode(m).base_size))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("checkpoint", help="a training checkpoint folder (runs/<name>/best)")
    ap.add_argument("--out", default=str(ROOT / "dsocr" / "assets" / "dsocr-mini"))
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument(
        "--default-mode",
        help="mode the CLI uses for this model (default: measured on held-out pages, see above)",
    )
    ap.add_argument(
        "--measure-pages",
        type=int,
        default=16,
        help="held-out pages per trained mode for the measured default mode (default 16)",
    )
    ap.add_argument("--corpus", help="corpus folder for the measurement (default: the recipe's)")
    ap.add_argument("--device", help="device for the measurement (default: cuda if available)")
    ap.add_argument(
        "--default-task",
        help="task the CLI uses (default: free when it was only "
        "trained on plain text, else markdown)",
    )
    args = ap.parse_args(argv)
    src, out = Path(args.checkpoint), Path(args.out)
    check_out(out)
    model = load_checkpoint(src, device="cpu", dtype=torch.float32)
    tok = Tokenizer.from_folder(src)
    meta = json.loads((src / "meta.json").read_text()) if (src / "meta.json").is_file() else {}
    meta["bundled_from"] = str(src)
    meta["bundled_dtype"] = args.dtype
    saved = meta.get("data_recipe", {})
    trained = [m for m in saved.get("modes", []) if isinstance(m, str)]
    only_free = set(saved.get("prompts", ["free"])) == {"free"}
    task = args.default_task or ("free" if only_free else "markdown")
    measured = None
    if args.default_mode:
        mode = get_mode(args.default_mode).name
    elif len(trained) < 2:
        mode = trained[0] if trained else "base"
    else:
        recipe = DataRecipe.from_meta(saved)
        if args.corpus:
            recipe = replace(recipe, corpus=args.corpus)
        if recipe.corpus and not Path(recipe.corpus).is_dir():
            raise SystemExit(
                f"{recipe.corpus}: the recipe's corpus is missing, so the default mode cannot be "
                "measured (build it with scripts/build_corpus.py, pass --corpus, or --default-mode)"
            )
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        ocr = OCR(model.to(device), tok, str(src))
        measured = measure_modes(ocr, replace(recipe, modes=tuple(trained)), args.measure_pages)
        model.to("cpu")
        mode = pick_mode(measured["mean"])
        print(f"default mode {mode}: {json.dumps(measured)}", file=sys.stderr)
    meta["defaults"] = {"mode": mode, "task": task} | ({"measured": measured} if measured else {})
    out.parent.mkdir(parents=True, exist_ok=True)
    # A fresh folder of our own beside --out (never someone's "<out>.tmp"), removed on failure.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would follow the bundle into place
    try:
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
            raise SystemExit(
                f"bundle too large: {sizes} (files <= {MAX_FILE}, total <= {MAX_TOTAL})"
            )
        load_checkpoint(tmp, device="cpu")  # strict reload: every key and shape
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({"out": str(out), "files": sizes, "step": meta.get("step")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
