"""Optical memory report: context tokens against a plain-text history, and recall by age.

A dialogue of ``--turns`` turns (alternating user / assistant), each a passage of held-out English
text (``data/corpus/heldout.jsonl``, never trained on), goes into an ``OpticalMemory`` with the
default forgetting schedule (Gundam > Large > Base > Small > Tiny after ``--keep-text`` text
turns). After every turn the report records the context's decoder tokens (text + ``<image>``
placeholders) beside the plain-text history's tokens. At the end each image turn is recalled
(decoded back with the model) and scored against its text: Fox precision and CER, by age and mode.

Writes ``--out`` (default docs/benchmarks/memory.md), a PNG beside it (tokens per turn; recall by
age) and the raw numbers (``.json``).

    python bench/memory.py                                  # bundled dsocr-mini
    python bench/memory.py --model /models/DeepSeek-OCR --turns 40 --font-size 12
    python bench/memory.py --model tiny --turns 8 --max-new-tokens 8 --out /tmp/memory.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from dsocr.api import load_model
from dsocr.compress import OpticalMemory
from dsocr.compress.codec import REFERENCE_STYLE
from dsocr.eval.metrics import cer, fox_scores
from dsocr.eval.run import header_lines, run_info
from dsocr.fileio import note_block, save_report
from dsocr.render import missing_chars
from dsocr.train.data import corpus_identity

ROOT = Path(__file__).resolve().parents[1]


def passages(corpus: Path, n: int, lo: int, hi: int, seed: int) -> list[str]:
    """n passages of lo..hi characters: whole lines of English held-out documents, seeded."""
    docs = []
    with corpus.open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row.get("lang", "en").startswith("en"):
                docs.append(row["text"])
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(200 * n):
        if len(out) >= n:
            break
        lines = [x.strip() for x in rng.choice(docs).split("\n") if len(x.strip()) > 30]
        if not lines:
            continue
        start = rng.randrange(len(lines))
        text = ""
        for ln in lines[start:]:
            text = f"{text} {ln}".strip()
            if len(text) >= lo:
                break
        if lo <= len(text) <= hi and not missing_chars(text) and text not in out:
            out.append(text)
    return out


def write_plot(path: Path, curve: list[dict], recall: list[dict]) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot written"
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    a.plot(
        [c["turns"] for c in curve], [c["plain_tokens"] for c in curve], "-o", label="plain text"
    )
    a.plot([c["turns"] for c in curve], [c["context_tokens"] for c in curve], "-s", label="optical")
    a.set_xlabel("turns in the history")
    a.set_ylabel("decoder tokens")
    a.grid(alpha=0.3)
    a.legend()
    b.plot(
        [r["age"] for r in recall], [100 * r["precision"] for r in recall], "-o", label="precision"
    )
    b.plot(
        [r["age"] for r in recall],
        [100 * (1 - min(1, r["cer"])) for r in recall],
        "-s",
        label="1 - CER",
    )
    for r in recall:
        b.annotate(r["mode"], (r["age"], 100 * r["precision"]), fontsize=7, alpha=0.7)
    b.set_xlabel("age (turns since)")
    b.set_ylabel("%")
    b.set_ylim(-2, 102)
    b.grid(alpha=0.3)
    b.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dsocr-mini")
    p.add_argument("--corpus", default=str(ROOT / "data" / "corpus" / "heldout.jsonl"))
    p.add_argument("--turns", type=int, default=24)
    p.add_argument("--keep-text", type=int, default=4)
    p.add_argument("--budget", type=int, default=None, help="token budget of the context")
    p.add_argument("--min-chars", type=int, default=200)
    p.add_argument("--max-chars", type=int, default=500)
    p.add_argument(
        "--font-size",
        type=int,
        default=None,
        help="px on the 640 px reference page (default: 22 for dsocr-mini's training sizes, "
        "else the library's 12)",
    )
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "memory.md"))
    args = p.parse_args(argv)

    ocr = load_model(args.model, device="cpu")
    font = args.font_size or (22 if ocr.model.config.name.startswith("mini") else 12)
    style = dataclasses.replace(REFERENCE_STYLE, font_size=font, margin=24)
    texts = passages(Path(args.corpus), args.turns, args.min_chars, args.max_chars, args.seed)
    curve = []
    with tempfile.TemporaryDirectory() as tmp:
        mem = OpticalMemory(
            Path(tmp) / "memory",
            keep_text_turns=args.keep_text,
            token_budget=args.budget,
            style=style,
            tokenizer=ocr.tokenizer,
        )
        for i, text in enumerate(texts):
            mem.add("user" if i % 2 == 0 else "assistant", text)
            r = mem.report()
            curve.append(
                {
                    "turns": r.turns,
                    "plain_tokens": r.plain_tokens,
                    "context_tokens": r.context_tokens,
                    "vision_tokens": r.vision_tokens,
                    "image_turns": dict(r.image_turns),
                    "dropped": r.dropped,
                }
            )
        plan = mem.plan()
        recall = []
        for turn, what in plan.items():
            if what == "text":
                continue
            t0 = time.perf_counter()
            got = mem.recall(turn, ocr, max_new_tokens=args.max_new_tokens)
            truth = texts[turn]
            mode = what if isinstance(what, str) else what.name
            recall.append(
                {
                    "turn": turn,
                    "age": len(texts) - 1 - turn,
                    "mode": mode,
                    "precision": fox_scores(got, truth)["precision"],
                    "cer": cer(got, truth, normalize_whitespace=True),
                    "seconds": time.perf_counter() - t0,
                    "prediction_head": got[:100],
                }
            )
            print(json.dumps(recall[-1]), file=sys.stderr)
        final = mem.report()
    res = {
        **run_info("python bench/memory.py " + " ".join(argv)),
        "model": args.model,
        "config": ocr.model.config.name,
        "font_size": font,
        "corpus_identity": corpus_identity(args.corpus, ROOT),
        "curve": curve,
        "recall": recall,
        "final": dataclasses.asdict(final) | {"ratio": final.ratio},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    note = write_plot(out.with_suffix(".png"), curve, recall)
    save_report(out, render(res, note))
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


def render(res: dict, plot_note: str | None) -> str:
    f = res["final"]
    L = [
        "# Optical memory: tokens and recall",
        "",
        *header_lines(res),
        f"- Model: `{res['model']}` (config `{res['config']}`); pages rendered at "
        f"{res['font_size']} px on the 640 px reference page, scaled per mode",
        f"- Turns: passages of {res.get('corpus_identity', 'the held-out corpus')}",
        "",
        note_block("read-first"),
        "",
        f"After {f['turns']} turns the context holds {f['context_tokens']} decoder tokens against "
        f"{f['plain_tokens']} for the plain-text history ({f['ratio']:.2f}x; "
        f"{f['tokens_saved']} tokens saved), with {f['text_turns']} text turns, image turns by "
        f"mode {f['image_turns']}, {f['dropped']} dropped.",
        "",
        "| turns | plain-text tokens | optical context tokens | grid vision tokens |",
        "|---:|---:|---:|---:|",
    ]
    for c in res["curve"]:
        L.append(
            f"| {c['turns']} | {c['plain_tokens']} | {c['context_tokens']} | {c['vision_tokens']} |"
        )
    L += [
        "",
        "## Recall by age",
        "",
        "| turn | age | mode | precision | CER | s |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    for r in res["recall"]:
        L.append(
            f"| {r['turn']} | {r['age']} | {r['mode']} | {100 * r['precision']:.1f}% | "
            f"{r['cer']:.3f} | {r['seconds']:.1f} |"
        )
    L += ["", plot_note or "![tokens and recall](memory.png)", ""]
    return "\n".join(L)


if __name__ == "__main__":
    sys.exit(main())
