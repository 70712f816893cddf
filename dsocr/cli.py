"""The ``dsocr`` command line: thin argparse subcommands, each calling one library function."""

from __future__ import annotations

import argparse
import sys

from dsocr.configs import MODES


def _dtype(name: str | None):
    import torch

    return {
        None: None,
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }[name]


def cmd_ocr(args) -> int:
    from dsocr.api import load_model
    from dsocr.language.tokenizer import PROMPTS

    ocr = load_model(args.model, device=args.device, dtype=_dtype(args.dtype))
    prompt = args.prompt or PROMPTS[args.task]
    status = 0
    for path in args.images:
        try:
            text = ocr.generate(path, prompt, mode=args.mode, max_new_tokens=args.max_new_tokens)
        except (OSError, ValueError) as e:
            print(f"dsocr: error: {path}: {e}", file=sys.stderr)
            status = 1
            continue
        if len(args.images) > 1:
            print(f"==> {path} <==")
        print(text)
    return status


def cmd_tokens(args) -> int:
    from dsocr.vision.preprocess import count_image_tokens, crop_grid, valid_image_tokens

    modes = [args.mode] if args.mode else list(MODES)
    print(f"{'mode':<10} {'grid':>6} {'placeholders':>13} {'valid':>6}")
    for m in modes:
        cols, rows = crop_grid(args.width, args.height, MODES[m])
        n = count_image_tokens(args.width, args.height, m)
        v = valid_image_tokens(args.width, args.height, m)
        print(f"{m:<10} {f'{cols}x{rows}':>6} {n:>13} {v:>6}")
    return 0


def cmd_info(args) -> int:
    from dsocr.api import load_model

    ocr = load_model(args.model, device="cpu")
    cfg = ocr.model.config
    n = sum(p.numel() for p in ocr.model.parameters())
    print(f"model:      {ocr.source} ({cfg.name})")
    print(f"parameters: {n:,}")
    print(f"tokenizer:  {len(ocr.tokenizer)} tokens, <image> = {ocr.tokenizer.image_id}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsocr", description="DeepSeek-OCR in plain PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)

    o = sub.add_parser("ocr", help="decode images to text with one prompt")
    o.add_argument("images", nargs="+", help="image files")
    o.add_argument(
        "--model",
        default=None,
        help="checkpoint folder, bundled model or variant (default: dsocr-mini)",
    )
    o.add_argument("--mode", default="base", choices=list(MODES))
    o.add_argument(
        "--task", default="free", choices=["free", "markdown", "ocr", "figure", "describe"]
    )
    o.add_argument("--prompt", default=None, help="a raw prompt (overrides --task)")
    o.add_argument("--max-new-tokens", type=int, default=512)
    o.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if any)")
    o.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="default: float32 on CPU, bfloat16 on GPU",
    )
    o.set_defaults(func=cmd_ocr)

    t = sub.add_parser("tokens", help="vision tokens an image of WIDTH x HEIGHT costs per mode")
    t.add_argument("width", type=int)
    t.add_argument("height", type=int)
    t.add_argument("--mode", default=None, choices=list(MODES))
    t.set_defaults(func=cmd_tokens)

    i = sub.add_parser("info", help="describe a model")
    i.add_argument("--model", default=None)
    i.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"dsocr: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
