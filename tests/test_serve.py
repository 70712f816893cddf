"""``dsocr serve``: the real server (uvicorn on loopback) called with the official openai client."""

from __future__ import annotations

import base64
import io
import random
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("multipart")

from PIL import Image  # noqa: E402

import dsocr  # noqa: E402
from dsocr.serve.app import create_app  # noqa: E402

API_KEY = "sk-test"
MAX_UPLOAD = 200_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, app):
        self.port = _free_port()
        cfg = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            assert time.time() - t0 < 20, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def ocr():
    return dsocr.load_model("tiny", device="cpu")


@pytest.fixture(scope="module")
def server(ocr):
    app = create_app(
        ocr,
        max_upload_bytes=MAX_UPLOAD,
        max_pages=2,
        request_timeout_s=30,
        max_queue=16,
        api_key=API_KEY,
        max_batch_size=8,
        max_new_tokens=64,
    )
    with _Server(app) as s:
        s.app = app
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


def _png(color=(255, 255, 255), size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", size, color)
    img.paste((0, 0, 0), (8, 8, 30, 20))
    img.save(buf, format="PNG")
    return buf.getvalue()


def _png_header(w: int, h: int) -> bytes:
    """A PNG declaring w x h pixels in its IHDR, with an empty IDAT: Pillow opens it lazily."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def _messages(png: bytes | None = None, text: str = "Free OCR."):
    png = png if png is not None else _png()
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": text},
            ],
        }
    ]


def _chat(client, **kw):
    kw.setdefault("model", "tiny")
    kw.setdefault("messages", _messages())
    kw.setdefault("max_tokens", 12)
    extra = {"mode": "tiny", "ignore_eos": True} | kw.pop("extra_body", {})
    return client.chat.completions.create(extra_body=extra, **kw)


def _assert_ok(client):
    r = _chat(client, max_tokens=3)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3


def _post(server, path, headers=None, **kw):
    h = {"Authorization": f"Bearer {API_KEY}"} | (headers or {})
    return httpx.post(server.url + path, headers=h, timeout=30, **kw)


# ------------------------------------------------------------------------------------------------


def test_plain_and_models(client, ocr):
    r = _chat(client)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
    # the server's greedy answer is the library's (same prompt layout, same engine)
    expected = ocr.run(
        Image.open(io.BytesIO(_png())).convert("RGB"), "<image>\nFree OCR.", "tiny", 12
    )
    assert r.choices[0].message.content == expected.text
    assert r.usage.prompt_tokens == expected.num_prompt_tokens
    models = client.models.list()
    assert [m.id for m in models.data] == [client.models.list().data[0].id]


def test_streaming_matches_plain(client):
    plain = _chat(client, max_tokens=20).choices[0].message.content
    chunks = list(_chat(client, max_tokens=20, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == ["length"]
    assert chunks[-1].usage.completion_tokens == 20


def test_concurrent_requests_share_the_batch(client, server):
    worker = server.app.state.worker
    before = worker.max_active_seen
    worker.max_active_seen = 0
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda i: _chat(client, max_tokens=40), range(6)))
    assert all(r.usage.completion_tokens == 40 for r in results)
    assert len({r.choices[0].message.content for r in results}) == 1  # same greedy request
    assert worker.max_active_seen > 1
    worker.max_active_seen = max(before, worker.max_active_seen)


def test_sampling_params_accepted(client):
    a = _chat(client, temperature=0.8, top_p=0.9, seed=3).choices[0].message.content
    b = _chat(client, temperature=0.8, top_p=0.9, seed=3).choices[0].message.content
    assert a == b


def test_bad_api_key(server, client):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        _chat(bad)
    r = httpx.get(server.url + "/v1/models", timeout=10)  # no key at all
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200  # open
    _assert_ok(client)


def test_invalid_generation_settings_are_400(server, client):
    with pytest.raises(openai.BadRequestError, match="stop"):
        _chat(client, stop=[""])
    _assert_ok(client)


def test_malformed_json_and_fields(server, client):
    r = _post(
        server,
        "/v1/chat/completions",
        content=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = _post(server, "/v1/chat/completions", json={"messages": "nope"})
    assert r.status_code == 422 and "messages" in r.json()["error"]["message"]
    with pytest.raises(openai.UnprocessableEntityError):
        _chat(client, extra_body={"mode": "huge"})
    _assert_ok(client)


def test_non_image_payload_and_remote_url(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, messages=_messages(png=b"hello, this is not an image" * 4))
    assert e.value.status_code == 400 and "not a supported image" in str(e.value)
    # Images are decoded as convert decodes files: corrupt data, a header claiming 50,000 x
    # 50,000 pixels and a HEIC without pillow-heif are 400s with the reason, a GIF is read.
    bad = {
        "corrupt or truncated": _png()[:60],
        "image too large: 2,500,000,000 pixels": _png_header(50_000, 50_000),
        "ftyp": b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 64,
    }
    for reason, data in bad.items():
        with pytest.raises(openai.BadRequestError) as e:
            _chat(client, messages=_messages(png=data))
        assert e.value.status_code == 400 and "cannot decode image" in str(e.value)
        if reason != "ftyp":
            assert reason in str(e.value)
    gif = io.BytesIO()
    frames = [Image.new("P", (64, 48), 1), Image.new("P", (64, 48), 2)]
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    assert len(_chat(client, messages=_messages(png=gif.getvalue())).choices) == 1
    remote = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                {"type": "text", "text": "Free OCR."},
            ],
        }
    ]
    with pytest.raises(openai.BadRequestError, match="remote"):
        _chat(client, messages=remote)
    r = _post(server, "/v1/ocr", files={"file": ("x.txt", b"plain text " * 10, "text/plain")})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_file"
    _assert_ok(client)


def test_oversize_upload(server, client):
    noise = Image.frombytes("RGB", (300, 300), random.Random(0).randbytes(300 * 300 * 3))
    buf = io.BytesIO()
    noise.save(buf, format="PNG")
    big = buf.getvalue()
    assert len(big) > MAX_UPLOAD
    r = _post(server, "/v1/ocr", files={"file": ("big.png", big, "image/png")})
    assert r.status_code == 413 and r.json()["error"]["code"] == "upload_too_large"
    with pytest.raises(openai.APIStatusError) as e:
        _chat(client, messages=_messages(png=big))
    assert e.value.status_code == 413
    _assert_ok(client)


def _pdf(n_pages: int) -> bytes:
    pages = [Image.new("RGB", (120, 160), (255, 255, 255)) for _ in range(n_pages)]
    buf = io.BytesIO()
    pages[0].save(buf, format="PDF", save_all=True, append_images=pages[1:], resolution=72)
    return buf.getvalue()


def test_ocr_endpoint_and_page_limit(server, client):
    opts = {"mode": "tiny", "max_new_tokens": "8", "task": "free"}
    r = _post(server, "/v1/ocr", files={"file": ("doc.pdf", _pdf(3), "application/pdf")}, data=opts)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_pages"
    r = _post(
        server,
        "/v1/ocr",
        files={"file": ("doc.pdf", _pdf(3), "application/pdf")},
        data=opts | {"pages": "2-3"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["document"]["format"] == "dsocr.document"
    assert body["document"]["pages_converted"] == 2 and isinstance(body["markdown"], str)
    r = _post(
        server,
        "/v1/ocr",
        files={"file": ("a.png", _png(), "image/png")},
        data=opts | {"mode": "nope"},
    )
    assert r.status_code == 422
    r = _post(server, "/v1/ocr", files={"file": ("a.png", _png(), "image/png")}, data=opts)
    assert r.status_code == 200 and r.json()["document"]["pages_converted"] == 1
    _assert_ok(client)


def test_full_queue_and_timeout(ocr):
    app = create_app(
        ocr,
        max_upload_bytes=MAX_UPLOAD,
        max_pages=2,
        request_timeout_s=1.5,
        max_queue=1,
        max_batch_size=1,
        max_new_tokens=64,
    )
    worker = app.state.worker
    real_step = worker.engine.step

    def slow_step():
        time.sleep(0.05)
        return real_step()

    worker.engine.step = slow_step
    with _Server(app) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)

        def call(_):
            try:
                return _chat(client, max_tokens=10).usage.completion_tokens
            except openai.RateLimitError:
                return 429

        with ThreadPoolExecutor(5) as pool:
            codes = list(pool.map(call, range(5)))
        assert 429 in codes and 10 in codes, codes
        # a request that cannot finish in time: 504, and the server still serves afterwards
        with pytest.raises(openai.APIStatusError) as e:
            _chat(client, max_tokens=64)
        assert e.value.status_code == 504
        t0 = time.time()
        while worker.outstanding and time.time() - t0 < 10:  # the aborted one frees its slot
            time.sleep(0.05)
        assert worker.outstanding == 0
        assert _chat(client, max_tokens=3).usage.completion_tokens == 3


def test_metrics(server, client):
    _assert_ok(client)
    text = httpx.get(server.url + "/metrics", timeout=10).text
    assert 'dsocr_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    assert 'dsocr_requests_total{endpoint="/v1/chat/completions",status="401"}' in text
    assert "dsocr_generated_tokens_total" in text and "dsocr_pages_total" in text
    assert 'dsocr_request_latency_seconds_bucket{endpoint="/v1/chat/completions",le="+Inf"}' in text
    assert "dsocr_queue_depth 0" in text
    gen = [line for line in text.splitlines() if line.startswith("dsocr_generated_tokens_total")]
    assert int(gen[0].split()[-1]) > 0


def test_raw_sse_format(server):
    body = {
        "messages": _messages(),
        "max_tokens": 4,
        "stream": True,
        "mode": "tiny",
        "ignore_eos": True,
    }
    r = _post(server, "/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_ocr_alongside_chat(server, client):
    opts = {"mode": "tiny", "max_new_tokens": "8", "task": "free"}
    with ThreadPoolExecutor(3) as pool:
        doc = pool.submit(
            _post, server, "/v1/ocr", files={"file": ("a.png", _png(), "image/png")}, data=opts
        )
        chats = [pool.submit(_chat, client, max_tokens=16) for _ in range(2)]
        assert doc.result().status_code == 200
        assert all(c.result().usage.completion_tokens == 16 for c in chats)


def _slow_engine_steps(monkeypatch, seconds: float = 0.05):
    """Every Engine (the chat worker's and convert's) sleeps before each step."""
    from dsocr.engine.generate import Engine

    real = Engine.step

    def slow(self):
        time.sleep(seconds)
        return real(self)

    monkeypatch.setattr(Engine, "step", slow)


def _metric(text: str, prefix: str) -> float:
    (line,) = [x for x in text.splitlines() if x.startswith(prefix)]
    return float(line.split()[-1])


def test_chunked_oversize_chat_body_is_refused(server, client):
    def body():  # no Content-Length: sent chunked; 2 MB, over the 2 x 200 kB + 1 MiB limit
        for _ in range(20):
            yield b" " * 100_000

    h = {"Content-Type": "application/json"}
    r = _post(server, "/v1/chat/completions", content=body(), headers=h)
    assert r.status_code == 413 and r.json()["error"]["code"] == "upload_too_large"
    _assert_ok(client)


def test_disconnect_and_ocr_timeout_free_the_engine(ocr, monkeypatch):
    _slow_engine_steps(monkeypatch)
    body = {"messages": _messages(), "max_tokens": 64, "mode": "tiny", "ignore_eos": True}
    # a plain (non-streaming) client that gives up: its request leaves the batch long before
    # its 64 tokens (>= 3.2 s at 50 ms a step) or the 30 s request timeout
    app = create_app(ocr, request_timeout_s=30, max_queue=1, max_batch_size=1, max_new_tokens=64)
    worker = app.state.worker
    with _Server(app) as s:
        t0 = time.time()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/v1/chat/completions", json=body, timeout=0.3)
        while (worker.outstanding or worker.active) and time.time() - t0 < 2.0:
            time.sleep(0.05)
        assert worker.outstanding == 0 and worker.active == 0, "the abandoned request kept going"
        assert httpx.get(s.url + "/health").json()["active"] == 0
        assert app.state.metrics.generated_tokens == 0  # it never finished
        # a stream's latency is measured to its end, not to its headers
        stream = body | {"max_tokens": 12, "stream": True}
        r = httpx.post(s.url + "/v1/chat/completions", json=stream, timeout=10)
        assert r.text.endswith("data: [DONE]\n\n")
        text = httpx.get(s.url + "/metrics").text
        key = 'dsocr_request_latency_seconds_sum{endpoint="/v1/chat/completions"}'
        assert _metric(text, key) >= 12 * 0.05

    app = create_app(ocr, request_timeout_s=1.0, max_queue=1, max_batch_size=1, max_new_tokens=64)
    with _Server(app) as s:
        # an OCR job that times out is cancelled, not left running: its slot frees at once
        files = {"file": ("slow.png", _png(), "image/png")}
        opts = {"mode": "tiny", "max_new_tokens": "64", "task": "free"}
        t0 = time.time()
        r = httpx.post(s.url + "/v1/ocr", files=files, data=opts, timeout=10)
        assert r.status_code == 504
        while time.time() - t0 < 2.5:
            if _metric(httpx.get(s.url + "/metrics").text, "dsocr_ocr_jobs ") == 0:
                break
            time.sleep(0.05)
        assert time.time() - t0 < 2.5, "the timed-out OCR job kept running"
        # a stream that times out ends in an error event and is counted as a 504, not a 200
        r = httpx.post(s.url + "/v1/chat/completions", json=body | {"stream": True}, timeout=10)
        assert '"code": "timeout"' in r.text and r.text.endswith("data: [DONE]\n\n")
        text = httpx.get(s.url + "/metrics").text
        assert 'dsocr_requests_total{endpoint="/v1/chat/completions",status="504"} 1' in text
        assert 'endpoint="/v1/chat/completions",status="200"' not in text


def test_ocr_fields_password_and_names(server, tmp_path):
    pikepdf = pytest.importorskip("pikepdf")
    plain, locked = tmp_path / "plain.pdf", tmp_path / "locked.pdf"
    plain.write_bytes(_pdf(1))
    with pikepdf.open(plain) as p:
        p.save(locked, encryption=pikepdf.Encryption(owner="o", user="secret", R=6))
    opts = {"mode": "tiny", "max_new_tokens": "4", "task": "free"}

    def post(data, name="../../etc/Report 2024.pdf"):
        files = {"file": (name, locked.read_bytes(), "application/pdf")}
        return _post(server, "/v1/ocr", files=files, data=data)

    r = post(opts)
    assert r.status_code == 400 and "'password' form field" in r.json()["error"]["message"]
    assert "/tmp" not in r.json()["error"]["message"]
    r = post(opts | {"password": "wrong"})
    assert r.status_code == 400 and "wrong password" in r.json()["error"]["message"]
    r = post(opts | {"colour": "blue"})
    assert r.status_code == 422 and "colour" in r.json()["error"]["message"]
    r = post(opts | {"password": "secret"})
    assert r.status_code == 200, r.text
    doc = r.json()["document"]
    assert doc["source"] == "Report 2024.pdf" and doc["stem"] == "Report 2024"  # as convert
    assert doc["model"] == "tiny"


def test_upload_stem_is_safe():
    from dsocr.serve.app import upload_stem

    assert upload_stem("../../etc/passwd") == "passwd"
    assert upload_stem("C:\\Users\\x\\scan.final.PNG") == "scan.final"
    assert upload_stem("..") == "upload" and upload_stem(None) == "upload"
    assert upload_stem("Ünïcode page.pdf") == "Ünïcode page"  # as convert's folders
    assert upload_stem("a/b\x00c<d>.png") == "bc_d_" and upload_stem("con.png") == "_con"


def test_429_carries_retry_after(ocr, monkeypatch):
    _slow_engine_steps(monkeypatch)
    app = create_app(ocr, max_queue=0, max_batch_size=1, max_new_tokens=64)
    with _Server(app) as s:
        body = {"messages": _messages(), "max_tokens": 20, "mode": "tiny", "ignore_eos": True}
        with ThreadPoolExecutor(3) as pool:
            rs = list(
                pool.map(lambda _: httpx.post(s.url + "/v1/chat/completions", json=body), range(3))
            )
        busy = [r for r in rs if r.status_code == 429]
        assert busy and all(r.headers["retry-after"] == "1" for r in busy)
        assert any(r.status_code == 200 for r in rs)


def test_remote_image_urls_only_when_enabled(ocr, tmp_path):
    import functools
    import http.server

    (tmp_path / "page.png").write_bytes(_png())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        app = create_app(ocr, allow_remote_urls=True, max_new_tokens=8)
        with _Server(app) as s:
            client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
            local = _chat(client, max_tokens=4).choices[0].message.content

            def remote(path):
                part = {"type": "image_url", "image_url": {"url": url + path}}
                msgs = [{"role": "user", "content": [part, {"type": "text", "text": "Free OCR."}]}]
                return _chat(client, messages=msgs, max_tokens=4)

            # the fetched image is the same image: the same greedy text
            assert remote("/page.png").choices[0].message.content == local
            with pytest.raises(openai.BadRequestError, match="cannot fetch"):
                remote("/missing.png")
    finally:
        httpd.shutdown()


def test_chat_mode_defaults_to_the_checkpoint_mode(ocr, tmp_path):
    import dataclasses
    import json

    (tmp_path / "meta.json").write_text(json.dumps({"defaults": {"mode": "tiny"}}))
    app = create_app(dataclasses.replace(ocr, source=str(tmp_path)), max_new_tokens=8)
    with _Server(app) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        implicit = client.chat.completions.create(model="m", messages=_messages(), max_tokens=2)
        tiny = _chat(client, max_tokens=2)
        base = _chat(client, max_tokens=2, extra_body={"mode": "base"})
    assert implicit.usage.prompt_tokens == tiny.usage.prompt_tokens < base.usage.prompt_tokens
