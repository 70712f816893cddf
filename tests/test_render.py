"""dsocr.render: determinism, pagination invariant, scripts, Markdown, fit_to_mode, degrade."""

import dataclasses
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
from dsocr.render.layout import RECT, TEXT, layout_markdown, layout_text, paginate

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
        (dict(direction="RTL"), r"direction must be one of \('auto', 'ltr', 'rtl'\), got 'RTL'"),
        (dict(direction="right-to-left"), "direction must be one of"),
        (dict(direction=None), "direction must be one of"),
        (dict(direction=["rtl"]), "direction must be one of"),  # unhashable: not a TypeError
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


# ---------------------------------------------------------------------------------------------
# Right-to-left Markdown layout: per-block base direction, mirrored blocks

RTL_STYLE = PageStyle(width=600, height=400, font_size=16, margin=10)  # column: x 10..590


def ink_cols(page: Page, rows: slice = slice(None)) -> np.ndarray:
    return np.flatnonzero(ink(page)[rows].any(axis=0))


def texts_by_x(item) -> list[tuple[int, str]]:
    """(x, drawn string) of an item's text ops, left to right."""
    return sorted((op[1], op[4]) for op in item.ops if op[0] == TEXT)


def lines_of(items) -> list:
    return [it for it in items if any(op[0] == TEXT for op in it.ops)]


def test_rtl_markdown_paragraph_and_heading_are_right_aligned():
    for md in ("مرحبا بالعالم\n", "# عنوان قصير\n", "> اقتباس قصير\n"):
        (page,) = render_markdown(md, RTL_STYLE)
        cols = np.flatnonzero((np.asarray(page.image) < 200).any(axis=0))  # grey quote bar too
        assert cols.max() >= 585, md  # at the right margin (x 590)
        assert cols.min() > 300, md  # a short line does not reach the left half
    (quote,) = lines_of(layout_markdown("> اقتباس قصير\n", RTL_STYLE))
    (bar,) = [op for op in quote.ops if op[0] == RECT]
    (_, text), *_ = texts_by_x(quote)
    assert bar[3] == RTL_STYLE.column_width - 1  # the quote bar is on the right
    assert max(x for x, _ in texts_by_x(quote)) + face("arabic", 16).measure(text) < bar[1]


def test_rtl_list_markers_are_on_the_right():
    md = "- العنصر الأول\n- الثاني\n  1. عنصر مرقم\n  2) آخر\n"
    (page,) = render_markdown(md, RTL_STYLE)
    cols = ink_cols(page)
    assert cols.min() > 300  # no bullet at the left
    items = lines_of(layout_markdown(md, RTL_STYLE))
    assert len(items) == 4
    indent = round(16 * 1.5)
    for item, marker, level in zip(items, ["•", "•", ".1", "(2"], [0, 0, 1, 1]):
        ops = texts_by_x(item)
        assert "".join(s for _, s in ops[1:]) == marker  # rightmost, in visual order
        assert ops[0][0] < ops[1][0]  # the item text is left of its marker
        edge = RTL_STYLE.column_width - indent * (level + 1)  # text's right edge, marker after
        assert edge < ops[1][0] < edge + 12
    # the bullet's ink is at the right, with a gap between it and the text
    first = ink(page)[: items[0].height + 8]
    used = np.flatnonzero(first.any(axis=0))
    gap = np.flatnonzero(np.diff(used) > 2)
    assert len(gap) and used[gap[-1]] <= RTL_STYLE.margin + RTL_STYLE.column_width - indent + 1
    assert used.max() > RTL_STYLE.margin + RTL_STYLE.column_width - indent + 3  # the bullet


def test_rtl_table_runs_columns_from_the_right():
    md = "| الاسم | العمر |\n|---|---|\n| علي | 30 |\n| سارة | 25 |\n"
    rows = lines_of(layout_markdown(md, RTL_STYLE))
    assert len(rows) == 3
    header = texts_by_x(rows[0])
    assert [s for _, s in header] == ["العمر", "الاسم"]  # first column at the right
    assert [s for _, s in texts_by_x(rows[1])] == ["30", "علي"]
    rects = [op for op in rows[0].ops if op[0] == RECT]
    assert max(op[3] for op in rects) == RTL_STYLE.column_width - 1  # grid hugs the right edge
    assert min(op[1] for op in rects) > 300  # a narrow table does not span the column
    first_col = max(rects, key=lambda op: op[1])
    assert header[1][0] > first_col[1]  # "الاسم" inside the rightmost cell
    (page,) = render_markdown(md, RTL_STYLE)
    cols = ink_cols(page)
    assert cols.max() == RTL_STYLE.margin + RTL_STYLE.column_width - 1 and cols.min() > 300
    # a Latin table keeps its first column at the left
    ltr = lines_of(layout_markdown("| name | age |\n|---|---|\n| Ali | 30 |\n", RTL_STYLE))
    assert [s for _, s in texts_by_x(ltr[0])] == ["name", "age"]
    assert min(op[1] for op in ltr[0].ops if op[0] == RECT) == 0


def test_mixed_document_decides_per_block():
    md = (
        "# English title\n\nAn English paragraph.\n\n- English item\n\n"
        "# عنوان\n\nفقرة عربية قصيرة.\n\n- عنصر\n\n2024\n\nBack to English.\n"
    )
    style = dataclasses.replace(RTL_STYLE, height=800)
    (page,) = render_markdown(md, style)
    assert page.text == md
    (placed,), _ = paginate(layout_markdown(md, style), 1, style.column_height)
    bands = [(y, it) for _, y, it in placed.items if any(op[0] == TEXT for op in it.ops)]
    assert len(bands) == 8
    dark = ink(page)
    edges = []
    for y, it in bands:
        cols = np.flatnonzero(dark[10 + y : 10 + y + it.height].any(axis=0))
        edges.append((cols.min(), cols.max()))
    for k in (0, 1, 2, 7):  # English heading, paragraph, list item, last paragraph: left
        assert edges[k][0] < 50 and edges[k][1] < 400, (k, edges[k])
    for k in (3, 4, 5, 6):  # Arabic heading, paragraph, list item, and "2024" after them: right
        assert edges[k][0] > 300 and edges[k][1] > 570, (k, edges[k])
    assert texts_by_x(bands[2][1])[0][1] == "•"  # English list: bullet left of the text
    assert texts_by_x(bands[5][1])[-1][1] == "•"  # Arabic list: bullet right of the text


def test_direction_option_forces_the_base_direction():
    md = "مرحبا بالعالم\n\n- عنصر\n\n| أ | ب |\n|---|---|\n| 1 | 2 |\n"
    ltr = dataclasses.replace(RTL_STYLE, direction="ltr")
    (page,) = render_markdown(md, ltr)
    assert ink_cols(page).min() < 40 and ink_cols(page).max() < 300  # all on the left
    items = lines_of(layout_markdown(md, ltr))
    assert texts_by_x(items[1])[0][1] == "•"
    assert [s for _, s in texts_by_x(items[2])] == ["أ", "ب"]
    (page,) = render_text("مرحبا بالعالم", ltr)
    assert ink_cols(page).min() < 20 and ink_cols(page).max() < 300
    rtl = dataclasses.replace(RTL_STYLE, direction="rtl")
    for render in (render_text, render_markdown):
        (page,) = render("Hello world.", rtl)
        cols = ink_cols(page)
        assert cols.max() >= 585 and cols.min() > 300
    assert [s for _, s in texts_by_x(layout_text("Hello world.", rtl)[0])] == [".", "Hello world"]
    assert "".join(ch for ch, _, _ in glyph_centers("Hello world.", rtl)[0]) == ".Helloworld"


def test_code_blocks_stay_left_to_right():
    md = "فقرة\n\n```\n# تعليق\nx = 1\n```\n"
    for direction in ("auto", "rtl"):
        style = dataclasses.replace(RTL_STYLE, direction=direction)
        items = lines_of(layout_markdown(md, style))
        code = [it for it in items if md[it.start] in "#x"]
        assert len(code) == 2
        for it in code:
            assert texts_by_x(it)[0][0] == max(2, 16 // 3), direction  # from the code padding
        assert texts_by_x(code[0])[0][1] == "#"


def test_neutral_block_takes_the_previous_blocks_direction():
    items = layout_text("123\nمرحبا\n456\nabc\n789", RTL_STYLE)
    xs = [texts_by_x(it)[0][0] for it in items]
    assert xs[0] == 0 and xs[3] == 0 and xs[4] == 0  # document start, and after Latin: LTR
    assert xs[1] > 300 and xs[2] > 300  # after Arabic: right-aligned


@pytest.mark.parametrize("direction", ["auto", "rtl"])
def test_rtl_glyph_centres_lie_in_the_ink(direction):
    style = dataclasses.replace(SMALL, direction=direction)
    text = "مرحبا بالعالم (نص) 123\nשלום עולם\nكتاب [x] جديد."
    (page,) = render_text(text, style)
    (glyphs,) = glyph_centers(text, style)
    assert sorted(ch for ch, _, _ in glyphs) == sorted(text.replace(" ", "").replace("\n", ""))
    dark = ink(page)
    for ch, x, y in glyphs:
        y0 = int(y)
        band = dark[max(0, y0 - 12) : y0 + 8]
        cols = np.flatnonzero(band.any(axis=0))
        assert cols.min() - 1 <= x <= cols.max() + 1, ch  # inside the line's drawn ink
        assert x > 320 / 2, ch  # right-aligned short lines
        x0 = int(x)
        assert band[:, max(0, x0 - 6) : x0 + 7].any(), ch  # ink next to the centre


def test_rtl_pagination_keeps_every_character_once():
    para = "يحول النظام النص الطويل إلى صور صفحات ثم يقرأ النص من جديد (بدقة 97%). "
    text = "\n".join(f"{i}. {para * (1 + i % 3)}" for i in range(30))
    for style in (SMALL, dataclasses.replace(SMALL, columns=2, column_gap=12)):
        pages = render_text(text, style)
        assert len(pages) > 3 and joined(pages) == text
        assert len(glyph_centers(text, style)) == len(pages)
        for p in pages:
            cols = ink_cols(p)
            assert cols.min() >= style.margin - 1 and cols.max() <= 320 - style.margin
    md = "\n\n".join(
        f"## قسم {i}\n\n{para * 3}\n\n- {para}\n- بند\n\n> {para}\n\n"
        "| عمود | قيمة |\n|---|---|\n| أ | 1 |\n| ب | 2 |"
        for i in range(8)
    )
    for style in (SMALL, dataclasses.replace(SMALL, direction="rtl", columns=2)):
        pages = render_markdown(md, style)
        assert len(pages) > 3 and joined(pages) == md
    english = PROSE * 40
    pages = render_text(english, dataclasses.replace(SMALL, direction="rtl"))
    assert len(pages) > 1 and joined(pages) == english
