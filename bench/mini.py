"""dsocr-mini on held-out data: the numbers docs/benchmarks/mini.md reports.

Three measurements, all on text no training step read (``data/corpus/heldout.jsonl``, split by
chapter group in scripts/build_corpus.py) or on pages nobody here rendered:

1. **Held-out pages in the training style.** Pages drawn exactly as training draws them (the data
   recipe stored in the checkpoint's meta.json: fonts, sizes, margins, columns, scan simulation),
   but from the held-out split, in each mode (default Tiny 64 and Small 100 vision tokens).
   Bucketed by text tokens counted with the DeepSeek-V3 tokenizer, as the paper does.
2. **The paper's Table 2 buckets** (600-700 up to 1,200-1,300 V3 tokens, one page each, the
   largest font that fits; ``bench/compression.py``'s passages and fitting), so our ratios sit
   beside the paper's.
3. **Real PDF pages in Base mode** (``data/eval/pdf-debref-en`` from scripts/build_eval_sets.py:
   Debian Reference PDF pages at 144 dpi, ground truth = the PDF text layer).

Precision is Fox's scorer (``dsocr.eval.metrics.fox_scores``); CER is whitespace-normalised
character error rate. Decoding is greedy with the official single-image n-gram ban (30/90), a budget
of 1.2x the reference in the model's tokens + 32, batched by the engine (``OCR.run_many``).

    python bench/mini.py                                   # bundled dsocr-mini
    python bench/mini.py --model runs/mini-cpu/best --pages 48 --table2-pages 3
    python bench/mini.py --model tiny --pages 2 --table2-pages 1 --pdf-pages 1 --out /tmp/m.md
    python bench/mini.py --model runs/x/latest --out /tmp/x.md --compare docs/benchmarks/mini.json
    python bench/mini.py --font-sizes 24 --out /tmp/m24.md   # the training style, smaller text

``--compare OLD.json`` (another run's saved results, same seed, corpus and recipe) adds a paired
comparison: the CER difference on the very same held-out pages, with a bootstrap 95% interval over
pages. Page ``i`` of a seed is the same page whatever ``--pages`` is, so a 256-page run compares
with a 32-page one on their first 32 pages.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compression  # noqa: E402  (bench/compression.py: Table 2 passages, paper numbers)

from dsocr.api import load_model  # noqa: E402
from dsocr.compress import compress  # noqa: E402
from dsocr.compress.accounting import readback_budget  # noqa: E402
from dsocr.configs import get_mode  # noqa: E402
from dsocr.eval.metrics import cer, fox_scores  # noqa: E402
from dsocr.eval.run import header_lines, run_info  # noqa: E402
from dsocr.fileio import save_report  # noqa: E402
from dsocr.language.tokenizer import PROMPTS, count_text_tokens  # noqa: E402
from dsocr.train.data import (  # noqa: E402
    DataRecipe,
    corpus_identity,
    make_sample,
    recipe_docs,
    sample_seed,
)

ROOT = Path(__file__).resolve().parents[1]
GRID_TOKENS = {"tiny": 64, "small": 100, "base": 256, "large": 400}  # the paper's budgets
SHORT_BUCKETS = [(0, 50), (50, 100), (100, 150), (150, 200), (200, 400), (400, 10**6)]


def recipe_of(ocr, corpus: str) -> DataRecipe:
    """The data recipe the checkpoint was trained with (meta.json), pointed at ``corpus``."""
    meta = Path(ocr.source) / "meta.json"
    d = json.loads(meta.read_text()).get("data_recipe", {}) if meta.is_file() else {}
    recipe = DataRecipe.from_meta(d) if d else DataRecipe(langs=("en",))
    return replace(recipe, corpus=corpus)


def budget(ocr, text: str) -> int:
    return readback_budget(ocr.tokenizer, text, ocr.model.config.language.max_position_embeddings)


def decode(ocr, images, refs, mode, args) -> list[dict]:
    """Greedy-decode ``images`` in one batched engine run; score each against its reference."""
    t0 = time.perf_counter()
    results = ocr.run_many(
        images,
        PROMPTS["free"],
        mode=mode,
        max_new_tokens=[budget(ocr, r) for r in refs],
        batch_size=args.batch_size,
    )
    dt = (time.perf_counter() - t0) / max(1, len(images))
    rows = []
    for res, ref in zip(results, refs):
        pred = res.text.strip()
        fox = fox_scores(pred, ref)
        rows.append(
            {
                "mode": mode,
                "v3_tokens": count_text_tokens(ref),
                "precision": fox["precision"],
                "recall": fox["recall"],
                "cer": cer(pred, ref, normalize_whitespace=True),
                "finish": res.finish_reason,
                "seconds": dt,
                "reference_head": ref[:120],
                "prediction_head": pred[:120],
            }
        )
    return rows


def mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def summarise(rows: list[dict], mode: str) -> dict:
    return {
        "pages": len(rows),
        "v3_tokens": mean(r["v3_tokens"] for r in rows),
        "ratio": mean(r["v3_tokens"] for r in rows) / GRID_TOKENS[mode] if rows else None,
        "precision": mean(r["precision"] for r in rows),
        "recall": mean(r["recall"] for r in rows),
        "cer": mean(r["cer"] for r in rows),
        "eos": sum(r["finish"] == "eos" for r in rows),
    }


def buckets(rows: list[dict], mode: str) -> list[dict]:
    """``summarise`` per SHORT_BUCKETS range of V3 tokens (empty ranges left out)."""
    out = []
    for lo, hi in SHORT_BUCKETS:
        inside = [x for x in rows if lo <= x["v3_tokens"] < hi]
        if inside:
            out.append({"lo": lo, "hi": hi, **summarise(inside, mode)})
    return out


def paired(new: list[dict], old: list[dict], seed: int = 0, draws: int = 2000) -> dict | None:
    """Per-page CER of two runs on the same held-out pages (their common first pages): the mean
    difference new - old (negative: the new model reads better), a bootstrap 95% interval of it
    over pages, and the pages that got better or worse. None when the pages differ (another seed,
    corpus or recipe): their reference text or V3 token counts do not match."""
    n = min(len(new), len(old))
    same = all(
        a["reference_head"] == b["reference_head"] and a["v3_tokens"] == b["v3_tokens"]
        for a, b in zip(new[:n], old[:n])
    )
    if not n or not same:
        return None
    d = [a["cer"] - b["cer"] for a, b in zip(new[:n], old[:n])]
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(d, k=n)) for _ in range(draws))
    return {
        "pages": n,
        "old_cer": mean(b["cer"] for b in old[:n]),
        "new_cer": mean(a["cer"] for a in new[:n]),
        "diff": statistics.fmean(d),
        "lo": means[int(0.025 * draws)],
        "hi": means[int(0.975 * draws) - 1],
        "better": sum(x < 0 for x in d),
        "worse": sum(x > 0 for x in d),
    }


def compare(res: dict, old: dict, label: str) -> dict:
    """``paired`` per mode of ``res`` against another run's saved results ``old``."""
    modes = [m for m in res["modes"] if m in old.get("heldout", {})]
    return {
        "against": label,
        "model": old.get("model"),
        "train_step": old.get("train_step"),
        "modes": {m: paired(res["heldout"][m]["rows"], old["heldout"][m]["rows"]) for m in modes},
    }


def heldout_pages(ocr, args) -> dict:
    recipe = recipe_of(ocr, args.corpus)
    if args.font_sizes:
        recipe = replace(recipe, font_sizes=tuple(args.font_sizes))
    docs = recipe_docs(recipe.corpus, "heldout", tuple(recipe.langs))
    keys = ("langs", "font_sizes", "fonts", "min_chars", "max_chars", "scramble_prob")
    out = {"recipe": {k: getattr(recipe, k) for k in keys}}
    for mode in args.modes:
        r = replace(recipe, modes=(mode,))
        samples = [
            make_sample(r, random.Random(sample_seed(args.seed, "bench", 0, 0, i)), docs)
            for i in range(args.pages)
        ]
        rows = decode(ocr, [s.image for s in samples], [s.target for s in samples], mode, args)
        out[mode] = {"all": summarise(rows, mode), "buckets": buckets(rows, mode), "rows": rows}
        print(f"held-out {mode}: {out[mode]['all']}", file=sys.stderr)
    return out


def table2(ocr, args) -> list[dict]:
    rng = random.Random(args.seed)
    docs = compression.english_docs(Path(args.corpus) / "heldout.jsonl")
    out = []
    for lo, hi, *_ in compression.PAPER_TABLE2:
        passages = compression.cut_passages(docs, lo, hi, args.table2_pages, rng, args.modes)
        bucket = {"lo": lo, "hi": hi, "pages": len(passages)}
        for mode in args.modes:
            pages = [compress(p, mode, fit_one_page=True) for p in passages]
            images = [m.pages[0].image.convert("RGB") for m in pages]
            rows = decode(ocr, images, passages, mode, args)
            for row, m in zip(rows, pages):
                row["font_size"] = m.style.font_size
            bucket[mode] = summarise(rows, mode) | {"font_size": mean(r["font_size"] for r in rows)}
        out.append(bucket)
        print(f"table2 {lo}-{hi}: {bucket}", file=sys.stderr)
    return out


def pdf_pages(ocr, args) -> dict | None:
    from dsocr.eval.datasets import load_pages

    folder = Path(args.pdf_set)
    if not (folder / "manifest.jsonl").is_file():
        print(f"{folder}: no page set (scripts/build_eval_sets.py); skipped", file=sys.stderr)
        return None
    pages = load_pages(folder, limit=args.pdf_pages)
    rows = decode(
        ocr, [p.load_image() for p in pages], [p.text for p in pages], args.pdf_mode, args
    )
    return {
        "set": str(folder),
        "mode": args.pdf_mode,
        **summarise(rows, args.pdf_mode),
        "rows": rows,
    }


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------


def pct(x):
    return "—" if x is None else f"{100 * x:.1f}%"


def num(x, spec=".2f"):
    return "—" if x is None else f"{x:{spec}}"


def render(res: dict) -> str:
    L = [
        "# dsocr-mini on held-out data",
        "",
        *header_lines(res),
        f"- Model: `{res['model']}` (config `{res['config']}`, {res['params'] / 1e6:.1f}M "
        f"parameters, trained {res['train_step']} steps)",
        "- How this model was trained, phase by phase, and why: "
        "[docs/training.md](../training.md).",
        "- Read precision beside recall: Fox precision is a word-*set* precision, so a short "
        'output of common words ("the a the") scores high while recalling almost nothing; '
        "CER and recall say how much of the page came back.",
        "- Precision: Fox word-set precision; recall: the same sets the other way; CER: whitespace-normalised character error rate "
        "(lower is better); ratio: DeepSeek-V3 text tokens per grid vision token (64 Tiny, "
        "100 Small, 256 Base), as the paper's Table 2.",
        "",
        "## 1. Held-out pages in the training style",
        "",
        f"Recipe: {res['heldout']['recipe']}. Decoded {res['heldout_pages']} pages per mode.",
        "",
        f"Held-out text: {res.get('corpus_identity', 'not recorded')}.",
        "",
        "| mode | V3 tokens | pages | ratio | precision | recall | CER | ended by EOS |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in res["modes"]:
        h = res["heldout"][mode]
        for b in h["buckets"] + [dict(h["all"], lo="all", hi="")]:
            span = "all" if b["lo"] == "all" else f"{b['lo']}-{b['hi'] if b['hi'] < 10**6 else ''}"
            L.append(
                f"| {mode} | {span} | {b['pages']} | {num(b['ratio'], '.1f')}x | "
                f"{pct(b['precision'])} | {pct(b.get('recall'))} | {num(b['cer'], '.3f')} | "
                f"{b['eos']}/{b['pages']} |"
            )
    L += [
        "",
        "## 2. The paper's Table 2 buckets (one page each, largest font that fits)",
        "",
        "| V3 tokens | pages | mode | font px | ratio | precision | recall | CER "
        "| paper precision | paper ratio |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    paper = {(r[0], r[1]): r for r in compression.PAPER_TABLE2}
    for b in res["table2"]:
        for mode in res["modes"]:
            s = b[mode]
            pi, ci = compression.PAPER_COLUMNS[mode]
            p = paper[(b["lo"], b["hi"])]
            L.append(
                f"| {b['lo']}-{b['hi']} | {b['pages']} | {mode} | {num(s['font_size'], '.0f')} | "
                f"{num(s['ratio'], '.1f')}x | {pct(s['precision'])} | {pct(s.get('recall'))} | "
                f"{num(s['cer'], '.3f')} | {p[pi]}% | {p[ci]}x |"
            )
    L += ["", "## 3. Real PDF pages", ""]
    pdf = res.get("pdf")
    if pdf is None:
        L.append("Not run: no page set (`python scripts/build_eval_sets.py`).")
    else:
        L += [
            f"`{pdf['set'].replace(str(ROOT) + '/', '')}` ({pdf['pages']} pages, ground truth = PDF text layer), "
            f"{pdf['mode']} mode: CER {num(pdf['cer'], '.3f')}, precision {pct(pdf['precision'])}, "
            f"{num(pdf['v3_tokens'], '.0f')} V3 tokens per page on average, "
            f"{pdf['eos']}/{pdf['pages']} ended by EOS, {num(mean(r['seconds'] for r in pdf['rows']))} "
            "s/page.",
        ]
    if res.get("compare"):
        c = res["compare"]
        L += [
            "",
            f"## 4. Against {c['against']}",
            "",
            f"The same held-out pages of section 1 read by that model (its run's `--model` was "
            f"`{c['model']}`, trained {c['train_step']} steps). Difference: this model's per-page "
            "CER minus that one's (negative: this model reads better), its bootstrap 95% "
            "interval over pages.",
            "",
            "| mode | pages | CER then | CER now | difference | 95% interval | better | worse |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for mode, d in c["modes"].items():
            if d is None:
                L.append(f"| {mode} | not comparable: other pages (seed, corpus or recipe) |||||||")
                continue
            L.append(
                f"| {mode} | {d['pages']} | {d['old_cer']:.3f} | {d['new_cer']:.3f} | "
                f"{d['diff']:+.3f} | {d['lo']:+.3f} to {d['hi']:+.3f} | {d['better']} | "
                f"{d['worse']} |"
            )
    L += ["", "## Samples (held-out, first mode)", ""]
    for r in res["heldout"][res["modes"][0]]["rows"][:4]:
        L += [
            f"- reference: `{r['reference_head']!r}`",
            f"  - prediction: `{r['prediction_head']!r}` (CER {r['cer']:.3f})",
        ]
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dsocr-mini")
    p.add_argument("--device", default=None)
    p.add_argument("--corpus", default=str(ROOT / "data" / "corpus"))
    p.add_argument("--modes", type=lambda s: s.split(","), default=["tiny", "small"])
    p.add_argument("--pages", type=int, default=48, help="held-out pages per mode")
    p.add_argument(
        "--font-sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=None,
        help="section 1's font sizes in px, instead of the training recipe's (same text)",
    )
    p.add_argument("--table2-pages", type=int, default=3, help="pages per Table 2 bucket")
    p.add_argument("--pdf-set", default=str(ROOT / "data" / "eval" / "pdf-debref-en"))
    p.add_argument("--pdf-pages", type=int, default=10)
    p.add_argument("--pdf-mode", default="base")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "mini.md"))
    p.add_argument(
        "--from-json", default=None, help="re-render the report from a saved .json (no model run)"
    )
    p.add_argument("--compare", default=None, help="another run's .json: a paired comparison")
    p.add_argument("--compare-label", default=None, help="what --compare is (default: its path)")
    args = p.parse_args(argv)
    old = None
    if args.compare:
        try:
            old = json.loads(Path(args.compare).read_text())
        except (OSError, ValueError) as e:
            print(f"error: --compare {args.compare}: {e}", file=sys.stderr)
            return 2
    label = args.compare_label or args.compare
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
        for mode in res["modes"]:
            h = res["heldout"][mode]
            h["all"], h["buckets"] = summarise(h["rows"], mode), buckets(h["rows"], mode)
        if old is not None:
            res["compare"] = compare(res, old, label)
        save_report(args.out, render(res))
        print(f"re-rendered {args.out} from {args.from_json}")
        return 0
    for m in [*args.modes, args.pdf_mode]:
        get_mode(m)
    ocr = load_model(args.model, device=args.device)
    meta = Path(ocr.source) / "meta.json"
    step = json.loads(meta.read_text()).get("step") if meta.is_file() else 0
    res = {
        **run_info("python bench/mini.py " + " ".join(argv)),
        "model": args.model,
        "config": ocr.model.config.name,
        "params": sum(t.numel() for t in ocr.model.parameters()),
        "train_step": step,
        "modes": args.modes,
        "heldout_pages": args.pages,
        "corpus_identity": corpus_identity(args.corpus, ROOT),
    }
    res["heldout"] = heldout_pages(ocr, args)
    res["table2"] = table2(ocr, args)
    res["pdf"] = pdf_pages(ocr, args)
    if old is not None:
        res["compare"] = compare(res, old, label)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_report(out, render(res))
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out} and {out.with_suffix('.json').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
