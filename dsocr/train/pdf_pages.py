"""Real PDF pages for training: the index of training pages, and rasterising them.

The paper's coarse labels: a PDF page rasterised at 144 dpi (the official PDF runner's
resolution), labelled with the PDF's own text layer. ``scripts/build_pdf_pages.py`` writes the
index (``data/corpus/pdf_pages.jsonl``), one row per page that may be trained on::

    {"pdf": "../pdfs/debian-reference.en.pdf", "sha256": "<of the PDF>", "page": 40,
     "lang": "en", "text": "<text layer>", "lines": 21, "train_lines": 17, "heldout_lines": 0}

``pdf`` is relative to the index's folder (or absolute), ``page`` 0-based, ``text`` normalised
as the eval sets normalise their ground truth (:func:`page_text`). A page qualifies
(:func:`is_training_page`) when its text layer has at least ``min_chars`` characters, at least
``min_train`` of its measured lines (:func:`dsocr.eval.datasets.text_layer_lines`) occur in
train.jsonl, and none occurs in heldout.jsonl. The held-out measure is the eval sets' own
(:class:`dsocr.eval.datasets.CorpusText`), and a ``pdf-debref-*`` page needs at least 3 held-out
lines, so no eval page and no page carrying held-out text can be in the index.

``DataRecipe.pdf_share`` is the share of training samples drawn from the index
(:func:`make_pdf_sample`); documents are opened lazily, once per process.
"""

from __future__ import annotations

import atexit
import gzip
import json
import os
import random
import threading
from functools import lru_cache
from pathlib import Path

from PIL import Image

from dsocr.fileio import sha256_file

DPI = 144
MIN_CHARS = 200
MIN_TRAIN_LINES = 3
INDEX_NAME = "pdf_pages.jsonl"

# Debian Reference file language -> the corpus's "lang" code (what --data-langs filters on).
LANG_CODES = {"zh-cn": "zh"}


class PdfIndexError(ValueError):
    """The index or a PDF it names is missing, unreadable or changed (one line)."""


def page_text(text_layer: str | None) -> str:
    """A text layer as the eval sets store their ground truth (``build_pdf_set``): newlines
    normalised to ``\\n``, surrounding whitespace stripped."""
    return (text_layer or "").replace("\r\n", "\n").replace("\r", "\n").strip()


def is_training_page(
    chars: int,
    train: int,
    heldout: int,
    *,
    min_chars: int = MIN_CHARS,
    min_train: int = MIN_TRAIN_LINES,
) -> bool:
    """Enough text, enough of it in train.jsonl, none of it in heldout.jsonl."""
    return chars >= min_chars and train >= min_train and heldout == 0


# ----------------------------------------------------------------------------------------------
# building the index (scripts/build_pdf_pages.py)


def select_training_pages(
    pdf: str | os.PathLike,
    corpus,
    lang: str,
    *,
    min_chars: int = MIN_CHARS,
    min_train: int = MIN_TRAIN_LINES,
    train_text: str | None = None,
) -> list[dict]:
    """Index rows (without ``pdf`` / ``sha256``) for the training pages of ``pdf``.

    ``corpus`` is a corpus folder or a :class:`dsocr.eval.datasets.CorpusText`; held-out lines
    are counted against the whole held-out split, exactly as the eval sets count them. Train
    lines are counted in ``train_text`` (default: the whole train split; the build script passes
    the language's train rows, 4-30x faster and never more permissive).
    """
    from dsocr.eval.datasets import CorpusText, text_layer_lines
    from dsocr.pipeline.providers import iter_pages

    text = corpus if isinstance(corpus, CorpusText) else CorpusText(corpus)
    train_text = text.splits["train"] if train_text is None else train_text
    rows = []
    for p in iter_pages(pdf, dpi=9, extract_text=True):  # text only: rendered tiny
        layer = page_text(p.text_layer)
        lines = text_layer_lines(layer)
        heldout = text.count(lines, "heldout")
        if len(layer) < min_chars or heldout:
            continue
        train = sum(1 for x in lines if x in train_text)
        if is_training_page(len(layer), train, heldout, min_chars=min_chars, min_train=min_train):
            rows.append(
                {
                    "page": p.index,
                    "lang": lang,
                    "text": layer,
                    "lines": len(lines),
                    "train_lines": train,
                    "heldout_lines": heldout,
                }
            )
    return rows


# ----------------------------------------------------------------------------------------------
# reading the index


def _read_rows(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@lru_cache(maxsize=4)
def load_pdf_index(path: str, langs: tuple[str, ...] = ()) -> tuple[dict, ...]:
    """The index rows (``langs``: only these; (): all), each with ``path`` (the PDF, resolved
    against the index's folder). Every PDF is checked once per process: a missing index, a
    missing PDF or one whose sha256 is not the index's raises :class:`PdfIndexError` naming the
    file, so a bad index fails when the loader starts, not mid-run."""
    index = Path(path)
    if not index.is_file() and index.with_suffix(".jsonl.gz").is_file():
        index = index.with_suffix(".jsonl.gz")
    if not index.is_file():
        raise PdfIndexError(f"{path}: no PDF page index (run scripts/build_pdf_pages.py)")
    try:
        rows = _read_rows(index)
    except (OSError, ValueError) as e:
        raise PdfIndexError(f"{index}: unreadable PDF page index: {e}") from None
    checked: dict[str, str] = {}
    out = []
    for row in rows:
        if langs and row.get("lang") not in langs:
            continue
        pdf = os.path.normpath(index.parent / row["pdf"])  # an absolute path stays as it is
        if pdf not in checked:
            try:
                checked[pdf] = sha256_file(pdf)
            except OSError:
                raise PdfIndexError(
                    f"{pdf}: PDF named by {index} is missing (rerun scripts/build_pdf_pages.py)"
                ) from None
        if checked[pdf] != row["sha256"]:
            raise PdfIndexError(
                f"{pdf}: sha256 {checked[pdf][:12]}... is not the {row['sha256'][:12]}... that "
                f"{index} was built from (the PDF changed: rerun scripts/build_pdf_pages.py)"
            )
        out.append({**row, "path": pdf})
    if not out:
        what = f" in languages {', '.join(langs)}" if langs else ""
        raise PdfIndexError(f"{index}: no PDF pages{what}")
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# rasterising (per process: documents opened on first use)

_DOCS: dict[str, object] = {}
_DOCS_PID = [os.getpid()]
_LOCK = threading.Lock()  # PDFium is not thread-safe


def _document(path: str):
    if _DOCS_PID[0] != os.getpid():  # a forked worker: never share the parent's handles
        _DOCS.clear()
        _DOCS_PID[0] = os.getpid()
    doc = _DOCS.get(path)
    if doc is None:
        import pypdfium2

        if not _DOCS:  # after pypdfium2's own exit hook, so that ours runs first (LIFO)
            atexit.register(_close_documents)
        doc = _DOCS[path] = pypdfium2.PdfDocument(path)
    return doc


def _close_documents() -> None:
    atexit.unregister(_close_documents)
    with _LOCK:
        for doc in _DOCS.values():
            doc.close()
        _DOCS.clear()


def render_pdf_page(
    path: str, index: int, dpi: float = DPI, glyphs: bool = False
) -> tuple[Image.Image, list[tuple[str, float, float]] | None]:
    """Page ``index`` (0-based) of ``path`` as an RGB image at ``dpi`` (white background, forms
    drawn, as ``dsocr.pipeline.providers`` renders PDFs) and, with ``glyphs``, the centre of each
    text-layer character in image px: (char, x, y), for the character loss."""
    import pypdfium2

    scale = dpi / 72
    with _LOCK:
        page = _document(path)[index]
        try:
            bitmap = page.render(scale=scale, may_draw_forms=True)
            try:
                image = bitmap.to_pil().convert("RGB")
            finally:
                bitmap.close()
            centers = None
            if glyphs:
                _, height = page.get_size()
                textpage = page.get_textpage()
                try:
                    centers = []
                    for i in range(textpage.count_chars()):
                        ch = chr(pypdfium2.raw.FPDFText_GetUnicode(textpage.raw, i) or 32)
                        if ch.isspace():
                            continue
                        left, bottom, right, top = textpage.get_charbox(i)
                        x, y = (left + right) / 2 * scale, (height - (bottom + top) / 2) * scale
                        centers.append((ch, x, y))
                finally:
                    textpage.close()
        finally:
            page.close()
    return image, centers


def make_pdf_sample(recipe, rng: random.Random, rows: tuple[dict, ...]):
    """One real PDF page: a mode and a page of ``rows`` drawn with ``rng``; the whole page at
    144 dpi (the mode's preprocessing resizes or pads it), prompt Free OCR, target its text
    layer."""
    from dsocr.language.tokenizer import PROMPTS
    from dsocr.train.data import Sample

    mode = rng.choice(recipe.modes)
    row = rng.choice(rows)
    image, glyphs = render_pdf_page(row["path"], row["page"], glyphs=recipe.glyph_targets)
    return Sample(image, PROMPTS["free"], row["text"], mode, glyphs)
