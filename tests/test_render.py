"""dsocr.render: determinism, pagination invariant, scripts, Markdown, fit_to_mode, degrade."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import features

from dsocr.render import (
    Page,
    PageStyle,
    degrade,
    fit_to_mode,
    glyph_centers,
    missing_chars,
    render_markdown,
    render_text,
    unrenderable,
)
from dsocr.render.fonts import FACES, FONT_DIR, face
from dsocr.render.layout import layout_text

SMALL = PageStyle(width=320, height=240, font_size=14, margin=8)
PROSE = (
    "Contexts optical compression renders long text onto page images that cost few vision "
    "tokens, and a decoder reads the text back. "
)

# sha256 of the pinned render's pixels, per FreeType version (glyph rasterisation differs between
# FreeType releases). A mismatch on a listed version means the fonts or the layout changed.
PINNED = {"2.14.3": "85a804f437811a8c002063b66c2ff92bb3c4a45a48fa6ad156a31f63602024ed"}


def ink(page: Page, threshold: int = 128) -> np.ndarray:
    return np.asarray(page.image) < threshold


def joined(pages: list[Page]) -> str:
    return "".join(p.text for p in pages)


def test_render_is_deterministic_and_pinned():
    style = PageStyle(width=192, height=64, font_size=14, margin=4)
    text = "Optical compression, 123!\nΩ Ж 中"
    a, b = render_text(text, style), render_text(text, style)
    assert len(a) == 1 and a[0].image.mode == "L" and a[0].image.size == (192, 64)
    assert a[0].image.tobytes() == b[0].image.tobytes()
    digest = hashlib.sha256(a[0].image.tobytes()).hexdigest()
    version = features.version("freetype2")
    if version not in PINNED:
        pytest.skip(f"no pinned hash for FreeType {version}; this render gives {digest}")
    assert digest == PINNED[version], f"fonts or layout changed: {digest}"


def test_shipped_fonts_match_manifest():
    manifest = json.loads((FONT_DIR / "fonts.json").read_text())
    assert {spec.file for spec in FACES.values()} <= manifest.keys()
    total = 0
    for name, entry in manifest.items():
        data = (FONT_DIR / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], name
        assert (FONT_DIR / entry["license"]).exists()
        total += len(data)
    assert total < 12e6


def test_pagination_keeps_every_character_once():
    text = "\n".join(f"{i}. {PROSE * (1 + i % 3)}" for i in range(40)) + "\n\n  indented\ttab\n"
    pages = render_text(text, SMALL)
    assert len(pages) > 3
    assert joined(pages) == text
    assert all(p.text for p in pages)
    for p in pages:
        assert p.image.size == (320, 240)
        cols = np.flatnonzero(ink(p).any(axis=0))
        assert cols.min() >= SMALL.margin - 1 and cols.max() <= 320 - SMALL.margin
    # text consumed at a wrap point stays on the page before it, no page starts with a space
    assert not any(p.text.startswith(" ") for p in pages[1:])


def test_glyph_centres_follow_the_drawn_characters():
    text = "\n".join(f"{i}. {PROSE * (1 + i % 3)}" for i in range(12))
    pages = render_text(text, SMALL)
    centres = glyph_centers(text, SMALL)
    assert len(centres) == len(pages) > 1
    for page, glyphs in zip(pages, centres):
        assert "".join(ch for ch, _, _ in glyphs) == "".join(page.text.split())
        dark = ink(page)
        hits = 0
        for _, x, y in glyphs:
            assert 0 <= x < page.image.width and 0 <= y < page.image.height
            x0, y0 = int(x), int(y)
            hits += bool(dark[max(0, y0 - 4) : y0 + 5, max(0, x0 - 4) : x0 + 5].any())
        assert hits >= 0.95 * len(glyphs)  # ink next to nearly every centre (not "." or "'")
        xs = [x for _, x, _ in glyphs[:5]]
        assert xs == sorted(xs)  # left to right along the first line


def test_long_word_is_hard_wrapped_and_form_feed_breaks_page():
    text = "x" * 200 + " tail\fsecond page\r\nend"
    pages = render_text(text, PageStyle(width=200, height=200, font_size=12, margin=5))
    assert joined(pages) == text
    assert len(pages) == 2
    assert pages[1].text == "second page\r\nend"


def test_empty_text_gives_one_blank_page():
    (page,) = render_text("", SMALL)
    assert page.text == "" and not ink(page).any()


def test_columns():
    style = PageStyle(width=400, height=200, font_size=10, margin=10, columns=2, column_gap=20)
    text = PROSE * 12
    pages = render_text(text, style)
    assert joined(pages) == text
    first = ink(pages[0])
    gutter = first[:, 196:204]  # between the columns
    assert first[:, :190].any() and first[:, 210:].any() and not gutter.any()
    one_col = render_text(text, PageStyle(width=400, height=200, font_size=10, margin=10))
    assert abs(len(pages) - len(one_col)) <= 1


@pytest.mark.parametrize(
    "text",
    [
        "Привет, мир! Съешь же ещё этих мягких булок.",
        "Γειά σου κόσμε, ταχίστη αλώπηξ.",
        "مرحبا بالعالم، هذا نص عربي.",
        "नमस्ते दुनिया, यह एक परीक्षण है। क्षत्रिय",
        "中文字体渲染测试，光学上下文压缩。",
        "日本語のテキスト、カタカナ。",
        "한국어 텍스트 렌더링",
        "שלום עולם",
    ],
)
def test_scripts_render_ink(text):
    for family in ("sans", "serif", "mono"):
        (page,) = render_text(text, PageStyle(width=480, height=80, font=family, margin=8))
        assert ink(page).sum() > 100, family


@pytest.mark.skipif(not features.check("raqm"), reason="needs raqm")
def test_arabic_and_devanagari_are_shaped():
    arabic = face("arabic", 32)
    word = "بالعالم"
    isolated = sum(arabic.measure(c) for c in word)
    assert arabic.measure(word) < 0.8 * isolated  # joined forms are narrower
    deva = face("devanagari", 32)
    conjunct = "क्ष"  # KA + VIRAMA + SSA -> one conjunct glyph
    assert deva.measure(conjunct) < deva.measure("क") + deva.measure("ष")


def test_rtl_paragraph_is_right_aligned():
    style = PageStyle(width=600, height=60, font_size=16, margin=10)
    (rtl,) = render_text("مرحبا بالعالم", style)
    (ltr,) = render_text("Hello world", style)
    rtl_cols = np.flatnonzero(ink(rtl).any(axis=0))
    ltr_cols = np.flatnonzero(ink(ltr).any(axis=0))
    assert rtl_cols.max() > 580 and rtl_cols.min() > 300
    assert ltr_cols.min() < 20 and ltr_cols.max() < 300


def _visual(text: str, style: PageStyle) -> list[str]:
    """The drawn strings of the first line, left to right."""
    ops = layout_text(text, style)[0].ops
    return [op[4] for op in sorted(ops, key=lambda op: op[1])]


@pytest.mark.parametrize(
    "text, visual",
    [
        # brackets used to keep their LTR glyphs in RTL text: ")جديد(" on the page
        ("كتاب (جديد) في", ["في", "(", "جديد", ")", "كتاب"]),
        ("(مرحبا) بالعالم", ["بالعالم", "(", "مرحبا", ")"]),
        # the closing bracket used to be split off the Latin run: ").(Hello" on the page
        ("مرحبا (Hello).", [".(", "Hello", ")", "مرحبا"]),
        ("שלום (עולם) [x]", ["[", "x", "] (", "עולם", ")", "שלום"]),
        ("עמוד 3 מתוך 10.", [".", "10", "מתוך", "3", "עמוד"]),
        # an Arabic phrase in LTR text reads right to left as a whole, brackets included
        ("Word مرحبا (جديد) end", ["Word", "(", "جديد", ")", "مرحبا", "end"]),
        ("Hello world", ["Hello world"]),
    ],
)
def test_bidi_orders_runs_and_mirrors_brackets(text, visual):
    style = PageStyle(width=600, height=60, font_size=20, margin=8)
    assert _visual(text, style) == visual
    (page,) = render_text(text, style)
    assert page.text == text
    drawn = sorted(ch for ch, _, _ in glyph_centers(text, style)[0])
    assert drawn == sorted(text.replace(" ", ""))  # source characters, unmirrored


def test_unknown_character_raises_with_code_point():
    assert missing_chars("abc ሀ 中") == ["ሀ"]
    with pytest.raises(ValueError, match=r"unknown script.*U\+1200"):
        render_text("Amharic: ሀ", SMALL)


@pytest.mark.parametrize("text", ["x\x00y", "مرحبا \x00 x", "a\x01b", "bell\x07", "del\x7f"])
def test_control_characters_are_rejected_nul_included(text):
    """NUL used to pass: an Arabic face maps U+0000, so it was drawn as nothing."""
    bad = [c for c in text if ord(c) < 32 or 127 <= ord(c) < 160]
    assert missing_chars(text) == bad
    with pytest.raises(ValueError, match=r"control character .*U\+00"):
        render_text(text, SMALL)
    why = unrenderable("fine\n" + text)
    assert why.startswith("line 2: control character") and f"U+{ord(bad[0]):04X}" in why
    assert unrenderable("tab\tcr\r\nff\fvt\v ok") is None  # the ones the layout handles
    assert missing_chars("a\vb") == []


def test_fit_to_mode():
    sizes = []
    for n in (2, 8, 30):
        page, style = fit_to_mode(PROSE * n, 512)
        assert page.image.size == (512, 512) and style.size == (512, 512)
        assert page.text == PROSE * n
        sizes.append(style.font_size)
        bigger = PageStyle(
            width=512, height=512, margin=style.margin, font_size=style.font_size + 1
        )
        assert len(render_text(PROSE * n, bigger)) > 1  # the largest size that fits
    assert sizes[0] > sizes[1] > sizes[2]
    with pytest.raises(ValueError, match="do not fit"):
        fit_to_mode(PROSE * 2000, 512)
    page, style = fit_to_mode("# Title\n\nSome *text*.\n", 640, markdown=True)
    assert page.image.size == (640, 640)


def test_degrade_is_seeded():
    (page,) = render_text(PROSE, SMALL)
    kw = dict(blur=0.8, noise=12.0, jpeg_quality=60, rotate_deg=1.5)
    a = degrade(page.image, 7, **kw)
    b = degrade(page.image, 7, **kw)
    c = degrade(page.image, 8, **kw)
    assert a.size == page.image.size and a.mode == "L"
    assert a.tobytes() == b.tobytes() != c.tobytes()
    assert a.tobytes() != page.image.tobytes()
    assert degrade(page.image, 0).tobytes() == page.image.tobytes()


MARKDOWN = """# Optical compression

Text is **rendered** to pages and `decoded` back.
A second line of the same paragraph.

## Details

- first item
- second item
  1. nested ordered item

```python
def f(x):
\treturn x * 2
```

| mode | size | tokens |
|------|-----:|--------|
| Tiny | 512 | 64 |
| Small | 640 | 100 |

> a quote

---
"""


def test_markdown_blocks():
    style = PageStyle(width=480, height=640, font_size=14, margin=16)
    (page,) = render_markdown(MARKDOWN, style)
    assert page.text == MARKDOWN
    arr = np.asarray(page.image)
    assert (arr == round(255 * 0.92)).sum() > 1000  # code block shading
    long_rows = ((arr < 128).sum(axis=1) > 200).sum()
    assert long_rows >= 3  # table grid lines span the table
    # the heading is drawn larger than body text
    rows = np.flatnonzero((arr < 128).any(axis=1))
    runs = np.split(rows, np.flatnonzero(np.diff(rows) > 1) + 1)
    assert len(runs[0]) > 1.3 * np.median([len(r) for r in runs[1:4]])


def test_markdown_paginates_long_documents():
    md = "\n".join(MARKDOWN for _ in range(6)) + "\n" + "word " * 400
    pages = render_markdown(md, PageStyle(width=400, height=400, font_size=12, margin=12))
    assert len(pages) > 4
    assert joined(pages) == md
    two = render_markdown(md, PageStyle(width=600, height=400, font_size=10, columns=2))
    assert joined(two) == md


def test_style_validation():
    with pytest.raises(ValueError, match="font must be"):
        PageStyle(font="comic")
    bad = [
        (dict(width=0), "width must be a whole number >= 1"),
        (dict(width=-5, height=100), "width must be"),
        (dict(width=300.5, height=300), "width must be"),  # was a TypeError inside Pillow
        (dict(columns=1.5), "columns must be"),  # used to draw past the page, text lost
        (dict(columns=0), "columns must be"),
        (dict(margin=-1), "margin must be"),
        (dict(column_gap=-1), "column_gap must be"),
        (dict(line_height=float("nan")), "line_height must be a finite number"),
        (dict(line_height=float("inf")), "line_height must be a finite number"),  # OverflowError
        (dict(font_size="12"), "font_size must be a finite number"),  # TypeError
        (dict(dpi=0), "dpi must be > 0"),
        (dict(background=256), "grey levels"),
    ]
    for kw, message in bad:
        with pytest.raises(ValueError, match=message):
            PageStyle(**kw)
    assert PageStyle(width=np.int64(200), height=100, margin=0).size == (200, 100)
    assert PageStyle(dpi=200).size == (1654, 2339)


def test_render_does_not_import_torch():
    code = "import sys, dsocr.render; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
