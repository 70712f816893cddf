"""Run OCR peers over evaluation pages and write a Markdown report.

    from dsocr.eval.datasets import load_pages
    from dsocr.eval.peers import make_peers
    from dsocr.eval.run import evaluate, write_report
    pages = load_pages("data/eval/rendered-en") + load_pages("data/eval/pdf-debref-en")
    rows = evaluate(make_peers("tesseract,rapidocr"), pages)
    write_report(rows, "docs/benchmarks/eval.md", command="dsocr eval ...")

One row per (peer, mode, dataset): page count, mean valid vision tokens per page (dsocr peers),
mean CER, WER, Fox precision, OmniDocBench text edit (all per page, then averaged over pages) and
mean wall seconds per page. A peer that is not available gets a row with ``skipped`` set and no
numbers. The report states where each dsocr mode stands against the other peers, and plots
accuracy against vision tokens per page (the paper's Figure 1) and against seconds per page.
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
from dsocr.fileio import note_block, save_report

METRICS = ("cer", "wer", "fox_precision", "text_edit")


@dataclass
class ReportRow:
    peer: str
    dataset: str
    mode: str = ""  # dsocr resolution mode; "" for classic OCR peers
    vision_tokens: float = math.nan  # mean valid vision tokens per page (dsocr peers only)
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
            mode = getattr(peer, "mode", "")
            row = ReportRow(peer.name, d, mode=getattr(mode, "name", mode))
            count = getattr(peer, "vision_tokens", None)
            for page in (p for p in pages if p.dataset == d):
                image = page.load_image()
                t0 = time.perf_counter()
                pred = peer.ocr(image)
                dt = time.perf_counter() - t0
                rec = {"id": page.id, "seconds": dt, **score(pred, page.text)}
                if count is not None:
                    rec["vision_tokens"] = count(image)
                row.per_page.append(rec)
                if progress:
                    progress(peer.name, page.id, dt)
            row.pages = len(row.per_page)
            if row.pages:
                for m in METRICS + ("seconds",):
                    val = sum(r[m] for r in row.per_page) / row.pages
                    setattr(row, "s_per_page" if m == "seconds" else m, val)
                if count is not None:
                    row.vision_tokens = sum(r["vision_tokens"] for r in row.per_page) / row.pages
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


def run_info(command: str) -> dict[str, str]:
    """The command, machine and UTC date a report names (stored in its JSON, re-rendered later)."""
    import torch

    return {
        "command": command,
        "machine": f"{machine_description()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def header_lines(info: dict[str, str]) -> list[str]:
    """Markdown bullets for :func:`run_info`."""
    command = f"`{info['command']}`" if info.get("command") else "(library call)"
    return [
        f"- Command: {command}",
        f"- Machine: {info['machine']}",
        f"- Date: {info['date']}",
    ]


def _fmt(x: float, digits: int = 4) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def report_markdown(rows: list[ReportRow], command: str = "", notes: str = "") -> str:
    lines = [
        "# dsocr eval report",
        "",
        *header_lines(run_info(command)),
        "",
        "CER: character error rate after whitespace normalisation (lower is better). WER: word "
        "error rate. Fox precision: Fox-benchmark token precision (higher is better). Text edit: "
        "OmniDocBench normalised edit distance (lower is better). s/page: mean wall seconds.",
        "",
        "Vision tokens: valid vision tokens per page in that mode (dsocr only).",
    ]
    for d in dict.fromkeys(r.dataset for r in rows):
        lines += [
            "",
            f"### {d}",
            "",
            "| peer | mode | vision tokens | pages | CER | WER | Fox precision | text edit | s/page |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in (r for r in rows if r.dataset == d):
            head = f"| {r.peer} | {r.mode or '—'} | {_fmt(r.vision_tokens, 0)}"
            if r.skipped:
                lines.append(f"{head} | 0 | skipped: {r.skipped} | | | | |")
                continue
            lines.append(
                f"{head} | {r.pages} | {_fmt(r.cer)} | {_fmt(r.wer)} | "
                f"{_fmt(r.fox_precision)} | {_fmt(r.text_edit)} | {_fmt(r.s_per_page, 2)} |"
            )
    standing = standing_lines(rows)
    if standing:
        lines += ["", "## Where dsocr stands", "", *standing]
    lines += ["", note_block("notes", notes.strip() + "\n" if notes.strip() else "")]
    return "\n".join(lines) + "\n"


def standing_lines(rows: list[ReportRow], goal_tokens: int = 256) -> list[str]:
    """One Markdown bullet per (dataset, dsocr mode): its CER beside every classic peer's, and
    whether it beats all of them (the issue's goal: at ``goal_tokens`` vision tokens or fewer)."""
    done = [r for r in rows if not r.skipped and r.pages]
    out = []
    for r in sorted((r for r in done if r.mode), key=lambda r: r.dataset):  # stable sort
        others = [p for p in done if not p.mode and p.dataset == r.dataset]
        if not others:
            continue
        versus = ", ".join(
            f"{p.peer} {p.cer:.4f} ({'dsocr better' if r.cer < p.cer else 'dsocr worse'})"
            for p in others
        )
        beats = all(r.cer < p.cer for p in others)
        within = r.vision_tokens <= goal_tokens
        verdict = "beats every peer" if beats else "does not beat every peer"
        budget = f"within {goal_tokens} vision tokens" if within else f"above {goal_tokens} tokens"
        out.append(
            f"- {r.dataset}, {r.peer} in {r.mode} ({r.vision_tokens:.0f} vision tokens, {budget}):"
            f" CER {r.cer:.4f} against {versus}; it {verdict} on CER."
        )
    return out


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_tokens(rows: list[ReportRow], path: str | os.PathLike) -> Path | None:
    """Accuracy (1 - CER) vs vision tokens per page, one line per dsocr peer and dataset over its
    modes, classic peers as dashed levels (they have no vision tokens); None without matplotlib."""
    plt = _pyplot()
    done = [r for r in rows if not r.skipped and r.pages]
    if plt is None or not any(r.mode for r in done):
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    datasets = list(dict.fromkeys(r.dataset for r in done))
    colors = {d: f"C{i}" for i, d in enumerate(datasets)}
    for key in dict.fromkeys((r.peer, r.dataset) for r in done if r.mode):
        pts = sorted(
            (r.vision_tokens, 1 - r.cer, r.mode) for r in done if (r.peer, r.dataset) == key
        )
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            "o-",
            color=colors[key[1]],
            label=f"{key[0]} / {key[1]}",
        )
        for x, y, m in pts:
            ax.annotate(m, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    styles = ["--", ":", "-."]
    for i, peer in enumerate(dict.fromkeys(r.peer for r in done if not r.mode)):
        for r in (r for r in done if r.peer == peer):
            ax.axhline(
                1 - r.cer,
                color=colors[r.dataset],
                ls=styles[i % 3],
                lw=1,
                label=f"{peer} / {r.dataset} (no vision tokens)",
            )
    ax.set_xscale("log")
    ax.set_xlabel("vision tokens per page (log)")
    ax.set_ylabel("character accuracy (1 - CER)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot(rows: list[ReportRow], path: str | os.PathLike) -> Path | None:
    """Accuracy (1 - CER) vs seconds/page; None when matplotlib is not importable."""
    plt = _pyplot()
    if plt is None:
        return None
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r.skipped or not r.pages:
            continue
        label = f"{r.peer} {r.mode} / {r.dataset}" if r.mode else f"{r.peer} / {r.dataset}"
        ax.scatter(r.s_per_page, 1 - r.cer)
        ax.annotate(label, (r.s_per_page, 1 - r.cer), fontsize=7)
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
    """Write the Markdown report (and ``<stem>.png`` beside it when matplotlib is present),
    keeping what was written by hand into the notes slot of the report it replaces."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    md = report_markdown(rows, command, notes)
    png = plot_tokens(rows, path.with_name(path.stem + "_tokens.png"))
    if png is not None:
        md += f"\n![accuracy vs vision tokens per page]({png.name})\n"
    png = plot(rows, path.with_suffix(".png"))
    if png is not None:
        md += f"\n![accuracy vs seconds per page]({png.name})\n"
    return save_report(path, md)


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
    ap.add_argument(
        "--mode", default="base", help="resolution mode, or a comma list (tiny,small,base)"
    )
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
        for mode in (m.strip() for m in args.mode.split(",") if m.strip()):
            name = f"dsocr:{args.model}"
            peers.append(DsocrPeer(ocr, mode, args.prompt, args.max_new_tokens, name=name))
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
