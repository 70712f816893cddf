"""Evaluation page sets: a folder of PNG page images plus ``manifest.jsonl``.

Each manifest row is one page::

    {"id": "pdf-debref-en-p012", "image": "images/pdf-debref-en-p012.png", "text": "...",
     "source": "/usr/share/debian-reference/debian-reference.en.pdf#12", "sha256": "<of the PNG>"}

``image`` is relative to the manifest's folder. ``load_pages`` checks every checksum, so a set
that changed on disk is an error, not a silent shift in the numbers.

Two builders (``scripts/build_eval_sets.py`` runs both, writing ``data/eval/<set>/``):

- :func:`build_pdf_set`: real PDF pages rasterised at 144 dpi (the official PDF runner's
  resolution) with the PDF's own text layer as ground truth. The text layer is a coarse reference
  (reading order of headers/footers, ligatures, no layout spaces), so numbers on this set are
  comparable between engines, not absolute.
- :func:`build_rendered_set`: held-out corpus text rendered with :mod:`dsocr.render` (fixed seed,
  fixed style), ground truth exact by construction.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from dsocr.fileio import sha256_file

MANIFEST = "manifest.jsonl"

# Fixed, documented page list for the real-PDF set: the English Debian Reference (package
# debian-reference-en, 261 pages). 1-based PDF page numbers: the preface (24, 26) and body text
# spread over chapters 1-12; the cover and table of contents (pages 1-23) are left out.
DEFAULT_PDF = "/usr/share/debian-reference/debian-reference.en.pdf"
DEFAULT_PDF_PAGES = (24, 26, 35, 50, 65, 80, 100, 120, 200, 230)


@dataclass
class EvalPage:
    id: str
    image_path: Path
    text: str
    source: str
    sha256: str
    dataset: str = ""

    def load_image(self) -> Image.Image:
        return Image.open(self.image_path).convert("RGB")


def write_set(out_dir: str | os.PathLike, items: list[tuple[str, Image.Image, str, str]]) -> Path:
    """Write (id, image, text, source) items as ``out_dir/images/<id>.png`` + manifest.jsonl."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for pid, image, text, source in items:
        rel = f"images/{pid}.png"
        image.save(out / rel, optimize=False)
        rows.append(
            {
                "id": pid,
                "image": rel,
                "text": text,
                "source": source,
                "sha256": sha256_file(out / rel),
            }
        )
    manifest = out / MANIFEST
    with open(manifest, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return manifest


def load_pages(
    manifest: str | os.PathLike, limit: int | None = None, verify: bool = True
) -> list[EvalPage]:
    """Read a manifest (or the folder holding one); the first ``limit`` rows; check checksums."""
    manifest = Path(manifest)
    if manifest.is_dir():
        manifest = manifest / MANIFEST
    dataset = manifest.parent.name
    pages = []
    with open(manifest, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            page = EvalPage(
                r["id"], manifest.parent / r["image"], r["text"], r["source"], r["sha256"], dataset
            )
            if verify and sha256_file(page.image_path) != page.sha256:
                raise ValueError(f"{page.image_path}: sha256 differs from {manifest}")
            pages.append(page)
            if limit is not None and len(pages) >= limit:
                break
    return pages


def build_pdf_set(
    out_dir: str | os.PathLike,
    pdf: str | os.PathLike = DEFAULT_PDF,
    pages: tuple[int, ...] = DEFAULT_PDF_PAGES,
    dpi: float = 144,
    prefix: str = "debref-en",
) -> Path:
    """Rasterise 1-based ``pages`` of ``pdf`` at ``dpi``; ground truth = the page's text layer."""
    from dsocr.pipeline.providers import iter_pages

    items = []
    for p in iter_pages(pdf, dpi=dpi, pages=[n - 1 for n in pages]):
        text = (p.text_layer or "").replace("\r\n", "\n").replace("\r", "\n").strip()
        items.append((f"{prefix}-p{p.index + 1:04d}", p.image, text, f"{pdf}#{p.index + 1}"))
    return write_set(out_dir, items)


def rendered_pages(
    texts: list[tuple[str, str]], n_pages: int, seed: int = 0, chars_per_page: int = 1500
) -> list[tuple[str, Image.Image, str, str]]:
    """(source, text) pairs -> ``n_pages`` clean rendered pages (first page of a text slice each).

    Texts are drawn in a seeded order; each page takes a ``chars_per_page`` slice starting at a
    line boundary, rendered with a fixed style (sans 16 px, 816x1056 = US Letter at 96 dpi).
    Characters no shipped font has are dropped before rendering.
    """
    from dsocr.render import PageStyle, missing_chars, render_text

    rng = random.Random(seed)
    style = PageStyle(font="sans", font_size=16, width=816, height=1056)
    order = list(range(len(texts)))
    rng.shuffle(order)
    items = []
    for i in order:
        if len(items) >= n_pages:
            break
        source, text = texts[i]
        lines = [ln for ln in text.split("\n") if ln.strip()]
        if not lines:
            continue
        start = rng.randrange(max(1, len(lines) - 5))
        chunk = "\n".join(lines[start:])[:chars_per_page]
        bad = set(missing_chars(chunk))
        if bad:
            chunk = "".join(c for c in chunk if c not in bad)
        chunk = chunk.strip()
        if len(chunk) < 200:
            continue
        page = render_text(chunk, style)[0]
        items.append(
            (f"rendered-{len(items):03d}", page.image.convert("RGB"), page.text.strip(), source)
        )
    return items


def build_rendered_set(
    out_dir: str | os.PathLike,
    corpus: str | os.PathLike = "data/corpus/heldout.jsonl",
    n_pages: int = 10,
    lang: str = "en",
    seed: int = 0,
) -> Path:
    """Render ``n_pages`` pages of held-out corpus text in ``lang`` (fixed seed)."""
    texts = []
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r.get("lang") == lang:
                texts.append((f"{r['source']}:{r['doc']}", r["text"]))
    return write_set(out_dir, rendered_pages(texts, n_pages, seed=seed))
