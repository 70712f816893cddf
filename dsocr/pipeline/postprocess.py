"""Grounded model output -> blocks, Markdown, figure crops, layout drawings (pure text + PIL).

DeepSeek-OCR's grounding prompt (``<image>\\n<|grounding|>Convert the document to markdown.``)
makes the decoder write every layout block as

    <|ref|>LABEL<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>\\n CONTENT \\n\\n

with box coordinates on a 0-999 grid (reference spec §6, deepseek-ocr-v1.md). This module turns
that text into :class:`Block` objects and the blocks into Markdown, as the official runners do
(``run_dpsk_ocr_image.py``, ``run_dpsk_ocr_pdf.py``, ``run_dpsk_ocr_eval_batch.py``):

1. strip a trailing ``<｜end▁of▁sentence｜>`` and surrounding whitespace;
2. find ref/det pairs with a non-greedy DOTALL regex;
3. ``image`` blocks become ``![](images/NAME.jpg)`` links (crops saved by the caller);
4. other tags are dropped, their content kept; ``\\coloneqq`` -> ``:=``, ``\\eqqcolon`` -> ``=:``;
5. 3+ newlines collapse to 2; pages are joined with ``\\n<--- Page Split --->\\n``;
6. optionally (eval runner): strip ``\\quad (n)`` equation tags inside ``\\[...\\]`` and
   ``<center>`` tags.

Pixel boxes use the official ``int(v / 999 * W)`` (x) and ``int(v / 999 * H)`` (y).

Deviations from the official code, all in the direction of never crashing on model output:
- boxes are parsed with a regex instead of ``eval``; a malformed box is skipped, the block and its
  text are kept; values are clamped to 0-999 and corners sorted;
- a ref with an unclosed or missing det, a det that never closes before the next ref, and text
  before the first ref (or output without any ref, e.g. from "Free OCR.") are all kept as blocks;
- stray ``<|ref|>``/``<|det|>`` tags left inside content are removed, and so is the label of an
  unclosed ``<|ref|>`` that ends its segment on the same line (a label cut off by the token limit);
- one crop per *box* of an ``image`` block, named per block (the official runner counts crops per
  box but links per ref, so its names disagree when a ref has several boxes);
- the equation-tag regex runs with DOTALL, so multi-line ``\\[...\\]`` are cleaned too;
- layout colours are a fixed palette per label instead of random colours.

Nothing here imports torch; numpy is used only by the repetition heuristic.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser

import numpy as np
from PIL import Image, ImageDraw, ImageFont

EOS = "<｜end▁of▁sentence｜>"  # DeepSeek EOS as decoded with skip_special_tokens=False
PAGE_SPLIT = "\n<--- Page Split --->\n"  # official PDF runner's page separator
GRID = 999  # coordinates are integers in [0, GRID]; pixels = v / GRID * size

Box = tuple[int, int, int, int]  # (x1, y1, x2, y2)

# A ref tag, optionally followed by a det tag. Label and closed det body are non-greedy DOTALL as in
# the official `(<\|ref\|>(.*?)<\|/ref\|><\|det\|>(.*?)<\|/det\|>)`, but may not run across the
# next `<|ref|>`. An unclosed det takes a box list up to its first `]]`, else (output cut off)
# box-list characters up to the end of the line, so the content after it is kept.
_NOT_REF = r"(?:(?!<\|ref\|>).)"
_OPEN_DET = r"\[[\[\]\d \t,.+\-]*?\]\]|[\[\]\d \t,.+\-]*"
_TAG_RE = re.compile(
    r"<\|ref\|>(?P<label>" + _NOT_REF + r"*?)<\|/ref\|>"
    r"(?:<\|det\|>(?:(?P<det>" + _NOT_REF + r"*?)<\|/det\|>|(?P<open>" + _OPEN_DET + r")))?",
    re.DOTALL,
)
_STRAY_TAG_RE = re.compile(r"<\|/?(?:ref|det)\|>")
# An unmatched ref whose rest of the segment is one line: a label cut off by the token limit
# (``...<|ref|>tex``) or abandoned (``<|ref|>text<|ref|>title<|/ref|>...``); not content.
_DANGLING_REF_RE = re.compile(r"<\|ref\|>[^\n]*\Z")
_BOX_RE = re.compile(r"\[([^\[\]]*)\]")


@dataclass
class Block:
    """One layout block of a page.

    ``boxes`` are on the model's 0-999 grid; ``pixel_boxes`` are the same boxes in pixels of the
    page size given to :func:`parse_grounded`. ``text`` is the block content with the tags removed
    (no other cleaning). ``span`` is ``(start, end)`` into the raw string given to
    :func:`parse_grounded`: ``raw[start:end]`` is the block's tags and content.
    """

    label: str
    boxes: list[Box] = field(default_factory=list)
    pixel_boxes: list[Box] = field(default_factory=list)
    text: str = ""
    span: tuple[int, int] = (0, 0)

    def to_dict(self) -> dict:
        """JSON-ready form (for per-page metadata)."""
        return {
            "label": self.label,
            "boxes": [list(b) for b in self.boxes],
            "pixel_boxes": [list(b) for b in self.pixel_boxes],
            "text": self.text,
            "span": list(self.span),
        }


# ---------------------------------------------------------------------------------------------
# Parsing


def strip_eos(raw: str) -> str:
    """Remove surrounding whitespace and trailing EOS strings (official step 2)."""
    start, end = _body_bounds(raw)
    return raw[start:end]


def has_eos(raw: str) -> bool:
    """True if the decoded output ends with the EOS string (the model stopped by itself)."""
    return raw.rstrip().endswith(EOS)


def _body_bounds(raw: str) -> tuple[int, int]:
    end = len(raw.rstrip())
    while raw.endswith(EOS, 0, end):
        end = len(raw[: end - len(EOS)].rstrip())
    start = len(raw) - len(raw.lstrip())
    return min(start, end), end


def parse_boxes(det: str) -> list[Box]:
    """Parse a det body like ``[[1, 2, 3, 4], [5, 6, 7, 8]]`` into grid boxes.

    Tolerant: each innermost ``[...]`` with exactly four numbers is a box; anything else is
    skipped. Values are rounded, clamped to 0-999, and corners sorted so x1 <= x2, y1 <= y2.
    """
    boxes: list[Box] = []
    for m in _BOX_RE.finditer(det):
        parts = [p.strip() for p in m.group(1).split(",")]
        if len(parts) != 4:
            continue
        try:
            v = [min(GRID, max(0, int(round(float(p))))) for p in parts]
        except (ValueError, OverflowError):
            continue
        x1, x2 = sorted((v[0], v[2]))
        y1, y2 = sorted((v[1], v[3]))
        boxes.append((x1, y1, x2, y2))
    return boxes


def grid_to_pixels(box: Box, width: int, height: int) -> Box:
    """Grid box -> pixel box, as the official code: ``int(v / 999 * W)``."""
    x1, y1, x2, y2 = box
    return (
        int(x1 / GRID * width),
        int(y1 / GRID * height),
        int(x2 / GRID * width),
        int(y2 / GRID * height),
    )


def _content(raw: str, start: int, end: int) -> tuple[str, int]:
    """Block content between two tags: stray tags removed, outer newlines stripped.

    Returns the content and the end offset of the content in ``raw`` (trailing whitespace
    excluded) for the block's span.
    """
    seg = raw[start:end]
    stripped_end = start + len(seg.rstrip())
    seg = _DANGLING_REF_RE.sub("", seg.rstrip())
    text = _STRAY_TAG_RE.sub("", seg).strip("\r\n").rstrip()
    return text, stripped_end


def parse_grounded(raw: str, width: int, height: int) -> list[Block]:
    """Parse decoded model output into blocks; never raises on malformed output.

    ``width``/``height`` are the size of the page image the boxes refer to (the original image,
    not the model's padded input). Text before the first ref tag, or a whole output without ref
    tags, becomes a ``text`` block without boxes.
    """
    start, end = _body_bounds(raw)
    matches = list(_TAG_RE.finditer(raw, start, end))
    blocks: list[Block] = []
    first = matches[0].start() if matches else end
    text, text_end = _content(raw, start, first)
    if text.strip():
        blocks.append(Block("text", [], [], text, (start, text_end)))
    for i, m in enumerate(matches):
        nxt = matches[i + 1].start() if i + 1 < len(matches) else end
        det = m.group("det") if m.group("det") is not None else (m.group("open") or "")
        boxes = parse_boxes(det)
        text, text_end = _content(raw, m.end(), nxt)
        label = m.group("label").strip() or "text"
        pixel_boxes = [grid_to_pixels(b, width, height) for b in boxes]
        blocks.append(Block(label, boxes, pixel_boxes, text, (m.start(), max(m.end(), text_end))))
    return blocks


# ---------------------------------------------------------------------------------------------
# Markdown


def fix_latex(text: str) -> str:
    """Official LaTeX replacements: ``\\coloneqq`` -> ``:=``, ``\\eqqcolon`` -> ``=:``."""
    return text.replace("\\coloneqq", ":=").replace("\\eqqcolon", "=:")


_DISPLAY_MATH_RE = re.compile(r"\\\[(.*?)\\\]", re.DOTALL)
_EQ_TAG_RE = re.compile(r"\\quad\s*\([^)]*\)")


def strip_equation_tags(text: str) -> str:
    """Remove ``\\quad (n)`` equation numbers inside ``\\[...\\]`` (eval runner's clean_formula)."""

    def clean(m: re.Match) -> str:
        return "\\[" + _EQ_TAG_RE.sub("", m.group(1)).strip() + "\\]"

    return _DISPLAY_MATH_RE.sub(clean, text)


def strip_center(text: str) -> str:
    """Remove ``<center>`` / ``</center>`` (eval runner)."""
    return text.replace("<center>", "").replace("</center>", "")


def collapse_newlines(text: str) -> str:
    """Collapse runs of 3+ newlines to exactly 2."""
    return re.sub(r"\n{3,}", "\n\n", text)


def figure_links(
    crops: Sequence[tuple[int, object]], page: int | None = None
) -> dict[int, list[str]]:
    """Names for the crops of :func:`crop_figures`, in the official scheme.

    The k-th crop of a page is ``"k"`` (single image) or ``"{page}_{k}"`` (PDF runner). Returns
    ``{block_index: [name, ...]}`` for :func:`to_markdown`.
    """
    links: dict[int, list[str]] = {}
    for k, (index, _) in enumerate(crops):
        name = f"{k}" if page is None else f"{page}_{k}"
        links.setdefault(index, []).append(name)
    return links


def to_markdown(
    blocks: Sequence[Block],
    image_links: Mapping[int, str | Sequence[str]] | None = None,
    *,
    image_dir: str = "images",
    html_tables_to_markdown: bool = False,
    strip_eq_tags: bool = False,
    remove_center: bool = False,
) -> str:
    """Blocks -> clean Markdown.

    ``image_links`` maps a block index (position in ``blocks``) to the name(s) of its saved
    crop(s); each becomes ``![](image_dir/NAME.jpg)``. An ``image`` block without an entry (for
    instance an empty box that was not cropped) keeps only its content. Other blocks keep their
    content with the LaTeX fixes applied. HTML tables stay HTML unless
    ``html_tables_to_markdown``, which turns simple tables (no row/colspan, no nesting, equal row
    lengths) into pipe tables. ``strip_eq_tags``/``remove_center`` are the eval runner's extra
    cleaning.
    """
    image_links = image_links or {}
    parts: list[str] = []
    for i, block in enumerate(blocks):
        text = block.text
        if block.label == "image":
            names = image_links.get(i, [])
            names = [names] if isinstance(names, str) else list(names)
            for name in names:
                parts.append(f"![]({image_dir}/{name}.jpg)")
        text = fix_latex(text)
        if strip_eq_tags:
            text = strip_equation_tags(text)
        if remove_center:
            text = strip_center(text)
        if html_tables_to_markdown:
            text = convert_simple_tables(text)
        if text.strip():
            parts.append(text)
    return collapse_newlines("\n\n".join(parts)).strip()


def join_pages(pages_md: Iterable[str]) -> str:
    """Join per-page Markdown with the official ``\\n<--- Page Split --->\\n`` separator."""
    return PAGE_SPLIT.join(pages_md)


def split_pages(markdown: str) -> list[str]:
    """Inverse of :func:`join_pages`."""
    return markdown.split(PAGE_SPLIT)


# ---------------------------------------------------------------------------------------------
# HTML tables -> pipe tables


_TABLE_RE = re.compile(r"<table\b[^>]*>.*?</table\s*>", re.DOTALL | re.IGNORECASE)
_IGNORED_TABLE_TAGS = {"thead", "tbody", "tfoot", "colgroup", "col"}


class _TableParser(HTMLParser):
    """Collect the cells of one table; set ``complex`` on anything a pipe table cannot hold."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.rows: list[list[str]] = []
        self.row: list[str] | None = None
        self.cell: list[str] | None = None
        self.depth = 0
        self.complex = False

    def _close_cell(self) -> None:
        if self.cell is not None and self.row is not None:
            self.row.append(" ".join("".join(self.cell).split()).replace("|", "\\|"))
        self.cell = None

    def _close_row(self) -> None:
        self._close_cell()
        if self.row:
            self.rows.append(self.row)
        self.row = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.depth += 1
            if self.depth > 1:
                self.complex = True
        elif tag == "tr":
            if self.cell is not None:
                self.complex = True
            self._close_row()
            self.row = []
        elif tag in ("td", "th"):
            self._close_cell()
            if self.row is None:
                self.row = []
            for name, value in attrs:
                if name in ("rowspan", "colspan") and (value or "1").strip() != "1":
                    self.complex = True
            self.cell = []
        elif tag == "br" and self.cell is not None:
            self.cell.append("<br>")
        elif self.cell is not None:
            self.cell.append(self.get_starttag_text() or "")
        elif tag not in _IGNORED_TABLE_TAGS:
            self.complex = True  # caption or other structure outside cells

    def handle_startendtag(self, tag, attrs):
        if tag == "br" and self.cell is not None:
            self.cell.append("<br>")
        elif self.cell is not None:
            self.cell.append(self.get_starttag_text() or "")
        elif tag not in _IGNORED_TABLE_TAGS:
            self.complex = True

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._close_cell()
        elif tag == "tr":
            self._close_row()
        elif tag == "table":
            self._close_row()
            self.depth -= 1
        elif tag == "br":
            pass
        elif self.cell is not None:
            self.cell.append(f"</{tag}>")

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)
        elif data.strip():
            self.complex = True

    def handle_entityref(self, name):
        if self.cell is not None:
            self.cell.append(f"&{name};")

    def handle_charref(self, name):
        if self.cell is not None:
            self.cell.append(f"&#{name};")


def html_table_to_markdown(html: str) -> str | None:
    """One ``<table>...</table>`` -> pipe table, or None if it is not simple.

    Simple: no rowspan/colspan > 1, no nested table, no caption, every row with the same number
    of cells. The first row becomes the header (DeepSeek-OCR writes ``<td>`` everywhere).
    Inline markup inside cells is kept as HTML; ``|`` is escaped.
    """
    p = _TableParser()
    try:
        p.feed(html)
        p.close()
    except Exception:  # HTMLParser is lenient; be safe with model output anyway
        return None
    p._close_row()
    if p.complex or not p.rows or len({len(r) for r in p.rows}) != 1:
        return None
    lines = ["| " + " | ".join(r) + " |" for r in p.rows]
    lines.insert(1, "|" + "|".join(" --- " for _ in p.rows[0]) + "|")
    return "\n".join(lines)


def convert_simple_tables(text: str) -> str:
    """Replace every simple HTML table in ``text`` by a pipe table; keep complex ones."""

    def repl(m: re.Match) -> str:
        md = html_table_to_markdown(m.group(0))
        return m.group(0) if md is None else "\n\n" + md + "\n\n"

    return _TABLE_RE.sub(repl, text)


# ---------------------------------------------------------------------------------------------
# Images


def crop_figures(image: Image.Image, blocks: Sequence[Block]) -> list[tuple[int, Image.Image]]:
    """Crop every box of every ``image`` block from the page image.

    Boxes are re-scaled to ``image.size`` (so the crop is right even if the blocks were parsed for
    another size), clipped to the page; empty boxes are skipped. Returns ``(block_index, crop)``
    pairs in order, crops in RGB (ready for JPEG). Name them with :func:`figure_links`.
    """
    W, H = image.size
    crops: list[tuple[int, Image.Image]] = []
    for i, block in enumerate(blocks):
        if block.label != "image":
            continue
        for box in block.boxes:
            x1, y1, x2, y2 = grid_to_pixels(box, W, H)
            x1, x2 = max(0, min(x1, W)), max(0, min(x2, W))
            y1, y2 = max(0, min(y1, H)), max(0, min(y2, H))
            if x2 <= x1 or y2 <= y1:
                continue
            crop = image.crop((x1, y1, x2, y2))
            crops.append((i, crop if crop.mode == "RGB" else crop.convert("RGB")))
    return crops


_PALETTE = [
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 140, 140), (240, 50, 230), (128, 128, 0), (0, 0, 128), (170, 110, 40),
]  # fmt: skip


def label_color(label: str) -> tuple[int, int, int]:
    """A stable colour per label (the official runner draws random colours)."""
    return _PALETTE[zlib.crc32(label.encode("utf-8")) % len(_PALETTE)]


def draw_layout(image: Image.Image, blocks: Sequence[Block]) -> Image.Image:
    """Draw the blocks' boxes on a copy of the page, as the official visualisation.

    Outline width 4 for ``title`` and 2 otherwise, a translucent fill (alpha 20), and the label
    above the box on a light background. Returns an RGB image of the same size.
    """
    base = image.convert("RGBA")
    W, H = base.size
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    fill_draw = ImageDraw.Draw(overlay)
    out = base.copy()
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    for block in blocks:
        color = label_color(block.label)
        for box in block.boxes:
            x1, y1, x2, y2 = grid_to_pixels(box, W, H)
            width = 4 if block.label == "title" else 2
            draw.rectangle([x1, y1, x2, y2], outline=color, width=width)
            fill_draw.rectangle([x1, y1, x2, y2], fill=(*color, 20))
            tx, ty = x1, max(0, y1 - 15)
            l, t, r, b = draw.textbbox((tx, ty), block.label, font=font)
            draw.rectangle([l, t, r, b], fill=(255, 255, 255, 255))
            draw.text((tx, ty), block.label, font=font, fill=color)
    return Image.alpha_composite(out, overlay).convert("RGB")


# ---------------------------------------------------------------------------------------------
# Page health


def is_repetition_loop(
    text: str,
    *,
    min_repeats: int = 10,
    min_chars: int = 200,
    max_period: int = 500,
    window: int = 20_000,
) -> bool:
    """Heuristic: does ``text`` end in a block repeated over and over (a decoding loop)?

    For each period p (smallest first) it measures how far back ``text[i] == text[i - p]`` holds
    from the end (so a unit cut off mid-way by the token limit still counts). A loop is a tail of
    at least ``min_chars`` characters made of at least ``min_repeats`` copies of one unit of at
    most ``max_period`` characters. Only the last ``window`` characters are examined.
    """
    text = strip_eos(text)[-window:]
    n = len(text)
    if n < min_chars:
        return False
    a = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    for p in range(1, min(max_period, n // 2) + 1):
        neq = np.flatnonzero(a[p:] != a[:-p])
        run = (n - p) if neq.size == 0 else (n - p - 1 - int(neq[-1]))
        span = run + p
        if span >= min_chars and span >= min_repeats * p:
            return True
    return False


FLAG_TRUNCATED = "truncated"  # no EOS: hit the token limit (official SKIP_REPEAT drops such pages)
FLAG_LOOP = "repetition_loop"  # tail repeats one block (is_repetition_loop)
FLAG_EMPTY = "empty"  # nothing but whitespace/EOS
FLAG_UNGROUNDED = "ungrounded"  # no ref/det tags at all (only meaningful with a grounding prompt)


def page_flags(raw: str, *, stopped_at_eos: bool | None = None) -> list[str]:
    """Health flags for one page's raw output, in a fixed order.

    ``stopped_at_eos`` is the engine's own stop reason when known; otherwise it is read from the
    text (needs decoding with special tokens). The official PDF runner with SKIP_REPEAT drops
    pages flagged ``truncated``.
    """
    body = strip_eos(raw)
    eos = has_eos(raw) if stopped_at_eos is None else stopped_at_eos
    flags = []
    if not eos:
        flags.append(FLAG_TRUNCATED)
    if is_repetition_loop(body):
        flags.append(FLAG_LOOP)
    if not body:
        flags.append(FLAG_EMPTY)
    elif not _TAG_RE.search(body):
        flags.append(FLAG_UNGROUNDED)
    return flags
