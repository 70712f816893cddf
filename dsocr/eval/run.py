"""Run OCR peers over evaluation pages and write a Markdown report.

    from dsocr.eval.datasets import load_pages
    from dsocr.eval.peers import make_peers
    from dsocr.eval.run import evaluate, write_report
    pages = load_pages("data/eval/rendered-en") + load_pages("data/eval/pdf-debref-en")
    rows = evaluate(make_peers("tesseract,rapidocr"), pages)
    write_report(rows, "docs/benchmarks/eval.md", command="dsocr eval ...")

One row per (peer, dataset): page count, mean CER, WER, Fox precision, OmniDocBench text edit
(all per page, then averaged over pages) and mean wall seconds per page. A peer that is not
available gets a row with ``skipped`` set and no numbers.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dsocr.eval.metrics import cer, fox_precision, omnidoc_text_edit, wer

METRICS = ("cer", "wer", "fox_precision", "text_edit")


@dataclass
class ReportRow:
    peer: str
    dataset: str
    pages: int = 0
    cer: float = math.nan
    wer: float = math.nan
    fox_precision: float = math.nan
    text_edit: float = math.nan
    s_per_page: float = math.nan
    skipped: str = ""
    per_page: list[dict] = field(default_factory=list, repr=False)


def score(pred: str, gt: str) -> dict[str, float]:
    """All page metrics for one prediction (whitespace-normalised CER)."""
    return {
        "cer": cer(pred, gt, normalize_whitespace=True),
        "wer": wer(pred, gt),
        "fox_precision": fox_precision(pred, gt),
        "text_edit": omnidoc_text_edit(pred, gt),
    }


def evaluate(peers, pages, progress=None) -> list[ReportRow]:
    """Every available peer on every page -> one :class:`ReportRow` per (peer, dataset).

    ``progress(peer_name, page_id, seconds)`` is called after each page when given. Engine
    set-up (``available()``) is outside the timed region; the first page includes any lazy
    warm-up an engine does on its first call.
    """
    datasets = list(dict.fromkeys(p.dataset for p in pages))
    rows: list[ReportRow] = []
    for peer in peers:
        ok, why = peer.available()
        if not ok:
            rows += [ReportRow(peer.name, d, skipped=why) for d in datasets]
            continue
        for d in datasets:
            row = ReportRow(peer.name, d)
            for page in (p for p in pages if p.dataset == d):
                image = page.load_image()
                t0 = time.perf_counter()
                pred = peer.ocr(image)
                dt = time.perf_counter() - t0
                row.per_page.append({"id": page.id, "seconds": dt, **score(pred, page.text)})
                if progress:
                    progress(peer.name, page.id, dt)
            row.pages = len(row.per_page)
            if row.pages:
                for m in METRICS + ("seconds",):
                    val = sum(r[m] for r in row.per_page) / row.pages
                    setattr(row, "s_per_page" if m == "seconds" else m, val)
            rows.append(row)
    return rows


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    desc = f"{cpu}, {n} usable CPU cores, {platform.system()} {platform.release()}"
    try:
        import torch

        if torch.cuda.is_available():
            desc += f", GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return desc


def _fmt(x: float, digits: int = 4) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def report_markdown(rows: list[ReportRow], command: str = "", notes: str = "") -> str:
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# dsocr eval report",
        "",
        f"- Command: `{command}`" if command else "- Command: (library call)",
        f"- Machine: {machine_description()}",
        f"- Date: {now}",
        "",
        "CER: character error rate after whitespace normalisation (lower is better). WER: word "
        "error rate. Fox precision: Fox-benchmark token precision (higher is better). Text edit: "
        "OmniDocBench normalised edit distance (lower is better). s/page: mean wall seconds.",
        "",
        "| peer | dataset | pages | CER | WER | Fox precision | text edit | s/page |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.skipped:
            lines.append(f"| {r.peer} | {r.dataset} | 0 | skipped: {r.skipped} | | | | |")
            continue
        lines.append(
            f"| {r.peer} | {r.dataset} | {r.pages} | {_fmt(r.cer)} | {_fmt(r.wer)} | "
            f"{_fmt(r.fox_precision)} | {_fmt(r.text_edit)} | {_fmt(r.s_per_page, 2)} |"
        )
    if notes:
        lines += ["", notes.strip()]
    return "\n".join(lines) + "\n"


def plot(rows: list[ReportRow], path: str | os.PathLike) -> Path | None:
    """Accuracy (1 - CER) vs seconds/page; None when matplotlib is not importable."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r.skipped or not r.pages:
            continue
        ax.scatter(r.s_per_page, 1 - r.cer)
        ax.annotate(f"{r.peer} / {r.dataset}", (r.s_per_page, 1 - r.cer), fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("seconds per page (log)")
    ax.set_ylabel("character accuracy (1 - CER)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_report(
    rows: list[ReportRow], path: str | os.PathLike, command: str = "", notes: str = ""
) -> Path:
    """Write the Markdown report (and ``<stem>.png`` beside it when matplotlib is present)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    md = report_markdown(rows, command, notes)
    png = plot(rows, path.with_suffix(".png"))
    if png is not None:
        md += f"\n![accuracy vs seconds per page]({png.name})\n"
    path.write_text(md, encoding="utf-8")
    return path


def rows_as_dicts(rows: list[ReportRow], per_page: bool = False) -> list[dict]:
    out = []
    for r in rows:
        d = asdict(r)
        if not per_page:
            d.pop("per_page")
        out.append(d)
    return out


def add_arguments(ap) -> None:
    """The ``dsocr eval`` options, for cli.py to attach to its subparser."""
    ap.add_argument(
        "--dataset",
        action="append",
        required=True,
        help="page-set folder or manifest.jsonl (repeatable); build with scripts/build_eval_sets.py",
    )
    ap.add_argument("--model", default=None, help="dsocr model to evaluate (omit: peers only)")
    ap.add_argument("--mode", default="base")
    ap.add_argument("--prompt", default="<image>\nFree OCR.")
    ap.add_argument("--max-new-tokens", type=int, default=2048)
    ap.add_argument("--device", default=None)
    ap.add_argument("--peers", default="", help="comma list: tesseract,rapidocr")
    ap.add_argument("--limit", type=int, default=None, help="first N pages of each dataset")
    ap.add_argument("-o", "--output", default="eval.md", help="Markdown report path")
    ap.add_argument("--json", default=None, help="also write rows with per-page scores as JSON")


def run_from_args(args, argv_for_report: str = "") -> int:
    import json
    import sys

    from dsocr.eval.datasets import load_pages
    from dsocr.eval.peers import DsocrPeer, make_peers

    pages = [p for d in args.dataset for p in load_pages(d, limit=args.limit)]
    peers = []
    if args.model:
        from dsocr.api import load_model

        ocr = load_model(args.model, device=args.device)
        peers.append(
            DsocrPeer(ocr, args.mode, args.prompt, args.max_new_tokens, name=f"dsocr:{args.model}")
        )
    peers += make_peers(args.peers) if args.peers else []
    if not peers:
        print("dsocr eval: nothing to run: give --model and/or --peers", file=sys.stderr)
        return 2

    def progress(peer, page_id, dt):
        print(f"{peer} {page_id} {dt:.2f}s", file=sys.stderr)

    rows = evaluate(peers, pages, progress=progress)
    path = write_report(rows, args.output, command=argv_for_report)
    if args.json:
        Path(args.json).write_text(json.dumps(rows_as_dicts(rows, per_page=True), indent=1))
    print(report_markdown(rows, argv_for_report))
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    """``python -m dsocr.eval.run --dataset data/eval/rendered-en --peers tesseract``."""
    import argparse
    import shlex
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="dsocr eval", description="OCR accuracy and speed report")
    add_arguments(ap)
    return run_from_args(ap.parse_args(argv), "dsocr eval " + shlex.join(argv))


if __name__ == "__main__":
    raise SystemExit(main())
