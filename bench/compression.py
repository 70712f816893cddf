"""Vision-text compression study: the paper's Table 2 protocol on held-out real text.

Paper §4.1 / Table 2 (arXiv 2510.18234; spec §9.1): English documents with 600-1,300 text tokens
(DeepSeek tokenizer), bucketed by 100 tokens, each rendered to ONE page and read back with
``<image>\\nFree OCR.`` in Tiny (512 px, 64 vision tokens) and Small (640 px, 100 vision tokens);
precision and compression (= text tokens / vision tokens) per bucket.

Here: the Fox pages are replaced by passages of ``data/corpus/heldout.jsonl`` (English rows,
documents never trained on; built by scripts/build_corpus.py), cut at line boundaries into the same
token buckets (DeepSeek-V3 tokenizer, ``count_text_tokens``), each rendered to one square page at
the largest font that fits (``compress(..., fit_one_page=True)``; passages that fit no page at
6 px, mostly long code listings, are skipped, so the sample leans to prose as Fox pages do).
Precision is Fox's own scorer (word *sets*, ``dsocr.eval.metrics.fox_scores``), recall beside it;
the stricter multiset precision of ``dsocr.compress`` is kept in the JSON. Compression divides by
grid tokens (64 / 100) as Table 2 does.

Two stress checks:
- scrambled word order: the same passages with words shuffled within each line (seeded). A model
  that reads pixels keeps its precision; one leaning on its language prior loses it.
- long inputs: 2k, 5k and 10k text tokens (``--long-tokens``) paginated over several pages at the
  median density of the Table 2 pages of that mode, decoded page by page (``decompress``).

Writes ``--out`` (default docs/benchmarks/compression.md), a precision-vs-compression plot beside
it (``.png``, needs matplotlib) and the raw per-page results (``.json``).

    python bench/compression.py                                   # bundled dsocr-mini
    python bench/compression.py --model path/to/DeepSeek-OCR --pages-per-bucket 15
    python bench/compression.py --model tiny --pages-per-bucket 1 --max-new-tokens 8 \\
        --long-tokens 2000 --out /tmp/compression.md               # smoke run (random weights)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from dsocr.api import load_model
from dsocr.compress import compress, decompress, default_style, word_precision, word_recall
from dsocr.compress.accounting import readback_budget
from dsocr.configs import get_mode
from dsocr.fileio import note_block, save_report
from dsocr.language.tokenizer import PROMPTS, count_text_tokens
from dsocr.render import fit_to_mode, missing_chars
from dsocr.train.data import corpus_identity

try:  # the Fox benchmark's own scorer (word sets), what Table 2 reports as "precision"
    from dsocr.eval.metrics import fox_scores

    METRIC = "Fox word-set precision (`dsocr.eval.metrics.fox_scores`, as Fox's eval script)"
except ImportError:  # pragma: no cover - dsocr.eval.metrics predates this script in the repo

    def fox_scores(pred: str, gt: str) -> dict:
        return {"precision": word_precision(pred, gt), "recall": word_recall(pred, gt)}

    METRIC = "word multiset precision (`dsocr.compress.word_precision`; dsocr.eval missing)"

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "corpus" / "heldout.jsonl"

# Paper Table 2 (spec §9.1): (lo, hi) text tokens -> precision % / compression x at 64 and 100
# vision tokens, and the number of Fox pages in the bucket.
PAPER_TABLE2 = [
    # lo, hi, P@64, C@64, P@100, C@100, pages
    (600, 700, 96.5, 10.5, 98.5, 6.7, 7),
    (700, 800, 93.8, 11.8, 97.3, 7.5, 28),
    (800, 900, 83.8, 13.2, 96.8, 8.5, 28),
    (900, 1000, 85.9, 15.1, 96.8, 9.7, 14),
    (1000, 1100, 79.3, 16.5, 91.5, 10.6, 11),
    (1100, 1200, 76.4, 17.7, 89.8, 11.3, 8),
    (1200, 1300, 59.1, 19.7, 87.1, 12.6, 4),
]
PAPER_COLUMNS = {"tiny": (2, 3), "small": (4, 5)}  # mode -> (precision, compression) index


# --------------------------------------------------------------------------------------------------
# passages
# --------------------------------------------------------------------------------------------------


def english_docs(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no held-out corpus; run scripts/build_corpus.py first")
    docs = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row.get("lang", "en").startswith("en") and row.get("text"):
                docs.append(row["text"])
    if not docs:
        raise ValueError(f"{path}: no English rows")
    return docs


def fits_one_page(text: str, modes: list[str]) -> bool:
    """Whether text fits on one page of every mode at >= 6 px (code listings with many short
    lines often do not: 64 lines of 7 px is all a 512 px page holds)."""
    for mode in modes:
        try:
            fit_to_mode(text, get_mode(mode).base_size, default_style(mode))
        except ValueError:
            return False
    return True


def cut_passages(
    docs: list[str], lo: int, hi: int, n: int, rng: random.Random, modes: list[str]
) -> list[str]:
    """Up to n passages of lo <= V3 tokens < hi: runs of whole lines from seeded starts.

    Lines are added until the count reaches lo; a run that overshoots hi is retried elsewhere.
    Passages with characters no shipped font has, or that fit on no single page at 6 px, are
    skipped (this leans the sample towards prose, like Fox's document pages).
    """
    out: list[str] = []
    order = list(range(len(docs)))
    rng.shuffle(order)
    for attempt in range(40 * n + 80):
        if len(out) >= n:
            break
        lines = [ln for ln in docs[order[attempt % len(order)]].split("\n") if ln.strip()]
        if not lines:
            continue
        start = rng.randrange(len(lines))
        text, count = "", 0
        for ln in lines[start:]:
            text += ln + "\n"
            count = count_text_tokens(text)
            if count >= lo:
                break
        if (
            lo <= count < hi
            and text not in out
            and not missing_chars(text)
            and fits_one_page(text, modes)
        ):
            out.append(text)
    return out


def scramble(text: str, rng: random.Random) -> str:
    """Words shuffled within each line (line lengths and the word multiset are kept)."""
    lines = []
    for ln in text.split("\n"):
        w = ln.split()
        rng.shuffle(w)
        lines.append(" ".join(w))
    return "\n".join(lines)


def long_text(docs: list[str], target: int, rng: random.Random) -> str:
    """Whole lines of English documents (seeded order) until ~target V3 tokens."""
    order = list(range(len(docs)))
    rng.shuffle(order)
    parts: list[str] = []
    total = 0
    for i in order:
        for ln in docs[i].split("\n"):
            if not ln.strip() or missing_chars(ln):
                continue
            t = count_text_tokens(ln + "\n")
            if total + t > target:
                return "".join(parts)
            parts.append(ln + "\n")
            total += t
    return "".join(parts)


# --------------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------------


def max_new_for(ocr, text: str, mode, fixed: int | None) -> int:
    """``fixed``, else 1.2x the reference in the model's tokens + 32, within its positions."""
    if fixed:
        return fixed
    return readback_budget(ocr.tokenizer, text, ocr.model.config.language.max_position_embeddings)


def read_page(ocr, text: str, mode: str, args) -> dict:
    m = compress(text, mode, fit_one_page=True)
    row = {
        "mode": mode,
        "text_tokens": m.stats.text_tokens,
        "vision_tokens": m.stats.vision_tokens,
        "ratio": m.stats.ratio,
        "pages": len(m.entries),
        "font_size": m.style.font_size,
    }
    if len(m.entries) != 1:
        return {**row, "skipped": "does not fit on one page at 6 px"}
    t0 = time.perf_counter()
    pred = ocr.generate(
        m.pages[0].image.convert("RGB"),
        PROMPTS["free"],
        mode=mode,
        max_new_tokens=max_new_for(ocr, text, mode, args.max_new_tokens),
    )
    fox = fox_scores(pred, text)
    return {
        **row,
        "precision": fox["precision"],
        "recall": fox["recall"],
        "multiset_precision": word_precision(pred, text),
        "seconds": time.perf_counter() - t0,
        "prediction_head": pred[:200],
    }


def mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------


def fmt(x, spec=".1f", scale=1.0, suffix=""):
    return "—" if x is None else f"{x * scale:{spec}}{suffix}"


def write_plot(path: Path, buckets: list[dict], modes: list[str]) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot written"
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    colours = {"tiny": "tab:blue", "small": "tab:orange"}
    for mode in modes:
        c = colours.get(mode)
        if mode in PAPER_COLUMNS:
            pi, ci = PAPER_COLUMNS[mode]
            ax.plot(
                [r[ci] for r in PAPER_TABLE2],
                [r[pi] for r in PAPER_TABLE2],
                "--o",
                color=c,
                alpha=0.5,
                label=f"paper, {mode} ({get_mode(mode).paper_tokens} tokens)",
            )
        pts = [
            (b["modes"][mode]["ratio"], 100 * b["modes"][mode]["precision"])
            for b in buckets
            if b["modes"][mode]["precision"] is not None
        ]
        if pts:
            ax.plot(*zip(*pts), "-s", color=c, label=f"dsocr, {mode}")
    ax.set_xlabel("compression (text tokens / vision tokens)")
    ax.set_ylabel("word precision (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


def render_markdown(res: dict) -> str:
    modes = res["modes"]
    out = [
        "# Vision-text compression (paper Table 2 protocol)",
        "",
        f"Generated by `python bench/compression.py {' '.join(res['argv'])}` on "
        f"{res['date']} ({res['machine']}).",
        "",
    ]
    if res["smoke"]:
        out += [
            "> **Smoke run**: random or untrained weights with a tiny decode budget. The numbers "
            "below only show that the pipeline runs; they say nothing about the model.",
            "",
        ]
    out += [
        note_block("read-first"),
        "",
        f"- Model: `{res['model']}` ({res['config']}), device {res['device']}.",
        f"- Text: English passages of {res.get('corpus_identity', res['corpus'])} (held-out "
        "documents), cut at line "
        "boundaries into buckets by DeepSeek-V3 token count; paper: Fox English pages.",
        "- Each passage is one square page at the largest font that fits (min 6 px), read with "
        "`<image>\\nFree OCR.`; greedy decoding, max new tokens "
        f"{res['max_new_tokens'] or '1.2x the reference + 32'}.",
        f"- Precision: {METRIC}, mean over pages; recall beside it. Compression: text tokens / "
        "grid vision tokens (64 Tiny, 100 Small), the paper's denominator. The long-input check "
        "uses `decompress`'s stricter word multiset precision.",
        "",
        "## Precision and compression per bucket",
        "",
    ]
    head = ["Text tokens", "Pages"]
    for m in modes:
        tok = get_mode(m).paper_tokens or m
        if m in PAPER_COLUMNS:
            head += [f"Paper P@{tok}", f"P@{tok}", f"Paper C@{tok}", f"C@{tok}", f"R@{tok}"]
        else:
            head += [f"P@{m}", f"C@{m}", f"R@{m}"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b, paper in zip(res["buckets"], PAPER_TABLE2):
        row = [f"{b['lo']}–{b['hi']}", f"{b['pages']} (paper {paper[6]})"]
        for m in modes:
            s = b["modes"][m]
            ours = [
                fmt(s["precision"], scale=100, suffix="%"),
                fmt(s["ratio"], suffix="×"),
                fmt(s["recall"], scale=100, suffix="%"),
            ]
            if m in PAPER_COLUMNS:
                pi, ci = PAPER_COLUMNS[m]
                row += [f"{paper[pi]}%", ours[0], f"{paper[ci]}×", ours[1], ours[2]]
            else:
                row += ours
        out.append("| " + " | ".join(row) + " |")
    out += ["", "P precision, C compression, R recall (ours only; the paper reports none).", ""]
    if res.get("plot"):
        out += [f"![precision vs compression]({res['plot']})", ""]
    if res.get("plot_note"):
        out += [f"Plot: {res['plot_note']}.", ""]
    out += [
        "## Stress: scrambled word order",
        "",
        "The same passages with words shuffled within each line. A drop means the model leans on "
        "its language prior rather than the pixels.",
        "",
        "| Mode | Pages | Precision (original) | Precision (scrambled) |",
        "|---|---|---|---|",
    ]
    for m, s in res["scrambled"].items():
        out.append(
            f"| {m} | {s['pages']} | {fmt(s['original'], scale=100, suffix='%')} | "
            f"{fmt(s['scrambled'], scale=100, suffix='%')} |"
        )
    out += [
        "",
        "## Stress: long inputs over several pages",
        "",
        "Paginated at the median font size of that mode's Table 2 pages, decoded page by page and "
        "joined (`dsocr.compress.decompress`).",
        "",
        "| Mode | Text tokens | Pages | Font px | Compression | Precision | Recall | Seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["long"]:
        out.append(
            f"| {r['mode']} | {r['text_tokens']} | {r['pages']} | {r['font_size']} | "
            f"{fmt(r['ratio'], suffix='×')} | {fmt(r['precision'], scale=100, suffix='%')} | "
            f"{fmt(r['recall'], scale=100, suffix='%')} | {r['seconds']:.1f} |"
        )
    if res["skipped"]:
        out += ["", f"Skipped (did not fit one page): {res['skipped']} page(s)."]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def run(args, argv: list[str]) -> dict:
    rng = random.Random(args.seed)
    docs = english_docs(Path(args.corpus))
    ocr = load_model(args.model, device=args.device)
    modes = args.modes
    res = {
        "argv": argv,
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, torch {torch.__version__}",
        "model": args.model,
        "config": ocr.model.config.name,
        "device": str(ocr.model.device),
        "corpus_identity": corpus_identity(args.corpus, ROOT),
        "corpus": str(Path(args.corpus).relative_to(ROOT))
        if Path(args.corpus).resolve().is_relative_to(ROOT)
        else args.corpus,
        "modes": modes,
        "max_new_tokens": args.max_new_tokens,
        "smoke": ocr.model.config.name == "tiny" or 0 < (args.max_new_tokens or 64) < 64,
        "buckets": [],
        "pages": [],
        "skipped": 0,
    }
    passages_all = []
    for lo, hi, *_ in PAPER_TABLE2:
        passages = cut_passages(docs, lo, hi, args.pages_per_bucket, rng, modes)
        passages_all += passages
        bucket = {"lo": lo, "hi": hi, "pages": len(passages), "modes": {}}
        for mode in modes:
            rows = [read_page(ocr, p, mode, args) for p in passages]
            for r in rows:
                r.update(lo=lo, hi=hi)
            res["pages"] += rows
            done = [r for r in rows if "skipped" not in r]
            res["skipped"] += len(rows) - len(done)
            bucket["modes"][mode] = {
                "precision": mean(r["precision"] for r in done),
                "recall": mean(r["recall"] for r in done),
                "ratio": mean(r["ratio"] for r in done),
            }
        res["buckets"].append(bucket)
        print(f"{lo}-{hi}: {len(passages)} passages {bucket['modes']}", file=sys.stderr)

    # stress 1: scrambled word order on (up to) --scrambled passages spread over the buckets
    picked = passages_all[:: max(1, len(passages_all) // max(1, args.scrambled))][: args.scrambled]
    res["scrambled"] = {}
    for mode in modes:
        orig = [read_page(ocr, p, mode, args) for p in picked]
        scr = [read_page(ocr, scramble(p, rng), mode, args) for p in picked]
        res["scrambled"][mode] = {
            "pages": len(picked),
            "original": mean(r.get("precision") for r in orig),
            "scrambled": mean(r.get("precision") for r in scr),
        }

    # stress 2: long inputs paginated at the Table 2 density of each mode
    res["long"] = []
    for target in args.long_tokens:
        text = long_text(docs, target, rng)
        for mode in modes:
            sizes = [r["font_size"] for r in res["pages"] if r["mode"] == mode]
            font = args.long_font_size or (round(statistics.median(sizes)) if sizes else 8)
            style = dataclasses.replace(default_style(mode), font_size=font)
            m = compress(text, mode, style)
            t0 = time.perf_counter()
            got = decompress(m, ocr, source=text, max_new_tokens=args.max_new_tokens)
            res["long"].append(
                {
                    "mode": mode,
                    "text_tokens": m.stats.text_tokens,
                    "pages": len(m.entries),
                    "font_size": font,
                    "ratio": m.stats.ratio,
                    "precision": got.precision,
                    "recall": got.recall,
                    "seconds": time.perf_counter() - t0,
                }
            )
            print(f"long {target}: {res['long'][-1]}", file=sys.stderr)
    return res


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        default="dsocr-mini",
        help="checkpoint folder, bundled model or "
        "variant name ('tiny': random weights, for a smoke run)",
    )
    p.add_argument("--device", default=None)
    p.add_argument("--corpus", default=str(CORPUS))
    p.add_argument("--modes", type=lambda s: s.split(","), default=["tiny", "small"])
    p.add_argument("--pages-per-bucket", type=int, default=10)
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="fixed decode budget per page (default: 1.2x the reference + 32)",
    )
    p.add_argument("--scrambled", type=int, default=7, help="passages for the scrambled check")
    p.add_argument(
        "--long-tokens", type=lambda s: [int(x) for x in s.split(",")], default=[2000, 5000, 10000]
    )
    p.add_argument(
        "--long-font-size",
        type=int,
        default=None,
        help="font px for the long inputs (default: median fitted size of the mode)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "compression.md"))
    args = p.parse_args(argv)
    for m in args.modes:
        get_mode(m)
    res = run(args, argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot = out.with_suffix(".png")
    note = write_plot(plot, res["buckets"], args.modes)
    res["plot"], res["plot_note"] = (None, note) if note else (plot.name, None)
    save_report(out, render_markdown(res))
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    print(
        f"wrote {out}" + ("" if note else f", {plot.name}") + f", {out.with_suffix('.json').name}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
