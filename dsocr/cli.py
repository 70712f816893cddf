"""The ``dsocr`` command line: thin argparse subcommands, each calling one library function."""

from __future__ import annotations

import argparse
import sys
import time

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
    from dsocr.api import check_prompt, first_page, load_model, model_defaults
    from dsocr.language.tokenizer import PROMPTS
    from dsocr.pipeline.providers import InputError, printable

    _check_number("--max-new-tokens", args.max_new_tokens)  # flags before the model loads
    defaults = model_defaults(args.model)
    mode = args.mode or defaults.get("mode", "base")
    prompt = args.prompt or PROMPTS[args.task or defaults.get("task", "free")]
    check_prompt(prompt, 1)
    ocr = load_model(args.model, device=args.device, dtype=_dtype(args.dtype))
    status = 0
    for path in args.images:  # stdout: the text (and headers); notices and errors: stderr
        name = printable(path)
        try:
            page = first_page(path)
            res = ocr.run(page.image, prompt, mode=mode, max_new_tokens=args.max_new_tokens)
        except (InputError, ValueError) as e:  # InputError is already "<path>: <reason>"
            why = e if isinstance(e, InputError) else f"{name}: {e}"
            print(f"dsocr: error: {why}", file=sys.stderr)
            status = 1
            continue
        if len(args.images) > 1:
            print(f"==> {path} <==")
        print(res.text.strip(), flush=True)
        notes = {
            "length": f"stopped at the token limit ({res.num_generated_tokens} tokens) before "
            "the end of the page; the text may be cut (raise --max-new-tokens)",
            "loop": f"stopped by the loop detector (a {res.loop_period}-token block repeating);"
            " the text ends early",
        }
        if res.finish_reason in notes:
            print(f"dsocr: warning: {name}: {notes[res.finish_reason]}", file=sys.stderr)
        if page.page_count > 1:
            print(
                f"dsocr: warning: {name}: read page 1 of {page.page_count}; "
                "dsocr convert reads every page",
                file=sys.stderr,
            )
    return status


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """Warnings on one line, as the errors are (no source file or code line)."""
    return f"dsocr: warning: {message}\n"


def _count_documents(inputs, out) -> int:
    """How many documents ``convert`` will report: the files the inputs expand to (the output
    folder's excluded), a path that does not expand counting as one failed document."""
    from dsocr.pipeline.providers import InputError, discover_inputs

    seen, bad = set(), 0
    for item in inputs:
        try:
            seen.update(p.resolve() for p in discover_inputs([item], exclude=out))
        except (InputError, OSError):
            bad += 1
    return len(seen) + bad


class _Progress:
    """Documents done of the batch on stderr: a tqdm bar with pages and pages/s on a terminal,
    and each document's line prefixed with its count (the only output when not a terminal)."""

    def __init__(self, total: int | None = None):
        self.total, self.done, self.pages, self.t0 = 0, 0, 0, time.perf_counter()
        self.bar = None
        if total is not None:
            self.start(total)

    def start(self, total: int) -> None:
        """The batch holds ``total`` documents (convert's ``on_start``): show the bar."""
        self.total, self.t0 = total, time.perf_counter()
        if sys.stderr.isatty() and self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="doc", file=sys.stderr, dynamic_ncols=True)

    def page(self, doc, page) -> None:  # noqa: ARG002 - convert's on_page signature
        self.pages += 1
        if self.bar is not None:
            rate = self.pages / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(f"{self.pages} pages, {rate:.2f} pages/s")

    def document(self, line: str, counted: bool = True) -> None:
        self.done += 1
        text = f"[{self.done}/{max(self.total, self.done)}] {line}" if counted else line
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
            self.bar.update(1)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def cmd_convert(args) -> int:
    from dsocr.distributed import RayUnavailable
    from dsocr.pipeline.convert import convert
    from dsocr.pipeline.providers import printable
    from dsocr.pipeline.workspace import BatchSummary, OutputError
    from dsocr.vllm_backend import BackendUnavailable

    progress = _Progress()  # sized by convert's plan (on_start); Ray's by _count_documents

    def report(doc):
        if doc.status == "failed":
            progress.document(f"dsocr: error: {doc.error}", counted=False)
        else:
            progress.document(
                f"{doc.status}: {printable(doc.source)} -> {printable(doc.folder)} "
                f"({len(doc.pages)} page{'s' * (len(doc.pages) != 1)}, "
                f"{len(doc.flagged_pages)} flagged)"
            )

    _check_number("--batch-size", args.batch_size)
    _check_number("--max-new-tokens", args.max_new_tokens)
    _check_number("--replicas", args.replicas)
    _check_number("--gpus-per-replica", args.gpus_per_replica, zero_ok=True)
    if args.task == "locate" and args.ref is None and args.prompt is None:
        raise ValueError("--task locate needs --ref (the phrase to find)")
    # convert() / convert_ray() fill a missing task and mode from the model's meta.json defaults.
    given = {k: v for k, v in (("task", args.task), ("mode", args.mode)) if v is not None}
    options = dict(
        device=args.device,
        dtype=_dtype(args.dtype),
        prompt=args.prompt,
        ref=args.ref,
        **given,
        batch_size=args.batch_size,
        pages=args.pages,
        dpi=args.dpi,
        password=args.password,
        max_new_tokens=args.max_new_tokens,
        html_tables_to_markdown=args.tables_to_markdown,
    )
    try:
        if args.ray:
            if args.backend != "dsocr":
                raise BackendUnavailable("--ray runs the dsocr backend; drop --backend vllm")
            from dsocr.distributed import convert_ray

            progress.start(_count_documents(args.inputs, args.out))
            docs = convert_ray(
                args.inputs,
                args.out,
                model=args.model,
                replicas=args.replicas,
                num_gpus=args.gpus_per_replica,
                address=args.ray_address,
                **options,
            )
            for doc in docs:
                report(doc)
        else:
            docs = convert(
                args.inputs,
                ocr=args.model,
                out_dir=args.out,
                backend=args.backend,
                on_document=report,
                on_page=progress.page,
                on_start=lambda planned: progress.start(len(planned)),
                **options,
            )
    except (BackendUnavailable, RayUnavailable) as e:
        print(f"dsocr: error: {e}", file=sys.stderr)
        return 2
    except ConnectionError as e:  # ray.init(address=...) found no cluster there
        if not args.ray:
            raise
        print(f"dsocr: error: --ray-address {args.ray_address}: {e}", file=sys.stderr)
        return 2
    except OutputError as e:
        print(f"dsocr: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        progress.close()
        saved = BatchSummary.read(args.out)
        if saved is not None:
            print(saved.format(), file=sys.stderr)
        print("dsocr: interrupted; finished documents are kept, rerun to resume", file=sys.stderr)
        return 130
    finally:
        progress.close()
    summary = BatchSummary.from_documents(docs)
    print(summary.format(), file=sys.stderr)
    return summary.exit_code


def cmd_serve(args) -> int:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0-65535, got {args.port}")
    for flag, value in (
        ("--max-upload-mb", args.max_upload_mb),
        ("--max-pages", args.max_pages),
        ("--timeout", args.timeout),
        ("--batch-size", args.batch_size),
    ):
        _check_number(flag, value)
    _check_number("--max-queue", args.max_queue, zero_ok=True)
    _check_listen(args.host, args.port)
    from dsocr.serve import serve

    serve(
        model=args.model,
        host=args.host,
        port=args.port,
        device=args.device,
        api_key=args.api_key,
        max_upload_mb=args.max_upload_mb,
        max_pages=args.max_pages,
        timeout_s=args.timeout,
        max_queue=args.max_queue,
        batch_size=args.batch_size,
        allow_remote_urls=args.allow_remote_urls,
    )
    return 0


def _check_listen(host: str, port: int) -> None:
    """Bind once before the model loads, so a taken port or a bad --host is one line, not a log."""
    import socket

    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            s.bind(address)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None


def cmd_tokens(args) -> int:
    from dsocr.compress import grid_image_tokens
    from dsocr.vision.preprocess import count_image_tokens, crop_grid, valid_image_tokens

    if args.width < 1 or args.height < 1:
        raise ValueError(f"width and height must be >= 1 px, got {args.width}x{args.height}")
    rows = []  # all computed before anything is printed
    for m in [args.mode] if args.mode else list(MODES):
        cols, tiles = crop_grid(args.width, args.height, MODES[m])
        n = count_image_tokens(args.width, args.height, m)
        v = valid_image_tokens(args.width, args.height, m)
        g = grid_image_tokens(args.width, args.height, m)
        rows.append(f"{m:<10} {f'{cols}x{tiles}':>6} {n:>13} {v:>6} {g:>6}")
    # grid: the paper's count, the denominator of the compression ratio (dsocr compress)
    print(f"{'mode':<10} {'crops':>6} {'placeholders':>13} {'valid':>6} {'grid':>6}")
    print("\n".join(rows))
    return 0


def cmd_info(args) -> int:
    from dsocr.api import load_model

    ocr = load_model(args.model, device="cpu")
    cfg = ocr.model.config
    n = sum(p.numel() for p in ocr.model.parameters())
    print(f"model:      {ocr.source} ({cfg.name})")
    print(f"parameters: {n:,}")
    print(f"tokenizer:  {len(ocr.tokenizer)} tokens, <image> = {ocr.tokenizer.image_id}")
    from dsocr.language import fewrow

    print(f"cpu kernel: fewrow {fewrow.status()} (few-row decode products, fp32)")
    return 0


def _check_number(flag: str, value, zero_ok: bool = False) -> None:
    """Reject a zero (unless ``zero_ok``) or negative numeric flag, naming it."""
    if value is not None and (value < 0 or (value == 0 and not zero_ok)):
        raise ValueError(f"{flag} must be {'>= 0' if zero_ok else '> 0'}, got {value}")


def _model_tokenizer(source):
    """The tokenizer of ``--model`` (checkpoint folder, bundled model or variant), weights unread."""
    from dsocr.api import resolve_model_source
    from dsocr.configs import CONFIGS
    from dsocr.language.tokenizer import Tokenizer, byte_tokenizer

    resolved = resolve_model_source(source)
    if not isinstance(resolved, str):
        return Tokenizer.from_folder(resolved)
    vocab = CONFIGS[resolved].language.vocab_size  # a variant: as load_model builds it
    if vocab >= 1000:
        raise FileNotFoundError(f"{resolved}: a variant has no tokenizer.json; pass a folder")
    return Tokenizer(byte_tokenizer(vocab_size=vocab), source=f"{resolved} (byte tokenizer)")


def _tokens_line(st, model_name: str | None) -> str:
    """Text and vision tokens of CompressionStats: V3 count beside the model's, both ratios."""
    model = f", {st.model_text_tokens} {model_name}" if st.model_text_tokens is not None else ""
    return (
        f"{st.text_tokens} text tokens (DeepSeek-V3{model}), {st.vision_tokens} vision tokens "
        f"({st.valid_tokens} valid, {st.placeholder_tokens} placeholders), "
        f"{st.ratio:.1f}x compression per grid token, {st.ratio_valid:.1f}x per valid token"
    )


def cmd_compress(args) -> int:
    from dsocr.compress import compress, default_style
    from dsocr.render import unrenderable

    _check_number("--font-size", args.font_size)
    _check_number("--line-height", args.line_height)
    _check_number("--margin", args.margin, zero_ok=True)
    given = {
        k: v
        for k, v in (
            ("font", args.font),
            ("font_size", args.font_size),
            ("line_height", args.line_height),
            ("margin", args.margin),
            ("direction", args.direction),
        )
        if v is not None
    }
    try:  # one flag changes one property; the rest stay at the mode's scaled default
        style = default_style(args.mode, **given) if given else None
    except ValueError as e:
        raise ValueError(f"style flags do not fit a {args.mode} page: {e}") from None
    text = _read_text(args.text_file)
    why = unrenderable(text, style.font if style else "sans")
    if why is not None:
        raise ValueError(f"{args.text_file}: {why}")
    try:
        tokenizer = _model_tokenizer(args.model)
    except FileNotFoundError as e:
        if args.model is not None:
            raise
        print(f"dsocr: warning: no model tokenizer count ({e})", file=sys.stderr)
        tokenizer = None
    try:
        m = compress(
            text,
            args.mode,
            style,
            out_dir=args.out,
            fit_one_page=args.fit_one_page,
            tokenizer=tokenizer,
        )
    except OSError as e:
        raise ValueError(f"{args.out}: cannot write the pages ({e.strerror})") from None
    model_name = args.model or "dsocr-mini"
    print(
        f"{args.out}: {len(m.entries)} page(s) ({args.mode}), {_tokens_line(m.stats, model_name)}"
    )
    return 0


def _output_file(path: str):
    """``--output`` checked before any decoding: not a folder, under a writable folder."""
    import tempfile
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{p}: is a folder; give a file name for the text")
    parent = next(a for a in p.absolute().parents if a.exists())
    if not parent.is_dir():
        raise ValueError(f"{p}: cannot create it, {parent} is a file, not a folder")
    try:  # a real write, as os.access says yes to root and on read-only mounts
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        raise ValueError(f"{p}: cannot write the text ({e.strerror})") from None
    return p


def _write_output(p, text: str) -> None:
    from dsocr.fileio import atomic_write_text

    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(p, text)
    except OSError as e:
        raise ValueError(f"{p}: cannot write the text ({e.strerror})") from None


def cmd_decompress(args) -> int:
    from pathlib import Path

    from dsocr.api import load_model
    from dsocr.compress import decompress, load_manifest
    from dsocr.compress.accounting import model_token_count

    _check_number("--max-new-tokens", args.max_new_tokens)
    output = _output_file(args.output) if args.output else None
    manifest = load_manifest(args.folder)  # a bad folder is reported before the model loads
    source = _read_text(args.source) if args.source else None
    ocr = load_model(args.model, device=args.device, dtype=_dtype(args.dtype))
    try:
        res = decompress(
            manifest, ocr, args.prompt, source=source, max_new_tokens=args.max_new_tokens
        )
    except OSError as e:
        raise ValueError(f"{args.folder}: cannot read the pages ({e})") from None
    if output is not None:
        _write_output(output, str(res) + "\n")
    else:
        print(str(res))
    src = str((manifest.model_tokenizer or {}).get("source", "the compress --model"))
    name = Path(src).parent.name if src.endswith("tokenizer.json") else src  # dsocr-mini
    print(
        f"{args.folder}: {len(manifest.entries)} page(s) ({manifest.mode.name}), "
        f"{_tokens_line(manifest.stats, name)}",
        file=sys.stderr,
    )
    if source is not None:
        n = model_token_count(ocr.tokenizer, source)
        print(f"source: {n} text tokens with the decoding model's tokenizer", file=sys.stderr)
    if res.precision is not None:
        print(f"precision {res.precision:.4f}  recall {res.recall:.4f}", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / f"{args.name}.py"
    if not script.is_file():
        raise FileNotFoundError(f"{script}: benchmarks run from a source checkout of dsocr")
    sys.argv = [str(script), *args.args]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def _read_text(path: str) -> str:
    """The file's decoded text as is: no newline translation, so CRLF files hash as they are."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read text ({e})") from None


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line, pointing at --help (and at the nearest subcommand for a typo)."""

    def error(self, message: str):
        import difflib
        import re

        typo = re.match(r"argument command: invalid choice: '([^']*)'", message)
        names = getattr(self, "commands", [])
        if typo and names:
            near = difflib.get_close_matches(typo.group(1), names, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else f" (commands: {', '.join(names)})"
            message = f"unknown command '{typo.group(1)}'{hint}"
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


MODEL_HELP = "checkpoint folder, bundled model or variant (default: dsocr-mini)"
# bench/*.py, listed here because an installed dsocr has no bench/ folder to scan
BENCHMARKS = [
    "compression", "data", "engine", "expert_gemv", "memory", "mini", "pages", "render", "serve",
    "vision",
]  # fmt: skip


def _eval_run():
    from dsocr.eval import run

    return run


def _add_device_args(parser, dtype: bool = True) -> None:
    """``--device`` (and ``--dtype``) as every model-running command takes them."""
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda if any)"
    )
    if dtype:
        parser.add_argument(
            "--dtype",
            default=None,
            choices=["float32", "bfloat16", "float16"],
            help="default: bfloat16 on GPUs with native bf16 (compute capability 8.0+), "
            "else float32",
        )


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dsocr", description="DeepSeek-OCR in plain PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)

    o = sub.add_parser("ocr", help="decode images to text with one prompt")
    o.add_argument(
        "images", nargs="+", help="image files (of a PDF, page 1; dsocr convert reads them all)"
    )
    o.add_argument("--model", default=None, help=MODEL_HELP)
    o.add_argument(
        "--mode",
        default=None,
        choices=list(MODES),
        help="default: what the model was trained for (dsocr-mini: its meta.json), else base",
    )
    o.add_argument(
        "--task",
        default=None,
        choices=["free", "markdown", "ocr", "figure", "describe"],
        help="default: the model's own (meta.json), else free",
    )
    o.add_argument(
        "--prompt", default=None, help="a raw prompt with one <image> (overrides --task)"
    )
    o.add_argument(
        "--max-new-tokens",
        type=int,
        default=512,
        help="per image (default: 512); a page cut there gets a warning on stderr",
    )
    _add_device_args(o)
    o.set_defaults(func=cmd_ocr)

    v = sub.add_parser("convert", help="images and PDFs to Markdown + JSON (resumable batch)")
    v.add_argument("inputs", nargs="+", help="files, folders or globs")
    v.add_argument("-o", "--out", required=True, help="output folder")
    v.add_argument(
        "--task",
        default=None,
        choices=["markdown", "ocr", "free", "figure", "describe", "locate"],
        help="default: the model's own (meta.json), else markdown",
    )
    v.add_argument("--prompt", default=None, help="a raw prompt (overrides --task)")
    v.add_argument("--ref", default=None, help="what to locate (--task locate)")
    v.add_argument(
        "--mode",
        default=None,
        choices=list(MODES),
        help="default: what the model was trained for (meta.json), else gundam (official PDF mode)",
    )
    v.add_argument("--model", default=None, help=MODEL_HELP)
    _add_device_args(v)
    v.add_argument("--batch-size", type=int, default=8, help="pages decoded together (default: 8)")
    v.add_argument("--pages", default=None, help="page ranges, e.g. 1-5,9 (1-based)")
    v.add_argument(
        "--dpi", type=float, default=144, help="PDF rasterisation (default: 144, as official)"
    )
    v.add_argument("--password", default=None, help="for encrypted PDFs")
    v.add_argument("--max-new-tokens", type=int, default=8192, help="per page (default: 8192)")
    v.add_argument(
        "--tables-to-markdown",
        action="store_true",
        help="turn simple HTML tables into Markdown tables",
    )
    v.add_argument(
        "--backend",
        default="dsocr",
        choices=["dsocr", "vllm"],
        help="dsocr (this engine, CPU or GPU) or vllm (official checkpoint, CUDA GPU, Gundam)",
    )
    v.add_argument(
        "--ray", action="store_true", help="spread documents over a Ray cluster (dsocr[ray])"
    )
    v.add_argument("--replicas", type=int, default=2, help="model replicas (--ray; default: 2)")
    v.add_argument(
        "--gpus-per-replica", type=float, default=0, help="GPUs per replica (--ray; default: 0)"
    )
    v.add_argument("--ray-address", default=None, help="cluster address (--ray; default: local)")
    v.set_defaults(func=cmd_convert)

    e = sub.add_parser("eval", help="OCR accuracy and speed against peers (Tesseract, RapidOCR)")
    _eval_run().add_arguments(e)
    e.set_defaults(
        func=lambda a: _eval_run().run_from_args(
            a, _eval_run().command_line("dsocr eval", sys.argv[2:])
        )
    )

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP API (pip install dsocr[serve])")
    s.add_argument("--model", default=None, help=MODEL_HELP)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    s.add_argument("--port", type=int, default=8000, help="(default: 8000; 0: any free port)")
    _add_device_args(s, dtype=False)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    s.add_argument(
        "--max-upload-mb", type=float, default=20.0, help="per body or image (default: 20)"
    )
    s.add_argument("--max-pages", type=int, default=50, help="per /v1/ocr request (default: 50)")
    s.add_argument(
        "--timeout", type=float, default=300.0, help="seconds per request (default: 300)"
    )
    s.add_argument(
        "--max-queue", type=int, default=64, help="waiting requests before 429 (default: 64)"
    )
    s.add_argument(
        "--batch-size", type=int, default=8, help="requests decoded together (default: 8)"
    )
    s.add_argument(
        "--allow-remote-urls",
        action="store_true",
        help="let chat requests name http(s) image URLs, which the server then fetches "
        "(off by default: only base64 data: URLs)",
    )
    s.set_defaults(func=cmd_serve)

    t = sub.add_parser("tokens", help="vision tokens an image of WIDTH x HEIGHT costs per mode")
    t.add_argument("width", type=int, help="image width in px")
    t.add_argument("height", type=int, help="image height in px")
    t.add_argument("--mode", default=None, choices=list(MODES), help="default: every mode")
    t.set_defaults(func=cmd_tokens)

    c = sub.add_parser("compress", help="render a text file to page images + manifest")
    c.add_argument("text_file", help="UTF-8 text file")
    c.add_argument("--mode", default="tiny", choices=list(MODES), help="(default: tiny)")
    c.add_argument("--out", "-o", required=True, help="output folder")
    c.add_argument(
        "--font", default=None, choices=["sans", "serif", "mono"], help="(default: sans)"
    )
    c.add_argument("--font-size", type=int, default=None, help="px (default: scaled to the page)")
    c.add_argument("--line-height", type=float, default=None, help="x font size (default: 1.2)")
    c.add_argument(
        "--margin", type=int, default=None, help="px on every side (default: scaled to the page)"
    )
    c.add_argument(
        "--direction",
        default=None,
        choices=["auto", "ltr", "rtl"],
        help="block direction (default: auto, each block's first strong letter decides)",
    )
    c.add_argument(
        "--fit-one-page",
        action="store_true",
        help="largest font that fits one page (warns and paginates if none does)",
    )
    c.add_argument(
        "--model",
        default=None,
        help="also count text tokens with this model's tokenizer.json (checkpoint folder, "
        "bundled model or variant; default: dsocr-mini); its weights are not loaded",
    )
    c.set_defaults(func=cmd_compress)

    d = sub.add_parser("decompress", help="decode a compressed folder back to text")
    d.add_argument("folder", help="a dsocr compress output folder")
    d.add_argument("--model", default=None, help=MODEL_HELP)
    d.add_argument("--source", default=None, help="the original text file, to report precision")
    d.add_argument(
        "--prompt", default="<image>\nFree OCR.", help="(default: '<image>\\nFree OCR.')"
    )
    d.add_argument(
        "--max-new-tokens", type=int, default=None, help="per page (default: from its text tokens)"
    )
    _add_device_args(d)
    d.add_argument("--output", "-o", default=None, help="write the text here (default: stdout)")
    d.set_defaults(func=cmd_decompress)

    b = sub.add_parser("bench", help="run a benchmark script from bench/ (source checkout)")
    b.add_argument("name", choices=BENCHMARKS, help="the script, bench/NAME.py")
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("info", help="describe a model")
    i.add_argument("--model", default=None, help=MODEL_HELP)
    i.set_defaults(func=cmd_info)
    p.commands = list(sub.choices)  # for _Parser's "did you mean"
    return p


def main(argv: list[str] | None = None) -> int:
    import warnings

    args = build_parser().parse_args(argv)
    warnings.formatwarning = _warning_line
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"dsocr: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dsocr: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
