"""Input files -> page images: PDFs (pypdfium2) and images (Pillow), with one error type.

The official PDF runner (``run_dpsk_ocr_pdf.py``, reference spec §3.4) renders pages with PyMuPDF
at 144 dpi (zoom 2.0, alpha off) and feeds RGB PIL images to the model; images go through
``ImageOps.exif_transpose`` and ``convert("RGB")``. We do the same with pypdfium2 (Apache/BSD,
no AGPL) at ``scale = dpi / 72`` on a white background, forms and annotations drawn.

Everything a user can get wrong about an input file surfaces as :class:`InputError`, whose
``str()`` is one line ``"<path>: <reason>"`` (missing/unreadable/empty file, unsupported type,
corrupt image or PDF, encrypted PDF without or with a wrong password, zero-page PDF, image over
the pixel limit, an AVIF or HEIC file this installation cannot decode). The file type is decided
by magic bytes, never by the extension alone.

Image types: PNG, JPEG, TIFF, WebP, BMP and GIF always; AVIF when Pillow is built with libavif
(the PyPI wheels are); HEIC/HEIF when the optional ``pillow-heif`` package is installed
(``pip install 'dsocr[heif]'``; its Pillow opener is registered on the first HEIC file).

Decisions:
- Page ranges are 1-based for users (``"1-5,9"``, ``"3-"``) and 0-based in code. Zero, reversed
  and malformed ranges are errors. Pages beyond the document are dropped (or a range clipped)
  with a ``UserWarning``, so one range works across a batch of PDFs of different lengths; it is
  an error only when nothing is left. The result is sorted and de-duplicated (document order).
- Images over ``max_pixels`` (read from the header; Pillow's ``open`` does not decode) are
  rejected; Pillow's own ``DecompressionBombError`` is mapped to the same error. PDF pages whose
  render would exceed ``max_pixels`` are rendered at a lower dpi (with a warning) instead, and
  the page's ``dpi`` says which. A GIF frame may extend Pillow's canvas past the logical screen,
  so a GIF's largest frame extent is read from its block structure (no decoding) and checked too.
- Images with transparency are flattened onto white (the official code drops alpha, which turns
  transparent backgrounds black); 16-bit greyscale is scaled to 8 bits by its significant bits
  (12-bit scanner and camera data in a 16-bit file included, see :func:`_to_rgb`); 16-bit colour,
  of which Pillow keeps the high bytes, is stretched when it holds fewer bits
  (:func:`_stretch_high_bytes`); float images in [0, 1] by 255. A camera MPO (a JPEG with
  preview frames) is one page; the frames of an animated GIF or AVIF are pages, like a
  multi-page TIFF's (each as displayed: composed onto the frames before it, as the format's
  disposal says).
- PDFium is not thread-safe: every call into it holds one module-level lock, so several threads
  may iterate different documents (rendering is then serialised).
- Output names: :func:`safe_stem` never escapes the output directory; :func:`unique_stems`
  suffixes repeats ``-2``, ``-3`` in input order (case-insensitively, for macOS/Windows).
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import re
import struct
import threading
import unicodedata
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_DPI = 144  # official PDF runner (PyMuPDF zoom 2.0)
MAX_PIXELS = 89_478_485  # Pillow's own warning threshold (~9459 x 9459); ~270 MB as RGB
SUPPORTED_EXTENSIONS = (".pdf", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp")
SUPPORTED_EXTENSIONS += (".gif", ".avif", ".heic", ".heif")
IMAGE_TYPES = ("png", "jpeg", "tiff", "webp", "bmp", "gif", "avif", "heif")
IMAGE_TYPE_NAMES = "PNG/JPEG/TIFF/WebP/BMP/GIF/AVIF/HEIC"  # for messages
UNSUPPORTED_TYPE = f"unsupported file type (expected a PDF or a {IMAGE_TYPE_NAMES} image)"
HEIF_NEEDS_PLUGIN = (
    "HEIC/HEIF image needs the optional pillow-heif package (pip install 'dsocr[heif]')"
)
AVIF_NEEDS_LIBAVIF = (
    "AVIF image needs Pillow built with libavif (PIL.features.check('avif') is False)"
)

# ISO-BMFF (``ftyp`` box) brands: AVIF still/sequence; HEVC-coded HEIF; generic HEIF (either)
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEVC_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs"})
_MIF_BRANDS = frozenset({b"mif1", b"msf1"})

_PDFIUM_LOCK = threading.RLock()


class InputError(Exception):
    """A problem with one input file. ``str(e)`` is ``"<path>: <reason>"`` on one line."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = " ".join(str(reason).split())
        super().__init__(f"{printable(self.path)}: {self.reason}")


def printable(value) -> str:
    """``str(value)`` on one terminal line: control characters (a newline in a file name) shown
    as ``?``."""
    return "".join(c if c.isprintable() else "?" for c in str(value))


@dataclass
class PageImage:
    """One page ready for the model.

    ``index`` is 0-based within the source file; ``page_count`` is the source's total page count
    (frames for a multi-frame TIFF or an animated GIF). ``dpi`` is the render resolution for PDF
    pages, or the resolution stored in an image file (None when absent). ``text_layer`` is a PDF
    page's own text (PDFium text extraction), a coarse reference for checks; None for images.
    """

    source: Path
    index: int
    image: Image.Image
    dpi: float | None
    text_layer: str | None = None
    page_count: int = 1


# ---------------------------------------------------------------------------------------------
# Page ranges


_RANGE_RE = re.compile(r"^(\d+)(?:\s*(-)\s*(\d*))?$")


def page_range_items(spec: str) -> list[tuple[str, int, int | None]]:
    """The items of a page range spec as ``(text, first, last)``, 1-based (``last`` None: to the
    end), without knowing the document. Raises ValueError for an empty or malformed item, page 0
    or a reversed range, quoting the item as the user wrote it."""
    items = [s.strip() for s in spec.split(",")]
    if not spec.strip() or any(not s for s in items):
        raise ValueError(f"empty item in page range {spec!r}")
    out = []
    for item in items:
        m = _RANGE_RE.match(item)
        if m is None:
            raise ValueError(f"invalid page range {item!r}: use N, A-B or A- (1-based), e.g. 1-5,9")
        a = int(m.group(1))
        b = a if m.group(2) is None else (int(m.group(3)) if m.group(3) else None)
        if a == 0 or b == 0:
            raise ValueError(f"invalid page range {item!r}: pages are numbered from 1")
        if b is not None and b < a:
            raise ValueError(f"reversed page range {item!r}: write {b}-{a}")
        out.append((item, a, b))
    return out


def canonical_page_spec(spec: str) -> str:
    """One spelling per selection, independent of the document: ``"3,2"`` and ``"2-3"`` give
    ``"2-3"``; ``"5-,1-2"`` gives ``"1-2,5-"`` (so a resume fingerprint does not depend on it)."""
    spans = sorted((a, math.inf if b is None else b) for _, a, b in page_range_items(spec))
    merged: list[list[float]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])

    def fmt(a, b):
        return f"{a}-" if b == math.inf else (f"{a}" if a == b else f"{a}-{b}")

    return ",".join(fmt(int(a), b if b == math.inf else int(b)) for a, b in merged)


def parse_page_ranges(spec: str, n_pages: int) -> list[int]:
    """``"1-5,9"`` (1-based, inclusive; ``"7-"`` means to the end) -> sorted 0-based indices.

    Raises ValueError for a malformed item, page 0, a reversed range, or when no page of the
    document is selected. Pages beyond ``n_pages`` are dropped with a UserWarning.
    """
    if n_pages < 1:
        raise ValueError(f"document has no pages (n_pages={n_pages})")
    selected: set[int] = set()
    for item, a, b in page_range_items(spec):
        b = n_pages if b is None else b
        count = f"{n_pages} page{'s' * (n_pages != 1)}"
        if a > n_pages:
            warnings.warn(
                f"page range {item!r} is beyond the document ({count}); skipped", stacklevel=2
            )
            continue
        if b > n_pages:
            warnings.warn(f"page range {item!r} clipped to {a}-{n_pages} ({count})", stacklevel=2)
            b = n_pages
        selected.update(range(a - 1, b))
    if not selected:
        raise ValueError(f"page range {spec!r} selects no page of a {n_pages}-page document")
    return sorted(selected)


def _select(path, pages: str | Sequence[int] | None, n: int) -> list[int]:
    if pages is None:
        return list(range(n))
    if isinstance(pages, str):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                selected = parse_page_ranges(pages, n)
            except ValueError as e:  # the error says it all: no clip warning beside it
                raise InputError(path, str(e)) from None
        for w in caught:  # say which document a clipped range belongs to
            warnings.warn(f"{printable(path)}: {w.message}", w.category, stacklevel=3)
        return selected
    bad = [i for i in pages if not 0 <= int(i) < n]
    if bad:
        raise InputError(path, f"page indices {bad} out of range for {n} pages (0-based)")
    return sorted({int(i) for i in pages})


# ---------------------------------------------------------------------------------------------
# File checks


def sniff_type(head: bytes) -> str | None:
    """File type from its first bytes: ``"pdf"``, one of IMAGE_TYPES, or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:2] == b"BM" and len(head) >= 26:
        return "bmp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[4:8] == b"ftyp":
        return _sniff_ftyp(head)
    if b"%PDF-" in head[:1024]:  # PDF allows junk before the header; PDFium tolerates it
        return "pdf"
    return None


def _sniff_ftyp(head: bytes) -> str | None:
    """``"avif"``, ``"heif"`` or None from an ISO-BMFF ``ftyp`` box (size, ``ftyp``, major brand,
    minor version, compatible brands). A major brand avif/avis or heic/heix/hevc/... decides;
    else the brands listed, AVIF first, since an AVIF file may have the generic ``mif1``/``msf1``
    as its major brand; generic HEIF alone is HEIF. MP4/MOV videos: None."""
    size = int.from_bytes(head[:4], "big")
    end = min(len(head), size) if size >= 16 else 16
    major = head[8:12]
    brands = {major} | {head[k : k + 4] for k in range(16, end - 3, 4)}
    if major in _AVIF_BRANDS:
        return "avif"
    if major in _HEVC_BRANDS:
        return "heif"
    if brands & _AVIF_BRANDS:
        return "avif"
    if brands & (_HEVC_BRANDS | _MIF_BRANDS):
        return "heif"
    return None


def missing_reason(path: Path) -> str:
    """Why ``path`` (which does not exist) is missing: a dangling link says so."""
    if path.is_symlink():
        try:
            return f"broken symbolic link (its target {os.readlink(path)} does not exist)"
        except OSError:
            return "broken symbolic link"
    return "file not found"


def _check_file(path: Path) -> str:
    """Existence, readability, non-emptiness and type of ``path``; returns the sniffed type."""
    try:
        if not path.exists():
            raise InputError(path, missing_reason(path))
        if path.is_dir():
            raise InputError(path, "is a directory, not a file")
        if not path.is_file():  # opening a FIFO would block the whole batch
            raise InputError(path, "not a regular file (a FIFO, socket or device)")
        if path.stat().st_size == 0:
            raise InputError(path, "empty file (0 bytes)")
        with open(path, "rb") as f:
            head = f.read(1024)
    except OSError as e:
        raise InputError(path, f"cannot read file: {e.strerror or e}") from None
    kind = sniff_type(head)
    if kind is None:
        raise InputError(path, UNSUPPORTED_TYPE)
    check_decoder(path, kind)
    return kind


def check_decoder(path: str | os.PathLike, kind: str | None) -> None:
    """Raise :class:`InputError` when this installation cannot decode a file of type ``kind``
    (from :func:`sniff_type`): AVIF without libavif in Pillow, HEIC/HEIF without pillow-heif.
    For HEIF it also registers pillow-heif's Pillow opener (once), so ``Image.open`` reads it."""
    if kind == "avif" and not _has_avif():
        raise InputError(path, AVIF_NEEDS_LIBAVIF)
    if kind == "heif" and not _heif_opener():
        raise InputError(path, HEIF_NEEDS_PLUGIN)


def _has_avif() -> bool:
    from PIL import features

    return bool(features.check("avif"))


_HEIF_STATE = {"registered": False}
_HEIF_LOCK = threading.Lock()


def _heif_opener() -> bool:
    """Whether pillow-heif is importable; registers its opener with Pillow the first time."""
    try:
        import pillow_heif
    except (ImportError, OSError):  # absent, or a wheel whose libheif does not load
        return False
    with _HEIF_LOCK:
        if not _HEIF_STATE["registered"]:
            pillow_heif.register_heif_opener()
            _HEIF_STATE["registered"] = True
    return True


# ---------------------------------------------------------------------------------------------
# Pages


def iter_pages(
    path: str | os.PathLike,
    dpi: float = DEFAULT_DPI,
    pages: str | Sequence[int] | None = None,
    password: str | None = None,
    max_pixels: int = MAX_PIXELS,
    *,
    extract_text: bool = True,
) -> Iterator[PageImage]:
    """Yield the pages of a PDF or image file as RGB :class:`PageImage`.

    ``pages`` is a 1-based range string (see :func:`parse_page_ranges`) or a sequence of 0-based
    indices; None means all pages (all frames of a multi-frame TIFF, an animated GIF or AVIF).
    ``dpi`` applies to PDFs.
    The file is opened and checked *now*: problems with the file raise :class:`InputError`
    from this call; a page that fails to render raises it during iteration. The returned
    generator holds the file open until it is exhausted or closed. Pillow's own bomb limit
    (``2 * Image.MAX_IMAGE_PIXELS``) still applies to images when ``max_pixels`` is larger.
    """
    if not (0 < dpi <= 2400):
        raise ValueError(f"dpi must be in (0, 2400], got {dpi}")
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    path = Path(path)
    kind = _check_file(path)
    if kind == "pdf":
        pdf = _open_pdf(path, password)
        try:
            n = len(pdf)
            if n == 0:
                raise InputError(path, "PDF has no pages")
            indices = _select(path, pages, n)
        except BaseException:
            _close_pdf(pdf)
            raise
        return _iter_pdf(path, pdf, indices, n, dpi, max_pixels, extract_text)
    fp = open(path, "rb")  # noqa: SIM115 - kept open while frames are iterated
    try:
        with _named_warnings(path):
            img = _open_image(path, fp, max_pixels)
        frames = _page_frames(img)
        indices = _select(path, pages, len(frames))
    except BaseException:
        fp.close()
        raise
    return _iter_image(path, fp, img, indices, frames, max_pixels)


def count_pages(path: str | os.PathLike, password: str | None = None) -> int:
    """Number of pages (PDF) or frames (image) of ``path``; raises :class:`InputError`."""
    path = Path(path)
    if _check_file(path) == "pdf":
        pdf = _open_pdf(path, password)
        try:
            with _PDFIUM_LOCK:
                return len(pdf)
        finally:
            _close_pdf(pdf)
    with open(path, "rb") as fp, _named_warnings(path):
        return _n_frames(_open_image(path, fp, None))


# --- PDF -------------------------------------------------------------------------------------


def _pdfium():
    try:
        import pypdfium2
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("PDF input needs pypdfium2: pip install pypdfium2") from None
    return pypdfium2


def _open_pdf(path: Path, password: str | None):
    pdfium = _pdfium()
    raw = pdfium.raw
    with _PDFIUM_LOCK:
        # PDFium's last-error code is global and some failures (an empty page tree) leave it
        # untouched, so a stale code from an earlier document could be reported. Set a known
        # code first by opening a path that cannot exist: FPDF_ERR_FILE after a failed load of
        # this readable file then means "failed without a reason".
        raw.FPDF_LoadDocument(b"", None)
        try:
            pdf = pdfium.PdfDocument(str(path), password=password)
        except pdfium.PdfiumError as e:
            code = getattr(e, "err_code", None)
            if code == raw.FPDF_ERR_PASSWORD:
                if password:
                    raise InputError(path, "encrypted PDF: wrong password") from None
                raise InputError(path, "encrypted PDF: a password is needed (--password)") from None
            if code == raw.FPDF_ERR_FORMAT:
                raise InputError(path, "corrupt PDF (PDFium cannot parse it)") from None
            if code == raw.FPDF_ERR_SECURITY:
                raise InputError(path, "PDF uses an unsupported security handler") from None
            if code in (raw.FPDF_ERR_SUCCESS, raw.FPDF_ERR_FILE):
                # the file was readable (checked above): PDFium refused the document without
                # a reason, which is what it does for an empty page tree
                raise InputError(path, "PDF has no pages") from None
            raise InputError(path, f"cannot open PDF: {e}") from None
        try:
            pdf.init_forms()  # draw form fields like PyMuPDF does; must precede page loading
        except Exception:  # noqa: BLE001 - forms are optional
            pass
    return pdf


def _close_pdf(pdf) -> None:
    with _PDFIUM_LOCK:
        pdf.close()


def _iter_pdf(path, pdf, indices, n, dpi, max_pixels, extract_text) -> Iterator[PageImage]:
    pdfium = _pdfium()
    try:
        for i in indices:
            with _PDFIUM_LOCK:
                try:
                    page = pdf[i]
                    try:
                        w_pt, h_pt = page.get_size()
                        page_dpi = float(dpi)
                        if (w_pt * dpi / 72) * (h_pt * dpi / 72) > max_pixels:
                            page_dpi = 72 * math.sqrt(max_pixels / (w_pt * h_pt)) * 0.999
                            warnings.warn(
                                f"{path}: page {i + 1} ({w_pt:.0f}x{h_pt:.0f} pt) at {dpi} dpi "
                                f"exceeds max_pixels; rendered at {page_dpi:.1f} dpi",
                                stacklevel=2,
                            )
                        bitmap = page.render(scale=page_dpi / 72, may_draw_forms=True)
                        try:
                            image = bitmap.to_pil().convert("RGB")  # convert copies the buffer
                        finally:
                            bitmap.close()
                        text = None
                        if extract_text:
                            textpage = page.get_textpage()
                            try:
                                text = textpage.get_text_range().replace("\r\n", "\n")
                            finally:
                                textpage.close()
                    finally:
                        page.close()
                except pdfium.PdfiumError as e:
                    raise InputError(path, f"page {i + 1}: cannot render: {e}") from None
            yield PageImage(path, i, image, page_dpi, text, n)
    finally:
        _close_pdf(pdf)


# --- images ----------------------------------------------------------------------------------


def _open_image(path: Path, fp, max_pixels: int | None) -> Image.Image:
    """Open lazily (header only) and check the declared size before any decoding."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(fp)
        except Image.DecompressionBombError as e:
            raise InputError(path, _bomb_reason(e, max_pixels)) from None
        except UnidentifiedImageError:
            raise InputError(path, "corrupt image (Pillow cannot identify it)") from None
        except Exception as e:  # noqa: BLE001 - decoders raise many types on bad headers
            raise InputError(path, f"corrupt image: {type(e).__name__}: {e}") from None
    if img.format is None or img.format.lower() not in IMAGE_TYPES + ("mpo",):
        raise InputError(path, f"unsupported image format {img.format}")
    if max_pixels is not None:
        _check_pixels(path, img, max_pixels)
        if img.format == "GIF":  # a frame may grow the canvas; Pillow checks only its own limit
            _check_pixels(path, img, max_pixels, size=_gif_extent(path))
    return img


def _gif_extent(path: Path) -> tuple[int, int]:
    """The canvas a GIF needs for all its frames: its logical screen grown to every frame's
    extent (as Pillow grows it when it reaches that frame), read from the block structure
    without decoding. Bytes that start no block are skipped one by one, as Pillow does."""

    def skip_sub_blocks(f) -> None:
        while (n := f.read(1)) and n != b"\x00":
            f.seek(n[0], os.SEEK_CUR)

    with open(path, "rb") as f:
        head = f.read(13)
        if len(head) < 13:
            return 0, 0  # Pillow has refused it already
        w, h = struct.unpack("<HH", head[6:10])
        if head[10] & 0x80:  # global colour table
            f.seek(3 << ((head[10] & 7) + 1), os.SEEK_CUR)
        while (b := f.read(1)) and b != b";":
            if b == b",":  # image descriptor: left, top, width, height, flags
                d = f.read(9)
                if len(d) < 9:
                    break
                x, y, fw, fh = struct.unpack("<HHHH", d[:8])
                w, h = max(w, x + fw), max(h, y + fh)
                if d[8] & 0x80:  # local colour table
                    f.seek(3 << ((d[8] & 7) + 1), os.SEEK_CUR)
                f.read(1)  # LZW minimum code size
                skip_sub_blocks(f)
            elif b == b"!":  # extension: label, then sub-blocks
                f.read(1)
                skip_sub_blocks(f)
    return w, h


def _page_frames(img: Image.Image) -> list[int]:
    """The frames of an image file that are pages. An MPO (a camera JPEG with a preview or depth
    image after the photo) is one page; every frame of a GIF, AVIF or HEIF is one. A TIFF frame
    marked as a reduced-resolution copy of another (NewSubfileType bit 0: a scanner's thumbnail
    or preview) is not a page, unless every frame is marked."""
    if img.format == "MPO":
        return [0]
    n = getattr(img, "n_frames", 1)
    if img.format != "TIFF" or n == 1:
        return list(range(n))
    pages = []
    for k in range(n):
        img.seek(k)
        if not int(img.tag_v2.get(254, 0) or 0) & 1:
            pages.append(k)
    img.seek(0)
    return pages or list(range(n))


def _n_frames(img: Image.Image) -> int:
    """Pages of an image file (:func:`_page_frames`)."""
    return len(_page_frames(img))


@contextlib.contextmanager
def _named_warnings(path):
    """Re-emit Pillow's warnings (``Corrupt EXIF data``) once each, prefixed with the file."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        seen = set()
        for w in caught:  # after the block: re-emitting inside it would record again
            if "PIL" not in Path(w.filename).parts:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            elif (w.category, str(w.message)) not in seen:
                seen.add((w.category, str(w.message)))
                msg = " ".join(str(w.message).split())
                warnings.warn(f"{printable(path)}: {msg}", w.category, stacklevel=4)


def _bomb_reason(e: Image.DecompressionBombError, max_pixels: int | None) -> str:
    """Pillow's bomb error (raised before the size is known to us) in our terms and limit."""
    m = re.search(r"\((\d+) pixels\)", str(e))
    limit = max_pixels or MAX_PIXELS
    if m is None:
        return f"image too large: over the limit of {limit:,} pixels (max_pixels)"
    return (
        f"image too large: {int(m.group(1)):,} pixels exceeds the limit of {limit:,} (max_pixels)"
    )


def _check_pixels(path, img: Image.Image, max_pixels: int, size=None) -> None:
    w, h = size or img.size
    if w * h > max_pixels:
        raise InputError(
            path,
            f"image too large: {w}x{h} = {w * h:,} pixels exceeds the limit of "
            f"{max_pixels:,} (max_pixels)",
        )


def _iter_image(path, fp, img, indices, frames, max_pixels) -> Iterator[PageImage]:
    n = len(frames)
    try:
        for i in indices:
            with _named_warnings(path), warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                try:
                    if frames[i] != 0 or getattr(img, "n_frames", 1) > 1:
                        img.seek(frames[i])
                        _check_pixels(path, img, max_pixels)
                    img.load()
                    bits = _declared_bits(path, img)  # before exif_transpose drops the tags
                    frame = ImageOps.exif_transpose(img) or img
                    if bits is not None and frame.mode in ("RGB", "RGBA"):
                        frame = _stretch_high_bytes(frame, bits)
                    rgb = _to_rgb(frame, bits)
                    rgb.info.pop("exif", None)  # applied; later readers would warn again
                except InputError:
                    raise
                except Image.DecompressionBombError as e:
                    raise InputError(path, _bomb_reason(e, max_pixels)) from None
                except Exception as e:  # noqa: BLE001 - truncated data, bad codecs, ...
                    where = f"frame {i + 1}: " if n > 1 else ""
                    raise InputError(
                        path, f"{where}corrupt or truncated image: {type(e).__name__}: {e}"
                    ) from None
            dpi = img.info.get("dpi")
            dpi = float(dpi[0]) if isinstance(dpi, tuple) and dpi and dpi[0] else None
            # no resolution tag reads as 1 dpi in Pillow; BMP's pixels per metre as 96.0119...
            dpi = round(dpi, 1) if dpi is not None and dpi >= 10 else None
            yield PageImage(path, i, rgb, dpi, None, n)
    finally:
        img.close()
        fp.close()


def _png_depth_and_sbit(path: Path) -> tuple[int, bytes | None]:
    """A PNG's bit depth (IHDR) and its sBIT chunk (significant bits per channel), which Pillow
    does not expose; sBIT must precede the image data."""
    with open(path, "rb") as f:
        head = f.read(33)  # signature, IHDR
        depth = head[24] if len(head) == 33 and head[12:16] == b"IHDR" else 0
        while len(chunk := f.read(8)) == 8:
            n, kind = struct.unpack(">I4s", chunk)
            if kind == b"sBIT":
                return depth, f.read(min(n, 4))
            if kind in (b"IDAT", b"IEND"):
                break
            f.seek(n + 4, os.SEEK_CUR)  # data and CRC
    return depth, None


def _declared_bits(path: Path, img: Image.Image) -> int | None:
    """For a frame of a 16-bit-per-sample file, the significant bits its file declares, 0 when
    it declares none; None for any other image.

    16-bit greyscale (``I;16*``): a PNG's sBIT (1 to 16), a TIFF's BitsPerSample below 16
    (12-bit packed samples, which Pillow unpacks to 16 bits); a TIFF's BitsPerSample of 16 is
    only the container size. 16-bit colour, which Pillow reads as 8-bit RGB(A) keeping each
    sample's high byte: a PNG's sBIT (largest colour channel)."""
    grey = img.mode.startswith("I;16")
    if not grey and img.mode not in ("RGB", "RGBA"):
        return None
    if img.format == "PNG":
        depth, sbit = _png_depth_and_sbit(path)
        if grey:
            return sbit[0] if sbit and 1 <= sbit[0] <= 16 else 0
        if depth != 16:
            return None
        return max(sbit[:3]) if sbit and len(sbit) >= 3 else 0
    if img.format == "TIFF":
        bps = img.tag_v2.get(258)
        bps = bps if isinstance(bps, tuple) else (bps,)
        if grey:
            return bps[0] if bps and isinstance(bps[0], int) and 1 <= bps[0] < 16 else 0
        return 0 if bps and all(b == 16 for b in bps) else None
    return 0 if grey else None


def _stretch_high_bytes(img: Image.Image, bits: int) -> Image.Image:
    """Undo the darkness of fewer-than-16-bit colour samples of which Pillow kept the high byte:
    ``bits`` 9-15 declared stretch 0..2**(bits-8)-1 to 0..255; 0 (none declared) stretches
    0..15 when no colour sample is above 15 (12-bit data, the greyscale rule of
    :func:`_to_rgb`); anything else leaves the image as it is. Only 16 grey levels survive a
    12-bit sample's high byte: enough for text."""
    a = np.asarray(img)
    colour = a[..., :3]
    if 8 < bits < 16:
        top = 2 ** (bits - 8) - 1
    elif bits == 0 and colour.max(initial=0) <= 15:
        top = 15
    else:
        return img
    out = a.copy()
    out[..., :3] = np.clip(colour.astype(np.uint16) * 255 // top, 0, 255).astype(np.uint8)
    return Image.fromarray(out, img.mode)


def _to_rgb(img: Image.Image, bits: int | None = None) -> Image.Image:
    """Any Pillow mode -> RGB; transparency flattened onto white, 16-bit scaled to 8-bit.

    16-bit greyscale (``I;16*``) is mapped to 0..255 from 0..``top`` (truncated): ``top`` is
    ``2**bits - 1`` when the file declares its significant ``bits`` (:func:`_declared_bits`: a
    PNG's sBIT, a TIFF's BitsPerSample below 16; 0 or None: undeclared); otherwise 4095 when
    the image's maximum is at most 4095 (12-bit samples in a 16-bit file, as many scanners and
    medical or industrial cameras write: divided by 65535 such a page would come out almost
    black), else 65535. So a genuine 16-bit image whose brightest pixel is at most 4095 is
    brightened 16 times unless its PNG says sBIT 16. 32-bit integer and float images use 255 or, with values over 255, 65535;
    float images in [0, 1] use 1.
    """
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(img).astype(np.float64)
        peak = a.max(initial=0)
        if mode.startswith("I;16"):
            top = float(2**bits - 1) if bits else (4095.0 if peak <= 4095 else 65535.0)
        elif mode == "F" and peak <= 1.0:
            top = 1.0  # a float image in [0, 1]
        else:
            top = 65535.0 if peak > 255 else 255.0
        a = np.clip(a * (255.0 / top), 0, 255).astype(np.uint8)  # truncated, as before
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB") if mode != "RGB" else img.copy()


# ---------------------------------------------------------------------------------------------
# Discovery and output names


def _is_supported_name(p: Path) -> bool:
    return p.suffix.lower() in SUPPORTED_EXTENSIONS and not p.name.startswith(".")


def _walk(folder: Path, exclude: Path | None = None) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder):  # symlinked folders are not followed (no loops)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if exclude is not None:
            dirs[:] = [d for d in dirs if (Path(root) / d).resolve() != exclude]
        found += [Path(root) / f for f in files if _is_supported_name(Path(f))]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def discover_inputs(
    inputs: Iterable[str | os.PathLike], exclude: str | os.PathLike | None = None
) -> list[Path]:
    """Expand files, folders (recursive) and glob patterns into a de-duplicated file list.

    A file named explicitly is kept whatever its extension (its type is checked later by magic
    bytes). Folders and globs contribute only files with SUPPORTED_EXTENSIONS, skipping hidden
    files and folders (``.DS_Store``, ``._x.pdf``) and anything under ``exclude`` (the output
    folder, so that a rerun into a folder inside the input does not read its own results).
    Order: inputs in the given order, each folder's or glob's files sorted; a file seen twice
    (same resolved path) is kept once. Raises :class:`InputError` for a path that does not exist
    and matches no glob.
    """
    out: list[Path] = []
    seen: set[Path] = set()
    skip = Path(exclude).resolve() if exclude is not None else None

    def add(p: Path, found: bool = True) -> None:
        key = p.resolve()
        if found and skip is not None and key.is_relative_to(skip):
            return
        if key not in seen:
            seen.add(key)
            out.append(p)

    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for f in _walk(p, skip):
                add(f)
        elif p.exists():
            add(p, found=False)
        elif any(c in str(item) for c in "*?["):
            matches = sorted(glob.glob(str(item), recursive=True))
            if not matches:
                raise InputError(item, "glob pattern matches no file")
            for m in map(Path, matches):
                if m.is_dir():
                    for f in _walk(m, skip):
                        add(f)
                elif _is_supported_name(m):
                    add(m)
        else:
            raise InputError(item, missing_reason(p))
    return out


_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", "clock$", "conin$", "conout$"} | {
    f"{d}{i}" for d in ("com", "lpt") for i in list("123456789") + ["¹", "²", "³"]
}
_BIDI = {chr(c) for c in (0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))}
_UNSAFE = re.compile(r'[<>:"/\\|?*]')


def safe_stem(path: str | os.PathLike, max_bytes: int = 120, fallback: str = "document") -> str:
    """A file's stem made safe as a single output folder/file name.

    Takes the last component (``/`` and ``\\`` both count as separators), drops the extension,
    NFC-normalises, removes control and bidi-override characters, replaces characters Windows
    forbids (``<>:"/\\|?*``) with ``_``, strips leading dots/spaces and trailing dots/spaces,
    prefixes Windows device names (``con``, ``lpt1.x``) with ``_``, and cuts to ``max_bytes``
    UTF-8 bytes. The result is never empty (``fallback``), never ``.``/``..``, never contains a
    separator, so ``out_dir / safe_stem(p)`` stays inside ``out_dir``.
    """
    s = os.fspath(path)
    s = s if isinstance(s, str) else s.decode("utf-8", "replace")
    parts = [p for p in re.split(r"[\\/]", s) if p]
    name = parts[-1] if parts else ""
    stem, dot, ext = name.rpartition(".")
    if dot and stem.strip(". ") and 0 < len(ext) <= 5 and ext.isalnum():
        name = stem
    name = unicodedata.normalize("NFC", name)
    name = "".join(
        c for c in name if unicodedata.category(c) != "Cc" and c not in _BIDI and c != "\ufeff"
    )
    name = _UNSAFE.sub("_", name).strip()
    name = name.lstrip(". ").rstrip(". ")
    if name.split(".")[0].strip().lower() in _WINDOWS_RESERVED:
        name = "_" + name
    encoded = name.encode("utf-8")
    if len(encoded) > max_bytes:
        name = encoded[:max_bytes].decode("utf-8", "ignore").rstrip(". ")
    return name or fallback


def unique_stems(
    paths: Sequence[str | os.PathLike], max_bytes: int = 120, avoid: Iterable[str] = ()
) -> list[str]:
    """:func:`safe_stem` for each path, repeats suffixed ``-2``, ``-3``... in input order.

    Comparison is case-insensitive (case-insensitive file systems); a suffixed name never
    collides with another path's own stem, nor with a name in ``avoid`` (stems already taken,
    e.g. by other documents of an earlier run). Deterministic for a given input order.
    """
    stems = [safe_stem(p, max_bytes=max_bytes) for p in paths]
    used: set[str] = {a.casefold() for a in avoid}
    taken = {s.casefold() for s in stems} | used
    out = []
    for s in stems:
        key = s.casefold()
        if key not in used:
            used.add(key)
            out.append(s)
            continue
        k = 2
        while f"{s}-{k}".casefold() in taken or f"{s}-{k}".casefold() in used:
            k += 1
        name = f"{s}-{k}"
        used.add(name.casefold())
        out.append(name)
    return out
