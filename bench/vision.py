"""DeepEncoder speed on this machine: seconds per view of the official SAM, CLIP and projector.

Builds the official vision tower (config ``deepseek-ocr``, seeded random weights; the decoder is
shrunk to one tiny layer, since only the encoder runs) and times ``encode_views`` on one view of
each ``--sizes`` (640: Small and Gundam tiles, 1024: Base and Gundam's global view, 1280: Large),
best of ``--repeats``, in inference mode. Two variants run interleaved in the same process:

- ``current``: SAM as it is;
- ``fresh bias per layer``: SAM's attention bias allocated anew in every layer (its per-forward
  buffer, ``vision.sam.rel_pos_bias``'s ``scratch``, switched off), the code before that buffer.

Writes docs/benchmarks/vision.md.

    python bench/vision.py
    python bench/vision.py --sizes 1024 --repeats 3
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from dsocr.configs import CONFIGS
from dsocr.eval.run import header_lines, run_info
from dsocr.fileio import note_block, save_report
from dsocr.model import build_model
from dsocr.vision import sam as sam_module
from dsocr.vision.deepencoder import encode_views

ROOT = Path(__file__).resolve().parents[1]


def encoder_only_model():
    cfg = CONFIGS["deepseek-ocr"]
    lang = replace(
        cfg.language,
        num_hidden_layers=1,
        vocab_size=1024,
        n_routed_experts=2,
        num_experts_per_tok=1,
    )
    return build_model(replace(cfg, language=lang), seed=0).eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="640,1024,1280")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "vision.md"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    m = encoder_only_model().model
    with_buffer = sam_module.rel_pos_bias

    def fresh_bias(q, rel_h, rel_w, q_hw, k_hw, scratch=None):
        return with_buffer(q, rel_h, rel_w, q_hw, k_hw, None)

    variants = {"current": with_buffer, "fresh bias per layer": fresh_bias}
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        px = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        best = dict.fromkeys(variants, float("inf"))
        with torch.inference_mode():
            encode_views(m.sam_model, m.vision_model, m.projector, px)  # warm-up
            for _ in range(args.repeats):
                for name, fn in variants.items():
                    sam_module.rel_pos_bias = fn
                    t = time.perf_counter()
                    encode_views(m.sam_model, m.vision_model, m.projector, px)
                    best[name] = min(best[name], time.perf_counter() - t)
        sam_module.rel_pos_bias = with_buffer
        rows.append((size, best))
        print(size, {k: round(v, 2) for k, v in best.items()}, flush=True)

    cmd = "python bench/vision.py " + " ".join(argv if argv is not None else sys.argv[1:])
    names = list(variants)
    lines = [
        "# DeepEncoder speed: seconds per view (official SAM + CLIP + projector)",
        "",
        *header_lines(run_info(cmd.strip())),
        f"- {torch.get_num_threads()} intra-op threads, float32, one view per call, inference "
        f"mode, best of {args.repeats}, variants interleaved",
        "",
        "| view px | " + " | ".join(f"{n} (s)" for n in names) + " | speed-up |",
        "|---:|" + "---:|" * (len(names) + 1),
    ]
    for size, best in rows:
        cells = " | ".join(f"{best[n]:.2f}" for n in names)
        lines.append(f"| {size} | {cells} | {best[names[1]] / best[names[0]]:.2f}x |")
    lines += ["", note_block("notes"), ""]
    path = save_report(args.out, "\n".join(lines))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
