"""The FastAPI app behind ``dsocr serve``.

Endpoints:

* ``POST /v1/chat/completions`` -- OpenAI chat format. Content parts ``{"type": "text"}`` and
  ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``. The prompt is the
  official layout ``<image>\\n`` + text (one ``<image>`` per image unless the text already holds
  them). ``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``, ``stream`` (SSE, OpenAI
  chunks, ``data: [DONE]``), ``stream_options.include_usage``; extensions ``mode`` (default: the
  mode the checkpoint's meta.json names, else "base") and ``ignore_eos``. Remote http(s) URLs are
  refused (400) unless ``allow_remote_urls`` (``dsocr serve --allow-remote-urls``), which fetches
  them with the upload limit and the request's deadline.
* ``POST /v1/ocr`` -- multipart ``file`` (image or PDF) plus the ``dsocr convert`` options
  ``task``, ``prompt``, ``ref``, ``mode``, ``pages``, ``dpi``, ``max_new_tokens``,
  ``html_tables_to_markdown``, ``password`` (an unknown field is a 422); runs
  ``pipeline.convert.convert`` (``out_dir=None``) on a temp file named after the upload and returns
  ``{"markdown", "document"}`` (``document`` = ``Document.to_json()``, with the upload's file
  name as ``source`` and the served model's name as ``model``, never server paths).
* ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text format).

Errors are OpenAI-style ``{"error": {"message", "type", "code"}}``: 400 malformed JSON / bad
payload / non-image, 401 bad or missing Bearer key, 413 upload too large **and too many pages**
(code ``too_many_pages``), 422 invalid fields, 429 queue full (with ``Retry-After``), 504 request
timeout. Bodies over the limit are refused while they are read, with or without Content-Length.

Concurrency: ONE worker thread owns the ``Engine`` (continuous batching: concurrent chat requests
share the decode batch). Handlers preprocess images in a thread, hand a ``Request`` to the worker
through a bounded budget (``max_batch_size`` active + ``max_queue`` waiting; beyond: 429) and
receive ``StreamEvent`` s on a per-request asyncio queue (``loop.call_soon_threadsafe``). A timed
out / disconnected request (streaming or not; disconnects are polled every
``DISCONNECT_POLL_S``) is dropped from the engine's waiting queue, or, when already decoding,
finished at its next step. ``/v1/ocr`` jobs run one at a time in their own thread (the same
``convert`` the CLI uses, which builds its own engine on the shared model); at most ``max_queue``
more wait, and a timed-out conversion is cancelled before its next engine step.

Metrics: request latency is measured to the end of the response body (a stream's last event); a
stream that ends in an error event is counted under that error's status.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import queue
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsocr.configs import get_mode
from dsocr.engine.generate import Engine, GenerationParams, Request, StreamEvent
from dsocr.engine.sampling import OFFICIAL_NGRAM_SETTINGS, ngram_whitelist_for
from dsocr.language.tokenizer import build_prompt_ids
from dsocr.pipeline.providers import (
    IMAGE_TYPE_NAMES,
    MAX_PIXELS,
    UNSUPPORTED_TYPE,
    InputError,
    count_pages,
    iter_pages,
    parse_page_ranges,
    safe_stem,
    sniff_type,
)
from dsocr.vision.preprocess import preprocess_image

IMAGE_TOKEN = "<image>"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
KNOWN_PATHS = ("/v1/chat/completions", "/v1/ocr", "/v1/models", "/health", "/metrics")
FINISH_MAP = {"eos": "stop", "stop": "stop", "length": "length", "loop": "stop"}
DISCONNECT_POLL_S = 0.5
OCR_FIELDS = ("file", "model")  # besides the convert options; "model" is accepted and ignored


# --------------------------------------------------------------------------------------------------
# Errors


class APIError(Exception):
    """An HTTP error with an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code


def _too_large(message: str) -> APIError:
    """413 for a body, image or upload over ``max_upload_bytes``."""
    return APIError(413, message, code="upload_too_large")


def error_body(message: str, type_: str, code: str | None) -> dict:
    return {"error": {"message": message, "type": type_, "code": code}}


def _error_response(e: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    if e.status == 429:
        headers = {"Retry-After": "1"}
    return JSONResponse(
        error_body(e.message, e.type, e.code), status_code=e.status, headers=headers
    )


# --------------------------------------------------------------------------------------------------
# Metrics


class Metrics:
    """Hand-written Prometheus counters; thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, list[int]] = {}
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.latency_count: dict[str, int] = defaultdict(int)
        self.pages = 0
        self.generated_tokens = 0
        self.prompt_tokens = 0

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            buckets = self.latency.setdefault(endpoint, [0] * len(LATENCY_BUCKETS))
            for i, b in enumerate(LATENCY_BUCKETS):
                if seconds <= b:
                    buckets[i] += 1
            self.latency_sum[endpoint] += seconds
            self.latency_count[endpoint] += 1

    def add(self, pages: int = 0, generated: int = 0, prompt: int = 0) -> None:
        with self._lock:
            self.pages += pages
            self.generated_tokens += generated
            self.prompt_tokens += prompt

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        out: list[str] = []
        with self._lock:
            out += [
                "# HELP dsocr_requests_total HTTP requests by endpoint and status.",
                "# TYPE dsocr_requests_total counter",
            ]
            for (ep, st), n in sorted(self.requests.items()):
                out.append(f'dsocr_requests_total{{endpoint="{ep}",status="{st}"}} {n}')
            for name, value, help_ in (
                ("dsocr_pages_total", self.pages, "Pages (images) processed."),
                (
                    "dsocr_generated_tokens_total",
                    self.generated_tokens,
                    "Tokens generated for finished requests.",
                ),
                ("dsocr_prompt_tokens_total", self.prompt_tokens, "Prompt tokens (chat)."),
            ):
                out += [f"# HELP {name} {help_}", f"# TYPE {name} counter", f"{name} {value}"]
            out += [
                "# HELP dsocr_request_latency_seconds Time to the end of the response body.",
                "# TYPE dsocr_request_latency_seconds histogram",
            ]
            for ep in sorted(self.latency):
                for b, n in zip(LATENCY_BUCKETS, self.latency[ep]):
                    out.append(
                        f'dsocr_request_latency_seconds_bucket{{endpoint="{ep}",le="{b}"}} {n}'
                    )
                cnt = self.latency_count[ep]
                out.append(
                    f'dsocr_request_latency_seconds_bucket{{endpoint="{ep}",le="+Inf"}} {cnt}'
                )
                out.append(
                    f'dsocr_request_latency_seconds_sum{{endpoint="{ep}"}} '
                    f"{self.latency_sum[ep]:.6f}"
                )
                out.append(f'dsocr_request_latency_seconds_count{{endpoint="{ep}"}} {cnt}')
        for name, (help_, value) in gauges.items():
            out += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name} {value:g}"]
        return "\n".join(out) + "\n"


class AuthAndMetrics:
    """Pure ASGI middleware: the optional Bearer key on ``/v1/*``, and every request's status and
    latency to the end of its body (a stream's last event) into ``Metrics``. A stream that ends in
    an error event sets ``request.state.stream_status``, which is counted instead of its 200.

    Not ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware wraps ``receive`` so that
    ``Request.is_disconnected()`` never sees a client leave, which the chat handler relies on.
    """

    def __init__(self, app, api_key: str | None, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path = scope["path"]
        endpoint = path if path in KNOWN_PATHS else "other"
        status = {"code": 500}  # an app that dies before answering

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self.api_key is not None and path.startswith("/v1/") and not self._authorised(scope):
                e = APIError(
                    401,
                    "invalid or missing API key (Authorization: Bearer <key>)",
                    "authentication_error",
                    "invalid_api_key",
                )
                await _error_response(e)(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            code = scope.get("state", {}).get("stream_status", status["code"])
            self.metrics.observe(endpoint, code, time.perf_counter() - t0)

    def _authorised(self, scope) -> bool:
        auth = ""
        for k, v in scope.get("headers", ()):
            if k == b"authorization":
                auth = v.decode("latin-1")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        return hmac.compare_digest(token.encode(), self.api_key.encode())


# --------------------------------------------------------------------------------------------------
# The engine worker


class QueueFull(Exception):
    pass


class EngineWorker:
    """One thread owning an ``Engine``: takes requests from handlers, loops ``engine.step()`` and
    routes each ``StreamEvent`` to its request's callback. ``max_active_seen``: the most requests
    ever decoding in one batch (tests assert continuous batching with it)."""

    def __init__(self, ocr, max_batch_size: int, max_queue: int, metrics: Metrics | None = None):
        self.ocr, self.max_batch_size, self.max_queue = ocr, max_batch_size, max_queue
        self.metrics = metrics
        self.engine = self._new_engine()
        self._inbox: queue.Queue = queue.Queue()
        self._cancel: queue.Queue = queue.Queue()
        self._callbacks: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.outstanding = 0  # accepted, not yet finished (waiting + active)
        self.active = 0
        self.max_active_seen = 0
        self.steps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dsocr-engine", daemon=True)

    def _new_engine(self) -> Engine:
        return Engine(
            self.ocr.model,
            self.ocr.tokenizer,
            max_batch_size=self.max_batch_size,
            dtype=self.ocr.model.dtype,
            eos_id=self.ocr.tokenizer.eos_id,
        )

    @property
    def capacity(self) -> int:
        return self.max_batch_size + self.max_queue

    @property
    def queue_depth(self) -> int:
        return max(0, self.outstanding - self.active)

    def start(self) -> EngineWorker:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def submit(self, request: Request, on_event) -> str:
        """Queue ``request`` (its ``request_id`` set here); raises QueueFull beyond capacity.
        ``on_event(ev)`` is called from the worker thread with each StreamEvent, or with an
        Exception if the engine failed."""
        rid = uuid.uuid4().hex
        request.request_id = rid
        with self._lock:
            if self.outstanding >= self.capacity:
                raise QueueFull()
            self.outstanding += 1
        self._inbox.put((request, on_event))
        return rid

    def cancel(self, rid: str) -> None:
        self._cancel.put(rid)

    # ---------------------------------------------------------------- worker thread
    def _finish(self, rid: str) -> None:
        if self._callbacks.pop(rid, None) is not None:
            with self._lock:
                self.outstanding -= 1

    def _take_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            request, cb = item
            try:
                self.engine.add_request(request)
                self._callbacks[request.request_id] = cb
            except Exception as e:  # noqa: BLE001 - reported to its request
                with self._lock:
                    self.outstanding -= 1
                cb(e)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _take_cancels(self) -> None:
        while True:
            try:
                rid = self._cancel.get_nowait()
            except queue.Empty:
                return
            if rid not in self._callbacks:
                continue
            if self.engine.abort(rid):
                self._finish(rid)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._take_inbox(block=not self.engine.has_unfinished())
            self._take_cancels()
            self.active = len(self.engine.active)  # an abort can empty the batch
            if not self.engine.has_unfinished():
                continue
            try:
                events: list[StreamEvent] = self.engine.step()
            except Exception as e:  # noqa: BLE001 - fail what is in flight, keep serving
                for rid, cb in list(self._callbacks.items()):
                    cb(e)
                    self._finish(rid)
                self.engine = self._new_engine()
                self.active = 0
                continue
            self.steps += 1
            self.active = len(self.engine.active)
            self.max_active_seen = max(self.max_active_seen, self.engine.stats.max_active)
            for ev in events:
                cb = self._callbacks.get(ev.request_id)
                if cb is not None:
                    cb(ev)
                if ev.result is not None:
                    if self.metrics is not None:
                        self.metrics.add(
                            generated=ev.result.num_generated_tokens,
                            prompt=ev.result.num_prompt_tokens,
                        )
                    self._finish(ev.request_id)


# --------------------------------------------------------------------------------------------------
# Request schemas


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


class ImageURL(_Loose):
    url: str


class ContentPart(_Loose):
    type: str
    text: str | None = None
    image_url: ImageURL | str | None = None


class Message(_Loose):
    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(_Loose):
    include_usage: bool = False


class ChatRequest(_Loose):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    mode: str | None = None  # extension: resolution mode (None: the model's default)
    ignore_eos: bool = False  # extension (as vLLM): always run max_tokens


@dataclass
class _Prepared:
    request: Request
    n_images: int
    created: int = field(default_factory=lambda: int(time.time()))


# --------------------------------------------------------------------------------------------------
# The app


def create_app(
    ocr,
    *,
    max_upload_bytes: int = 20 * 2**20,
    max_pages: int = 50,
    request_timeout_s: float = 300.0,
    max_queue: int = 64,
    api_key: str | None = None,
    allow_remote_urls: bool = False,
    max_batch_size: int = 8,
    max_new_tokens: int = 8192,
    model_name: str | None = None,
) -> FastAPI:
    """The server for a loaded ``OCR``. ``max_new_tokens`` is the default/ceiling of
    ``max_tokens``. The engine worker starts with the app (lifespan) and stops with it."""
    from dsocr.api import model_defaults

    model_name = model_name or (Path(ocr.source).name if ocr.source else "dsocr")
    default_mode = model_defaults(ocr.source or None).get("mode", "base")
    metrics = Metrics()
    worker = EngineWorker(ocr, max_batch_size, max_queue, metrics)
    ocr_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dsocr-convert")
    ocr_state = {"outstanding": 0}
    whitelist = ngram_whitelist_for(ocr.tokenizer)
    max_positions = ocr.model.config.language.max_position_embeddings
    ngram = OFFICIAL_NGRAM_SETTINGS["image"]

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            worker.stop()
            ocr_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="dsocr", lifespan=lifespan)
    app.state.worker = worker
    app.state.metrics = metrics
    app.state.ocr = ocr

    # ---------------------------------------------------------------- errors and middleware
    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        msg = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        return _error_response(APIError(422, msg or "invalid request", code="invalid_fields"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        return _error_response(APIError(e.status_code, str(e.detail), code=None))

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        return _error_response(
            APIError(
                500, f"internal error: {type(e).__name__}: {e}", "server_error", "internal_error"
            )
        )

    app.add_middleware(AuthAndMetrics, api_key=api_key, metrics=metrics)

    def check_length(request: HTTPRequest, limit: int) -> None:
        n = request.headers.get("content-length")
        if n is not None and n.isdigit() and int(n) > limit:
            raise _too_large(f"request body of {int(n)} bytes exceeds the limit of {limit}")

    async def read_body(request: HTTPRequest, limit: int) -> bytes:
        """The body, refused (413) as soon as it passes ``limit``: a chunked upload has no
        Content-Length to check first."""
        check_length(request, limit)
        buf = bytearray()
        async for piece in request.stream():
            buf += piece
            if len(buf) > limit:
                raise _too_large(f"request body exceeds the limit of {limit} bytes")
        return bytes(buf)

    # ---------------------------------------------------------------- info endpoints
    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": model_name,
            "queue_depth": worker.queue_depth,
            "active": worker.active,
        }

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "dsocr"}],
        }

    @app.get("/metrics")
    async def prometheus():
        gauges = {
            "dsocr_queue_depth": ("Chat requests waiting for a batch slot.", worker.queue_depth),
            "dsocr_active_requests": ("Chat requests decoding now.", worker.active),
            "dsocr_ocr_jobs": ("/v1/ocr jobs running or waiting.", ocr_state["outstanding"]),
            "dsocr_max_active_seen": (
                "Most requests ever decoding together.",
                worker.max_active_seen,
            ),
        }
        return PlainTextResponse(
            metrics.render(gauges), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    # ---------------------------------------------------------------- chat completions
    def fetch_remote(url: str, deadline: float) -> bytes:
        """GET an http(s) image URL (only with ``allow_remote_urls``), capped at the upload
        limit and the request's deadline."""
        import urllib.error
        import urllib.request

        timeout = max(0.1, min(30.0, deadline - time.monotonic()))
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - opted in
                raw = r.read(max_upload_bytes + 1)
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise APIError(400, f"cannot fetch {url}: {reason}", code="remote_url_failed") from None
        if len(raw) > max_upload_bytes:
            raise _too_large(f"{url}: image exceeds the upload limit of {max_upload_bytes} bytes")
        return raw

    def decode_image(url: str, deadline: float) -> Image.Image:
        if url.startswith(("http://", "https://")):
            if not allow_remote_urls:
                raise APIError(
                    400,
                    "remote image URLs are disabled on this server; send a data: URL (base64)",
                    code="remote_url_disabled",
                )
            raw = fetch_remote(url, deadline)
        else:
            raw = decode_data_url(url)
        return open_image(raw)

    def decode_data_url(url: str) -> bytes:
        if not url.startswith("data:") or "," not in url:
            raise APIError(
                400,
                "image_url must be a data: URL (data:image/png;base64,...)",
                code="invalid_image_url",
            )
        header, payload = url[5:].split(",", 1)
        if not header.endswith(";base64"):
            raise APIError(400, "image data: URL must be base64-encoded", code="invalid_image_url")
        if len(payload) * 3 // 4 > max_upload_bytes + 3:
            raise _too_large(f"image exceeds the upload limit of {max_upload_bytes} bytes")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, "image data is not valid base64", code="invalid_image") from None
        return raw

    def open_image(raw: bytes) -> Image.Image:
        """An uploaded image's first page, decoded as ``dsocr convert`` decodes files
        (``iter_pages``: the pixel limit, EXIF rotation, 12-bit samples, transparency, AVIF
        and HEIC decoders), from a private temporary file."""
        if len(raw) > max_upload_bytes:
            raise _too_large(
                f"image of {len(raw)} bytes exceeds the upload limit of {max_upload_bytes} bytes"
            )
        kind = sniff_type(raw[:1024])
        if kind is None or kind == "pdf":
            raise APIError(
                400,
                f"payload is not a supported image ({IMAGE_TYPE_NAMES}); use /v1/ocr for PDFs",
                code="invalid_image",
            )
        with tempfile.TemporaryDirectory(prefix="dsocr-image-") as d:
            path = Path(d) / f"image.{kind}"
            path.write_bytes(raw)
            try:
                pages = iter_pages(path, pages=[0], max_pixels=MAX_PIXELS, extract_text=False)
                try:
                    return next(pages).image
                finally:
                    pages.close()
            except InputError as e:  # corrupt, too many pixels, no decoder: the client's
                raise APIError(
                    400, f"cannot decode image: {e.reason}", code="invalid_image"
                ) from None

    def prepare(body: ChatRequest, deadline: float) -> _Prepared:
        """Prompt text + images from the messages -> an engine Request (runs in a thread)."""
        if body.n != 1:
            raise APIError(400, "only n=1 is supported", code="unsupported_n")
        try:
            mode = get_mode(body.mode or default_mode)
        except KeyError as e:
            raise APIError(422, str(e.args[0]), code="invalid_mode") from None
        texts: list[str] = []
        images: list[Image.Image] = []
        for m in body.messages:
            if m.role not in ("user", "system"):
                continue  # earlier assistant turns: the model has no chat template
            if isinstance(m.content, str):
                texts.append(m.content)
            for part in m.content if isinstance(m.content, list) else []:
                if part.type == "text":
                    texts.append(part.text or "")
                elif part.type == "image_url":
                    url = (
                        part.image_url.url
                        if isinstance(part.image_url, ImageURL)
                        else part.image_url
                    )
                    if not url:
                        raise APIError(400, "image_url part without a url", code="invalid_image")
                    images.append(decode_image(url, deadline))
                else:
                    raise APIError(
                        400,
                        f"unsupported content part type {part.type!r}",
                        code="unsupported_content",
                    )
        text = "\n".join(t for t in texts if t)
        markers = text.count(IMAGE_TOKEN)
        if markers == 0:
            prompt = f"{IMAGE_TOKEN}\n" * len(images) + text
        elif markers == len(images):
            prompt = text
        else:
            raise APIError(
                400,
                f"the text holds {markers} {IMAGE_TOKEN} marker(s) but "
                f"{len(images)} image(s) were sent",
                code="image_count_mismatch",
            )
        if not prompt.strip():
            raise APIError(400, "empty prompt: send text and/or an image", code="empty_prompt")
        inputs = [preprocess_image(im, mode) for im in images]
        ids = build_prompt_ids(ocr.tokenizer, prompt, [x.num_tokens for x in inputs])
        if len(ids) >= max_positions:
            raise APIError(
                400,
                f"prompt of {len(ids)} tokens does not fit the model's {max_positions} positions",
                code="context_length_exceeded",
            )
        limit = body.max_tokens or body.max_completion_tokens or max_new_tokens
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        try:
            params = gen_params(body, min(limit, max_new_tokens), stop)
        except ValueError as e:  # e.g. an empty stop string, a non-finite temperature
            raise APIError(400, str(e), code="invalid_params") from None
        request = Request(ids, params, images=inputs or None)
        return _Prepared(request, len(images))

    def gen_params(body: ChatRequest, limit: int, stop: tuple[str, ...]) -> GenerationParams:
        return GenerationParams(
            max_new_tokens=limit,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            ignore_eos=body.ignore_eos,
            stop=stop,
            ngram_size=ngram[0],
            ngram_window=ngram[1],
            ngram_whitelist=whitelist,
        )

    async def parse_chat(request: HTTPRequest) -> ChatRequest:
        raw = await read_body(request, 2 * max_upload_bytes + 2**20)
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"malformed JSON body: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the JSON body must be an object", code="invalid_json")
        try:
            return ChatRequest.model_validate(data)
        except ValidationError as e:
            msg = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise APIError(422, msg, code="invalid_fields") from None

    def submit(prep: _Prepared):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_event(ev):
            loop.call_soon_threadsafe(events.put_nowait, ev)

        try:
            rid = worker.submit(prep.request, on_event)
        except QueueFull:
            raise APIError(
                429,
                f"server busy: {worker.capacity} requests in flight; retry later",
                "rate_limit_error",
                "queue_full",
            ) from None
        if prep.n_images:
            metrics.add(pages=prep.n_images)
        return rid, events

    async def next_event(events: asyncio.Queue, deadline: float, http: HTTPRequest | None = None):
        """The request's next StreamEvent. With ``http``, polls for a client disconnect (raises
        ``ConnectionError``); a StreamingResponse watches for that itself."""
        while True:
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                raise TimeoutError
            if http is not None and now >= getattr(http.state, "poll_at", 0.0):
                http.state.poll_at = now + DISCONNECT_POLL_S  # tokens can arrive every few ms
                if await http.is_disconnected():
                    raise ConnectionError("client disconnected")
            wait = remaining if http is None else min(remaining, DISCONNECT_POLL_S)
            try:
                ev = await asyncio.wait_for(events.get(), wait)
                break
            except TimeoutError:
                continue
        if isinstance(ev, ValueError):  # the engine refused the request itself
            raise APIError(400, str(ev), code="invalid_request")
        if isinstance(ev, Exception):
            raise APIError(
                500, f"generation failed: {type(ev).__name__}: {ev}", "server_error", "engine_error"
            )
        return ev

    def timeout_error() -> APIError:
        return APIError(
            504, f"request timed out after {request_timeout_s:g} s", "timeout_error", "timeout"
        )

    def usage(result) -> dict:
        return {
            "prompt_tokens": result.num_prompt_tokens,
            "completion_tokens": result.num_generated_tokens,
            "total_tokens": result.num_prompt_tokens + result.num_generated_tokens,
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        deadline = time.monotonic() + request_timeout_s
        body = await parse_chat(request)
        prep = await asyncio.to_thread(prepare, body, deadline)
        rid, events = submit(prep)
        cid = f"chatcmpl-{rid}"
        if not body.stream:
            parts: list[str] = []
            try:
                while True:
                    ev = await next_event(events, deadline, request)
                    parts.append(ev.text)
                    if ev.result is not None:
                        break
            except TimeoutError:
                worker.cancel(rid)
                raise timeout_error() from None
            except ConnectionError:  # nobody to answer; 499 as nginx logs it
                worker.cancel(rid)
                return Response(status_code=499)
            except BaseException:
                worker.cancel(rid)
                raise
            res = ev.result
            return {
                "id": cid,
                "object": "chat.completion",
                "created": prep.created,
                "model": model_name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(parts)},
                        "finish_reason": FINISH_MAP.get(res.finish_reason, "stop"),
                        "dsocr_finish_reason": res.finish_reason,
                        "logprobs": None,
                    }
                ],
                "usage": usage(res),
            }

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta: dict, finish=None, raw_finish=None, usage_=None) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            if raw_finish is not None:
                choice["dsocr_finish_reason"] = raw_finish
            d = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": prep.created,
                "model": model_name,
                "choices": [choice],
            }
            if usage_ is not None:
                d["usage"] = usage_
            return f"data: {json.dumps(d, ensure_ascii=False)}\n\n"

        async def sse():
            done = False
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    try:
                        ev = await next_event(events, deadline)
                    except TimeoutError:
                        e = timeout_error()
                        request.state.stream_status = e.status
                        yield f"data: {json.dumps(error_body(e.message, e.type, e.code))}\n\n"
                        break
                    except APIError as e:
                        request.state.stream_status = e.status
                        yield f"data: {json.dumps(error_body(e.message, e.type, e.code))}\n\n"
                        done = True
                        break
                    if ev.text:
                        yield chunk({"content": ev.text})
                    if ev.result is not None:
                        done = True
                        r = ev.result
                        yield chunk({}, FINISH_MAP.get(r.finish_reason, "stop"), r.finish_reason)
                        if include_usage:
                            d = {
                                "id": cid,
                                "object": "chat.completion.chunk",
                                "created": prep.created,
                                "model": model_name,
                                "choices": [],
                                "usage": usage(r),
                            }
                            yield f"data: {json.dumps(d)}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                if not done:
                    worker.cancel(rid)

        return StreamingResponse(
            sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    # ---------------------------------------------------------------- document OCR
    def run_convert(path: Path, options: dict, cancel: threading.Event) -> Any:
        from dsocr.pipeline.convert import convert

        (doc,) = convert(
            [path], ocr=ocr, out_dir=None, batch_size=max_batch_size, cancel=cancel, **options
        )
        return doc

    @app.post("/v1/ocr")
    async def ocr_endpoint(request: HTTPRequest):
        deadline = time.monotonic() + request_timeout_s
        check_length(request, max_upload_bytes + 2**20)
        try:
            form = await request.form(max_files=1, max_fields=32)
        except Exception as e:  # noqa: BLE001 - malformed multipart
            raise APIError(400, f"malformed multipart form: {e}", code="invalid_form") from None
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise APIError(
                400, "send the document as the multipart file field 'file'", code="missing_file"
            )
        data = await upload.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise _too_large(f"upload exceeds the limit of {max_upload_bytes} bytes")
        kind = sniff_type(data[:1024])
        if kind is None:
            raise APIError(
                400,
                UNSUPPORTED_TYPE,
                code="invalid_file",
            )
        options: dict[str, Any] = {}
        converters = {
            "task": str,
            "prompt": str,
            "ref": str,
            "mode": str,
            "pages": str,
            "dpi": float,
            "max_new_tokens": int,
            "html_tables_to_markdown": lambda v: v.lower() in ("1", "true", "yes"),
            "password": str,
        }
        unknown = sorted(set(form.keys()) - set(converters) - set(OCR_FIELDS))
        if unknown:
            raise APIError(
                422,
                f"unknown field(s) {', '.join(unknown)}; known: {', '.join(converters)}",
                code="invalid_fields",
            )
        for name, conv in converters.items():
            v = form.get(name)
            if v is None or v == "":
                continue
            try:
                options[name] = conv(v)
            except ValueError:
                raise APIError(422, f"{name}: invalid value {v!r}", code="invalid_fields") from None
        if "max_new_tokens" in options:
            options["max_new_tokens"] = min(options["max_new_tokens"], max_new_tokens)
        from dsocr.pipeline.convert import ConvertOptions

        try:
            ConvertOptions(**options)
        except (ValueError, TypeError) as e:
            raise APIError(422, str(e), code="invalid_fields") from None

        if ocr_state["outstanding"] >= max_queue + 1:
            raise APIError(
                429, "server busy: too many OCR jobs; retry later", "rate_limit_error", "queue_full"
            )
        ocr_state["outstanding"] += 1
        tmp = tempfile.TemporaryDirectory(prefix="dsocr-serve-")
        handed_off = False
        upload_name = upload_stem(upload.filename) + "." + kind
        cancel = threading.Event()
        try:
            path = Path(tmp.name) / upload_name
            path.write_bytes(data)
            try:
                n = await asyncio.to_thread(count_pages, path, options.get("password"))
                selected = len(parse_page_ranges(options["pages"], n)) if "pages" in options else n
            except InputError as e:
                raise APIError(400, api_reason(e.reason), code="invalid_file") from None
            except ValueError as e:
                raise APIError(422, f"pages: {e}", code="invalid_fields") from None
            if selected > max_pages:
                raise APIError(
                    413,
                    f"{selected} pages selected; this server converts at most "
                    f"{max_pages} per request (use 'pages')",
                    code="too_many_pages",
                )
            fut = asyncio.get_running_loop().run_in_executor(
                ocr_pool, run_convert, path, options, cancel
            )

            def _cleanup(_f):
                ocr_state["outstanding"] -= 1
                tmp.cleanup()

            fut.add_done_callback(_cleanup)
            handed_off = True
            try:
                doc = await asyncio.wait_for(
                    asyncio.shield(fut), max(0.0, deadline - time.monotonic())
                )
            except TimeoutError:
                cancel.set()  # stops it before its next engine step, freeing the OCR slot
                raise timeout_error() from None
        finally:
            if not handed_off:
                ocr_state["outstanding"] -= 1
                tmp.cleanup()
        if doc.status == "failed":
            exc = doc.exception
            if isinstance(exc, InputError):
                raise APIError(400, api_reason(exc.reason), code="invalid_file")
            error = (doc.error or "conversion failed").replace(str(path), upload_name)
            raise APIError(500, error, "server_error", "convert_failed")
        doc_json = doc.to_json()
        doc_json["source"], doc_json["model"] = upload_name, model_name  # no server paths
        metrics.add(pages=len(doc.pages), generated=doc_json["tokens"]["generated"])
        return {
            "object": "ocr.document",
            "model": model_name,
            "markdown": doc.markdown,
            "document": doc_json,
        }

    return app


def upload_stem(filename: str | None) -> str:
    """A safe file stem from a client's upload name (``providers.safe_stem``, the rule the
    output folders follow); "upload" when nothing is left."""
    return safe_stem(filename or "", fallback="upload")


def api_reason(reason: str) -> str:
    """An input error's reason, with the CLI's option names put as this API's form fields."""
    return reason.replace("(--password)", "(the 'password' form field)").replace(
        "--password", "the 'password' form field"
    )


def serve(
    model: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    device: str | None = None,
    api_key: str | None = None,
    max_upload_mb: float = 20.0,
    max_pages: int = 50,
    timeout_s: float = 300.0,
    max_queue: int = 64,
    batch_size: int = 8,
    allow_remote_urls: bool = False,
    log_level: str = "info",
) -> None:
    """Load ``model`` and run the server with uvicorn until interrupted (``dsocr serve``)."""
    import uvicorn

    from dsocr.api import load_model

    ocr = load_model(model, device=device)
    app = create_app(
        ocr,
        max_upload_bytes=int(max_upload_mb * 2**20),
        max_pages=max_pages,
        request_timeout_s=timeout_s,
        max_queue=max_queue,
        api_key=api_key,
        allow_remote_urls=allow_remote_urls,
        max_batch_size=batch_size,
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level)


__all__ = [
    "APIError",
    "AuthAndMetrics",
    "EngineWorker",
    "Metrics",
    "create_app",
    "serve",
    "upload_stem",
]
