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
- Crops and layout pages are JPEG (quality 90 / 80), as the official runner saves crops.
- This module does not import torch or the converter; it reads documents by attribute
  (``convert.Document`` / ``convert.PageResult``).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from dsocr.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, atomic_write_with

if TYPE_CHECKING:  # pragma: no cover
    from dsocr.pipeline.convert import Document

IMAGE_DIR = "images"
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


def write_layouts_pdf(path: str | os.PathLike, pages: Sequence[tuple[bytes, float | None]]) -> None:
    """A multi-page PDF from ``(jpeg_bytes, dpi)`` pages, atomically, one decoded page at a time."""
    assert pages, "a layout PDF needs at least one page"

    def write(tmp: str) -> None:
        for i, (jpeg, dpi) in enumerate(pages):
            with Image.open(io.BytesIO(jpeg)) as im:
                im.load()
                im.save(tmp, "PDF", append=i > 0, resolution=float(dpi or 72.0))

    atomic_write_with(path, write)


def write_document(doc: Document, folder: str | os.PathLike) -> list[Path]:
    """Write ``doc`` into ``folder`` (created if needed); returns the written paths.

    Needs the pages' in-memory crops/layout JPEGs (``PageResult.image_data`` / ``layout_jpeg``),
    which the converter drops after writing; ``doc.to_json()`` records the written names.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = output_paths(doc.stem)
    written: list[Path] = []

    crops = [(name, data) for page in doc.pages for name, data in page.image_data.items()]
    if crops:
        (folder / IMAGE_DIR).mkdir(exist_ok=True)
    for name, data in crops:
        path = folder / IMAGE_DIR / f"{name}.jpg"
        atomic_write_bytes(path, data)
        written.append(path)

    path = folder / names["raw"]
    atomic_write_text(path, doc.raw + "\n")
    written.append(path)
    path = folder / names["markdown"]
    atomic_write_text(path, doc.markdown + "\n")
    written.append(path)

    layouts = [(p.layout_jpeg, p.dpi) for p in doc.pages if p.layout_jpeg is not None]
    if layouts:
        path = folder / names["layouts"]
        write_layouts_pdf(path, layouts)
        written.append(path)

    path = folder / names["json"]
    atomic_write_json(path, doc.to_json())  # last: a folder with its JSON is complete
    written.append(path)
    return written
