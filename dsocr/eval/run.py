"""Run OCR peers over evaluation pages and write a Markdown report.

    from dsocr.eval.datasets import load_pages
    from dsocr.eval.peers import make_peers
    from dsocr.eval.run import evaluate, write_report
    pages = load_pages("data/eval/rendered-en") + load_pages("data/eval/pdf-debref-en")
    rows = evaluate(make_peers("tesseract,rapidocr"), pages)
    info = run_info("dsocr eval ...")
    write_report(rows, "docs/benchmarks/eval.md", info=info)
    write_json(rows, "docs/benchmarks/eval.json", info)

One row per (peer, mode, dataset): page count, mean valid vision tokens per page (dsocr peers),
mean CER, WER, Fox precision, OmniDocBench text edit (all per page, then averaged over pages) and
mean wall seconds per page. A peer that is not available gets a row with ``skipped`` set and no
numbers. The report states where each dsocr mode stands against Tesseract and RapidOCR (a peer
that was not run is named, never passed over), and plots accuracy against vision tokens per page
(the paper's Figure 1) and against seconds per page. Report, JSON and plots are written
atomically; the JSON carries the same command, machine and date as the report.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import re
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dsocr.eval.metrics import cer, fox_precision, omnidoc_text_edit, table_teds, wer
from dsocr.fileio import atomic_write_text, atomic_write_with, note_block, save_report

# The classic peers the goal names: dsocr's standing is stated against both, and a
# missing one is said to be missing.
REQUIRED_PEERS = ("tesseract", "rapidocr")

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
    table_teds: float = math.nan  # mean over the pages whose ground truth has a table
    table_pages: int = 0
    s_per_page: float = math.nan
    skipped: str = ""
    per_page: list[dict] = field(default_factory=list, repr=False)


def score(pred: str, gt: str) -> dict[str, float]:
    """All page metrics for one prediction (whitespace-normalised CER); ``table_teds`` only
    when the ground truth has a table."""
    out = {
        "cer": cer(pred, gt, normalize_whitespace=True),
        "wer": wer(pred, gt),
        "fox_precision": fox_precision(pred, gt),
        "text_edit": omnidoc_text_edit(pred, gt),
    }
    tables = table_teds(pred, gt)
    if not math.isnan(tables):
        out["table_teds"] = tables
    return out


def evaluate(peers, pages, progress=None) -> list[ReportRow]:
    """Every available peer on every page -> one :class:`ReportRow` per (peer, dataset).

    ``progress(peer_name, page_id, seconds)`` is called after each page when given. Engine
    set-up (``available()``) is outside the timed region; the first page includes any lazy
    warm-up an engine does on its first call.
    """
    datasets = list(dict.fromkeys(p.dataset for p in pages))
    langs = {d: next((p.lang for p in pages if p.dataset == d), "") for d in datasets}
    rows: list[ReportRow] = []
    for peer in peers:
        ok, why = peer.available()
        if not ok:
            rows += [ReportRow(peer.name, d, skipped=why) for d in datasets]
            continue
        for d in datasets:
            mode = getattr(peer, "mode", "")
            use_language = getattr(peer, "use_language", None)
            if use_language is not None:
                ok, why = use_language(langs[d])
                if not ok:
                    rows.append(ReportRow(peer.name, d, skipped=why))
                    continue
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
                tables = [r["table_teds"] for r in row.per_page if "table_teds" in r]
                row.table_pages = len(tables)
                if tables:
                    row.table_teds = sum(tables) / len(tables)
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
    """The command, machine and UTC date a report names; one call per run feeds the Markdown
    report, its stdout copy and the JSON (:func:`write_json`), so all three agree."""
    import torch

    return {
        "command": command,
        "machine": f"{machine_description()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def command_line(prefix: str, argv) -> str:
    """The command as a shell would need it typed: ``prefix`` + shell-quoted ``argv``."""
    return " ".join([prefix, shlex.join(list(argv))]) if argv else prefix


def _command_markdown(command: str) -> list[str]:
    """A command as Markdown: an inline code span when it is one line without backticks, else
    a fenced block (fence longer than any backtick run inside) that keeps newlines."""
    if "\n" not in command and "\r" not in command and "`" not in command:
        return [f"- Command: `{command}`"]
    fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", command)), default=0))
    return ["- Command:", "", f"{fence}sh", *command.splitlines(), fence, ""]


def header_lines(info: dict[str, str]) -> list[str]:
    """Markdown bullets for :func:`run_info`."""
    command = (
        _command_markdown(info["command"]) if info.get("command") else ["- Command: (library call)"]
    )
    return [
        *command,
        f"- Machine: {info['machine']}",
        f"- Date: {info['date']}",
    ]


def _fmt(x: float, digits: int = 4) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def report_markdown(
    rows: list[ReportRow], command: str = "", notes: str = "", info: dict | None = None
) -> str:
    """The report text; ``info`` is a :func:`run_info` (made from ``command`` when None)."""
    lines = [
        "# dsocr eval report",
        "",
        *header_lines(info if info is not None else run_info(command)),
        "",
        "CER: character error rate after whitespace normalisation (lower is better). WER: word "
        "error rate. Fox precision: Fox-benchmark token precision (higher is better). Text edit: "
        "OmniDocBench normalised edit distance (lower is better). s/page: mean wall seconds.",
        "",
        "Vision tokens: valid vision tokens per page in that mode (dsocr only).",
    ]
    if any(r.table_pages for r in rows):
        lines += [
            "",
            "Table TEDS (sets with tables): tree-edit similarity of each ground-truth table (pipe "
            "or HTML) with the prediction's best-matching table, 0 when it has none, averaged "
            "over the pages that have a table (higher is better).",
        ]
    for d in dict.fromkeys(r.dataset for r in rows):
        with_tables = any(r.table_pages for r in rows if r.dataset == d)
        extra = (" table TEDS |", "---:|") if with_tables else ("", "")
        lines += [
            "",
            f"### {d}",
            "",
            "| peer | mode | vision tokens | pages | CER | WER | Fox precision | text edit |"
            f"{extra[0]} s/page |",
            f"|---|---|---:|---:|---:|---:|---:|---:|{extra[1]}---:|",
        ]
        for r in (r for r in rows if r.dataset == d):
            head = f"| {r.peer} | {r.mode or '—'} | {_fmt(r.vision_tokens, 0)}"
            if r.skipped:
                lines.append(f"{head} | 0 | skipped: {r.skipped} | | | | |{' |' * with_tables}")
                continue
            n = f"{r.table_pages} page{'s' * (r.table_pages != 1)}"
            tables = f" {_fmt(r.table_teds)} ({n}) |" if with_tables else ""
            lines.append(
                f"{head} | {r.pages} | {_fmt(r.cer)} | {_fmt(r.wer)} | "
                f"{_fmt(r.fox_precision)} | {_fmt(r.text_edit)} |{tables} {_fmt(r.s_per_page, 2)} |"
            )
    standing = standing_lines(rows)
    if standing:
        lines += ["", "## Where dsocr stands", "", *standing]
    lines += ["", note_block("notes", notes.strip() + "\n" if notes.strip() else "")]
    return "\n".join(lines) + "\n"


def _compare(a: float, b: float) -> int:
    """-1, 0, 1 as ``a`` is lower than, equal to or higher than ``b`` at the report's 4 digits."""
    fa, fb = f"{a:.4f}", f"{b:.4f}"
    return 0 if fa == fb else (-1 if a < b else 1)


def standing_lines(
    rows: list[ReportRow], goal_tokens: int = 256, required=REQUIRED_PEERS
) -> list[str]:
    """One Markdown bullet per (dataset, dsocr mode): its CER beside every classic peer's, and
    whether it beats all of them (the issue's goal: at ``goal_tokens`` vision tokens or fewer).

    CERs equal at the report's four digits are a tie. "beats every peer" is said only when every
    ``required`` peer ran on that set and dsocr's CER is lower than each; a required peer that
    did not run (not asked for, or unavailable) is named, and the verdict says it is missing."""
    done = [r for r in rows if not r.skipped and r.pages]
    out = []
    for r in sorted((r for r in done if r.mode), key=lambda r: r.dataset):  # stable sort
        others = [p for p in done if not p.mode and p.dataset == r.dataset]
        ran = {p.peer for p in others}
        missing = []
        for name in required:
            if name in ran:
                continue
            why = next((p.skipped for p in rows if p.peer == name and p.dataset == r.dataset), "")
            missing.append(f"{name} ({why})" if why else f"{name} (not run)")
        words = {-1: "dsocr better", 0: "tie", 1: "dsocr worse"}
        results = [_compare(r.cer, p.cer) for p in others]
        versus = ", ".join(f"{p.peer} {p.cer:.4f} ({words[c]})" for p, c in zip(others, results))
        within = r.vision_tokens <= goal_tokens
        budget = f"within {goal_tokens} vision tokens" if within else f"above {goal_tokens} tokens"
        if any(c > 0 for c in results):
            verdict = "it does not beat every peer on CER"
        elif any(c == 0 for c in results):
            tied = ", ".join(p.peer for p, c in zip(others, results) if c == 0)
            verdict = f"it ties {tied} on CER, so it does not beat every peer"
        elif missing:
            verdict = (
                f"it beats {', '.join(p.peer for p in others)} on CER, but not every required "
                "peer ran"
                if others
                else "no peer ran, so its standing is not known"
            )
        else:
            verdict = "it beats every peer on CER"
        against = f" against {versus}" if others else ""
        gap = f"; not run: {', '.join(missing)}" if missing else ""
        out.append(
            f"- {r.dataset}, {r.peer} in {r.mode} ({r.vision_tokens:.0f} vision tokens, {budget}):"
            f" CER {r.cer:.4f}{against}{gap}; {verdict}."
        )
    return out


def _accuracy(cer_value: float) -> tuple[float, bool]:
    """1 - CER for a plot, clipped at 0 (a CER above 1: more edits than reference characters);
    the flag says whether it was clipped."""
    acc = 1 - cer_value
    return (0.0, True) if acc < 0 else (acc, False)


def _save_figure(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    return path


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
    modes, classic peers as dashed levels (they have no vision tokens); None without matplotlib.
    A CER above 1 is drawn at accuracy 0, labelled with its CER, and the axis says so."""
    plt = _pyplot()
    done = [r for r in rows if not r.skipped and r.pages]
    if plt is None or not any(r.mode for r in done):
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    datasets = list(dict.fromkeys(r.dataset for r in done))
    colors = {d: f"C{i}" for i, d in enumerate(datasets)}
    clipped = False
    for key in dict.fromkeys((r.peer, r.dataset) for r in done if r.mode):
        pts = []
        for r in (r for r in done if (r.peer, r.dataset) == key):
            acc, cut = _accuracy(r.cer)
            clipped |= cut
            pts.append((r.vision_tokens, acc, r.mode + (f" (CER {r.cer:.2f})" if cut else "")))
        pts.sort()
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
            acc, cut = _accuracy(r.cer)
            clipped |= cut
            ax.axhline(
                acc,
                color=colors[r.dataset],
                ls=styles[i % 3],
                lw=1,
                label=f"{peer} / {r.dataset} (no vision tokens)",
            )
    ax.set_xscale("log")
    ax.set_xlabel("vision tokens per page (log)")
    ax.set_ylabel("character accuracy (1 - CER)" + (", clipped at 0" if clipped else ""))
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6, loc="center right")
    fig.tight_layout()
    try:
        return _save_figure(fig, path)
    finally:
        plt.close(fig)


def plot(rows: list[ReportRow], path: str | os.PathLike) -> Path | None:
    """Accuracy (1 - CER) vs seconds/page; None when matplotlib is not importable. A CER above 1
    is drawn at accuracy 0, labelled with its CER, and the axis says so."""
    plt = _pyplot()
    if plt is None:
        return None
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 4))
    clipped = False
    for r in rows:
        if r.skipped or not r.pages:
            continue
        label = f"{r.peer} {r.mode} / {r.dataset}" if r.mode else f"{r.peer} / {r.dataset}"
        acc, cut = _accuracy(r.cer)
        clipped |= cut
        if cut:
            label += f" (CER {r.cer:.2f})"
        ax.scatter(r.s_per_page, acc)
        ax.annotate(label, (r.s_per_page, acc), fontsize=7)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("seconds per page (log)")
    ax.set_ylabel("character accuracy (1 - CER)" + (", clipped at 0" if clipped else ""))
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    try:
        return _save_figure(fig, path)
    finally:
        plt.close(fig)


def write_report(
    rows: list[ReportRow],
    path: str | os.PathLike,
    command: str = "",
    notes: str = "",
    info: dict | None = None,
) -> Path:
    """Write the Markdown report (and ``<stem>.png`` beside it when matplotlib is present),
    keeping what was written by hand into the notes slot of the report it replaces."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    md = report_markdown(rows, command, notes, info)
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


def write_json(rows: list[ReportRow], path: str | os.PathLike, info: dict[str, str]) -> Path:
    """``{"command", "machine", "date", "rows": [... with per-page scores]}``, atomically
    (parent folders created)."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {**info, "rows": rows_as_dicts(rows, per_page=True)}
    atomic_write_text(path, json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    return path


def add_arguments(ap) -> None:
    """The ``dsocr eval`` options, for cli.py to attach to its subparser."""
    ap.add_argument(
        "--dataset",
        action="append",
        required=True,
        help="page-set folder or manifest.jsonl (repeatable); build with scripts/build_eval_sets.py",
    )
    ap.add_argument(
        "--model",
        default="dsocr-mini",
        help="dsocr model to evaluate: bundled name, checkpoint folder or variant (default "
        "dsocr-mini; 'none': peers only)",
    )
    ap.add_argument(
        "--mode",
        default=None,
        help="resolution mode, or a comma list (tiny,small,base); default: the model's own",
    )
    ap.add_argument(
        "--prompt",
        default="<image>\nFree OCR.",
        help="prompt for the dsocr model (default: Free OCR, the plain-text task)",
    )
    ap.add_argument(
        "--max-new-tokens", type=int, default=2048, help="decode budget per page (default 2048)"
    )
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda if any)")
    ap.add_argument(
        "--peers",
        default="",
        help="comma list of classic OCR peers: tesseract,rapidocr (default: none)",
    )
    ap.add_argument(
        "--tesseract-lang",
        default=None,
        help="Tesseract language for every set, e.g. deu+eng (default: from each manifest's lang)",
    )
    ap.add_argument("--limit", type=int, default=None, help="first N pages of each dataset")
    ap.add_argument(
        "-o",
        "--output",
        default="eval.md",
        help="Markdown report path (default eval.md; docs/benchmarks/eval.md in a checkout)",
    )
    ap.add_argument("--json", default=None, help="also write rows with per-page scores as JSON")


def _check_output(path: str, what: str) -> None:
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{what} {path}: is a folder")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{what} {path}: {parent} is not a folder")
            break


def check_args(args) -> list[str]:
    """Validate every option before anything slow happens; ValueError (one line) otherwise.
    Returns the resolution modes to run (empty with ``--model none``)."""
    from dsocr.configs import get_mode

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    _check_output(args.output, "-o")
    if args.json:
        _check_output(args.json, "--json")
        if Path(args.json).resolve() == Path(args.output).resolve():
            raise ValueError("--json and -o name the same file")
    if args.model is None or args.model.lower() == "none":
        if args.mode:
            raise ValueError("--mode needs a --model")
        return []
    from dsocr.api import model_defaults, resolve_model_source

    resolve_model_source(args.model)  # FileNotFoundError naming it
    spec = args.mode or model_defaults(args.model).get("mode", "base")
    modes = [m.strip() for m in spec.split(",") if m.strip()]
    if not modes:
        raise ValueError(f"--mode {spec!r}: no mode given")
    for m in modes:
        try:
            get_mode(m)
        except KeyError as e:
            raise ValueError(f"--mode: {e.args[0]}") from None
    if len(set(modes)) != len(modes):
        raise ValueError(f"--mode {spec!r}: a mode is named twice")
    return modes


def unavailable_required(rows: list[ReportRow], requested) -> list[str]:
    """``"<peer> on <set>: <why>"`` for each requested peer that did not run on a set."""
    return [
        f"{r.peer} on {r.dataset}: {r.skipped}" for r in rows if r.peer in requested and r.skipped
    ]


def run_from_args(args, argv_for_report: str = "") -> int:
    """``dsocr eval``: 0 when every requested peer ran, 3 when one was unavailable (the report
    is still written, naming it), 2 for bad options (ValueError, before any model loads)."""
    import sys

    from dsocr.eval.datasets import load_datasets
    from dsocr.eval.peers import DsocrPeer, make_peers

    modes = check_args(args)
    peers = make_peers(args.peers, tesseract_lang=args.tesseract_lang) if args.peers else []
    requested = {p.name for p in peers}
    if args.tesseract_lang and "tesseract" not in requested:
        raise ValueError("--tesseract-lang needs --peers tesseract")
    if not modes and not peers:
        raise ValueError("nothing to run: give --model and/or --peers")
    pages = load_datasets(args.dataset, limit=args.limit)
    if modes:
        from dsocr.api import load_model

        ocr = load_model(args.model, device=args.device)
        name = f"dsocr:{args.model}"
        dsocr_peers = [
            DsocrPeer(ocr, m, args.prompt, args.max_new_tokens, name=name) for m in modes
        ]
        peers = dsocr_peers + peers

    def progress(peer, page_id, dt):
        print(f"{peer} {page_id} {dt:.2f}s", file=sys.stderr)

    rows = evaluate(peers, pages, progress=progress)
    info = run_info(argv_for_report)
    path = write_report(rows, args.output, info=info)
    if args.json:
        write_json(rows, args.json, info)
    print(report_markdown(rows, info=info))
    print(f"wrote {path}")
    missing = unavailable_required(rows, requested)
    if missing:
        for m in missing:
            print(f"dsocr eval: peer not run: {m}", file=sys.stderr)
        return 3
    return 0


def main(argv=None) -> int:
    """``python -m dsocr.eval.run --dataset data/eval/rendered-en --peers tesseract``."""
    import argparse
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="dsocr eval", description="OCR accuracy and speed report")
    add_arguments(ap)
    try:
        return run_from_args(ap.parse_args(argv), command_line("dsocr eval", argv))
    except (FileNotFoundError, ValueError) as e:
        print(f"dsocr eval: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
