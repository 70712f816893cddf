"""Server load test: many concurrent chat-completion clients against `dsocr serve` on loopback.

    python bench/serve.py --model tiny --clients 32 --requests 128 --max-tokens 32

Starts the real server (uvicorn, in this process) on a free loopback port, then sends the same
fixed set of requests twice: one at a time, and from ``--clients`` concurrent clients. Each request
carries a unique tag; the script checks that every tag is answered exactly once. Reports requests/s,
generated tokens/s and p50/p99 latency for both, and the concurrency speed-up, to
docs/benchmarks/serve.md. Requests use ``ignore_eos`` so each generates exactly ``--max-tokens``.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx
import uvicorn
from PIL import Image

import dsocr
from dsocr.serve.app import create_app

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_url(seed: int) -> str:
    img = Image.effect_noise((96, 96), 40 + seed % 50).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def one_request(client: httpx.Client, tag: int, args) -> tuple[int, float, int]:
    body = {
        "model": "dsocr",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_url(tag)}},
                    {"type": "text", "text": f"Free OCR. [{tag}]"},
                ],
            }
        ],
        "max_tokens": args.max_tokens,
        "ignore_eos": True,
        "mode": args.mode,
        "user": str(tag),
    }
    t = time.perf_counter()
    r = client.post("/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    return tag, time.perf_counter() - t, r.json()["usage"]["completion_tokens"]


def run(url: str, args, clients: int) -> dict:
    tags = list(range(args.requests))
    with httpx.Client(base_url=url) as client:
        t = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            out = list(pool.map(lambda tag: one_request(client, tag, args), tags))
        wall = time.perf_counter() - t
    answered = sorted(tag for tag, _, _ in out)
    assert answered == tags, "a request was lost or answered twice"
    lat = sorted(x for _, x, _ in out)
    tokens = sum(n for _, _, n in out)
    return {
        "clients": clients,
        "wall_s": wall,
        "req_s": len(out) / wall,
        "tok_s": tokens / wall,
        "p50": statistics.median(lat),
        "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--mode", default="tiny")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32, help="engine slots")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "serve.md"))
    args = ap.parse_args(argv)
    ocr = dsocr.load_model(args.model, device="cpu")
    app = create_app(
        ocr,
        max_upload_bytes=10_000_000,
        max_pages=10,
        request_timeout_s=600,
        max_queue=args.requests,
        max_batch_size=args.batch_size,
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    try:
        run(url, argparse.Namespace(**{**vars(args), "requests": 4}), 2)  # warm-up
        seq = run(url, args, 1)
        conc = run(url, args, args.clients)
    finally:
        server.should_exit = True
        thread.join(10)
    cmd = "python bench/serve.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = [("sequential (1 client)", seq), (f"concurrent ({args.clients} clients)", conc)]
    lines = [
        "# Serving under concurrent load",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, CPU only  ",
        f"Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; model `{args.model}` "
        f"(mode {args.mode}), {args.requests} requests of {args.max_tokens} generated tokens, "
        f"engine batch {args.batch_size}",
        "",
        "Every request was answered exactly once (checked by tag) in both runs.",
        "",
        "| run | wall s | requests/s | generated tok/s | p50 latency s | p99 latency s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['wall_s']:.1f} | {r['req_s']:.2f} | {r['tok_s']:.1f} | "
            f"{r['p50']:.2f} | {r['p99']:.2f} |"
        )
    lines += ["", f"Throughput, concurrent ÷ sequential: {conc['req_s'] / seq['req_s']:.2f}x", ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
