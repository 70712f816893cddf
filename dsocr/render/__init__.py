"""Text -> page images, deterministic and torch-free (training pages and optical compression).

    from dsocr.render import PageStyle, render_text
    pages = render_text(long_text, PageStyle(width=640, height=640, font_size=12))
    assert "".join(p.text for p in pages) == long_text

See render.py (API), layout.py (wrapping, Markdown, pagination) and fonts.py (shipped fonts).
"""

from dsocr.render.fonts import FAMILIES, missing_chars, unrenderable
from dsocr.render.render import (
    Page,
    PageStyle,
    degrade,
    fit_to_mode,
    glyph_centers,
    render_markdown,
    render_text,
)

__all__ = [
    "FAMILIES",
    "Page",
    "PageStyle",
    "degrade",
    "fit_to_mode",
    "glyph_centers",
    "missing_chars",
    "render_markdown",
    "render_text",
    "unrenderable",
]
