"""Realistic scan-folder inputs: camera JPEGs (MPO), float TIFFs, broken EXIF, dangling links,
animated GIFs, AVIF, HEIC (with and without pillow-heif), 12-bit scans in 16-bit files."""

from __future__ import annotations

import io
import struct
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import TEST_BASE
from PIL import Image, ImageDraw, features

import dsocr
from dsocr.pipeline import providers
from dsocr.pipeline.convert import convert
from dsocr.pipeline.providers import (
    InputError,
    count_pages,
    discover_inputs,
    iter_pages,
    sniff_type,
)


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


# --- GIF -------------------------------------------------------------------------------------


def text_page(text: str, size=(160, 60)) -> Image.Image:
    im = Image.new("L", size, 255)
    ImageDraw.Draw(im).text((10, 10), text, fill=0)
    return im


def test_animated_gif_frames_are_pages(ocr, tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    one, two = text_page("page one"), text_page("second page")
    path = folder / "pages.gif"
    one.save(path, save_all=True, append_images=[two])
    assert sniff_type(path.read_bytes()[:16]) == "gif"
    assert count_pages(path) == 2
    got = list(iter_pages(path))
    assert [(p.index, p.page_count, p.image.mode) for p in got] == [(0, 2, "RGB"), (1, 2, "RGB")]
    assert got[0].image.tobytes() == one.convert("RGB").tobytes()
    assert got[1].image.tobytes() == two.convert("RGB").tobytes()
    assert got[0].dpi is None
    assert [p.index for p in iter_pages(path, pages="2")] == [1]
    assert discover_inputs([folder]) == [path]  # .gif is a supported extension
    (doc,) = convert([folder], ocr, mode=TEST_BASE, max_new_tokens=2)
    assert doc.status == "converted" and len(doc.pages) == 2


def test_gif_transparency_is_flattened_onto_white(tmp_path):
    """Frame 1 is palette + transparent index; frame 2 (disposal 2: the background restored)
    comes from Pillow as RGBA: both are composed onto white, not black or the key colour."""
    palette = [255, 0, 255, 255, 0, 0, 0, 0, 255] + [0] * (3 * 253)  # 0: magenta key
    left, right = Image.new("P", (20, 20), 0), Image.new("P", (20, 20), 0)
    for im in (left, right):
        im.putpalette(palette)
    left.paste(1, (0, 0, 10, 20))  # red on the left, transparent on the right
    right.paste(2, (10, 0, 20, 20))  # blue on the right, transparent on the left
    path = tmp_path / "logo.gif"
    left.save(path, save_all=True, append_images=[right], transparency=0, disposal=2)
    a, b = (np.asarray(p.image) for p in iter_pages(path))
    assert a[5, 5].tolist() == [255, 0, 0] and a[5, 15].tolist() == [255, 255, 255]
    assert b[5, 5].tolist() == [255, 255, 255] and b[5, 15].tolist() == [0, 0, 255]


def test_gif_frame_beyond_the_screen_is_checked_before_decoding(tmp_path):
    """A later frame placed far outside the logical screen makes Pillow grow the canvas when it
    reaches it (under Pillow's own bomb limit, not ours): refused when the file is opened."""
    buf = io.BytesIO()
    frames = [Image.new("L", (10, 10), v) for v in (0, 255)]
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    data = buf.getvalue()
    desc = b",\x00\x00\x00\x00\x0a\x00\x0a\x00"  # left 0, top 0, 10 x 10
    second = data.index(desc, data.index(desc) + 1)
    path = tmp_path / "tall.gif"
    path.write_bytes(data[:second] + b",\x00\x00\x88\x13" + data[second + 5 :])  # top 5000
    assert Image.open(path).size == (10, 10)
    with pytest.raises(InputError) as e:
        iter_pages(path, max_pixels=10_000)
    assert str(e.value) == (
        f"{path}: image too large: 10x5010 = 50,100 pixels exceeds the limit of 10,000 (max_pixels)"
    )
    assert len(list(iter_pages(path, max_pixels=60_000))) == 2


# --- AVIF, HEIC ------------------------------------------------------------------------------


@pytest.mark.skipif(not features.check("avif"), reason="Pillow built without libavif")
def test_avif_round_trip_and_animated_frames(tmp_path):
    page_ = text_page("AVIF page", (200, 80)).convert("RGB")
    path = tmp_path / "photo.avif"
    page_.save(path, quality=95)
    assert sniff_type(path.read_bytes()[:64]) == "avif"
    (p,) = list(iter_pages(path))
    assert p.image.size == (200, 80) and p.image.mode == "RGB" and p.page_count == 1
    diff = np.abs(np.asarray(p.image, np.int16) - np.asarray(page_, np.int16))
    assert diff.mean() < 4
    anim = tmp_path / "anim.avif"
    page_.save(anim, save_all=True, append_images=[page_.rotate(180)], quality=95)
    assert sniff_type(anim.read_bytes()[:64]) == "avif"  # major brand avis
    got = list(iter_pages(anim))
    assert [q.index for q in got] == [0, 1] and count_pages(anim) == 2
    flipped = np.asarray(got[1].image, np.int16) - np.asarray(page_.rotate(180), np.int16)
    assert np.abs(flipped).mean() < 4


def test_avif_without_libavif_is_a_one_line_error(tmp_path, monkeypatch):
    path = tmp_path / "photo.avif"
    path.write_bytes(b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + bytes(64))
    monkeypatch.setattr(providers, "_has_avif", lambda: False)
    for call in (iter_pages, count_pages):
        with pytest.raises(InputError) as e:
            call(path)
        assert str(e.value) == (
            f"{path}: AVIF image needs Pillow built with libavif (PIL.features.check('avif') "
            "is False)"
        )


def ftyp(major: bytes, *compatible: bytes) -> bytes:
    body = major + bytes(4) + b"".join(compatible)
    return struct.pack(">I", 8 + len(body)) + b"ftyp" + body


def test_iso_bmff_brands_are_sniffed():
    for major in (b"heic", b"heix", b"mif1", b"msf1", b"hevc"):
        assert sniff_type(ftyp(major, b"mif1", major) + bytes(16)) == "heif", major
    assert sniff_type(ftyp(b"avif", b"avif", b"mif1", b"miaf")) == "avif"
    assert sniff_type(ftyp(b"avis", b"avif", b"msf1")) == "avif"
    assert sniff_type(ftyp(b"mif1", b"mif1", b"avif")) == "avif"  # generic major, AVIF listed
    assert sniff_type(ftyp(b"mif1", b"mif1", b"heic")) == "heif"
    assert sniff_type(ftyp(b"isom", b"isom", b"mp41")) is None  # an MP4 video
    assert sniff_type(ftyp(b"qt  ", b"qt  ")) is None


def test_heic_without_pillow_heif_is_a_one_line_error(ocr, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # import pillow_heif fails
    folder = tmp_path / "phone"
    folder.mkdir()
    path = folder / "IMG_0001.HEIC"
    path.write_bytes(ftyp(b"heic", b"mif1", b"heic") + bytes(200))
    expected = (
        f"{path}: HEIC/HEIF image needs the optional pillow-heif package "
        "(pip install 'dsocr[heif]')"
    )
    for call in (iter_pages, count_pages):
        with pytest.raises(InputError) as e:
            call(path)
        assert str(e.value) == expected
    assert discover_inputs([folder]) == [path]  # found, so that the reason is reported
    (doc,) = convert([folder], ocr, mode=TEST_BASE, max_new_tokens=2)
    assert doc.status == "failed" and doc.error == expected


def test_heic_with_pillow_heif(tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif")
    page_ = text_page("HEIC page", (200, 80)).convert("RGB")
    path = tmp_path / "IMG_0002.heic"
    pillow_heif.from_pillow(page_).save(path, quality=95)
    assert sniff_type(path.read_bytes()[:64]) == "heif"
    assert count_pages(path) == 1
    (p,) = list(iter_pages(path))
    assert p.image.size == (200, 80) and p.image.mode == "RGB" and p.page_count == 1
    diff = np.abs(np.asarray(p.image, np.int16) - np.asarray(page_, np.int16))
    assert diff.mean() < 4


# --- 16-bit files holding 12-bit data ----------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png16(path: Path, a: np.ndarray, sbit: int | None = None) -> Path:
    """A 16-bit greyscale PNG, with an sBIT chunk (significant bits) when ``sbit`` is given."""
    buf = io.BytesIO()
    Image.fromarray(a.astype(np.uint16)).save(buf, "PNG")
    data = buf.getvalue()
    assert data[12:16] == b"IHDR" and data[24:26] == b"\x10\x00"  # 16-bit, greyscale
    extra = png_chunk(b"sBIT", bytes([sbit])) if sbit is not None else b""
    path.write_bytes(data[:33] + extra + data[33:])  # after IHDR
    return path


def tiff12(path: Path, a: np.ndarray) -> Path:
    """An uncompressed greyscale TIFF with packed 12-bit samples (BitsPerSample 12)."""
    h, w = a.shape
    v = a.astype(np.uint32).reshape(h, w // 2, 2)
    packed = np.stack([v[..., 0] >> 4, (v[..., 0] & 15) << 4 | v[..., 1] >> 8, v[..., 1] & 255], -1)
    data = packed.astype(np.uint8).tobytes()
    tags = [(256, w), (257, h), (258, 12), (259, 1), (262, 1), (273, 0), (277, 1), (278, h)]
    tags.append((279, len(data)))
    start = 8 + 2 + 12 * len(tags) + 4
    ifd = struct.pack("<H", len(tags))
    for tag, value in tags:
        ifd += struct.pack("<HHII", tag, 4, 1, start if tag == 273 else value)  # LONG values
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd + bytes(4) + data)
    return path


def grey(path: Path, **kw) -> list[int]:
    rgb = np.asarray(next(iter_pages(path, **kw)).image)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()
    return rgb[0, :, 0].tolist()


def test_12_bit_scans_in_16_bit_files_keep_their_brightness(tmp_path):
    """0..4095 in a 16-bit PNG or TIFF (no sBIT) means 12-bit data: 4095 is white, not 16/255."""
    a = np.array([[0, 4095, 2048, 1000]] * 2)
    want = [0, 255, 127, 62]  # 2048 / 4095 * 255 = 127.5, truncated
    assert grey(png16(tmp_path / "scan.png", a)) == want
    Image.fromarray(a.astype(np.uint16)).save(tmp_path / "scan.tif")
    assert Image.open(tmp_path / "scan.tif").tag_v2[258] == (16,)
    assert grey(tmp_path / "scan.tif") == want
    packed = tiff12(tmp_path / "packed.tif", a)
    assert Image.open(packed).tag_v2[258] == (12,)
    assert grey(packed) == want


def test_png_sbit_says_how_many_bits_are_significant(tmp_path):
    a = np.array([[0, 1023, 512]])
    assert grey(png16(tmp_path / "10bit.png", a, sbit=10)) == [0, 255, 127]
    assert grey(png16(tmp_path / "guess.png", a)) == [0, 63, 31]  # without sBIT: 12-bit rule
    dark = np.array([[0, 4095, 257]])  # sBIT 16: a genuinely dark 16-bit image stays dark
    assert grey(png16(tmp_path / "dark.png", dark, sbit=16)) == [0, 15, 1]


def png16_rgb(path: Path, a: np.ndarray, sbit: int | None = None) -> Path:
    """A 16-bit RGB PNG written by hand (Pillow cannot write one), with an sBIT when given."""
    h, w, _ = a.shape
    raw = b"".join(b"\0" + a[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    extra = png_chunk(b"sBIT", bytes([sbit] * 3)) if sbit is not None else b""
    body = png_chunk(b"IHDR", ihdr) + extra + png_chunk(b"IDAT", zlib.compress(raw))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body + png_chunk(b"IEND", b""))
    return path


def tiff16_rgb(path: Path, a: np.ndarray) -> Path:
    """An uncompressed 16-bit RGB TIFF written by hand (BitsPerSample 16, 16, 16)."""
    h, w, _ = a.shape
    data = a.astype("<u2").tobytes()
    n_tags = 10
    bps_at = 8 + 2 + 12 * n_tags + 4
    data_at = bps_at + 6
    tags = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, 3, bps_at), (259, 3, 1, 1), (262, 3, 1, 2)]
    tags += [(273, 4, 1, data_at), (277, 3, 1, 3), (278, 4, 1, h), (279, 4, 1, len(data))]
    tags += [(284, 3, 1, 1)]
    ifd = struct.pack("<H", n_tags) + b"".join(struct.pack("<HHII", *t) for t in tags)
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd + bytes(4) + b"\x10\0" * 3 + data)
    return path


def test_12_bit_colour_in_16_bit_files_keeps_its_brightness(tmp_path):
    """Pillow reads 16-bit colour as the samples' high bytes, so 12-bit data came out at most
    15/255; it is stretched back (16 levels survive), per sBIT when the PNG has one."""
    a = np.array([[[0, 0, 0], [4095, 4095, 4095], [2048, 1024, 4095]]])
    want = [[0, 0, 0], [255, 255, 255], [136, 68, 255]]  # high byte 8 -> 8 * 255 // 15
    assert np.asarray(Image.open(png16_rgb(tmp_path / "g.png", a))).tolist()[0][1] == [15] * 3
    for name, path in [
        ("png", png16_rgb(tmp_path / "c.png", a)),
        ("sbit 12", png16_rgb(tmp_path / "s12.png", a, sbit=12)),
        ("tiff", tiff16_rgb(tmp_path / "c.tif", a)),
    ]:
        assert np.asarray(next(iter_pages(path)).image).tolist()[0] == want, name
    # sBIT 16 (a genuinely dark 16-bit image) and full-range colour stay as Pillow reads them
    dark = next(iter_pages(png16_rgb(tmp_path / "d.png", a, sbit=16))).image
    assert np.asarray(dark).tolist()[0][1] == [15, 15, 15]
    full = a * 16
    full[0, 1] = 65535
    got = np.asarray(next(iter_pages(png16_rgb(tmp_path / "f.png", full))).image).tolist()[0]
    assert got == [[0, 0, 0], [255, 255, 255], [128, 64, 255]]
    # 8-bit colour is never stretched, however dark
    Image.fromarray(np.full((2, 2, 3), 9, np.uint8)).save(tmp_path / "dark8.png")
    assert np.asarray(next(iter_pages(tmp_path / "dark8.png")).image).max() == 9


def test_full_range_16_bit_images_are_scaled_by_65535(tmp_path):
    a = np.array([[0, 257, 32896, 65535, 4095]])  # 257 * k -> k
    assert grey(png16(tmp_path / "full.png", a)) == [0, 1, 128, 255, 15]
    Image.fromarray(a.astype(np.uint16)).save(tmp_path / "full.tif")
    assert grey(tmp_path / "full.tif") == [0, 1, 128, 255, 15]
