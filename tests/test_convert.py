"""Images and PDFs -> Markdown/JSON folders: stages, output layout, resume, bad inputs, batching.

Most tests replace the engine with ``FakeEngine``, which answers each page with a scripted,
realistic grounded output (the tiny model's random weights write noise). One test runs the real
tiny model end to end.
"""

from __future__ import annotations

import json
import os
import re
import struct
import threading
import time
import warnings
import zlib
from collections import deque
from pathlib import Path

import pytest
from conftest import TEST_BASE
from PIL import Image

import dsocr
import dsocr.pipeline.convert as convert_mod
from dsocr.engine.generate import Result, StreamEvent
from dsocr.pipeline import PAGE_SPLIT
from dsocr.pipeline.convert import (
    Converter,
    ConvertOptions,
    Document,
    convert,
    convert_file,
)
from dsocr.pipeline.output import write_document
from dsocr.pipeline.postprocess import grid_to_pixels
from dsocr.pipeline.providers import InputError
from dsocr.pipeline.workspace import HOST_TAG, BatchSummary, OutputError, Workspace
from dsocr.vision.preprocess import count_image_tokens

pdfium = pytest.importorskip("pypdfium2")

GROUNDED = (
    "<|ref|>title<|/ref|><|det|>[[100, 50, 900, 120]]<|/det|>\n# Quarterly Report\n\n"
    "<|ref|>text<|/ref|><|det|>[[100, 150, 900, 400]]<|/det|>\n"
    "Revenue grew by 12% in \\(Q_2\\).\n\n"
    "<|ref|>image<|/ref|><|det|>[[100, 450, 500, 800]]<|/det|>\n\n"
    "<|ref|>image_caption<|/ref|><|det|>[[100, 810, 500, 850]]<|/det|>\n"
    "<center>Figure 1: Sales by region</center>\n\n"
    "<|ref|>table<|/ref|><|det|>[[520, 450, 900, 800]]<|/det|>\n"
    "<table><tr><td>Q1</td><td>10</td></tr><tr><td>Q2</td><td>12</td></tr></table>"
)
TABLE = "<table><tr><td>Q1</td><td>10</td></tr><tr><td>Q2</td><td>12</td></tr></table>"


def expected_markdown(link: str) -> str:
    return (
        "# Quarterly Report\n\nRevenue grew by 12% in \\(Q_2\\).\n\n"
        f"![](images/{link}.jpg)\n\n<center>Figure 1: Sales by region</center>\n\n{TABLE}"
    )


class FakeEngine:
    """The ``Engine`` API (add_request / step) with scripted outputs, recording every batch.

    ``script(stem, page_index) -> (text, finish_reason)``; each request finishes after
    ``steps`` steps. ``interrupt_on``: raise KeyboardInterrupt when a page of that stem is added.
    """

    def __init__(self, script=None, steps=1, interrupt_on=None, before_first_step=None):
        self.script = script or (lambda stem, index: (GROUNDED, "eos"))
        self.steps, self.interrupt_on = steps, interrupt_on
        self.before_first_step = before_first_step
        self.waiting: deque = deque()
        self.active: list = []
        self.requests: list = []  # request ids, in add order
        self.batches: list[list] = []  # request ids decoded together, per step

    def add_request(self, req):
        if req.request_id[0] == self.interrupt_on:
            raise KeyboardInterrupt
        assert req.images and len(req.prompt_ids) > req.images[0].num_tokens
        self.requests.append(req.request_id)
        self.waiting.append([req, 0, time.perf_counter()])
        return req.request_id

    def step(self):
        if self.before_first_step is not None and not self.batches:
            self.before_first_step()
        self.active += self.waiting
        self.waiting.clear()
        self.batches.append([r.request_id for r, _, _ in self.active])
        events, still = [], []
        for entry in self.active:
            entry[1] += 1
            if entry[1] < self.steps:
                still.append(entry)
                continue
            req, _, t0 = entry
            text, reason = self.script(*req.request_id)
            n = len(text.encode()) + (reason == "eos")
            dt = time.perf_counter() - t0
            result = Result(req.request_id, [20] * n, text, reason, len(req.prompt_ids), n, 0.0,
                            dt / 2, dt / 2, dt / 2, dt)  # fmt: skip
            events.append(StreamEvent(req.request_id, [20], text, result))
        self.active = still
        return events


@pytest.fixture(scope="module")
def ocr():
    return dsocr.load_model("tiny", device="cpu")


def opts(**kw) -> ConvertOptions:
    kw.setdefault("mode", TEST_BASE)
    kw.setdefault("dpi", 72)
    return ConvertOptions(**kw)


def png(path: Path, size=(200, 160), color="white") -> Path:
    Image.new("RGB", size, color).save(path)
    return path


def pdf(path: Path, n: int, size=(200, 260)) -> Path:
    """An n-page PDF made with PIL: page k is a different grey, size in points (72 dpi)."""
    pages = [Image.new("RGB", size, (255 - 30 * k,) * 3) for k in range(n)]
    pages[0].save(path, "PDF", save_all=True, append_images=pages[1:], resolution=72)
    return path


def pdf_pages(path: Path) -> int:
    doc = pdfium.PdfDocument(str(path))
    try:
        return len(doc)
    finally:
        doc.close()


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


# --- output of one grounded page -------------------------------------------------------------


def test_grounded_output_becomes_markdown_json_crops_and_layout(ocr, tmp_path):
    src = png(tmp_path / "report.png", (200, 160))
    out = tmp_path / "out"
    (doc,) = Converter(ocr, opts(), out, engine=FakeEngine()).convert([src])
    assert doc.status == "converted" and doc.folder == out / "report"
    folder = out / "report"
    assert files_under(folder) == {
        "report.md",
        "report.json",
        "report_det.md",
        "report_layouts.pdf",
        "images/0.jpg",
    }
    md = (folder / "report.md").read_text()
    assert md == expected_markdown("0") + "\n"
    assert (folder / "report_det.md").read_text() == GROUNDED + "\n"

    # The crop is the image block's box, in pixels of the page; linked relative to the .md.
    x1, y1, x2, y2 = grid_to_pixels((100, 450, 500, 800), 200, 160)
    with Image.open(folder / "images/0.jpg") as crop:
        assert crop.size == (x2 - x1, y2 - y1)
    assert (folder / "images/0.jpg").is_file() and "](images/0.jpg)" in md

    meta = json.loads((folder / "report.json").read_text())
    assert meta["source"] == str(src) and meta["model"] == "tiny" and meta["mode"] == "test-base"
    assert meta["task"] == "markdown" and meta["kind"] == "png" and meta["page_count"] == 1
    assert meta["flagged_pages"] == [] and meta["files"]["layouts"] == "report_layouts.pdf"
    (page,) = meta["pages"]
    assert page["page"] == 1 and (page["width"], page["height"]) == (200, 160)
    assert page["finish_reason"] == "eos" and page["flags"] == []
    assert [b["label"] for b in page["blocks"]] == [
        "title",
        "text",
        "image",
        "image_caption",
        "table",
    ]
    image_block = page["blocks"][2]
    assert image_block["boxes"] == [[100, 450, 500, 800]]
    assert image_block["pixel_boxes"] == [[x1, y1, x2, y2]]
    assert page["blocks"][0]["text"] == "# Quarterly Report"
    assert page["images"] == ["images/0.jpg"] and page["raw"] == GROUNDED
    tokens = page["tokens"]
    assert tokens["vision"] == count_image_tokens(200, 160, TEST_BASE)
    assert tokens["prompt"] > tokens["vision"] and tokens["generated"] == len(GROUNDED) + 1
    assert {"render_s", "preprocess_s", "prefill_s", "decode_s", "postprocess_s"} <= set(
        page["timings"]
    )
    assert pdf_pages(folder / "report_layouts.pdf") == 1
    title = "report_layouts".encode("utf-16-be")  # the stem, not the temporary file's name
    assert b"/Title (\xfe\xff" + title + b")" in (folder / "report_layouts.pdf").read_bytes()

    # The JSON reads back into the same document.
    again = Document.from_json(meta)
    assert again.markdown == doc.markdown and again.pages[0].blocks == doc.pages[0].blocks


def test_in_memory_conversion_and_tables_to_markdown(ocr, tmp_path):
    src = png(tmp_path / "t.png")
    conv = Converter(ocr, opts(html_tables_to_markdown=True), engine=FakeEngine())
    (doc,) = conv.convert([src])
    assert doc.status == "converted" and doc.folder is None
    assert (
        "| Q1 | 10 |\n| --- | --- |\n| Q2 | 12 |" in doc.markdown and "<table>" not in doc.markdown
    )
    assert doc.pages[0].image_data and doc.pages[0].layout_jpeg  # kept until written
    write_document(doc, tmp_path / "later")
    assert {"t.md", "t.json", "images/0.jpg", "t_layouts.pdf"} <= files_under(tmp_path / "later")


def test_free_ocr_has_no_layout_and_no_ungrounded_flag(ocr, tmp_path):
    src = png(tmp_path / "plain.png")
    engine = FakeEngine(lambda stem, i: ("Just some text.", "eos"))
    (doc,) = Converter(ocr, opts(task="free"), tmp_path / "out", engine=engine).convert([src])
    assert files_under(tmp_path / "out/plain") == {"plain.md", "plain.json", "plain_det.md"}
    assert doc.markdown == "Just some text." and doc.pages[0].flags == []


# --- full layout for a PDF and an image; page ranges -----------------------------------------


def test_pdf_and_image_output_layout_with_page_ranges(ocr, tmp_path):
    book = pdf(tmp_path / "book.pdf", 5)
    photo = png(tmp_path / "photo.png")
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:  # the photo has one page
        warnings.simplefilter("always")
        docs = Converter(ocr, opts(pages="1-2,4"), out, engine=FakeEngine()).convert([book, photo])
    messages = " | ".join(str(w.message) for w in caught)
    assert "'1-2' clipped" in messages and "'4' is beyond" in messages
    assert [d.status for d in docs] == ["converted", "converted"]
    assert files_under(out / "book") == {
        "book.md",
        "book.json",
        "book_det.md",
        "book_layouts.pdf",
        "images/0_0.jpg",
        "images/1_0.jpg",
        "images/3_0.jpg",
    }
    md = (out / "book/book.md").read_text()
    assert md == PAGE_SPLIT.join(expected_markdown(f"{p}_0") for p in (0, 1, 3)) + "\n"
    assert (out / "book/book_det.md").read_text() == PAGE_SPLIT.join([GROUNDED] * 3) + "\n"
    meta = json.loads((out / "book/book.json").read_text())
    assert [p["page"] for p in meta["pages"]] == [1, 2, 4]
    assert meta["page_count"] == 5 and meta["pages_converted"] == 3 and meta["kind"] == "pdf"
    assert meta["settings"]["pages"] == "1-2,4"
    assert (meta["pages"][0]["width"], meta["pages"][0]["height"]) == (200, 260)  # 72 dpi
    assert pdf_pages(out / "book/book_layouts.pdf") == 3

    # An image has one page whatever the range selects (the range is clipped with a warning).
    assert files_under(out / "photo") == {
        "photo.md",
        "photo.json",
        "photo_det.md",
        "photo_layouts.pdf",
        "images/0.jpg",
    }
    assert [p.index for p in docs[1].pages] == [0]

    # Workspace metadata: one marker per document, a summary, no leftovers.
    assert files_under(out / ".dsocr") == {"done/book.json", "done/photo.json", "summary.json"}
    marker = json.loads((out / ".dsocr/done/book.json").read_text())
    assert marker["pages"] == 3 and marker["source"] == str(book)
    summary = json.loads((out / ".dsocr/summary.json").read_text())
    assert summary["converted"] == 2 and summary["pages"] == 4 and summary["exit_code"] == 0


def test_page_range_errors():
    with pytest.raises(ValueError, match="reversed"):
        opts(pages="4-2")
    with pytest.raises(ValueError, match="numbered from 1"):
        opts(pages="0-3")
    with pytest.raises(ValueError, match="invalid page range"):
        opts(pages="1-2,x")
    opts(pages="2-,99999999999")  # huge numbers are fine (checked per document)


# --- resume ----------------------------------------------------------------------------------


def test_resume_after_interrupt(ocr, tmp_path):
    first, second = png(tmp_path / "first.png"), png(tmp_path / "second.png", color="gray")
    out = tmp_path / "out"
    o = opts(batch_size=1)
    engine = FakeEngine(interrupt_on="second")
    with pytest.raises(KeyboardInterrupt):
        Converter(ocr, o, out, engine=engine).convert([first, second])
    # The first document is complete and marked; nothing of the second exists.
    assert {"first.md", "first.json", "images/0.jpg"} <= files_under(out / "first")
    assert (out / ".dsocr/done/first.json").is_file()
    assert not (out / "second").exists() and not (out / ".dsocr/done/second.json").exists()
    assert list((out / ".dsocr/tmp").iterdir()) == []
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert json.loads((out / ".dsocr/summary.json").read_text())["interrupted"] is True
    md_before = (out / "first/first.md").stat().st_mtime_ns

    engine = FakeEngine()
    conv = Converter(ocr, o, out, engine=engine)
    docs = conv.convert([first, second])
    assert [d.status for d in docs] == ["skipped", "converted"]
    assert engine.requests == [("second", 0)]  # the first was not redone
    assert (out / "first/first.md").stat().st_mtime_ns == md_before
    assert docs[0].markdown == expected_markdown("0")  # read back from its JSON
    assert (out / "second/second.md").read_text() == expected_markdown("0") + "\n"
    assert conv.last_summary.skipped == 1 and conv.last_summary.converted == 1

    # Changed options or a changed file redo a document.
    engine = FakeEngine()
    Converter(ocr, opts(batch_size=1, max_new_tokens=99), out, engine=engine).convert([first])
    assert engine.requests == [("first", 0)]
    png(second, color="black")
    engine = FakeEngine()
    Converter(ocr, opts(batch_size=1, max_new_tokens=99), out, engine=engine).convert(
        [first, second]
    )
    assert engine.requests == [("second", 0)]


def test_interrupt_while_writing_leaves_nothing_partial(ocr, tmp_path, monkeypatch):
    src = png(tmp_path / "doc.png")
    out = tmp_path / "out"

    def write_then_interrupt(doc, folder):
        (folder / "doc.md").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_mod, "write_document", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        Converter(ocr, opts(), out, engine=FakeEngine()).convert([src])
    assert not (out / "doc").exists() and not (out / ".dsocr/done/doc.json").exists()
    assert list((out / ".dsocr/tmp").iterdir()) == []


def test_stale_staging_of_dead_process_is_removed(tmp_path):
    stale = tmp_path / "out/.dsocr/tmp/999999999.abcd.doc"
    stale.mkdir(parents=True)
    (stale / "doc.md").write_text("half")
    from dsocr.pipeline.workspace import HOST_TAG

    ours = tmp_path / f"out/.dsocr/tmp/999999999.{HOST_TAG}.abcd.doc2"
    theirs = tmp_path / "out/.dsocr/tmp/999999999.h00000000.abcd.doc3"  # another host's writer
    ours.mkdir()
    theirs.mkdir()
    Workspace(tmp_path / "out")
    assert not stale.exists() and not ours.exists()
    assert theirs.exists()  # its pid means nothing on this machine: left alone


# --- bad inputs ------------------------------------------------------------------------------


def png_header_only(path: Path, w: int, h: int) -> Path:
    """A PNG that claims w x h pixels but holds no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_bad_inputs_fail_one_line_each_and_the_batch_carries_on(ocr, tmp_path):
    pikepdf = pytest.importorskip("pikepdf")
    d = tmp_path / "in"
    d.mkdir()
    good = png(d / "good.png")
    (d / "zero-bytes.png").write_bytes(b"")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    (d / "broken.pdf").write_bytes(b"%PDF-1.7\nnot a pdf body\n")
    pdf(d / "plain.pdf", 2)
    with pikepdf.open(d / "plain.pdf") as p:
        p.save(d / "locked.pdf", encryption=pikepdf.Encryption(owner="o", user="secret", R=6))
    (d / "plain.pdf").unlink()
    empty = pdfium.PdfDocument.new()
    empty.save(str(d / "no-pages.pdf"))
    empty.close()
    png_header_only(d / "huge.png", 50_000, 50_000)
    (d / "notes.txt").write_text("not a document")
    blocked = png(d / "blocked.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "blocked").write_text("a file where the output folder should go")
    bad = {
        "zero-bytes.png": "empty file",
        "corrupt.png": "corrupt image",
        "broken.pdf": "corrupt PDF",
        "locked.pdf": "a password is needed",
        "no-pages.pdf": "PDF has no pages",
        "huge.png": "image too large",
        "notes.txt": "unsupported file type",
        "missing.pdf": "file not found",
        "blocked.png": "exists and is not a folder",
    }
    inputs = [good, *(d / name for name in bad)]
    lines: list[str] = []

    def report(doc):
        lines.append(f"error: {doc.error}" if doc.status == "failed" else f"ok: {doc.source}")

    docs = Converter(ocr, opts(), out, engine=FakeEngine()).convert(inputs, on_document=report)
    assert len(docs) == len(inputs) and len(lines) == len(inputs)
    assert docs[0].status == "converted" and (out / "good/good.md").is_file()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == len(bad)
    for name, why in bad.items():
        (line,) = [e for e in errors if name in e]
        assert why in line and "\n" not in line
    assert "cannot write output" in next(e for e in errors if "blocked.png" in e)
    assert str(out / "blocked") in next(e for e in errors if "blocked.png" in e)
    assert (out / "blocked").is_file()  # not replaced

    summary = BatchSummary.from_documents(docs)
    assert (summary.documents, summary.converted, summary.failed) == (10, 1, 9)
    assert summary.exit_code == 1 and len(summary.errors) == 9
    assert "9 failed" in summary.format()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]

    # The password option opens the encrypted PDF; the good file is not redone.
    docs = Converter(ocr, opts(password="secret"), out, engine=FakeEngine()).convert(
        [d / "locked.pdf", blocked.parent / "good.png"]
    )
    assert [x.status for x in docs] == ["converted", "skipped"]
    assert len(docs[0].pages) == 2


def test_unwritable_output_folder_is_a_clear_error_before_loading(tmp_path):
    in_the_way = tmp_path / "out"
    in_the_way.write_text("a file")
    with pytest.raises(OutputError) as e:
        convert([png(tmp_path / "a.png")], ocr="no-such-model", out_dir=in_the_way)
    assert str(e.value).startswith(f"{in_the_way}: ") and "\n" not in str(e.value)


def test_convert_file_raises_the_input_error(ocr, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    with pytest.raises(InputError, match="bad.png: empty file"):
        convert_file(bad, ocr)


def test_convert_of_one_file_returns_its_document(ocr, tmp_path):
    """One file path -> its Document (a failure raises); a folder or a glob -> a list."""
    (tmp_path / "in").mkdir()
    src = png(tmp_path / "in" / "page.png")
    doc = convert(str(src), ocr, mode=TEST_BASE, max_new_tokens=2, batch_size=1)
    assert isinstance(doc, Document) and doc.status == "converted" and len(doc.pages) == 1
    assert convert(src, ocr, mode=TEST_BASE, max_new_tokens=2).pages[0].raw == doc.pages[0].raw
    for many in (tmp_path / "in", str(tmp_path / "in" / "*.png"), [src]):
        (d,) = convert(many, ocr, mode=TEST_BASE, max_new_tokens=2, batch_size=1)
        assert d.pages[0].raw == doc.pages[0].raw
    with pytest.raises(InputError, match="missing.png"):
        convert(tmp_path / "missing.png", ocr)
    (failed,) = convert([tmp_path / "missing.png"], ocr)
    assert failed.status == "failed" and "missing.png" in failed.error


def test_output_names_cannot_escape(tmp_path):
    ws = Workspace(tmp_path / "out")
    for stem in ("..", "../x", "a/b", ".dsocr", ""):
        with pytest.raises(AssertionError):
            ws.folder(stem)


def test_odd_file_names_stay_inside_the_output(ocr, tmp_path):
    src = png(tmp_path / "..weird name?.png")
    out = tmp_path / "out"
    (doc,) = Converter(ocr, opts(), out, engine=FakeEngine()).convert([src])
    assert doc.status == "converted" and doc.folder.parent == out
    assert doc.stem == "weird name_"


# --- flags and batching ----------------------------------------------------------------------


def test_pages_without_eos_or_in_a_loop_are_flagged_and_kept(ocr, tmp_path):
    looping = "<|ref|>text<|/ref|><|det|>[[10, 10, 900, 60]]<|/det|>\nSame line again.\n\n" * 40
    script = {
        0: (GROUNDED, "eos"),
        1: ("<|ref|>text<|/ref|><|det|>[[10, 10, 900, 60]]<|/det|>\nCut off in the mid", "length"),
        2: (looping, "loop"),  # the engine's detector stopped it
        3: (looping, "length"),  # ran to the limit; the text heuristic finds the loop
    }
    engine = FakeEngine(lambda stem, i: script[i])
    out = tmp_path / "out"
    conv = Converter(ocr, opts(), out, engine=engine)
    (doc,) = conv.convert([pdf(tmp_path / "doc.pdf", 4)])
    assert doc.status == "converted" and len(doc.pages) == 4  # nothing dropped
    meta = json.loads((out / "doc/doc.json").read_text())
    assert [p["flags"] for p in meta["pages"]] == [
        [],
        ["truncated"],
        ["truncated", "repetition_loop"],
        ["truncated", "repetition_loop"],
    ]
    assert [p["finish_reason"] for p in meta["pages"]] == ["eos", "length", "loop", "length"]
    assert meta["flagged_pages"] == [2, 3, 4]
    md = (out / "doc/doc.md").read_text()
    assert "Cut off in the mid" in md and "Same line again." in md  # text kept

    s = conv.last_summary
    assert s.flagged_pages == 3 and s.flag_counts == {"truncated": 3, "repetition_loop": 2}
    assert s.exit_code == 0  # flagged pages are reported, not failures
    text = s.format()
    assert "3 flagged page(s)" in text and f"{tmp_path / 'doc.pdf'}: page 3:" in text
    saved = json.loads((out / ".dsocr/summary.json").read_text())
    assert saved["flagged_pages"] == 3 and len(saved["flagged"]) == 3


def test_pages_of_several_documents_share_batches(ocr, tmp_path, monkeypatch):
    inputs = [png(tmp_path / f"img{k}.png") for k in range(3)] + [pdf(tmp_path / "two.pdf", 2)]
    # Deterministic timing: the first engine step waits until the producer has queued everything.
    all_queued = threading.Event()
    put = convert_mod.Prefetcher._put

    def put_and_tell(self, item):
        put(self, item)
        if item is convert_mod._END:
            all_queued.set()

    monkeypatch.setattr(convert_mod.Prefetcher, "_put", put_and_tell)
    engine = FakeEngine(steps=3, before_first_step=lambda: all_queued.wait(30))
    seen = []
    docs = Converter(ocr, opts(batch_size=4, prefetch=16), engine=engine).convert(
        inputs, on_page=lambda doc, page: seen.append((doc.stem, page.index))
    )
    assert sorted(seen) == sorted(engine.requests)
    assert all(d.status == "converted" for d in docs)
    assert sorted(engine.requests) == sorted(
        [("img0", 0), ("img1", 0), ("img2", 0), ("two", 0), ("two", 1)]
    )
    assert max(len(b) for b in engine.batches) == 4  # batch_size pages in flight
    assert max(len({stem for stem, _ in b}) for b in engine.batches) >= 3  # mixed documents


# --- options ---------------------------------------------------------------------------------


def test_options_validation_and_help():
    with pytest.raises(ValueError, match="unknown task"):
        ConvertOptions(task="poem")
    with pytest.raises(ValueError, match="exactly one <image>"):
        ConvertOptions(prompt="no image here")
    with pytest.raises(ValueError, match="needs a ref: the phrase to find"):
        ConvertOptions(task="locate")
    with pytest.raises(ValueError, match="unknown mode"):
        ConvertOptions(mode="huge")
    assert ConvertOptions(task="locate", ref="the total").resolved_prompt() == (
        "<image>\nLocate <|ref|>the total<|/ref|> in the image."
    )
    assert ConvertOptions(task="locate", ref="x").grounded
    assert not ConvertOptions(task="free").grounded
    help_text = ConvertOptions.help()
    assert set(help_text) >= {"task", "mode", "dpi", "pages", "batch_size", "max_new_tokens"}
    assert all(isinstance(v, str) and v for v in help_text.values())


# --- the real tiny model, no patching --------------------------------------------------------


def test_end_to_end_with_the_tiny_model(ocr, tmp_path):
    src = png(tmp_path / "page.png", (120, 90))
    out = tmp_path / "out"
    docs = convert([src], ocr, out, mode=TEST_BASE, max_new_tokens=4, batch_size=1)
    (doc,) = docs
    assert doc.status == "converted", doc.error
    assert {"page.md", "page.json", "page_det.md", "page_layouts.pdf"} <= files_under(out / "page")
    (page,) = json.loads((out / "page/page.json").read_text())["pages"]
    assert 1 <= page["tokens"]["generated"] <= 4
    assert page["tokens"]["vision"] == count_image_tokens(120, 90, TEST_BASE)
    assert page["finish_reason"] in ("eos", "length", "loop")
    if page["finish_reason"] == "length":
        assert "truncated" in page["flags"]
    assert BatchSummary.from_documents(docs).exit_code == 0
    assert pdf_pages(out / "page/page_layouts.pdf") == 1


# --- reruns keep what was finished --------------------------------------------------------------


def test_failed_replacement_puts_the_finished_folder_back(ocr, tmp_path, monkeypatch):
    import dsocr.pipeline.workspace as ws_mod

    src, out = png(tmp_path / "page.png"), tmp_path / "out"
    Converter(ocr, opts(), out, engine=FakeEngine()).convert([src])
    before = {f: (out / "page" / f).read_bytes() for f in files_under(out / "page")}
    marker = (out / ".dsocr/done/page.json").read_bytes()
    real_rename = ws_mod.os.rename

    def rename(a, b):
        staging = Path(a).parent.name == "tmp" and "-old." not in Path(a).name
        if staging and Path(b) == out / "page":  # staging -> OUT/page fails, undoing works
            raise OSError(28, "No space left on device")
        return real_rename(a, b)

    monkeypatch.setattr(ws_mod.os, "rename", rename)
    conv = Converter(ocr, opts(max_new_tokens=99), out, engine=FakeEngine())  # new options: redo
    (doc,) = conv.convert([src])
    assert doc.status == "failed" and "No space left on device" in doc.error
    monkeypatch.undo()
    # the earlier complete output and its done marker are back, nothing staged is left
    assert {f: (out / "page" / f).read_bytes() for f in files_under(out / "page")} == before
    assert (out / ".dsocr/done/page.json").read_bytes() == marker
    assert list((out / ".dsocr/tmp").iterdir()) == []
    engine = FakeEngine()  # and a rerun with the first options still skips it
    assert [d.status for d in Converter(ocr, opts(), out, engine=engine).convert([src])] == [
        "skipped"
    ]


def test_crash_between_renames_is_undone_when_the_workspace_reopens(tmp_path):
    out = tmp_path / "out"
    Workspace(out)
    moved = out / f".dsocr/tmp/999999999.{HOST_TAG}.0a1b2c3d-old.report"  # a dead pid's
    moved.mkdir()
    (moved / "report.md").write_text("finished earlier")
    Workspace(out)
    assert (out / "report/report.md").read_text() == "finished earlier"
    assert list((out / ".dsocr/tmp").iterdir()) == []


def test_output_folder_inside_the_input_folder_is_not_read_back(ocr, tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    png(folder / "page.png")
    out = folder / "out"
    conv = Converter(ocr, opts(), out, engine=FakeEngine())
    conv.convert([folder])
    assert (out / "page/images/0.jpg").is_file()  # a figure crop: an image inside the input
    engine = FakeEngine()
    docs = Converter(ocr, opts(), out, engine=engine).convert([folder])
    assert [(d.stem, d.status) for d in docs] == [("page", "skipped")]
    assert engine.requests == []


def test_stems_survive_a_rerun_with_other_inputs(ocr, tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a, b = png(tmp_path / "a/x.png"), png(tmp_path / "b/x.png", color="gray")
    out = tmp_path / "out"
    first = Converter(ocr, opts(), out, engine=FakeEngine()).convert([a, b])
    assert [d.stem for d in first] == ["x", "x-2"]
    # b alone, then a new file named like them: b keeps x-2 (skipped), a's folder is not reused
    c = png(tmp_path / "X.png", color="black")
    engine = FakeEngine()
    docs = Converter(ocr, opts(), out, engine=engine).convert([c, b])
    assert [(d.stem, d.status) for d in docs] == [("X-3", "converted"), ("x-2", "skipped")]
    assert engine.requests == [("X-3", 0)]
    assert json.loads((out / "x/x.json").read_text())["source"] == str(a)


def test_unusable_device_is_one_error_before_the_output_folder(tmp_path):
    src, out = png(tmp_path / "page.png"), tmp_path / "out"
    with pytest.raises(ValueError, match=r"device 'foo': not a device name"):
        convert([src], "tiny", out, device="foo")
    assert not out.exists()


def test_summary_line_counts_flags_and_pages_done_before(ocr, tmp_path):
    src, out = pdf(tmp_path / "doc.pdf", 2), tmp_path / "out"
    engine = FakeEngine(script=lambda stem, i: ("cut off", "length" if i else "eos"))
    conv = Converter(ocr, opts(task="free"), out, engine=engine)
    conv.convert([src])
    assert "2 page(s), 1 flagged, in" in conv.last_summary.format().splitlines()[0]
    conv = Converter(ocr, opts(task="free"), out, engine=FakeEngine())
    conv.convert([src])
    head = conv.last_summary.format().splitlines()[0]
    assert (
        "1 skipped" in head and "0 page(s) (+ 2 done before, 1 of them flagged), 0 flagged" in head
    )


def test_cli_warnings_and_progress_are_one_line(tmp_path):
    import subprocess
    import sys

    # a subprocess: pytest's own warning capture would swallow what the CLI prints
    src = pdf(tmp_path / "doc.pdf", 1)
    args = [str(src), "-o", str(tmp_path / "out"), "--model", "tiny", "--device", "cpu"]
    args += ["--mode", "tiny", "--task", "free", "--pages", "1-3", "--dpi", "72.5"]
    r = subprocess.run(
        [sys.executable, "-m", "dsocr.cli", "convert", *args, "--max-new-tokens", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert f"dsocr: warning: {src}: page range '1-3' clipped to 1-1 (1 page)" in lines
    assert "UserWarning" not in r.stderr and ".py:" not in r.stderr


def test_same_pages_spelled_differently_are_not_redone(ocr, tmp_path):
    src, out = pdf(tmp_path / "doc.pdf", 3), tmp_path / "out"
    Converter(ocr, opts(pages="2-3"), out, engine=FakeEngine()).convert([src])
    engine = FakeEngine()
    (doc,) = Converter(ocr, opts(pages="3,2"), out, engine=engine).convert([src])
    assert doc.status == "skipped" and engine.requests == []


def test_cli_prints_the_summary_when_interrupted(ocr, tmp_path, capsys, monkeypatch):
    from dsocr.cli import main

    first, second = png(tmp_path / "first.png"), png(tmp_path / "second.png")
    out = tmp_path / "out"

    model = ocr

    def interrupted_convert(inputs, ocr=None, out_dir=None, **kw):  # noqa: ARG001
        # batch 1: the first page is finished before the second is added (and interrupts)
        engine = FakeEngine(interrupt_on="second")
        conv = Converter(model, opts(batch_size=1), out_dir, engine=engine)
        return conv.convert(inputs, on_document=kw.get("on_document"))

    monkeypatch.setattr(convert_mod, "convert", interrupted_convert)
    code = main(["convert", str(first), str(second), "-o", str(out), "--model", "tiny"])
    err = capsys.readouterr().err
    assert code == 130
    assert "2 document(s): 1 converted, 0 skipped (already done), 0 failed; 1 page(s)" in err
    assert "interrupted: finished documents are kept" in err


# --- pages spilled to the workspace while a document is decoded -------------------------------

# What differs between two runs of the same conversion anyway: timings, the marker's finish time,
# the summary's speed, and the layout PDF's dates (its title is the file's stem, not volatile).
PDF_VOLATILE = re.compile(rb"/(?:CreationDate|ModDate) \((?:[^()\\]|\\.)*\)")
VOLATILE_KEYS = ("timings", "finished_at", "wall_s", "pages_per_s")


def untimed(obj):
    if isinstance(obj, dict):
        return {k: untimed(v) for k, v in obj.items() if k not in VOLATILE_KEYS}
    return [untimed(v) for v in obj] if isinstance(obj, list) else obj


def comparable(folder: Path) -> dict[str, object]:
    """Every file under ``folder`` by relative name: its bytes, less what differs run to run."""
    out: dict[str, object] = {}
    for rel in sorted(files_under(folder)):
        data = (folder / rel).read_bytes()
        if rel.endswith(".json"):
            out[rel] = untimed(json.loads(data))
        else:
            out[rel] = PDF_VOLATILE.sub(b"", data) if rel.endswith(".pdf") else data
    return out


def spills(out: Path) -> list[Path]:
    return sorted(p for p in (out / ".dsocr/tmp").iterdir() if "-spill." in p.name)


def spill_inputs(tmp_path: Path) -> list[Path]:
    return [pdf(tmp_path / "book.pdf", 5), png(tmp_path / "photo.png")]


def test_spilled_pages_write_the_same_files_as_pages_kept_in_memory(ocr, tmp_path, monkeypatch):
    inputs = spill_inputs(tmp_path)
    monkeypatch.setattr(convert_mod, "SPILL_PAGES", False)
    in_memory = []
    Converter(ocr, opts(batch_size=2), tmp_path / "mem", engine=FakeEngine()).convert(
        inputs, on_page=lambda d, p: in_memory.append(p.layout_jpeg is not None and p.image_data)
    )
    monkeypatch.setattr(convert_mod, "SPILL_PAGES", True)
    spilled = []
    docs = Converter(ocr, opts(batch_size=2), tmp_path / "spill", engine=FakeEngine()).convert(
        inputs, on_page=lambda d, p: spilled.append(p.layout_file is not None and p.image_files)
    )
    assert [d.status for d in docs] == ["converted", "converted"]
    assert len(in_memory) == len(spilled) == 6 and all(in_memory) and all(spilled)
    mem, spill = comparable(tmp_path / "mem"), comparable(tmp_path / "spill")
    assert "book/book_layouts.pdf" in spill and "book/images/4_0.jpg" in spill
    assert "photo/images/0.jpg" in spill and ".dsocr/done/book.json" in spill
    assert spill == mem  # same names, same bytes: Markdown, JSON, crops, layout PDF, markers
    assert pdf_pages(tmp_path / "spill/book/book_layouts.pdf") == 5
    assert spills(tmp_path / "spill") == []


def test_spilled_crops_are_copied_where_they_cannot_be_linked(ocr, tmp_path, monkeypatch):
    import dsocr.pipeline.output as output_mod

    inputs = spill_inputs(tmp_path)
    Converter(ocr, opts(), tmp_path / "linked", engine=FakeEngine()).convert(inputs)

    tried = []

    def no_links(src, dst):
        tried.append(Path(src).name)
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(output_mod.os, "link", no_links)
    docs = Converter(ocr, opts(), tmp_path / "copied", engine=FakeEngine()).convert(inputs)
    assert [d.status for d in docs] == ["converted", "converted"]
    assert sorted(tried) == ["0.jpg", "0_0.jpg", "1_0.jpg", "2_0.jpg", "3_0.jpg", "4_0.jpg"]
    assert comparable(tmp_path / "copied") == comparable(tmp_path / "linked")
    assert not [p for p in (tmp_path / "copied").rglob("*") if p.name.endswith(".tmp")]


def test_pages_leave_memory_for_the_workspace_as_they_are_decoded(ocr, tmp_path):
    src, out = pdf(tmp_path / "book.pdf", 5), tmp_path / "out"
    seen: list = []
    staged: list[int] = []

    def on_page(doc, page):
        seen.append(page)
        for p in seen:  # this page and every earlier one: no bytes in memory
            assert p.layout_jpeg is None and p.image_data == {}, p.index
            assert p.layout_file.is_file() and all(f.is_file() for f in p.image_files.values())
        (folder,) = spills(out)  # one spill folder for the document, under .dsocr/tmp
        assert page.layout_file.parent.parent == folder
        assert page.layout_file.read_bytes()[:2] == b"\xff\xd8"  # a JPEG
        assert list(page.image_files) == page.image_names == [f"{page.index}_0"]
        staged.append(len(list((folder / "layouts").iterdir())))

    left_when_written = []
    conv = Converter(ocr, opts(batch_size=1), out, engine=FakeEngine())
    (doc,) = conv.convert(
        [src], on_page=on_page, on_document=lambda d: left_when_written.append(spills(out))
    )
    assert doc.status == "converted" and staged == [1, 2, 3, 4, 5]
    assert left_when_written == [[]]  # removed as soon as the document is written
    assert spills(out) == [] and list((out / ".dsocr/tmp").iterdir()) == []
    for page in doc.pages:  # written: the files are gone and nothing refers to them
        assert page.layout_file is None and page.image_files == {} and page.image_data == {}
    assert pdf_pages(out / "book/book_layouts.pdf") == 5
    assert {f"images/{k}_0.jpg" for k in range(5)} <= files_under(out / "book")
    assert json.loads((out / "book/book.json").read_text())["files"]["layouts"] == (
        "book_layouts.pdf"
    )


def fail_on(monkeypatch, stem: str, index: int, error: BaseException, seen: list):
    """Make the postprocessing of page ``index`` of ``stem`` raise ``error``, recording the spill
    folders that exist at that moment in ``seen``."""
    real = convert_mod.Postprocess.__call__

    def postprocess(self, job):
        if (job.doc.stem, job.page.index) == (stem, index):
            out = job.doc.source.parent / "out"
            seen.extend(sorted(f.name for f in (s / "layouts").iterdir()) for s in spills(out))
            raise error
        return real(self, job)

    monkeypatch.setattr(convert_mod.Postprocess, "__call__", postprocess)


def test_a_failure_in_the_middle_of_a_document_leaves_no_spill_and_a_rerun_finishes_it(
    ocr, tmp_path, monkeypatch
):
    inputs, out = spill_inputs(tmp_path), tmp_path / "out"
    Converter(ocr, opts(batch_size=1), tmp_path / "ref", engine=FakeEngine()).convert(inputs)

    def nothing_partial():
        assert not (out / "book").exists() and not (out / ".dsocr/done/book.json").exists()
        assert list((out / ".dsocr/tmp").iterdir()) == []
        assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]

    # An error on page 3 fails that document (its first pages were spilled, and are removed at
    # once, while the batch goes on).
    seen: list = []
    fail_on(monkeypatch, "book", 2, RuntimeError("boom"), seen)
    reported = []

    def on_document(doc):
        reported.append((doc.stem, doc.status, [s.name.split(".")[-1] for s in spills(out)]))

    conv = Converter(ocr, opts(batch_size=1), out, engine=FakeEngine())
    docs = conv.convert(inputs, on_document=on_document)
    assert [d.status for d in docs] == ["failed", "converted"] and "boom" in docs[0].error
    assert seen == [["0.jpg", "1.jpg"]]
    assert reported == [("book", "failed", []), ("photo", "converted", [])]
    nothing_partial()
    monkeypatch.undo()

    # Ctrl-C on page 3, and Ctrl-C while the document is written: nothing of it stays.
    seen = []
    fail_on(monkeypatch, "book", 2, KeyboardInterrupt(), seen)
    with pytest.raises(KeyboardInterrupt):
        Converter(ocr, opts(batch_size=1), out, engine=FakeEngine()).convert(inputs)
    assert seen == [["0.jpg", "1.jpg"]]
    nothing_partial()
    monkeypatch.undo()

    def write_then_interrupt(doc, folder):
        (folder / "book.md").write_text("half")
        assert len(list(spills(out)[0].glob("layouts/*.jpg"))) == 5  # all pages wait there
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_mod, "write_document", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        Converter(ocr, opts(batch_size=1), out, engine=FakeEngine()).convert(inputs)
    nothing_partial()
    monkeypatch.undo()

    # A crash (no cleanup at all) leaves the spill folder; the next run's workspace removes it.
    seen = []
    fail_on(monkeypatch, "book", 2, KeyboardInterrupt(), seen)
    monkeypatch.setattr(convert_mod.WriteOutput, "discard", lambda self, doc: None)
    monkeypatch.setattr(convert_mod.WriteOutput, "discard_all", lambda self: None)
    with pytest.raises(KeyboardInterrupt):
        Converter(ocr, opts(batch_size=1), out, engine=FakeEngine()).convert(inputs)
    monkeypatch.undo()
    (left,) = spills(out)
    assert left.name.startswith(f"{os.getpid()}.{HOST_TAG}.")
    dead = left.with_name("999999999." + left.name.split(".", 1)[1])  # as if its process died
    left.rename(dead)
    engine = FakeEngine()
    docs = Converter(ocr, opts(batch_size=1), out, engine=engine).convert(inputs)
    assert not dead.exists() and list((out / ".dsocr/tmp").iterdir()) == []
    assert [d.status for d in docs] == ["converted", "skipped"]
    assert engine.requests == [("book", k) for k in range(5)]
    assert comparable(out / "book") == comparable(tmp_path / "ref/book")


def test_without_an_output_folder_pages_keep_their_bytes(ocr, tmp_path, monkeypatch):
    src = pdf(tmp_path / "book.pdf", 3)
    monkeypatch.chdir(tmp_path)
    held = []

    def on_page(doc, page):
        held.append(bool(page.layout_jpeg and page.image_data))
        assert page.layout_file is None and page.image_files == {}

    (doc,) = Converter(ocr, opts(), engine=FakeEngine()).convert([src], on_page=on_page)
    assert doc.status == "converted" and held == [True] * 3
    assert all(p.layout_jpeg[:2] == b"\xff\xd8" and p.image_data for p in doc.pages)
    assert not list(tmp_path.rglob(".dsocr"))  # nothing was spilled anywhere
    write_document(doc, tmp_path / "later")
    Converter(ocr, opts(), tmp_path / "out", engine=FakeEngine()).convert([src])
    assert comparable(tmp_path / "later") == comparable(tmp_path / "out/book")
