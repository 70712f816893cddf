"""Images and PDFs -> Markdown + JSON: the converter, its options and its stages.

The job users come for (as with marker and olmocr): files in, one folder of results per file out.
The official PDF runner (``run_dpsk_ocr_pdf.py``; reference spec §3.4, §6, §7) renders pages at
144 dpi, prompts ``<image>\\n<|grounding|>Convert the document to markdown.``, decodes greedily
(up to 8192 tokens) with a no-repeat n-gram ban (n=20, window 50, ``<td>``/``</td>``
whitelisted), and writes clean Markdown, the raw tagged output and a layout PDF. We do the same,
with continuous batching across documents and a resumable workspace::

    docs = convert(["scans/", "paper.pdf"], ocr="path/to/DeepSeek-OCR", out_dir="out")
    print(BatchSummary.from_documents(docs).format())

Stages (conventions §10: small classes with one ``__call__``, wired explicitly in ``Converter``):

    RenderPages   doc  -> page jobs      providers.iter_pages (PDF raster, image decode)
    Preprocess    job  -> job            the mode's views + prompt ids (vision/preprocess)
    Generate      jobs -> finished jobs  the engine: vision encoding at admission, continuous
                                         batching; pages of MANY documents share batches
    Postprocess   job  -> PageResult     blocks, Markdown, flags, figure crops, layout drawing
    WriteOutput   doc  -> doc            output.write_document through the workspace (atomic)

Deviation from ``__call__(doc) -> doc``: the unit differs per stage. Generation must see pages of
many documents at once (one batch mixes them), so documents are split into page jobs before it
and reassembled after it; everything else is a plain function of one page or one document.

Threads: RenderPages and Preprocess run in one producer thread that fills a bounded queue
(``ConvertOptions.prefetch`` pages) while the main thread runs the model, so rasterisation
overlaps generation. One thread is enough: PDFium is not thread-safe (providers serialises it
with a lock). Postprocess and writing run on the main thread between engine steps.

Memory: with an output folder, each page's figure crops and layout JPEG go to a spill folder in
the workspace as soon as the page is post-processed (``WriteOutput.spill``), so a long document
does not hold them all until it is written (a layout page is 0.1-0.4 MB at 144 dpi); without one
they stay in memory (``PageResult.image_data`` / ``layout_jpeg``), as the Python API returns them.

Page health: a page that ends without EOS (token limit), in a repetition loop (the engine's loop
detector, or ``postprocess.is_repetition_loop`` on the text), empty, or without grounding tags
under a grounding prompt keeps its text and carries flags in the JSON and the batch summary. No
page is dropped (the official runner's SKIP_REPEAT silently drops pages without EOS).

Errors: a bad input (``providers.InputError``: missing, unreadable, empty, corrupt, encrypted,
zero pages, too large, unsupported type) or an output folder that cannot be written
(``workspace.OutputError``) fails that document with a one-line error naming the file or folder;
the batch carries on, and ``BatchSummary.exit_code`` is 1.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import queue
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, NamedTuple, get_type_hints

from dsocr.configs import Mode, get_mode
from dsocr.engine.generate import Engine, GenerationParams, Request, Result
from dsocr.engine.sampling import ngram_whitelist_for
from dsocr.language.tokenizer import GROUNDING_TOKEN, IMAGE_TOKEN, PROMPTS, build_prompt_ids
from dsocr.pipeline.output import (
    LAYOUT_QUALITY,
    encode_jpeg,
    output_paths,
    spill_page,
    write_document,
)
from dsocr.pipeline.postprocess import (
    FLAG_EMPTY,
    FLAG_LOOP,
    FLAG_TRUNCATED,
    FLAG_UNGROUNDED,
    Block,
    crop_figures,
    draw_layout,
    figure_links,
    join_pages,
    page_flags,
    parse_grounded,
    to_markdown,
)
from dsocr.pipeline.providers import (
    DEFAULT_DPI,
    MAX_PIXELS,
    InputError,
    PageImage,
    canonical_page_spec,
    discover_inputs,
    iter_pages,
    missing_reason,
    page_range_items,
    sniff_type,
    unique_stems,
)
from dsocr.pipeline.workspace import (
    BatchSummary,
    OutputError,
    Workspace,
    document_key,
    options_fingerprint,
)
from dsocr.vision.preprocess import ImageInputs, preprocess_image

TASKS = ("markdown", "ocr", "free", "figure", "describe", "locate")
LAYOUT_PREVIEWS = ("pdf", "none")
FLAGS = (FLAG_TRUNCATED, FLAG_LOOP, FLAG_EMPTY, FLAG_UNGROUNDED)  # page flags, in JSON order
OUTPUT_VERSION = 1  # bump when the files written for the same inputs change (redoes documents)
# Pages between two ``release_free_memory()`` calls in a batch (and one at its end); see there.
TRIM_EVERY_PAGES = 32
# With an output folder, pages' crops and layout JPEGs wait in a spill folder on disk, not in
# memory, until their document is written (False: in memory, as without an output folder).
SPILL_PAGES = True


# ---------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class ConvertOptions:
    """Everything that controls a conversion. Field help is in ``Annotated`` (see ``help()``)."""

    task: Annotated[str, "what to ask the model: " + ", ".join(TASKS)] = "markdown"
    prompt: Annotated[str | None, "a raw prompt with one <image> (overrides task)"] = None
    ref: Annotated[str | None, "the phrase to find, for task 'locate'"] = None
    mode: Annotated[
        str | Mode, "resolution mode: tiny, small, base, large, gundam (official PDF), gundam-m"
    ] = "gundam"
    dpi: Annotated[float, "PDF render resolution (official: 144)"] = DEFAULT_DPI
    pages: Annotated[str | None, "pages to convert, 1-based ranges: '1-5,9', '3-'"] = None
    password: Annotated[str | None, "password of encrypted PDFs"] = None
    batch_size: Annotated[int, "pages decoded together; pages of several files share it"] = 8
    max_new_tokens: Annotated[int, "token limit per page (official: 8192); hits are flagged"] = 8192
    ngram_size: Annotated[int | None, "no-repeat n-gram size (official PDF: 20); None: off"] = 20
    ngram_window: Annotated[int, "generated tokens the n-gram ban looks back over"] = 50
    detect_loops: Annotated[bool, "stop a page stuck in a repetition loop (and flag it)"] = True
    html_tables_to_markdown: Annotated[bool, "turn simple HTML tables into pipe tables"] = False
    max_pixels: Annotated[int, "largest image accepted; larger PDF pages render smaller"] = (
        MAX_PIXELS
    )
    layout_preview: Annotated[str, "annotated <stem>_layouts.pdf for grounded tasks: pdf, none"] = (
        "pdf"
    )
    prefetch: Annotated[int | None, "pages rendered ahead of the model (default: batch_size)"] = (
        None
    )

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; known: {', '.join(TASKS)}")
        if self.prompt is None and self.task == "locate" and not self.ref:
            raise ValueError("task 'locate' needs a ref: the phrase to find (--ref)")
        n_images = self.resolved_prompt().count(IMAGE_TOKEN)
        if n_images != 1:
            raise ValueError(
                f"the prompt must contain exactly one {IMAGE_TOKEN} (found {n_images}): "
                f"{self.resolved_prompt()!r}"
            )
        try:
            get_mode(self.mode)
        except KeyError as e:
            raise ValueError(str(e.args[0])) from None
        if not 0 < self.dpi <= 2400:
            raise ValueError(f"dpi must be in (0, 2400], got {self.dpi}")
        for name in ("batch_size", "max_new_tokens", "ngram_window", "max_pixels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.prefetch is not None and self.prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {self.prefetch}")
        if self.ngram_size is not None and self.ngram_size < 2:
            raise ValueError(f"ngram_size must be >= 2 or None, got {self.ngram_size}")
        if self.layout_preview not in LAYOUT_PREVIEWS:
            raise ValueError(f"layout_preview must be one of {LAYOUT_PREVIEWS}")
        if self.pages is not None:
            _check_page_spec(self.pages)

    @classmethod
    def help(cls) -> dict[str, str]:
        """``{field: help text}`` from the ``Annotated`` metadata (for CLI help)."""
        hints = get_type_hints(cls, include_extras=True)
        return {f.name: hints[f.name].__metadata__[0] for f in fields(cls)}

    def resolved_prompt(self) -> str:
        if self.prompt is not None:
            return self.prompt
        if self.task == "locate":
            return PROMPTS["locate"].format(ref=self.ref)
        return PROMPTS[self.task]

    @property
    def grounded(self) -> bool:
        """Does the prompt ask for boxes (grounding tasks and 'locate')?"""
        p = self.resolved_prompt()
        return GROUNDING_TOKEN in p or "<|ref|>" in p

    def output_settings(self) -> dict[str, Any]:
        """The options that change the output files (the resume fingerprint); JSON-ready."""
        mode = asdict(get_mode(self.mode))
        mode.pop("paper_tokens", None)
        return {
            "task": self.task if self.prompt is None else "custom",
            "prompt": self.resolved_prompt(),
            "mode": mode,
            "dpi": float(self.dpi),
            "pages": None if self.pages is None else canonical_page_spec(self.pages),
            "max_new_tokens": self.max_new_tokens,
            "ngram_size": self.ngram_size,
            "ngram_window": self.ngram_window,
            "detect_loops": self.detect_loops,
            "html_tables_to_markdown": self.html_tables_to_markdown,
            "max_pixels": self.max_pixels,
            "layout_preview": self.layout_preview,
        }


def _check_page_spec(spec: str) -> None:
    """Reject a malformed page range once, up front (each document is checked again against
    its own length): syntax, page 0 and reversed ranges, quoted as written."""
    try:
        page_range_items(spec)
    except ValueError as e:
        raise ValueError(f"pages: {e}") from None


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class TokenCounts:
    """Per-page token counts (the compression ratio is ``generated / valid``)."""

    prompt: int = 0  # prompt ids, vision placeholders included
    vision: int = 0  # <image> placeholders: count_image_tokens(w, h, mode)
    valid: int = 0  # placeholders that cover image content (paper Eq. 1)
    generated: int = 0  # generated ids, a final EOS included


@dataclass
class PageResult:
    """One converted page. ``index`` is 0-based in the source; ``width``/``height`` are the page
    image's pixels (the pixel boxes refer to them). ``image_data`` / ``layout_jpeg`` hold the
    figure crops and the annotated page until they are written (then they are dropped); when
    converting into an output folder they are spilled to files right away, which
    ``image_files`` / ``layout_file`` name until the document is written."""

    index: int
    width: int
    height: int
    dpi: float | None
    raw: str
    blocks: list[Block]
    markdown: str
    flags: list[str]
    finish_reason: str
    tokens: TokenCounts = field(default_factory=TokenCounts)
    timings: dict[str, float] = field(default_factory=dict)
    image_names: list[str] = field(default_factory=list)  # crops, "images/<name>.jpg"
    image_data: dict[str, bytes] = field(default_factory=dict, repr=False)
    layout_jpeg: bytes | None = field(default=None, repr=False)
    image_files: dict[str, Path] = field(default_factory=dict, repr=False)  # spilled crops
    layout_file: Path | None = field(default=None, repr=False)  # spilled layout JPEG

    @property
    def has_layout(self) -> bool:
        """Does the page have a layout drawing waiting to be written (in memory or spilled)?"""
        return self.layout_jpeg is not None or self.layout_file is not None

    def to_json(self) -> dict:
        return {
            "page": self.index + 1,
            "index": self.index,
            "width": self.width,
            "height": self.height,
            "dpi": self.dpi,
            "finish_reason": self.finish_reason,
            "flags": list(self.flags),
            "tokens": asdict(self.tokens),
            "timings": {k: round(v, 6) for k, v in self.timings.items()},
            "images": [f"images/{n}.jpg" for n in self.image_names],
            "blocks": [b.to_dict() for b in self.blocks],
            "markdown": self.markdown,
            "raw": self.raw,
        }

    @classmethod
    def from_json(cls, d: dict) -> PageResult:
        blocks = [
            Block(
                b["label"],
                [tuple(x) for x in b.get("boxes", [])],
                [tuple(x) for x in b.get("pixel_boxes", [])],
                b.get("text", ""),
                tuple(b.get("span", (0, 0))),
            )
            for b in d.get("blocks", [])
        ]
        names = [Path(p).stem for p in d.get("images", [])]
        return cls(
            index=d["index"],
            width=d["width"],
            height=d["height"],
            dpi=d.get("dpi"),
            raw=d.get("raw", ""),
            blocks=blocks,
            markdown=d.get("markdown", ""),
            flags=list(d.get("flags", [])),
            finish_reason=d.get("finish_reason", ""),
            tokens=TokenCounts(**d.get("tokens", {})),
            timings=dict(d.get("timings", {})),
            image_names=names,
        )


@dataclass
class Document:
    """One input file and its pages. ``status``: pending, converted, skipped (done in an earlier
    run; pages read back from its JSON) or failed (``error`` is one line naming the file or
    folder). ``folder`` is where it was written, if it was."""

    source: Path
    stem: str
    pages: list[PageResult] = field(default_factory=list)
    status: str = "pending"
    error: str | None = None
    kind: str | None = None  # "pdf" or an image type (providers.sniff_type)
    page_count: int | None = None  # pages (frames) in the source
    sha256: str | None = None  # of the source file's bytes
    model: str = ""
    mode: str = ""
    task: str = ""
    prompt: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    folder: Path | None = None
    exception: BaseException | None = field(default=None, repr=False, compare=False)

    @property
    def markdown(self) -> str:
        """Clean Markdown, pages joined by the official page-split marker."""
        return join_pages(p.markdown for p in self.pages)

    @property
    def raw(self) -> str:
        """Raw model output (grounding tags kept), pages joined by the page-split marker."""
        return join_pages(p.raw for p in self.pages)

    @property
    def flagged_pages(self) -> list[PageResult]:
        return [p for p in self.pages if p.flags]

    @property
    def ok(self) -> bool:
        return self.status in ("converted", "skipped")

    def to_json(self) -> dict:
        tokens = TokenCounts()
        for p in self.pages:
            for k, v in asdict(p.tokens).items():
                setattr(tokens, k, getattr(tokens, k) + v)
        names = output_paths(self.stem)
        layouts = any(p.has_layout for p in self.pages) or (
            self.folder is not None and (self.folder / names["layouts"]).is_file()
        )
        return {
            "format": "dsocr.document",
            "version": OUTPUT_VERSION,
            "source": str(self.source),
            "stem": self.stem,
            "sha256": self.sha256,
            "kind": self.kind,
            "page_count": self.page_count,
            "pages_converted": len(self.pages),
            "model": self.model,
            "mode": self.mode,
            "task": self.task,
            "prompt": self.prompt,
            "settings": self.settings,
            "flagged_pages": [p.index + 1 for p in self.pages if p.flags],
            "tokens": asdict(tokens),
            "timings": {k: round(v, 6) for k, v in self.timings.items()},
            "files": {
                "markdown": names["markdown"],
                "raw": names["raw"],
                "layouts": names["layouts"] if layouts else None,
            },
            "pages": [p.to_json() for p in self.pages],
        }

    @classmethod
    def from_json(cls, d: dict, source: str | os.PathLike | None = None) -> Document:
        return cls(
            source=Path(source if source is not None else d["source"]),
            stem=d["stem"],
            pages=[PageResult.from_json(p) for p in d.get("pages", [])],
            status="converted",
            kind=d.get("kind"),
            page_count=d.get("page_count"),
            sha256=d.get("sha256"),
            model=d.get("model", ""),
            mode=d.get("mode", ""),
            task=d.get("task", ""),
            prompt=d.get("prompt", ""),
            settings=dict(d.get("settings", {})),
            timings=dict(d.get("timings", {})),
        )


# ---------------------------------------------------------------------------------------------
# Work items passed between the producer thread, the engine and the main loop


@dataclass(eq=False)
class PageJob:
    """A page on its way through the stages; dropped once its PageResult exists."""

    doc: Document
    page: PageImage
    prompt_ids: list[int] | None = None
    inputs: ImageInputs | None = None
    tokens: TokenCounts = field(default_factory=TokenCounts)
    result: Result | None = None
    timings: dict[str, float] = field(default_factory=dict)
    ready_at: float = 0.0  # perf_counter when queued for the model


@dataclass(eq=False)
class DocEnd:
    """All pages of ``doc`` were queued (``n_pages`` of them)."""

    doc: Document
    n_pages: int


@dataclass(eq=False)
class DocFailed:
    doc: Document
    error: BaseException


@dataclass(eq=False)
class DocSkipped:
    """``doc`` was finished by an earlier run; ``done`` is that run's document."""

    doc: Document
    done: Document


_END = object()  # the producer has nothing more


def _identify(path: Path) -> tuple[str, str | None]:
    """(sha256 of the bytes, sniffed type) of an input file; InputError if it cannot be read."""
    h = hashlib.sha256()
    if path.exists() and not path.is_dir() and not path.is_file():
        raise InputError(path, "not a regular file (a FIFO, socket or device)")
    try:
        with open(path, "rb") as f:
            head = f.read(1024)
            h.update(head)
            while block := f.read(1 << 20):
                h.update(block)
    except FileNotFoundError:
        raise InputError(path, missing_reason(path)) from None
    except IsADirectoryError:
        raise InputError(path, "is a directory, not a file") from None
    except OSError as e:
        raise InputError(path, f"cannot read file: {e.strerror or e}") from None
    return h.hexdigest(), sniff_type(head)


# ---------------------------------------------------------------------------------------------
# Stages


class RenderPages:
    """doc -> its pages as RGB images (``providers.iter_pages``), wrapped in page jobs.

    Raises InputError when the file cannot be opened, or during iteration when a page cannot
    be rendered. The generator holds the file open until it is exhausted or closed.
    """

    def __init__(self, options: ConvertOptions):
        self.options = options

    def __call__(self, doc: Document) -> Iterator[PageJob]:
        o = self.options
        pages = iter_pages(doc.source, o.dpi, o.pages, o.password, o.max_pixels, extract_text=False)
        try:
            while True:
                t0 = time.perf_counter()
                try:
                    page = next(pages)
                except StopIteration:
                    return
                doc.page_count = page.page_count
                yield PageJob(doc, page, timings={"render_s": time.perf_counter() - t0})
        finally:
            pages.close()


class Preprocess:
    """job -> job with the mode's views (``ImageInputs``), the prompt ids and token counts."""

    def __init__(self, tokenizer, prompt: str, mode: str | Mode, pixels_per_token: int = 64):
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.mode = get_mode(mode)
        self.pixels_per_token = pixels_per_token

    def __call__(self, job: PageJob) -> PageJob:
        t0 = time.perf_counter()
        inputs = preprocess_image(job.page.image, self.mode, self.pixels_per_token)
        ids = build_prompt_ids(self.tokenizer, self.prompt, [inputs.num_tokens])
        job.inputs, job.prompt_ids = inputs, ids
        job.tokens = TokenCounts(
            prompt=len(ids), vision=inputs.num_tokens, valid=inputs.valid_tokens
        )
        job.timings["preprocess_s"] = time.perf_counter() - t0
        return job


class Cancelled(Exception):
    """A conversion stopped by its ``cancel`` event (e.g. a server request that timed out)."""


class Generate:
    """A stream of page jobs (and document events) -> the same jobs with ``result`` set.

    Keeps up to ``batch_size`` pages in the engine; whenever one finishes, the next queued page
    joins the running batch (continuous batching), whatever document it comes from. Document
    events pass through in order. Only blocks for new input when nothing is in flight, so the
    model never waits on rendering it could overlap. ``engine`` is a ``dsocr.engine.Engine`` or
    anything with its ``add_request`` / ``step`` API (tests pass a fake).
    """

    def __init__(self, engine, params: GenerationParams, batch_size: int):
        self.engine = engine
        self.params = params
        self.batch_size = batch_size

    def __call__(
        self, source: Prefetcher, cancel: threading.Event | None = None
    ) -> Iterator[PageJob | DocEnd | DocFailed | DocSkipped]:
        """``cancel``: when set, raises ``Cancelled`` before the next engine step."""
        in_flight: dict[Any, PageJob] = {}
        exhausted = False
        try:
            while True:
                if cancel is not None and cancel.is_set():
                    raise Cancelled("conversion cancelled")
                while not exhausted and len(in_flight) < self.batch_size:
                    item = source.get(block=not in_flight)
                    if item is None:
                        break  # nothing ready; keep the model busy with what it has
                    if item is _END:
                        exhausted = True
                    elif isinstance(item, PageJob):
                        if item.doc.status != "pending":
                            continue  # its document failed meanwhile
                        failure = self._submit(item, in_flight)
                        if failure is not None:
                            yield failure
                    else:
                        yield item
                if not in_flight:
                    if exhausted:
                        return
                    continue
                for event in self.engine.step():
                    if event.result is None:
                        continue
                    job = in_flight.pop(event.request_id, None)
                    if job is None:
                        continue  # a request from an interrupted earlier run
                    job.result = event.result
                    yield job
        finally:
            if in_flight:
                self.reset()

    def _submit(self, job: PageJob, in_flight: dict) -> DocFailed | None:
        request_id = (job.doc.stem, job.page.index)
        # vLLM preprocesses the page itself: it gets the page image, dsocr's engine our tensors.
        raw = getattr(self.engine, "wants_raw_images", False)
        images = [job.page.image if raw else job.inputs]
        request = Request(job.prompt_ids, self.params, images=images, request_id=request_id)
        try:
            self.engine.add_request(request)
        except Exception as e:  # noqa: BLE001 - e.g. a prompt longer than the model's context
            err = InputError(job.doc.source, f"page {job.page.index + 1}: {type(e).__name__}: {e}")
            return DocFailed(job.doc, err)
        job.timings["wait_s"] = time.perf_counter() - job.ready_at
        job.inputs = job.prompt_ids = None  # the engine holds them until admission
        in_flight[request_id] = job
        return None

    def reset(self) -> None:
        """Forget requests left in the engine by an interrupted run."""
        self.engine.reset()


class Postprocess:
    """A finished page job -> PageResult: blocks, Markdown, flags, crops, layout drawing."""

    def __init__(self, options: ConvertOptions, tokenizer=None):
        self.options = options
        self.tokenizer = tokenizer
        self.grounded = options.grounded

    def __call__(self, job: PageJob) -> PageResult:
        t0 = time.perf_counter()
        res, page, o = job.result, job.page, self.options
        raw = res.text
        if raw is None:  # an engine without a tokenizer: decode here, final EOS dropped
            ids = res.token_ids[:-1] if res.finish_reason == "eos" else res.token_ids
            raw = self.tokenizer.decode(ids)
        image = page.image
        W, H = image.size
        blocks = parse_grounded(raw, W, H)
        image_data: dict[str, bytes] = {}
        links: dict[int, list[str]] = {}
        if self.grounded:
            crops = crop_figures(image, blocks)
            single = job.doc.kind != "pdf" and page.page_count == 1  # official: k.jpg vs p_k.jpg
            links = figure_links(crops, page=None if single else page.index)
            names = [n for ns in links.values() for n in ns]  # crop order
            image_data = {n: encode_jpeg(c) for n, (_, c) in zip(names, crops)}
        markdown = to_markdown(blocks, links, html_tables_to_markdown=o.html_tables_to_markdown)
        flags = set(page_flags(raw, stopped_at_eos=res.finish_reason in ("eos", "stop")))
        if res.finish_reason == "loop":  # the engine's detector stopped it
            flags.add(FLAG_LOOP)
        if not self.grounded:
            flags.discard(FLAG_UNGROUNDED)
        flags = [f for f in FLAGS if f in flags]
        layout = None
        if self.grounded and o.layout_preview == "pdf":
            layout = encode_jpeg(draw_layout(image, blocks), LAYOUT_QUALITY)
        tokens = TokenCounts(**asdict(job.tokens))
        tokens.generated = res.num_generated_tokens
        timings = dict(job.timings)
        timings.update(
            queue_s=res.queue_s,
            prefill_s=res.prefill_s,
            ttft_s=res.ttft_s,
            decode_s=res.decode_s,
            generate_s=res.total_s,
            postprocess_s=time.perf_counter() - t0,
        )
        job.page.image = None  # release the page image early (long PDFs)
        return PageResult(
            index=page.index,
            width=W,
            height=H,
            dpi=page.dpi,
            raw=raw,
            blocks=blocks,
            markdown=markdown,
            flags=flags,
            finish_reason=res.finish_reason,
            tokens=tokens,
            timings=timings,
            image_names=list(image_data),
            image_data=image_data,
            layout_jpeg=layout,
        )


class WriteOutput:
    """doc -> doc written to ``OUT/<stem>/`` through the workspace (staged, atomic, marked done).

    ``spill(doc, page)`` moves a post-processed page's crops and layout JPEG to the document's
    spill folder (``Workspace.spill_folder``), where writing takes them from; ``discard(doc)``
    removes that folder (done by writing, and by the converter when a document fails or the run
    stops). Drops the crops and layout pages afterwards. Raises OutputError naming the folder.
    """

    def __init__(self, workspace: Workspace, fingerprint: str, spill: bool | None = None):
        self.workspace = workspace
        self.fingerprint = fingerprint
        self.spill_pages = SPILL_PAGES if spill is None else spill
        self._spills: dict[str, Path] = {}  # stem -> spill folder of a document not yet written

    def spill(self, doc: Document, page: PageResult) -> None:
        if not self.spill_pages or (not page.image_data and page.layout_jpeg is None):
            return
        folder = self._spills.get(doc.stem)
        if folder is None:
            folder = self._spills[doc.stem] = self.workspace.spill_folder(doc.stem)
        try:
            spill_page(page, folder)
        except OSError as e:
            where = getattr(e, "filename", None) or folder
            reason = f"cannot stage page {page.index + 1}: {e.strerror or e} ({where})"
            raise OutputError(self.workspace.folder(doc.stem), reason) from None

    def discard(self, doc: Document) -> None:
        """Remove ``doc``'s spill folder, if it has one."""
        folder = self._spills.pop(doc.stem, None)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def discard_all(self) -> None:
        for folder in self._spills.values():
            shutil.rmtree(folder, ignore_errors=True)
        self._spills.clear()

    def __call__(self, doc: Document) -> Document:
        t0 = time.perf_counter()
        key = document_key(doc.sha256 or "", self.fingerprint)
        try:
            doc.folder = self.workspace.commit(doc, key, write_document)
        finally:
            self.discard(doc)
        doc.timings["write_s"] = time.perf_counter() - t0
        for page in doc.pages:
            page.image_data, page.image_files = {}, {}
            page.layout_jpeg = page.layout_file = None
        return doc


# ---------------------------------------------------------------------------------------------
# The producer thread


class Prefetcher:
    """Runs ``produce(doc)`` for each document in a background thread, into a bounded queue.

    ``produce`` yields page jobs and document events; an exception from it fails that document
    (a ``DocFailed`` item) and the thread moves on to the next one. ``get(block)`` returns the
    next item, None (nothing ready and ``block`` false) or ``_END``. ``close()`` stops the
    thread at its next queue operation (pages being rendered finish first).
    """

    def __init__(
        self,
        docs: Sequence[Document],
        produce: Callable[[Document], Iterator[Any]],
        maxsize: int,
    ):
        self.docs = list(docs)
        self.produce = produce
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, maxsize))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dsocr-pages", daemon=True)

    def start(self) -> Prefetcher:
        self._thread.start()
        return self

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stopped

    def _run(self) -> None:
        try:
            for doc in self.docs:
                items = self.produce(doc)
                try:
                    for item in items:
                        if isinstance(item, PageJob):
                            item.ready_at = time.perf_counter()
                        self._put(item)
                except _Stopped:
                    return
                except Exception as e:  # noqa: BLE001 - one bad document must not stop the batch
                    self._put(DocFailed(doc, e))
                finally:
                    items.close()  # closes the file now, in this thread (PDFium)
            self._put(_END)
        except _Stopped:
            return

    def get(self, block: bool = True):
        while True:
            try:
                return self._queue.get(timeout=0.1) if block else self._queue.get_nowait()
            except queue.Empty:
                if not block:
                    return None
                if not self._thread.is_alive() and self._queue.empty():
                    return _END

    def close(self, timeout: float = 30.0) -> None:
        self._stop.set()
        while True:  # unblock a put and free the queued pages
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)


class _Stopped(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Memory


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library is not glibc (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the C library this process already uses
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (and malloc_trim)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Give memory that glibc's malloc keeps after it was freed back to the OS (``malloc_trim(0)``);
    False, doing nothing, where the C library is not glibc.

    Why: a page's transient buffers (the rendered page, its views) are allocated in the producer
    thread's malloc arena and freed later, between longer-lived small blocks (likely PDFium's
    per-document objects: the arena shrinks when the PDF is closed). glibc reuses too little of
    that freed memory and only returns a heap's free top, so a long PDF's RSS grew by ~0.8 MB per
    page with the live heap flat (that arena's in-use bytes constant, its free bytes growing;
    jemalloc's RSS flat on the same run). ``malloc_trim(0)`` returns the free pages inside every
    arena; measured ~20 ms per call every ``TRIM_EVERY_PAGES`` pages, under 1% of a fast run.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


# ---------------------------------------------------------------------------------------------
# The converter


def _error_line(doc: Document, e: BaseException) -> str:
    """One line naming the input (and the output folder when that is what failed)."""
    if isinstance(e, InputError):
        return str(e)
    if isinstance(e, OutputError):
        return f"{doc.source}: cannot write output: {e}"
    text = " ".join(str(e).split())
    return (
        f"{doc.source}: {type(e).__name__}: {text}" if text else f"{doc.source}: {type(e).__name__}"
    )


class PlannedInput(NamedTuple):
    """One input file with its output stem, or the error that stopped it being expanded."""

    path: Path
    stem: str
    error: InputError | None = None


def plan_inputs(
    inputs: Iterable[str | os.PathLike], workspace: Workspace | None = None
) -> list[PlannedInput]:
    """Files, folders and globs -> one :class:`PlannedInput` per file, with unique safe stems.

    Loads no model, so a driver can plan a batch and hand shares of it to workers that write to
    the same output folder without their stems colliding. With the batch's ``workspace``, files
    under the output folder are not inputs (a rerun into a folder inside the input would read
    its own results), a file finished there before keeps its stem whatever else the batch
    holds, and the folders of other earlier documents are not reused.
    """
    exclude = workspace.root if workspace is not None else None
    previous = workspace.previous_stems() if workspace is not None else {}
    entries: list[tuple[Path, InputError | None]] = []
    seen: set[Path] = set()
    for item in inputs:
        try:
            found = discover_inputs([item], exclude=exclude)
            if not found:
                raise InputError(item, "no PDF or image files found")
        except InputError as e:
            entries.append((Path(item), e))
            continue
        for path in found:
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                entries.append((path, None))
    stems: list[str | None] = [None] * len(entries)
    claimed: set[str] = set()
    for i, (p, err) in enumerate(entries):
        stem = previous.get(p.resolve()) if err is None else None
        if stem is not None and stem.casefold() not in claimed:
            stems[i] = stem
            claimed.add(stem.casefold())
    this_run = {p.resolve() for p, _ in entries}
    reserved = {s.casefold() for src, s in previous.items() if src not in this_run}
    rest = [i for i, s in enumerate(stems) if s is None]
    for i, stem in zip(rest, unique_stems([entries[i][0] for i in rest], avoid=claimed | reserved)):
        stems[i] = stem
    return [PlannedInput(p, stem, err) for (p, err), stem in zip(entries, stems)]


class Converter:
    """Holds the model, the options and the stage tuple; ``convert(paths)`` runs a batch.

    ``ocr`` is a loaded ``dsocr.api.OCR``. ``out_dir`` (a folder or a ``Workspace``) enables
    writing and resuming (pages' crops and layout pages wait in a spill folder there until their
    document is written); without it documents stay in memory (with their crops and layout
    pages, ready for ``output.write_document``). ``engine`` replaces the default
    ``Engine(ocr.model, ocr.tokenizer, max_batch_size=options.batch_size)``.
    """

    def __init__(
        self,
        ocr,
        options: ConvertOptions | None = None,
        out_dir: str | os.PathLike | Workspace | None = None,
        engine=None,
    ):
        options = options or ConvertOptions()
        self.ocr = ocr
        self.options = options
        if out_dir is None or isinstance(out_dir, Workspace):
            self.workspace = out_dir
        else:
            self.workspace = Workspace(out_dir)
        tok = ocr.tokenizer
        if engine is None:
            engine = Engine(
                ocr.model, tok, max_batch_size=options.batch_size, dtype=ocr.model.dtype
            )
        params = GenerationParams(
            max_new_tokens=options.max_new_tokens,
            ngram_size=options.ngram_size,
            ngram_window=options.ngram_window,
            ngram_whitelist=ngram_whitelist_for(tok),  # <td>, </td> in this tokenizer's ids
            detect_loops=options.detect_loops,
        )
        config = ocr.model.config
        self.settings = {
            "output_version": OUTPUT_VERSION,
            "model": str(ocr.source),
            "model_config": config.name,
            **options.output_settings(),
        }
        self.fingerprint = options_fingerprint(self.settings)
        self.stages = (
            RenderPages(options),
            # an engine that tiles pages itself (vLLM) says how, so token counts are its own
            Preprocess(
                tok,
                options.resolved_prompt(),
                getattr(engine, "tiling_mode", options.mode),
                config.sam.pixels_per_token,
            ),
            Generate(engine, params, options.batch_size),
            Postprocess(options, tok),
            WriteOutput(self.workspace, self.fingerprint) if self.workspace is not None else None,
        )
        self.last_summary: BatchSummary | None = None

    # ---------------------------------------------------------------- inputs
    def documents(self, inputs: Iterable[str | os.PathLike | PlannedInput]) -> list[Document]:
        """Expand files, folders and globs into documents with unique safe stems.

        An input that cannot be expanded (missing path, glob without match, folder without
        supported files) becomes a failed document, so the batch carries on. Inputs that are
        already :class:`PlannedInput` (from :func:`plan_inputs`, e.g. one share of a distributed
        run) keep their stems.
        """
        inputs = list(inputs)
        planned = (
            inputs
            if all(isinstance(x, PlannedInput) for x in inputs)
            else plan_inputs(inputs, self.workspace)
        )
        o = self.options
        docs = []
        for path, stem, err in planned:
            doc = Document(
                source=path,
                stem=stem,
                model=str(self.ocr.source),
                mode=get_mode(o.mode).name,
                task=o.task if o.prompt is None else "custom",
                prompt=o.resolved_prompt(),
                settings=dict(self.settings),
            )
            if err is not None:
                doc.status, doc.error, doc.exception = "failed", str(err), err
            docs.append(doc)
        return docs

    # ---------------------------------------------------------------- producer side
    def _produce(self, doc: Document) -> Iterator[Any]:
        """Producer thread: identify, maybe skip (resume), render + preprocess every page."""
        render, preprocess = self.stages[0], self.stages[1]
        doc.sha256, doc.kind = _identify(doc.source)
        if self.workspace is not None:
            done = self._finished_earlier(doc)
            if done is not None:
                yield DocSkipped(doc, done)
                return
        n = 0
        for job in render(doc):
            yield preprocess(job)
            n += 1
        yield DocEnd(doc, n)

    def _finished_earlier(self, doc: Document) -> Document | None:
        key = document_key(doc.sha256, self.fingerprint)
        if not self.workspace.is_done(doc.stem, key):
            return None
        try:
            done = Document.from_json(self.workspace.document_json(doc.stem), source=doc.source)
        except (OSError, ValueError, KeyError, TypeError):
            return None  # unreadable JSON: convert again
        done.status, done.folder = "skipped", self.workspace.folder(doc.stem)
        return done

    # ---------------------------------------------------------------- main loop
    def convert(
        self,
        inputs: Iterable[str | os.PathLike],
        on_document: Callable[[Document], None] | None = None,
        on_page: Callable[[Document, PageResult], None] | None = None,
        cancel: threading.Event | None = None,
        on_start: Callable[[list[Document]], None] | None = None,
    ) -> list[Document]:
        """Convert a batch; returns one Document per input file, in input order.

        ``on_start(docs)`` is called once with the planned documents (inputs expanded, failed
        ones included) before any work, so a caller can size a progress bar without expanding
        the inputs itself; ``on_document(doc)`` as each document is converted, skipped or
        failed, and ``on_page(doc, page)`` as each page is decoded (long PDFs). Setting
        ``cancel`` stops the run between engine steps with ``Cancelled`` (handled as Ctrl-C). The
        run's
        ``BatchSummary`` is in ``self.last_summary`` (and ``OUT/.dsocr/summary.json``). Ctrl-C
        (KeyboardInterrupt) propagates after the producer is stopped; finished documents keep
        their folders and markers, nothing partial is left.
        """
        _, _, generate, postprocess, write = self.stages
        t_start, wall0 = time.time(), time.perf_counter()
        docs = self.documents(inputs)
        if on_start is not None:
            on_start(list(docs))
        by_stem = {d.stem: d for d in docs}
        expected: dict[str, int] = {}
        results: dict[str, dict[int, PageResult]] = {d.stem: {} for d in docs}
        for d in docs:
            d.timings["started_at"] = t_start

        def finish(doc: Document, status: str, error: BaseException | None = None) -> None:
            if error is not None:
                doc.status, doc.error, doc.exception, doc.pages = (
                    "failed",
                    _error_line(doc, error),
                    error,
                    [],
                )
            else:
                doc.status = status
            doc.timings["finished_at"] = time.time()
            results.pop(doc.stem, None)
            if write is not None:
                write.discard(doc)  # a failed document leaves no spilled pages
            if on_document is not None:
                on_document(doc)

        def maybe_complete(doc: Document) -> None:
            if doc.status != "pending" or doc.stem not in expected:
                return
            pages = results[doc.stem]
            if len(pages) < expected[doc.stem]:
                return
            doc.pages = [pages[i] for i in sorted(pages)]
            doc.timings["done_after_s"] = time.time() - doc.timings["started_at"]
            try:
                if write is not None:
                    write(doc)
            except Exception as e:  # noqa: BLE001 - OutputError and anything else: fail this doc
                finish(doc, "failed", e)
                return
            finish(doc, "converted")

        for d in docs:
            if d.status == "failed" and on_document is not None:
                d.timings["finished_at"] = time.time()
                on_document(d)
        pending = [d for d in docs if d.status == "pending"]
        prefetch = Prefetcher(
            pending, self._produce, self.options.prefetch or self.options.batch_size
        )
        interrupted = False
        untrimmed = 0  # pages since the last release_free_memory()
        stream = generate(prefetch, cancel)
        try:
            prefetch.start()
            for item in stream:
                doc = by_stem[item.doc.stem]
                if doc.status != "pending":
                    continue  # failed meanwhile: drop its remaining pages
                if isinstance(item, PageJob):
                    try:
                        page = results[doc.stem][item.page.index] = postprocess(item)
                        if write is not None:
                            write.spill(doc, page)  # its crops and layout wait on disk
                    except Exception as e:  # noqa: BLE001
                        finish(doc, "failed", e)
                        continue
                    untrimmed += 1
                    if untrimmed >= TRIM_EVERY_PAGES:
                        release_free_memory()
                        untrimmed = 0
                    if on_page is not None:
                        on_page(doc, page)
                elif isinstance(item, DocEnd):
                    expected[doc.stem] = item.n_pages
                elif isinstance(item, DocFailed):
                    finish(doc, "failed", item.error)
                    continue
                elif isinstance(item, DocSkipped):
                    done = item.done
                    doc.pages, doc.folder = done.pages, done.folder
                    doc.page_count, doc.kind = done.page_count, done.kind
                    doc.timings.update({k: v for k, v in done.timings.items() if k.endswith("_s")})
                    finish(doc, "skipped")
                    continue
                maybe_complete(doc)
        except BaseException:
            interrupted = True
            raise
        finally:
            stream.close()  # forgets requests left in the engine
            prefetch.close()
            if write is not None:
                write.discard_all()  # spilled pages of documents an interruption left unwritten
            if untrimmed:
                release_free_memory()  # a server runs batch after batch in one process
            wall = time.perf_counter() - wall0
            self.last_summary = BatchSummary.from_documents(docs, wall, interrupted)
            if self.workspace is not None:
                try:
                    self.workspace.write_summary(self.last_summary)
                except OutputError as e:  # the documents are written; do not lose them
                    warnings.warn(f"batch summary not written: {e}", stacklevel=2)
        return docs


# ---------------------------------------------------------------------------------------------
# Functions


def _load(ocr, device=None, dtype=None):
    if ocr is None or isinstance(ocr, str | os.PathLike):
        from dsocr.api import load_model

        return load_model(ocr, device=device, dtype=dtype)
    return ocr


def convert(
    inputs: str | os.PathLike | Iterable[str | os.PathLike],
    ocr=None,
    out_dir: str | os.PathLike | None = None,
    *,
    device: str | None = None,
    dtype=None,
    backend: str = "dsocr",
    on_document: Callable[[Document], None] | None = None,
    on_page: Callable[[Document, PageResult], None] | None = None,
    cancel: threading.Event | None = None,
    on_start: Callable[[list[Document]], None] | None = None,
    **options,
) -> Document | list[Document]:
    """Convert files, folders and globs; one path to one file returns its Document.

    A single file path (a ``str`` or ``PathLike`` that is not a folder or a glob) returns its
    :class:`Document` and raises its ``InputError`` / ``OutputError`` if it fails. Anything else
    (a list, a folder, a glob) returns one Document per input file, in input order, failed ones
    included (``doc.status``, ``doc.error``). ``ocr`` is a loaded ``OCR`` or a model source for ``dsocr.load_model`` (a checkpoint folder,
    a bundled model, a variant name; None: the default model). ``options`` are
    :class:`ConvertOptions` fields. With ``out_dir`` every document is written to
    ``out_dir/<stem>/`` and a rerun skips the finished ones. The output folder is checked before
    the model is loaded. Summarise with ``BatchSummary.from_documents(docs)``. ``backend="vllm"``
    decodes with vLLM (official checkpoint, CUDA GPU, Gundam mode; see ``dsocr.vllm_backend``).
    Setting ``cancel`` (a ``threading.Event``) from another thread stops the run with
    ``Cancelled`` before the next engine step. ``on_start``, ``on_document`` and ``on_page``:
    see :meth:`Converter.convert`.
    """
    from dsocr.api import check_device, model_defaults

    if device is not None:
        check_device(device)  # before the output folder is made
    # A checkpoint's own defaults (meta.json: the mode and task it was trained for) fill in what
    # the caller left out; official checkpoints keep the official ones (gundam, markdown).
    source = getattr(ocr, "source", ocr)
    opts = ConvertOptions(**(model_defaults(source) | options))
    single = isinstance(inputs, str | os.PathLike) and names_one_file(inputs)
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    workspace = Workspace(out_dir) if out_dir is not None else None
    if backend == "vllm":
        from dsocr.api import resolve_model_source
        from dsocr.vllm_backend import VllmEngine, VllmOCR, check_vllm

        check_vllm()
        vocr = VllmOCR(resolve_model_source(source))
        engine = VllmEngine(vocr, opts.resolved_prompt(), opts.mode, max_batch_size=opts.batch_size)
        converter = Converter(vocr, opts, workspace, engine=engine)
    elif backend == "dsocr":
        converter = Converter(_load(ocr, device, dtype), opts, workspace)
    else:
        raise ValueError(f"unknown backend {backend!r}; known: dsocr, vllm")
    docs = converter.convert(
        inputs, on_document=on_document, on_page=on_page, cancel=cancel, on_start=on_start
    )
    if not single:
        return docs
    (doc,) = docs
    if doc.status == "failed":
        raise doc.exception if doc.exception is not None else RuntimeError(doc.error)
    return doc


def names_one_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` names one file (existing or not) rather than a folder or a glob."""
    p = Path(path)
    return not p.is_dir() and (p.exists() or not any(c in str(path) for c in "*?["))


def convert_file(
    path: str | os.PathLike,
    ocr=None,
    out_dir: str | os.PathLike | None = None,
    **options,
) -> Document:
    """Convert one file; raises its InputError / OutputError instead of returning a failure."""
    if not names_one_file(path):
        raise ValueError(f"{path}: is a folder or a glob; use convert() for those")
    return convert(path, ocr, out_dir, **options)
