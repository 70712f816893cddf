"""How fast can one decode step stream expert weights on this CPU? A microbenchmark for the engine.

Decode of the official decoder is bound by reading routed-expert weights: at batch 8 each of the
~35 experts a layer touches sees 1-3 tokens. This times, on 192 matrices of one expert's shape
(896 x 1280 fp32, 64 experts x gate/up/down, 880 MB: more than any cache), the rate at which
weight bytes are consumed by:

- a plain streaming read (``sum`` of a 1 GiB tensor): the machine's ceiling;
- ``F.linear(x, W)`` (what transformers' eager experts call);
- ``(W @ x.T).T``, the same product with the other operand order;
- oneDNN's linear (``language.decoder.onednn_linear``, torch's ``mkldnn._linear_pointwise``);
- ``F.linear`` split over two or four Python threads (torch releases the GIL inside the kernel);
- ``language.fewrow`` (our few-row kernel) on one thread, on two Python threads (how the engine
  runs experts), and with each product split over two OpenMP threads;

for 1, 2, 3, 4 and 8 rows, at ``--threads`` intra-op threads. A second table times one matrix of
``lm_head``'s shape (129,280 x 1,280, 662 MB): ``F.linear`` and oneDNN against
``language.decoder.linear`` inside ``decode_threads(2)`` and ``(4)`` (what the engine runs: fewrow
on torch's threads where it is built), and ``decode_threads(2)`` with fewrow switched off.
Best of ``--repeats``, the variants interleaved. Writes docs/benchmarks/expert_gemv.md.

    python bench/expert_gemv.py
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

from dsocr.eval.run import header_lines, run_info
from dsocr.fileio import note_block, save_report
from dsocr.language import decoder, fewrow
from dsocr.language.decoder import decode_threads, linear, onednn_linear

ROOT = Path(__file__).resolve().parents[1]


def rate(fn, nbytes: int, repeats: int) -> float:
    """Best GB/s of ``repeats`` calls of ``fn`` consuming ``nbytes``."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def best_rates(variants: dict, nbytes: int, repeats: int) -> dict:
    """Best GB/s of each variant, interleaved so that load drift hits every variant alike."""
    best = dict.fromkeys(variants, 0.0)
    for _ in range(repeats):
        for name, fn in variants.items():
            best[name] = max(best[name], rate(fn, nbytes, 1))
    return best


def table(rows: list, what: str) -> list[str]:
    names = list(rows[0][1])
    lines = ["| " + what + " | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for n, best in rows:
        lines.append(f"| {n} | " + " | ".join(f"{best[k]:.1f}" for k in names) + " |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rows", default="1,2,3,4,8")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "expert_gemv.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(896, 1280, generator=g) for _ in range(192)]
    nbytes = sum(w.numel() * 4 for w in weights)
    big = torch.randn(1 << 28, generator=g)  # 1 GiB
    pool = ThreadPoolExecutor(4)

    def linears(ws, x):
        return [F.linear(x, w) for w in ws]

    def threaded(x, k):
        return [p.result() for p in [pool.submit(linears, weights[i::k], x) for i in range(k)]]

    def fewrows(ws, x, ys, threads=1):
        for w, y in zip(ws, ys):
            fewrow.linear_into(x, w, y, 0, w.shape[0], threads)

    def fewrow_threaded(x, ys, k):
        parts = [pool.submit(fewrows, weights[i::k], x, ys[i::k]) for i in range(k)]
        return [p.result() for p in parts]

    has_fewrow = fewrow.available()
    print("fewrow:", fewrow.status(), flush=True)

    stream = rate(lambda: big.sum(), big.numel() * 4, args.repeats)
    rows = []
    for n in (int(r) for r in args.rows.split(",")):
        x = torch.randn(n, 1280, generator=g)
        ys = [torch.empty(n, 896) for _ in weights]
        variants = {
            "F.linear": lambda x=x: linears(weights, x),
            "(W @ x.T).T": lambda x=x: [(w @ x.T).T for w in weights],
            "oneDNN": lambda x=x: [onednn_linear(x, w) for w in weights],
            "F.linear, 2 Python threads": lambda x=x: threaded(x, 2),
            "F.linear, 4 Python threads": lambda x=x: threaded(x, 4),
        }
        if has_fewrow:
            variants["fewrow"] = lambda x=x, ys=ys: fewrows(weights, x, ys)
            variants["fewrow, 2 Python threads"] = lambda x=x, ys=ys: fewrow_threaded(x, ys, 2)
            variants["fewrow, 2 OpenMP threads"] = lambda x=x, ys=ys: fewrows(weights, x, ys, 2)
        rows.append((n, best_rates(variants, nbytes, args.repeats)))
        print(n, {k: round(v, 1) for k, v in rows[-1][1].items()}, flush=True)
    weights.clear()  # free 880 MB before the lm_head matrix
    head = torch.nn.Linear(1280, 129280, bias=False)
    head_bytes = head.weight.numel() * 4

    def split(x, k, kernels=True):
        usable = fewrow.usable
        if not kernels:
            decoder.fewrow.usable = lambda *a: False
        try:
            with torch.no_grad(), decode_threads(k):
                return linear(x, head)
        finally:
            decoder.fewrow.usable = usable

    head_rows = []
    for n in (1, 2, 8):
        x = torch.randn(n, 1280, generator=g)
        variants = {
            "F.linear": lambda x=x: F.linear(x, head.weight),
            "oneDNN": lambda x=x: onednn_linear(x, head.weight),
            "linear, decode_threads(2)": lambda x=x: split(x, 2),
            "linear, decode_threads(4)": lambda x=x: split(x, 4),
            "linear, decode_threads(2), fewrow off": lambda x=x: split(x, 2, False),
        }
        head_rows.append((n, best_rates(variants, head_bytes, args.repeats)))
        print("lm_head", n, {k: round(v, 1) for k, v in head_rows[-1][1].items()}, flush=True)

    cmd = "python bench/expert_gemv.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Expert-weight streaming rate on this CPU (decode microbenchmark)",
        "",
        *header_lines(run_info(cmd.strip())),
        f"- 192 fp32 matrices of 896 x 1280 ({nbytes / 1e6:.0f} MB), "
        f"{args.threads} intra-op threads, best of {args.repeats}, variants interleaved",
        "",
        f"Streaming read (`sum` of 1 GiB): **{stream:.1f} GB/s**, the ceiling.",
        "",
        "GB/s of weight bytes consumed, by rows per matrix (tokens at one expert):",
        "",
        *table(rows, "rows"),
        "",
        f"GB/s on one matrix of `lm_head`'s shape (129,280 x 1,280, {head_bytes / 1e6:.0f} MB):",
        "",
        *table(head_rows, "rows"),
        "",
        note_block("notes"),
        "",
    ]
    path = save_report(args.out, "\n".join(lines))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
