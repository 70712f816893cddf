"""Write one converted document to its folder: Markdown, JSON, raw output, crops, layout preview.

The layout follows marker's ``output.py`` (one folder per input) and the official DeepSeek-OCR
runners (``run_dpsk_ocr_pdf.py``: ``X.mmd``, ``X_det.mmd``, ``X_layouts.pdf``, ``images/``;
reference spec §6):

    <folder>/<stem>.md            clean Markdown; pages joined by "\\n<--- Page Split --->\\n"
    <folder>/<stem>_det.md        raw model output with the grounding tags, pages joined likewise
    <folder>/images/<p>_<k>.jpg   crops of ``image`` blocks (``<k>.jpg`` for a single image),
                                  linked from the Markdown as ``![](images/<name>.jpg)``
    <folder>/<stem>_layouts.pdf   one annotated page per page (grounded tasks only)
    <folder>/<stem>.json          everything else, per page: blocks (label, 0-999 grid boxes,
                                  pixel boxes, text), markdown, raw output, flags, finish reason,
                                  token counts, timings; and the source, model, mode, options

Every file goes through ``dsocr.fileio`` (temp file + fsync + rename), and the JSON is written
last, so a folder whose JSON exists is complete even without the batch workspace (which adds a
staging folder and done markers on top, see ``workspace.py``).

Decisions:
- The layout preview is built with Pillow's PDF writer one page at a time (``append=True``) from
  the per-page JPEGs, so a 1,000-page document never holds more than one decoded page. Pages keep
  their physical size (``resolution`` = the render dpi).
- In a batch workspace the converter does not keep those JPEGs (nor the crops) in memory until
  the document is complete: ``spill_page`` writes them to the document's spill folder as each
  page is post-processed, and ``write_document`` takes them from there (crops hard-linked, or
  copied where links are not possible). A page holds its bytes (``image_data`` /
  ``layout_jpeg``) or the names of those files (``image_files`` / ``layout_file``); the written
  files are the same either way.
- Crops and layout pages are JPEG (quality 90 / 80), as the official runner saves crops.
- This module does not import torch or the converter; it reads documents by attribute
  (``convert.Document`` / ``convert.PageResult``).
"""

from __future__ import annotations

import io
import os
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from dsocr.fileio import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    atomic_write_with,
    fsync_dir,
)

if TYPE_CHECKING:  # pragma: no cover
    from dsocr.pipeline.convert import Document, PageResult

IMAGE_DIR = "images"
SPILL_LAYOUT_DIR = "layouts"  # in a spill folder: layouts/<page index>.jpg (crops: images/)
CROP_QUALITY = 90
LAYOUT_QUALITY = 80


def encode_jpeg(image: Image.Image, quality: int = CROP_QUALITY) -> bytes:
    """RGB JPEG bytes of ``image``."""
    buf = io.BytesIO()
    (image if image.mode == "RGB" else image.convert("RGB")).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def output_paths(stem: str) -> dict[str, str]:
    """File names of a document folder, relative to it."""
    return {
        "markdown": f"{stem}.md",
        "json": f"{stem}.json",
        "raw": f"{stem}_det.md",
        "layouts": f"{stem}_layouts.pdf",
        "images": IMAGE_DIR,
    }


def write_layouts_pdf(
    path: str | os.PathLike, pages: Sequence[tuple[bytes | os.PathLike, float | None]]
) -> None:
    """A multi-page PDF from ``(jpeg, dpi)`` pages, atomically, one decoded page at a time;
    ``jpeg`` is the JPEG's bytes or a JPEG file. Titled with the file's stem (Pillow would take
    the temporary file's random name)."""
    assert pages, "a layout PDF needs at least one page"
    title = Path(path).stem

    def write(tmp: str) -> None:
        for i, (jpeg, dpi) in enumerate(pages):
            src = io.BytesIO(jpeg) if isinstance(jpeg, bytes | bytearray) else jpeg
            with Image.open(src) as im:
                im.load()
                im.save(tmp, "PDF", append=i > 0, resolution=float(dpi or 72.0), title=title)

    atomic_write_with(path, write)


def spill_page(page: PageResult, folder: str | os.PathLike) -> None:
    """Move ``page``'s crops and layout JPEG from memory to files under ``folder`` (the
    document's spill folder: ``images/<name>.jpg``, ``layouts/<index>.jpg``) and drop the bytes;
    ``page.image_files`` / ``page.layout_file`` name the files, for :func:`write_document`.

    Not fsynced: the spill is scratch (removed with the document's staging), and the files are
    made durable when they are placed in the document folder. Raises OSError; the page is left
    unchanged then.
    """
    folder = Path(folder)
    files: dict[str, Path] = {}
    if page.image_data:
        (folder / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
        for name, data in page.image_data.items():
            files[name] = folder / IMAGE_DIR / f"{name}.jpg"
            files[name].write_bytes(data)
    layout = None
    if page.layout_jpeg is not None:
        (folder / SPILL_LAYOUT_DIR).mkdir(parents=True, exist_ok=True)
        layout = folder / SPILL_LAYOUT_DIR / f"{page.index}.jpg"
        layout.write_bytes(page.layout_jpeg)
    if files:
        page.image_files = {**page.image_files, **files}
        page.image_data = {}
    if layout is not None:
        page.layout_file, page.layout_jpeg = layout, None


def place_file(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """``dest`` gets the bytes of file ``src``, atomically: a hard link under a temp name beside
    ``dest``, fsynced, renamed over it (no copy; ``src`` stays); a copy through
    ``atomic_write_with`` where a link is not possible (another file system, no link support)."""
    src, dest = Path(src), Path(dest)
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")
    try:
        os.link(src, tmp)
    except OSError:
        atomic_write_with(dest, lambda t: shutil.copyfile(src, t))
        return
    try:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)


def write_document(doc: Document, folder: str | os.PathLike) -> list[Path]:
    """Write ``doc`` into ``folder`` (created if needed); returns the written paths.

    Needs the pages' crops/layout JPEGs, in memory (``PageResult.image_data`` / ``layout_jpeg``)
    or spilled to files (``image_files`` / ``layout_file``, see :func:`spill_page`; they are
    linked or copied, not moved); the converter drops both after writing. ``doc.to_json()``
    records the written names.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = output_paths(doc.stem)
    written: list[Path] = []

    if any(page.image_data or page.image_files for page in doc.pages):
        (folder / IMAGE_DIR).mkdir(exist_ok=True)
    for page in doc.pages:
        for name, data in page.image_data.items():
            path = folder / IMAGE_DIR / f"{name}.jpg"
            atomic_write_bytes(path, data)
            written.append(path)
        for name, src in page.image_files.items():
            path = folder / IMAGE_DIR / f"{name}.jpg"
            place_file(src, path)
            written.append(path)

    path = folder / names["raw"]
    atomic_write_text(path, doc.raw + "\n")
    written.append(path)
    path = folder / names["markdown"]
    atomic_write_text(path, doc.markdown + "\n")
    written.append(path)

    layouts = [
        (p.layout_jpeg if p.layout_jpeg is not None else p.layout_file, p.dpi)
        for p in doc.pages
        if p.has_layout
    ]
    if layouts:
        path = folder / names["layouts"]
        write_layouts_pdf(path, layouts)
        written.append(path)

    path = folder / names["json"]
    atomic_write_json(path, doc.to_json())  # last: a folder with its JSON is complete
    written.append(path)
    return written
