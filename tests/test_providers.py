"""Input files -> page images, page ranges, input discovery, safe output names (dsocr.pipeline)."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import pytest
from conftest import text_pdf
from PIL import Image

from dsocr.pipeline.providers import (
    InputError,
    count_pages,
    discover_inputs,
    iter_pages,
    parse_page_ranges,
    safe_stem,
    sniff_type,
    unique_stems,
)

pdfium = pytest.importorskip("pypdfium2")


# --- fixtures: files written by the tests ----------------------------------------------------


def blank_pdf(path: Path, n: int, size=(612, 792)) -> Path:
    pdf = pdfium.PdfDocument.new()
    for _ in range(n):
        pdf.new_page(*size)
    pdf.save(str(path))
    pdf.close()
    return path


def png_header_only(path: Path, w: int, h: int) -> Path:
    """A PNG that claims w x h pixels but holds no pixel data (IHDR + IEND)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def reason(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


# --- PDFs ------------------------------------------------------------------------------------


def test_multipage_pdf_at_144_dpi(tmp_path):
    path = blank_pdf(tmp_path / "three.pdf", 3)
    pages = list(iter_pages(path))
    assert [p.index for p in pages] == [0, 1, 2]
    for p in pages:
        assert p.image.size == (1224, 1584)  # Letter 612 x 792 pt * 144 / 72
        assert p.image.mode == "RGB" and p.dpi == 144 and p.page_count == 3
        assert p.image.getextrema() == ((255, 255),) * 3  # white, no alpha
        assert p.source == path
    assert next(iter(iter_pages(path, dpi=72))).image.size == (612, 792)
    assert count_pages(path) == 3


def test_pdf_page_ranges(tmp_path):
    path = blank_pdf(tmp_path / "five.pdf", 5)
    assert [p.index for p in iter_pages(path, pages="2-3,5")] == [1, 2, 4]
    assert [p.index for p in iter_pages(path, pages=[4, 0])] == [0, 4]
    with pytest.raises(InputError, match="reversed"):
        iter_pages(path, pages="3-2")
    with pytest.raises(InputError, match=r"five\.pdf: .*selects no page"):
        iter_pages(path, pages="9")  # the error alone: no "beyond" warning beside it


def test_parse_page_ranges():
    assert parse_page_ranges("1-5,9", 10) == [0, 1, 2, 3, 4, 8]
    assert parse_page_ranges(" 3 , 1-2 ,2", 10) == [0, 1, 2]
    assert parse_page_ranges("8-", 10) == [7, 8, 9]
    with pytest.warns(UserWarning, match="clipped"):
        assert parse_page_ranges("9-12", 10) == [8, 9]
    with pytest.warns(UserWarning, match="beyond"):
        assert parse_page_ranges("1,15", 10) == [0]
    for bad, msg in [
        ("0", "numbered from 1"),
        ("0-3", "numbered from 1"),
        ("5-2", "reversed"),
        ("", "empty"),
        ("1,,2", "empty"),
        ("a-b", "invalid"),
        ("-3", "invalid"),
        ("1.5", "invalid"),
    ]:
        with pytest.raises(ValueError, match=msg):
            parse_page_ranges(bad, 10)
    with pytest.raises(ValueError, match="selects no page"), pytest.warns(UserWarning):
        parse_page_ranges("11-12", 10)


def test_pdf_text_layer(tmp_path):
    path = text_pdf(tmp_path / "text.pdf", ["Hello PDF world", "Second page"])
    pages = list(iter_pages(path))
    assert [p.text_layer.strip() for p in pages] == ["Hello PDF world", "Second page"]
    assert pages[0].image.getextrema() != ((255, 255),) * 3  # the text was drawn
    assert next(iter(iter_pages(path, extract_text=False))).text_layer is None


def test_encrypted_pdf(tmp_path):
    pikepdf = pytest.importorskip("pikepdf")
    plain = blank_pdf(tmp_path / "plain.pdf", 2)
    path = tmp_path / "locked.pdf"
    with pikepdf.open(plain) as doc:
        doc.save(path, encryption=pikepdf.Encryption(owner="owner-pw", user="user-pw", R=6))
    with pytest.raises(InputError) as e:
        iter_pages(path)
    assert reason(e) == f"{path}: encrypted PDF: a password is needed (--password)"
    with pytest.raises(InputError) as e:
        iter_pages(path, password="nope")
    assert reason(e) == f"{path}: encrypted PDF: wrong password"
    assert len(list(iter_pages(path, password="user-pw"))) == 2


def test_zero_page_pdf(tmp_path):
    path = blank_pdf(tmp_path / "empty.pdf", 0)
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.7\nnot a pdf body\n")
    for _ in range(2):  # PDFium's stale error code from the broken file must not leak
        with pytest.raises(InputError, match="corrupt PDF"):
            iter_pages(broken)
        with pytest.raises(InputError) as e:
            iter_pages(path)
        assert reason(e) == f"{path}: PDF has no pages"


def test_corrupt_pdf(tmp_path):
    path = tmp_path / "broken.pdf"
    path.write_bytes(b"%PDF-1.7\nthis is not a pdf body\n")
    with pytest.raises(InputError, match="corrupt PDF"):
        iter_pages(path)


def test_oversized_pdf_page_is_rendered_smaller(tmp_path):
    path = blank_pdf(tmp_path / "poster.pdf", 1, size=(2000, 2000))
    with pytest.warns(UserWarning, match="max_pixels"):
        (page,) = iter_pages(path, max_pixels=1_000_000)
    w, h = page.image.size
    assert w * h <= 1_000_000 and w > 900
    assert page.dpi < 144


# --- images ----------------------------------------------------------------------------------


def test_images_formats_exif_alpha_and_tiff(tmp_path):
    Image.new("RGB", (30, 20), "red").save(tmp_path / "a.jpg", quality=95)
    Image.new("L", (30, 20), 128).save(tmp_path / "b.bmp")
    Image.new("RGB", (30, 20), "blue").save(tmp_path / "c.webp")
    for name in ("a.jpg", "b.bmp", "c.webp"):
        (p,) = iter_pages(tmp_path / name)
        assert p.image.size == (30, 20) and p.image.mode == "RGB" and p.text_layer is None
    # transparent PNG -> white background, not black
    Image.new("RGBA", (10, 10), (0, 0, 0, 0)).save(tmp_path / "t.png")
    (p,) = iter_pages(tmp_path / "t.png")
    assert p.image.getpixel((0, 0)) == (255, 255, 255)
    # EXIF orientation 6 (rotate 90): width and height swap
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (30, 20), "red").save(tmp_path / "rot.jpg", exif=exif.tobytes())
    (p,) = iter_pages(tmp_path / "rot.jpg")
    assert p.image.size == (20, 30)
    # 16-bit greyscale is scaled, not clipped to white
    Image.frombytes("I;16", (4, 4), b"\x80\x80" * 16).save(tmp_path / "g16.png")
    (p,) = iter_pages(tmp_path / "g16.png")
    assert p.image.getpixel((0, 0)) == (128, 128, 128)
    # multi-frame TIFF: frames are pages
    frames = [Image.new("RGB", (16, 8 * (i + 1)), "green") for i in range(3)]
    frames[0].save(tmp_path / "m.tiff", save_all=True, append_images=frames[1:], dpi=(300, 300))
    pages = list(iter_pages(tmp_path / "m.tiff"))
    assert [p.image.size for p in pages] == [(16, 8), (16, 16), (16, 24)]
    assert pages[0].dpi == pytest.approx(300) and pages[0].page_count == 3
    assert [p.index for p in iter_pages(tmp_path / "m.tiff", pages="2-3")] == [1, 2]


def test_type_by_magic_not_extension(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    (tmp_path / "actually_png.pdf").write_bytes(buf.getvalue())
    (p,) = iter_pages(tmp_path / "actually_png.pdf")
    assert p.image.size == (8, 8)
    (tmp_path / "notes.png").write_text("just some text\n")
    with pytest.raises(InputError, match="unsupported file type"):
        iter_pages(tmp_path / "notes.png")
    assert sniff_type(b"junk\n%PDF-1.4") == "pdf"
    assert sniff_type(b"GIF89a") == sniff_type(b"GIF87a") == "gif"


def test_missing_empty_and_corrupt_files(tmp_path):
    with pytest.raises(InputError) as e:
        iter_pages(tmp_path / "nope.pdf")
    assert reason(e) == f"{tmp_path / 'nope.pdf'}: file not found"
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(InputError) as e:
        iter_pages(tmp_path / "zero.png")
    assert reason(e).endswith("zero.png: empty file (0 bytes)")
    with pytest.raises(InputError, match="is a directory"):
        iter_pages(tmp_path)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, "PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[:60])
    with pytest.raises(InputError, match=r"cut\.png: corrupt"):
        list(iter_pages(tmp_path / "cut.png"))
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 50)
    with pytest.raises(InputError, match=r"junk\.jpg: corrupt"):
        list(iter_pages(tmp_path / "junk.jpg"))


def test_huge_image_rejected_before_decoding(tmp_path):
    bomb = png_header_only(tmp_path / "bomb.png", 50_000, 50_000)
    with pytest.raises(InputError) as e:
        iter_pages(bomb)
    # Pillow refuses it before we see the size: still our wording and our limit, not Pillow's
    assert reason(e) == (
        f"{bomb}: image too large: 2,500,000,000 pixels exceeds the limit of 89,478,485 "
        "(max_pixels)"
    )
    big = png_header_only(tmp_path / "big.png", 5_000, 5_000)
    with pytest.raises(InputError) as e:
        iter_pages(big, max_pixels=1_000_000)
    assert reason(e) == (
        f"{big}: image too large: 5000x5000 = 25,000,000 pixels exceeds the limit of "
        "1,000,000 (max_pixels)"
    )


def test_input_error_is_one_line():
    e = InputError("bad\nname.pdf", "line one\nline two")
    assert str(e) == "bad?name.pdf: line one line two"
    assert e.path == "bad\nname.pdf" and e.reason == "line one line two"


# --- discovery and names ---------------------------------------------------------------------


def test_discover_inputs(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / ".hidden").mkdir()
    for rel in ["docs/b.pdf", "docs/a.PNG", "docs/sub/c.jpg", "docs/notes.txt",
                "docs/.DS_Store", "docs/._a.pdf", "docs/.hidden/x.pdf", "loose.tiff"]:  # fmt: skip
        (tmp_path / rel).write_bytes(b"x")
    docs = tmp_path / "docs"
    found = discover_inputs([docs])
    assert [p.relative_to(docs).as_posix() for p in found] == ["a.PNG", "b.pdf", "sub/c.jpg"]
    # glob + explicit file + duplicates: first occurrence wins, order kept
    found = discover_inputs([str(tmp_path / "docs" / "*.pdf"), docs / "b.pdf", docs / "notes.txt"])
    assert [p.name for p in found] == ["b.pdf", "notes.txt"]  # an explicit file is kept as is
    found = discover_inputs([str(tmp_path / "**" / "*.jpg"), docs])
    assert [p.name for p in found] == ["c.jpg", "a.PNG", "b.pdf"]
    assert discover_inputs([tmp_path / "loose.tiff", docs / ".." / "loose.tiff"]) == [
        tmp_path / "loose.tiff"
    ]
    with pytest.raises(InputError, match="file not found"):
        discover_inputs([tmp_path / "missing.pdf"])
    with pytest.raises(InputError, match="matches no file"):
        discover_inputs([str(tmp_path / "*.nothing")])


@pytest.mark.parametrize(
    "name, expected",
    [
        ("../../etc/passwd", "passwd"),
        ("..", "document"),
        (".", "document"),
        ("", "document"),
        ("../", "document"),
        ("con", "_con"),
        ("CON.pdf", "_CON"),
        ("lpt1.tar.gz", "_lpt1.tar"),
        ("a/b\\c.pdf", "c"),
        ("..\\..\\windows\\evil.pdf", "evil"),
        ("re\x00port\x1f.pdf", "report"),
        ("what?:*.pdf", "what___"),
        ("...hidden.pdf", "hidden"),
        ("trailing. .pdf", "trailing"),
        ("report.v2.pdf", "report.v2"),
        ("r\u202egnp.pdf", "rgnp"),
        ("报告 2024.pdf", "报告 2024"),
    ],
)
def test_safe_stem(name, expected):
    stem = safe_stem(name)
    assert stem == expected
    assert "/" not in stem and "\\" not in stem and "\x00" not in stem
    assert not stem.startswith(".") and stem not in ("", ".", "..")


def test_safe_stem_length_and_containment(tmp_path):
    stem = safe_stem("é" * 300 + ".pdf")
    assert len(stem.encode()) <= 120 and stem == "é" * 60
    for bad in ["../../etc/passwd", "..", "a/../../b", "/abs/path.pdf", "x\x00/../y"]:
        target = (tmp_path / safe_stem(bad)).resolve()
        assert target.parent == tmp_path.resolve()


def test_unique_stems():
    paths = ["a/doc.pdf", "b/doc.pdf", "c/DOC.png", "doc-2.pdf", "other.pdf", "d/doc.pdf"]
    assert unique_stems(paths) == ["doc", "doc-3", "DOC-4", "doc-2", "other", "doc-5"]
    assert unique_stems(paths) == unique_stems(list(paths))  # deterministic


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(InputError) as e:  # opening it for reading would block forever
        iter_pages(fifo)
    assert reason(e) == f"{fifo}: not a regular file (a FIFO, socket or device)"


def test_page_range_messages_quote_the_range_as_written(tmp_path):
    from dsocr.pipeline.providers import canonical_page_spec, page_range_items

    with pytest.raises(ValueError, match=r"reversed page range '5-3': write 3-5"):
        page_range_items("1,5-3")
    with pytest.raises(ValueError, match=r"invalid page range '0-2'"):
        page_range_items("0-2")
    three = blank_pdf(tmp_path / "three.pdf", 3)
    with pytest.raises(InputError, match=r"three\.pdf: page range '7-' selects no page of a 3-"):
        iter_pages(three, pages="7-")
    with pytest.warns(UserWarning, match=r"three\.pdf: page range '2-9' clipped to 2-3"):
        assert [p.index for p in iter_pages(three, pages="2-9")] == [1, 2]
    assert canonical_page_spec("3,2") == canonical_page_spec("2-3") == "2-3"
    assert canonical_page_spec("5-, 1-2, 2") == "1-2,5-"
    assert canonical_page_spec("1-4,3-9,11") == "1-9,11"
    assert canonical_page_spec("4-,2-6") == "2-"
