"""Pages per second through the whole model: vision encoding, prefill and decode, continuous batch.

The GPU measurement of the engine issue: the official architecture (config ``deepseek-ocr``, seeded
random weights, so the text is noise and EOS is ignored) converts ``--pages`` rendered pages in
``--mode`` (Base: 1024 x 1024, 256 vision tokens) with ``--new-tokens`` generated tokens each and
``--concurrency`` pages in the engine at once. The report sets the rate beside:

- the official claims for one A100-40G: 200,000+ pages/day (paper; about 2.3 pages/s) and about
  2,500 tokens/s for PDF concurrency (README);
- this device's roofline for the decode: per step, the FLOPs of ``concurrency`` tokens against peak
  bf16 compute, and the bytes read (the attention, dense and shared weights, the routed experts
  the batch is expected to touch, ``lm_head``, the KV cache) against peak memory bandwidth.

Peaks come from the device's name (H100 SXM, H200, A100 tables below) or ``--peak-tflops`` and
``--peak-gbps``. Runs anywhere; on a CPU use a scaled model, e.g. the smoke run in the tests:

    python -m bench.pages                                   # GPU: official size, Base, 64 x 1000
    python -m bench.pages --config tiny --mode tiny --pages 4 --concurrency 2 --new-tokens 8 \\
        --md /tmp/pages.md                                  # plumbing, on any machine
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import replace

import torch

from dsocr.configs import CONFIGS, get_mode
from dsocr.engine.generate import Engine, GenerationParams, Request, default_dtype
from dsocr.fileio import save_report
from dsocr.model import build_model
from dsocr.render import PageStyle, render_text
from dsocr.vision.preprocess import preprocess_image

# Dense bf16 tensor-core TFLOP/s and memory GB/s from the vendors' data sheets (SXM parts).
PEAKS = {"H200": (989.0, 4800.0), "H100": (989.0, 3350.0), "A100": (312.0, 1555.0)}
OFFICIAL_PAGES_PER_DAY = 200_000  # "200k+ pages/day" on one A100-40G (paper)
OFFICIAL_TOKENS_PER_S = 2_500  # "~2,500 tokens/s" PDF concurrency on one A100-40G (README)

TEXT = (
    "Optical context compression stores long text as page images that cost far fewer tokens "
    "than the text itself, and decodes it back when it is needed. "
) * 40


def device_peaks(device: torch.device) -> tuple[str, float | None, float | None]:
    if device.type != "cuda":
        return platform.processor() or platform.machine(), None, None
    name = torch.cuda.get_device_name(device)
    for key, (tflops, gbps) in PEAKS.items():
        if key in name:
            return name, tflops, gbps
    return name, None, None


def expected_experts(experts: int, top_k: int, tokens: int) -> float:
    """Expected distinct experts that ``tokens`` uniformly routed tokens touch in one layer."""
    return experts * (1 - (1 - top_k / experts) ** tokens)


def decode_roofline(cfg, batch: int, context: int, bytes_per_el: int) -> dict:
    """FLOPs and bytes of one decode step of ``batch`` tokens at mean ``context`` positions."""
    lang = cfg.language
    C, L, V = lang.hidden_size, lang.num_hidden_layers, lang.vocab_size
    attn = 4 * C * C
    expert = 3 * C * lang.moe_intermediate_size
    shared = expert * lang.n_shared_experts
    dense = 3 * C * lang.intermediate_size
    moe_layers = sum(lang.is_moe_layer(i) for i in range(L))
    dense_layers = L - moe_layers
    touched = expected_experts(lang.n_routed_experts, lang.num_experts_per_tok, batch)
    weights = (
        L * attn
        + dense_layers * dense
        + moe_layers * (shared + touched * expert + C * lang.n_routed_experts)
        + V * C
    )
    kv = batch * L * 2 * C * context  # MHA: k and v of C values per position and layer
    active = (
        L * attn
        + dense_layers * dense
        + moe_layers * (shared + lang.num_experts_per_tok * expert)
        + V * C
    )
    flops = batch * (2 * active + L * 4 * C * context)  # matmuls + attention scores and values
    return dict(flops=flops, bytes=(weights + kv) * bytes_per_el, touched_experts=touched)


def make_pages(n: int, mode) -> list:
    style = PageStyle(width=mode.base_size, height=mode.base_size, font_size=14)
    pages = render_text(TEXT, style)
    return [pages[i % len(pages)].image for i in range(n)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="deepseek-ocr")
    ap.add_argument("--layers", type=int, default=None, help="scale the decoder's layer count")
    ap.add_argument("--mode", default="base")
    ap.add_argument("--pages", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=1000)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: per device (bf16 GPU, fp32 CPU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    ap.add_argument("--warmup-pages", type=int, default=None, help="default: concurrency")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--peak-gbps", type=float, default=None)
    ap.add_argument("--md", default="docs/benchmarks/pages.md")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(device)
    cfg = CONFIGS[args.config]
    if args.layers:
        cfg = replace(cfg, language=replace(cfg.language, num_hidden_layers=args.layers))
    mode = get_mode(args.mode)
    t0 = time.perf_counter()
    model = build_model(cfg, device=device, dtype=dtype, seed=0).eval()
    build_s = time.perf_counter() - t0
    params = GenerationParams(max_new_tokens=args.new_tokens, ignore_eos=True, detect_loops=False)
    inputs = [preprocess_image(im, mode, cfg.sam.pixels_per_token) for im in make_pages(2, mode)]
    n_vis = inputs[0].num_tokens
    prompt_tail = [11, 12, 13, 14, 15, 16, 17, 18]  # any ids: the weights are random
    prompt = [cfg.language.bos_token_id] + [cfg.image_token_id] * n_vis + prompt_tail

    def run(n_pages: int) -> tuple[float, Engine]:
        engine = Engine(
            model,
            max_batch_size=args.concurrency,
            dtype=dtype,
            max_seq_len=len(prompt) + args.new_tokens,
            compile_decode=args.compile,
        )
        for i in range(n_pages):
            engine.add_request(Request(prompt, params, images=[inputs[i % 2]], request_id=i))
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        done = 0
        while engine.has_unfinished():
            done += sum(e.result is not None for e in engine.step())
        if device.type == "cuda":
            torch.cuda.synchronize()
        assert done == n_pages, (done, n_pages)
        return time.perf_counter() - t, engine

    warmup = (
        args.warmup_pages if args.warmup_pages is not None else min(args.concurrency, args.pages)
    )
    if warmup:
        run(warmup)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    wall, engine = run(args.pages)
    s = engine.stats
    gen = args.pages * args.new_tokens
    name, tflops, gbps = device_peaks(device)
    tflops = args.peak_tflops or tflops
    gbps = args.peak_gbps or gbps
    roof = decode_roofline(
        cfg, args.concurrency, len(prompt) + args.new_tokens // 2, torch.finfo(dtype).bits // 8
    )
    decode_tok_s = s.decode_tokens / s.decode_s if s.decode_s else float("nan")
    ceilings = {}
    if tflops:
        ceilings["compute"] = args.concurrency / (roof["flops"] / (tflops * 1e12))
    if gbps:
        ceilings["bandwidth"] = args.concurrency / (roof["bytes"] / (gbps * 1e9))
    res = dict(
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        device=name,
        torch=torch.__version__,
        dtype=str(dtype).replace("torch.", ""),
        config=cfg.name,
        layers=cfg.language.num_hidden_layers,
        mode=mode.name,
        vision_tokens=n_vis,
        pages=args.pages,
        concurrency=args.concurrency,
        new_tokens=args.new_tokens,
        compile=args.compile,
        warmup_pages=warmup,
        build_s=round(build_s, 1),
        wall_s=round(wall, 2),
        pages_per_s=args.pages / wall,
        pages_per_day=args.pages / wall * 86400,
        tokens_per_s=gen / wall,
        decode_tokens_per_s=decode_tok_s,
        vision_s=round(s.vision_s, 2),
        prefill_s=round(s.prefill_s, 2),
        decode_s=round(s.decode_s, 2),
        peak_gpu_gb=torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None,
        peak_tflops=tflops,
        peak_gbps=gbps,
        step_gflop=roof["flops"] / 1e9,
        step_gb=roof["bytes"] / 1e9,
        touched_experts=roof["touched_experts"],
        ceilings_decode_tok_s=ceilings,
    )
    print(json.dumps(res, default=str))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    if args.md:
        save_report(args.md, report(res, argv))
        print(f"wrote {args.md}")
    return 0


def _fmt(x, nd=1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{nd}f}"


def report(r: dict, argv) -> str:
    cmd = "python -m bench.pages " + " ".join(argv if argv is not None else sys.argv[1:])
    official_pps = OFFICIAL_PAGES_PER_DAY / 86400
    lines = [
        "# Pages per second: the whole model in a continuous batch",
        "",
        f"- Command: `{cmd.strip()}`",
        f"- Device: {r['device']}, torch {r['torch']}, {r['dtype']}, date {r['date']}",
        f"- Model: config `{r['config']}` ({r['layers']} decoder layer(s)), seeded random weights,"
        f" mode {r['mode']} ({r['vision_tokens']} vision tokens), {r['pages']} pages,"
        f" {r['concurrency']} in flight, {r['new_tokens']} generated tokens each (EOS ignored),"
        f" decode step {'compiled' if r['compile'] else 'eager'}; timed after a warm-up run of"
        f" {r['warmup_pages']} pages",
        "",
        "| pages/s | pages/day | generated tok/s | decode tok/s | vision s | prefill s | "
        "decode s | wall s | peak GPU GB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {_fmt(r['pages_per_s'], 2)} | {_fmt(r['pages_per_day'], 0)} | "
        f"{_fmt(r['tokens_per_s'])} | {_fmt(r['decode_tokens_per_s'])} | {r['vision_s']} | "
        f"{r['prefill_s']} | {r['decode_s']} | {r['wall_s']} | {_fmt(r['peak_gpu_gb'])} |",
        "",
        f"Beside the official claims for one A100-40G, {OFFICIAL_PAGES_PER_DAY:,}+ pages/day "
        f"({official_pps:.2f} pages/s, paper) and about {OFFICIAL_TOKENS_PER_S:,} tokens/s "
        f"(README, PDF concurrency): "
        f"{r['pages_per_s'] / official_pps:.2f}x the pages, "
        f"{r['tokens_per_s'] / OFFICIAL_TOKENS_PER_S:.2f}x the tokens.",
        "",
        f"Decode roofline at {r['concurrency']} tokens a step: {_fmt(r['step_gflop'])} GFLOP and "
        f"{_fmt(r['step_gb'], 2)} GB read a step (about {r['touched_experts']:.1f} of the routed "
        f"experts a layer touched, plus the KV cache at mean context). Peaks: "
        f"{_fmt(r['peak_tflops'], 0)} TFLOP/s, {_fmt(r['peak_gbps'], 0)} GB/s.",
        "",
        "| bound | decode tok/s ceiling | measured share |",
        "|---|---:|---:|",
    ]
    for k, v in r["ceilings_decode_tok_s"].items():
        lines.append(f"| {k} | {_fmt(v, 0)} | {r['decode_tokens_per_s'] / v:.1%} |")
    if not r["ceilings_decode_tok_s"]:
        lines.append("| (no peaks known for this device) | n/a | n/a |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
