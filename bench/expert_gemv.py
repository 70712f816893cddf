"""How fast can one decode step stream expert weights on this CPU? A microbenchmark for the engine.

Decode of the official decoder is bound by reading routed-expert weights: at batch 8 each of the
~35 experts a layer touches sees 1-3 tokens. This times, on 192 matrices of one expert's shape
(896 x 1280 fp32, 64 experts x gate/up/down, 880 MB: more than any cache), the rate at which
weight bytes are consumed by:

- a plain streaming read (``sum`` of a 1 GiB tensor): the machine's ceiling;
- ``F.linear(x, W)`` (what ``language/decoder.py`` and transformers' eager experts call);
- ``(W @ x.T).T``, the same product with the other operand order;
- ``F.linear`` split over two Python threads (torch releases the GIL inside the kernel);

for 1, 2, 3, 4 and 8 rows, at ``--threads`` intra-op threads. Best of ``--repeats``, the
variants interleaved. Writes docs/benchmarks/expert_gemv.md.

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

ROOT = Path(__file__).resolve().parents[1]


def rate(fn, nbytes: int, repeats: int) -> float:
    """Best GB/s of ``repeats`` calls of ``fn`` consuming ``nbytes``."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


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
    pool = ThreadPoolExecutor(2)
    half = len(weights) // 2

    def linear(ws, x):
        return [F.linear(x, w) for w in ws]

    def threaded(x):
        parts = [pool.submit(linear, weights[:half], x), pool.submit(linear, weights[half:], x)]
        return [p.result() for p in parts]

    stream = rate(lambda: big.sum(), big.numel() * 4, args.repeats)
    rows = []
    for n in (int(r) for r in args.rows.split(",")):
        x = torch.randn(n, 1280, generator=g)
        variants = {
            "F.linear": lambda x=x: linear(weights, x),
            "(W @ x.T).T": lambda x=x: [(w @ x.T).T for w in weights],
            "F.linear, 2 Python threads": lambda x=x: threaded(x),
        }
        best = dict.fromkeys(variants, 0.0)
        for _ in range(args.repeats):  # interleaved, so load drift hits every variant alike
            for name, fn in variants.items():
                best[name] = max(best[name], rate(fn, nbytes, 1))
        rows.append((n, best))
        print(n, {k: round(v, 1) for k, v in best.items()}, flush=True)

    cmd = "python bench/expert_gemv.py " + " ".join(argv if argv is not None else sys.argv[1:])
    names = list(rows[0][1])
    lines = [
        "# Expert-weight streaming rate on this CPU (decode microbenchmark)",
        "",
        *header_lines(run_info(cmd.strip())),
        f"- {len(weights)} fp32 matrices of 896 x 1280 ({nbytes / 1e6:.0f} MB), "
        f"{args.threads} intra-op threads, best of {args.repeats}, variants interleaved",
        "",
        f"Streaming read (`sum` of 1 GiB): **{stream:.1f} GB/s**, the ceiling.",
        "",
        "GB/s of weight bytes consumed, by rows per matrix (tokens at one expert):",
        "",
        "| rows | " + " | ".join(names) + " |",
        "|---:|" + "---:|" * len(names),
    ]
    for n, best in rows:
        lines.append(f"| {n} | " + " | ".join(f"{best[k]:.1f}" for k in names) + " |")
    lines += ["", note_block("notes"), ""]
    path = save_report(args.out, "\n".join(lines))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
