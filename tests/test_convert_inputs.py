"""Realistic scan-folder inputs: camera JPEGs (MPO), float TIFFs, broken EXIF, dangling links."""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import TEST_BASE
from PIL import Image, ImageDraw

import dsocr
from dsocr.pipeline.convert import convert
from dsocr.pipeline.providers import InputError, count_pages, discover_inputs, iter_pages


@pytest.fixture(scope="module")
def ocr():
    return dsocr.load_model("tiny", device="cpu")


def page(size=(200, 160)) -> Image.Image:
    im = Image.new("RGB", size, "white")
    ImageDraw.Draw(im).rectangle((20, 20, 120, 60), fill="black")
    return im


def bad_exif_jpeg(path: Path) -> Path:
    """A JPEG whose APP1 Exif block is truncated (Pillow warns "Corrupt EXIF data")."""
    buf = io.BytesIO()
    page().save(buf, "JPEG")
    data = buf.getvalue()
    payload = b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\x00\x05\xff\xff\xff"
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    path.write_bytes(data[:2] + app1 + data[2:])
    return path


def test_camera_mpo_jpeg_is_one_page(tmp_path):
    """A phone JPEG with a preview image after the photo (MPO) is one page, not two."""
    path = tmp_path / "photo.jpg"
    page((400, 300)).save(path, format="MPO", save_all=True, append_images=[page((160, 120))])
    assert Image.open(path).format == "MPO"
    pages = list(iter_pages(path))
    assert [(p.index, p.image.size, p.page_count) for p in pages] == [(0, (400, 300), 1)]
    assert count_pages(path) == 1


def test_float_tiff_in_unit_range_is_not_black(tmp_path):
    a = np.ones((40, 60), np.float32)
    a[10:20, 10:30] = 0.0
    path = tmp_path / "float.tif"
    Image.fromarray(a).save(path)
    rgb = np.asarray(next(iter_pages(path)).image)
    assert rgb[0, 0].tolist() == [255, 255, 255] and rgb[15, 15].tolist() == [0, 0, 0]


def test_corrupt_exif_warns_once_naming_the_file(ocr, tmp_path):
    path = bad_exif_jpeg(tmp_path / "scan.jpg")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (p,) = list(iter_pages(path))
    exif = [str(w.message) for w in caught if "EXIF" in str(w.message)]
    assert exif == [f"{path}: Corrupt EXIF data. Expecting to read 12 bytes but only got 3."]
    assert "exif" not in p.image.info  # applied already; preprocessing must not re-read it
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*scan.jpg: Corrupt EXIF")
        warnings.filterwarnings("error", message="Corrupt EXIF")  # an unnamed repeat fails
        doc = convert(path, ocr, mode=TEST_BASE, max_new_tokens=2)
    assert doc.status == "converted" and len(doc.pages) == 1


def test_broken_symlink_is_named_as_such(ocr, tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    page().save(folder / "a.png")
    (folder / "gone.png").symlink_to(tmp_path / "missing.png")
    with pytest.raises(InputError, match="gone.png: broken symbolic link"):
        discover_inputs([folder / "gone.png"])
    docs = convert([folder], ocr, mode=TEST_BASE, max_new_tokens=2)
    by_name = {d.source.name: d for d in docs}
    assert by_name["a.png"].status == "converted"
    assert by_name["gone.png"].status == "failed"
    assert "broken symbolic link" in by_name["gone.png"].error


def test_a_page_range_past_the_end_is_one_error_without_a_clip_warning(tmp_path):
    from conftest import text_pdf

    pdf = text_pdf(tmp_path / "one.pdf", ["only page"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(InputError, match="one.pdf"):
            list(iter_pages(pdf, pages="5"))
        assert [str(w.message) for w in caught] == []
        assert len(list(iter_pages(pdf, pages="1-5"))) == 1  # clipped: still warned
        assert len(caught) == 1 and "one.pdf" in str(caught[0].message)


def _tiff(path, frames):
    """A multi-frame TIFF: (image, NewSubfileType) per frame."""
    from PIL import TiffImagePlugin

    with TiffImagePlugin.AppendingTiffWriter(str(path), True) as tf:
        for im, subfile in frames:
            im.save(tf, format="TIFF", tiffinfo={254: subfile})
            tf.newFrame()
    return path


def test_tiff_preview_frames_are_not_pages(tmp_path):
    page = Image.new("L", (300, 200), 255)
    ImageDraw.Draw(page).text((10, 10), "page", fill=0)
    thumb = page.resize((60, 40))
    scan = _tiff(tmp_path / "scan.tif", [(page, 0), (thumb, 1), (page.rotate(180), 0)])
    assert count_pages(scan) == 2
    got = list(iter_pages(scan))
    assert [p.image.size for p in got] == [(300, 200), (300, 200)] and got[1].index == 1
    assert got[1].image.tobytes() == page.rotate(180).convert("RGB").tobytes()  # frame 3
    only = _tiff(tmp_path / "only.tif", [(thumb, 1)])  # every frame marked: still read
    assert [p.image.size for p in iter_pages(only)] == [(60, 40)]
    assert got[0].dpi is None  # no resolution tag: unknown, not Pillow's 1 dpi
