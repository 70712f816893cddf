"""Page rendering: PageStyle, Page, render_text, render_markdown, fit_to_mode, degrade.

DeepSeek-OCR (Contexts Optical Compression, arXiv 2510.18234) reads text back from page images
that cost few vision tokens; this module makes those pages, both as training data and to compress
a long context into images (dsocr.compress). Pages are greyscale PIL images (mode "L"),
anti-aliased, deterministic: the same text and style give the same bytes on every run and, with
the same Pillow wheel, on every machine (fonts are shipped in the package, see fonts.py).

Speed: fonts and measured widths are cached, and each line is one ImageDraw.text call per font
run, so plain Latin pages render at a few hundred pages/s per core (bench/render.py,
docs/benchmarks/render.md).
"""

from __future__ import annotations

import dataclasses
import io
import math
import numbers
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dsocr.render.fonts import FAMILIES
from dsocr.render.layout import (
    DIRECTIONS,
    RECT,
    TEXT,
    Item,
    Placed,
    layout_markdown,
    layout_text,
    page_texts,
    paginate,
)

A4_INCHES = (210 / 25.4, 297 / 25.4)


@dataclass(frozen=True)
class PageStyle:
    """How pages look. All lengths in pixels; defaults are 12 pt DejaVu Sans on A4 at 96 dpi."""

    font: str = "sans"  # family: "sans", "serif" or "mono"; scripts fall back per character
    font_size: int = 16  # px (em size); 16 px = 12 pt at 96 dpi
    line_height: float = 1.25  # line pitch as a multiple of font_size
    margin: int = 48  # px on every side
    columns: int = 1
    column_gap: int = 24  # px between columns
    width: int | None = None  # px; None: A4 width at dpi
    height: int | None = None  # px; None: A4 height at dpi
    background: int = 255  # grey level 0..255
    foreground: int = 0  # grey level of the text 0..255
    dpi: int = 96  # only used for the default page size
    # Base direction of each paragraph, heading, list item, quote and table: "auto" from its
    # first strong character (UAX #9 P2-P3; none: the block before's), or forced "ltr" / "rtl".
    # Right-to-left blocks are mirrored (see layout.py); code blocks always stay left to right.
    direction: str = "auto"

    def __post_init__(self):
        if self.font not in FAMILIES:
            raise ValueError(f"font must be one of {FAMILIES}, got {self.font!r}")
        if not isinstance(self.direction, str) or self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        lowest = dict(width=1, height=1, columns=1, margin=0, column_gap=0, background=0)
        for name, low in {**lowest, "foreground": 0}.items():
            v = getattr(self, name)
            if v is None and name in ("width", "height"):
                continue
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < low:
                raise ValueError(f"{name} must be a whole number >= {low}, got {v!r}")
        for name in ("font_size", "line_height", "dpi"):
            v = getattr(self, name)
            if not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if self.font_size < 4:
            raise ValueError(f"font_size must be >= 4 px, got {self.font_size}")
        if self.line_height < 0.5:
            raise ValueError(f"line_height must be >= 0.5, got {self.line_height}")
        if self.dpi <= 0:
            raise ValueError(f"dpi must be > 0, got {self.dpi}")
        for grey in (self.background, self.foreground):
            if grey > 255:
                raise ValueError(f"grey levels must be in 0..255, got {grey}")
        if self.column_width < self.font_size:
            raise ValueError(f"columns of {self.column_width} px are too narrow for {self}")
        if self.size[1] - 2 * self.margin < self.line_px:
            raise ValueError(f"page height leaves no room for one line: {self}")

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the page in px."""
        width = self.width if self.width is not None else round(A4_INCHES[0] * self.dpi)
        height = self.height if self.height is not None else round(A4_INCHES[1] * self.dpi)
        return width, height

    @property
    def line_px(self) -> int:
        """Line pitch in px."""
        return max(1, round(self.font_size * self.line_height))

    @property
    def column_width(self) -> int:
        gaps = (self.columns - 1) * self.column_gap
        return (self.size[0] - 2 * self.margin - gaps) // self.columns

    @property
    def column_height(self) -> int:
        return self.size[1] - 2 * self.margin


@dataclass(frozen=True)
class Page:
    """One rendered page: a mode "L" image and exactly the source text placed on it."""

    image: Image.Image
    text: str


def render_text(text: str, style: PageStyle | None = None) -> list[Page]:
    """Render plain text onto as many pages as it needs.

    Every "\\n" ends a line; lines are word-wrapped to the column width; "\\f" starts a new page.
    Each line is right-aligned when its base direction is right to left (PageStyle.direction).
    "".join(p.text for p in pages) == text. Raises ValueError for a character no shipped font
    has (see fonts.missing_chars to filter beforehand).
    """
    style = style or PageStyle()
    return _render(text, layout_text(text, style), style)


def render_markdown(md: str, style: PageStyle | None = None) -> list[Page]:
    """Render light Markdown (headings, lists, code blocks, pipe tables, quotes, paragraphs).

    page.text is the Markdown source of what is on the page: "".join(page texts) == md. A block
    taller than the space left is split between lines (a table between rows). Right-to-left
    blocks (Arabic, Hebrew; see PageStyle.direction) are mirrored: right-aligned, list markers
    and quote bars on the right, table columns from the right; code blocks stay left to right.
    """
    style = style or PageStyle()
    return _render(md, layout_markdown(md, style), style)


def glyph_centers(
    text: str, style: PageStyle | None = None
) -> list[list[tuple[str, float, float]]]:
    """Per page of ``render_text(text, style)``: (character, x, y) of every non-space character,
    x at the middle of its advance and y about half an x-height above the baseline.

    For training targets (which vision token holds which characters). Characters of a shaped run
    (Arabic, Devanagari) all get the run's centre. Right-to-left lines report where their runs
    are drawn (right-aligned, in visual order), and their source characters, unmirrored.
    """
    style = style or PageStyle()
    pages, _ = paginate(layout_text(text, style), style.columns, style.column_height)
    step = style.column_width + style.column_gap
    out = []
    for page in pages:
        glyphs = []
        for col, y, item in page.items:
            ox, oy = style.margin + col * step, style.margin + y
            for op in item.ops:
                if op[0] != TEXT:
                    continue
                _, x, base, f, run = op[:5]
                chars = op[5] if len(op) > 5 else run  # unmirrored, for reversed RTL runs
                cy = oy + base - 0.3 * style.font_size
                if f.spec.shaped:
                    cx = ox + x + f.measure(run) / 2
                    glyphs += [(ch, cx, cy) for ch in run if not ch.isspace()]
                    continue
                left = 0.0
                for i, ch in enumerate(chars):
                    right = f.font.getlength(run[: i + 1])
                    if not ch.isspace():
                        glyphs.append((ch, ox + x + (left + right) / 2, cy))
                    left = right
        out.append(glyphs)
    return out


def fit_to_mode(
    text: str,
    size_px: int,
    style: PageStyle | None = None,
    *,
    markdown: bool = False,
    min_font_size: int = 6,
    max_font_size: int | None = None,
) -> tuple[Page, PageStyle]:
    """The largest font size at which text fits on one size_px x size_px page.

    size_px is a DeepSeek-OCR native resolution (512 Tiny, 640 Small, 1024 Base, 1280 Large).
    style supplies everything but the page size and font size (default: PageStyle with a
    size_px/32 margin). Returns (page, style used). Raises ValueError if even min_font_size
    does not fit.
    """
    if style is None:
        style = PageStyle(width=size_px, height=size_px, margin=max(2, size_px // 32))
    layout = layout_markdown if markdown else layout_text
    hi = max_font_size or max(min_font_size, size_px // 8)

    def attempt(font_size: int):
        try:
            trial = dataclasses.replace(style, width=size_px, height=size_px, font_size=font_size)
        except ValueError:
            return None
        items = layout(text, trial)
        pages, overflow = paginate(items, trial.columns, trial.column_height)
        return (trial, items, pages) if len(pages) == 1 and not overflow else None

    best = attempt(min_font_size)
    if best is None:
        raise ValueError(
            f"{len(text)} chars do not fit on one {size_px}x{size_px} page even at "
            f"{min_font_size} px; split the text or use a larger mode"
        )
    lo = min_font_size  # fits
    while lo < hi:  # binary search for the last size that fits (fitting is ~monotonic)
        mid = (lo + hi + 1) // 2
        got = attempt(mid)
        if got is not None:
            lo, best = mid, got
        else:
            hi = mid - 1
    trial, items, pages = best
    (page,) = _draw_pages(text, items, pages, trial)
    return page, trial


def _render(source: str, items: list[Item], style: PageStyle) -> list[Page]:
    pages, _ = paginate(items, style.columns, style.column_height)
    return _draw_pages(source, items, pages, style)


def _draw_pages(
    source: str, items: list[Item], pages: list[Placed], style: PageStyle
) -> list[Page]:
    texts = page_texts(source, items, pages)
    return [Page(_draw(p, style), t) for p, t in zip(pages, texts)]


def _draw(page: Placed, style: PageStyle) -> Image.Image:
    image = Image.new("L", style.size, style.background)
    draw = ImageDraw.Draw(image)
    bg, fg = style.background, style.foreground
    colours = {
        "fg": fg,
        "shade": round(bg + (fg - bg) * 0.08),  # code block background
        "rule": round(bg + (fg - bg) * 0.5),  # quote bars, thematic breaks
        None: None,
    }
    step = style.column_width + style.column_gap
    for col, y, item in page.items:
        ox, oy = style.margin + col * step, style.margin + y
        for op in item.ops:
            if op[0] == TEXT:
                _, x, base, f, s = op[:5]
                draw.text(
                    (ox + x, oy + base),
                    s,
                    fill=fg,
                    font=f.font,
                    anchor="ls",
                    direction=f.direction,
                )
            elif op[0] == RECT:
                _, x0, y0, x1, y1, fill, line = op
                draw.rectangle(
                    (ox + x0, oy + y0, ox + x1, oy + y1),
                    fill=colours[fill],
                    outline=colours[line],
                )
    return image


def degrade(
    image: Image.Image,
    rng_seed: int,
    blur: float = 0.0,
    noise: float = 0.0,
    jpeg_quality: int | None = None,
    rotate_deg: float = 0.0,
    fill: int | tuple[int, ...] = 255,
) -> Image.Image:
    """Simulate a scan: rotate, Gaussian-blur, add Gaussian noise, JPEG round-trip (that order).

    blur is the Gaussian radius in px, noise the noise std in grey levels (0..255), rotate_deg
    counter-clockwise about the centre (corners filled with `fill`), jpeg_quality 1..95 or None.
    The only randomness is the noise, drawn from numpy's PCG64 seeded with rng_seed, so a seed
    gives the same bytes every time. Returns a new image of the same size and mode.
    """
    out = image
    if rotate_deg:
        out = out.rotate(rotate_deg, resample=Image.Resampling.BICUBIC, fillcolor=fill)
    if blur > 0:
        out = out.filter(ImageFilter.GaussianBlur(blur))
    if noise > 0:
        rng = np.random.default_rng(rng_seed)
        arr = np.asarray(out, dtype=np.float32)
        arr = arr + rng.normal(0.0, noise, size=arr.shape).astype(np.float32)
        out = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode=out.mode)
    if jpeg_quality is not None:
        buf = io.BytesIO()
        out.save(buf, format="JPEG", quality=int(jpeg_quality))
        buf.seek(0)
        out = Image.open(buf)
        out.load()
    if out is image:
        out = image.copy()
    return out
