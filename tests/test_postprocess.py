"""Grounded-output parsing, Markdown, crops, layout drawing, loop heuristic (dsocr.pipeline)."""

from __future__ import annotations

from PIL import Image, ImageChops

from dsocr.pipeline.postprocess import (
    EOS,
    PAGE_SPLIT,
    Block,
    crop_figures,
    draw_layout,
    figure_links,
    fix_latex,
    html_table_to_markdown,
    is_repetition_loop,
    join_pages,
    page_flags,
    parse_boxes,
    parse_grounded,
    split_pages,
    strip_equation_tags,
    to_markdown,
)

W, H = 1000, 2000

# Hand-written in the official format: ref, det, "\n", content, "\n\n"; EOS at the end.
RAW = (
    "<|ref|>title<|/ref|><|det|>[[100, 40, 899, 80]]<|/det|>\n# 1 Introduction\n\n"
    "<|ref|>text<|/ref|><|det|>[[100, 100, 899, 200]]<|/det|>\n"
    "We define \\(f \\coloneqq g\\) and \\(h \\eqqcolon k\\).\n\n"
    "<|ref|>equation<|/ref|><|det|>[[150, 210, 850, 250]]<|/det|>\n"
    "\\[ E = mc^2 \\quad (1) \\]\n\n"
    "<|ref|>image<|/ref|><|det|>[[0, 300, 499, 600]]<|/det|>\n\n"
    "<|ref|>image_caption<|/ref|><|det|>[[100, 610, 899, 630]]<|/det|>\n"
    "<center>Figure 1: A cat.</center>\n\n"
    "<|ref|>table<|/ref|><|det|>[[100, 650, 899, 800]]<|/det|>\n"
    "<table><tr><td>a</td><td>b</td></tr><tr><td>1</td><td>2</td></tr></table>\n\n"
    "<|ref|>text<|/ref|><|det|>[[100, 820, 899, 860], [100, 870, 500, 900]]<|/det|>\n"
    "Two boxes, one paragraph.\n\n" + EOS
)


def test_parse_realistic_output():
    blocks = parse_grounded(RAW, W, H)
    assert [b.label for b in blocks] == [
        "title", "text", "equation", "image", "image_caption", "table", "text",
    ]  # fmt: skip
    title = blocks[0]
    assert title.boxes == [(100, 40, 899, 80)]
    assert title.pixel_boxes == [(100, 80, 899, 160)]  # int(v / 999 * size)
    assert title.text == "# 1 Introduction"
    assert RAW[title.span[0] : title.span[1]].startswith("<|ref|>title")
    assert RAW[title.span[0] : title.span[1]].endswith("# 1 Introduction")
    assert blocks[3].text == ""  # image blocks have empty content
    assert blocks[3].pixel_boxes == [(0, 600, 499, 1201)]
    assert blocks[5].text.startswith("<table>")
    assert blocks[6].boxes == [(100, 820, 899, 860), (100, 870, 500, 900)]
    assert EOS not in blocks[-1].text
    assert blocks[0].to_dict()["boxes"] == [[100, 40, 899, 80]]


def test_malformed_det_keeps_text():
    raw = (
        "<|ref|>text<|/ref|><|det|>[[10, 20, 30], [1, 2, 3, 4], [a, b, c, d]<|/det|>\nkept\n\n"
        "<|ref|>text<|/ref|><|det|>not a list<|/det|>\nalso kept\n\n"
        "<|ref|>text<|/ref|><|det|>[[900, 900, 100, 1200]]<|/det|>\nswapped\n\n"
        "<|ref|>sub_title<|/ref|>no det\n\n"
        "<|ref|>text<|/ref|><|det|>[[5, 6, 7"  # cut off by the token limit
    )
    blocks = parse_grounded(raw, W, H)
    assert [b.text for b in blocks] == ["kept", "also kept", "swapped", "no det", ""]
    assert blocks[0].boxes == [(1, 2, 3, 4)]
    assert blocks[1].boxes == []
    assert blocks[2].boxes == [(100, 900, 900, 999)]  # clamped and sorted
    assert blocks[3].label == "sub_title" and blocks[3].boxes == []
    assert blocks[4].boxes == []
    assert parse_boxes("[[1.6, 2, 3, 4]]") == [(2, 2, 3, 4)]
    assert parse_boxes("[1, 2, 3, 4]") == [(1, 2, 3, 4)]
    assert parse_boxes("[[nan, 1, 2, 3], [inf, 1, 2, 3]]") == []


def test_text_outside_refs():
    blocks = parse_grounded(
        "Preamble line.\n<|ref|>text<|/ref|><|det|>[[1,2,3,4]]<|/det|>\nbody", W, H
    )
    assert blocks[0] == Block("text", [], [], "Preamble line.", (0, 14))
    assert blocks[1].text == "body"
    free = parse_grounded("  Just plain OCR text.\n\nSecond paragraph." + EOS + "\n", W, H)
    assert len(free) == 1 and free[0].boxes == []
    assert free[0].text == "Just plain OCR text.\n\nSecond paragraph."
    assert parse_grounded("", W, H) == [] and parse_grounded(EOS, W, H) == []
    # stray tags never reach the text
    assert parse_grounded("a <|/det|> b", W, H)[0].text == "a  b"


def test_markdown_exact_small_case():
    raw = (
        "<|ref|>title<|/ref|><|det|>[[1, 1, 9, 9]]<|/det|>\n# Title\n\n"
        "<|ref|>image<|/ref|><|det|>[[0, 0, 499, 499]]<|/det|>\n\n"
        "<|ref|>text<|/ref|><|det|>[[1, 1, 9, 9]]<|/det|>\nLine one.\nLine two.\n\n\n\n" + EOS
    )
    blocks = parse_grounded(raw, W, H)
    md = to_markdown(blocks, {1: "0_0"})
    assert md == "# Title\n\n![](images/0_0.jpg)\n\nLine one.\nLine two."
    # an image block without a saved crop keeps no link
    assert to_markdown(blocks) == "# Title\n\nLine one.\nLine two."


def test_markdown_realistic_and_eval_options():
    blocks = parse_grounded(RAW, W, H)
    crops = crop_figures(Image.new("RGB", (W, H), "white"), blocks)
    links = figure_links(crops, page=3)
    assert links == {3: ["3_0"]}
    md = to_markdown(blocks, links)
    assert "<|ref|>" not in md and "<|det|>" not in md
    assert "\\(f := g\\) and \\(h =: k\\)" in md
    assert "![](images/3_0.jpg)" in md
    assert "<table><tr><td>a</td>" in md  # tables stay HTML by default
    assert "\\quad (1)" in md and "<center>" in md
    assert "\n\n\n" not in md
    clean = to_markdown(blocks, links, strip_eq_tags=True, remove_center=True)
    assert "\\[E = mc^2\\]" in clean
    assert "Figure 1: A cat." in clean and "<center>" not in clean


def test_latex_quirks():
    assert fix_latex(r"a \coloneqq b, c \eqqcolon d") == "a := b, c =: d"
    assert strip_equation_tags("x \\[ a=b \\quad (2.1) \\] y \\(z \\quad (3)\\)") == (
        "x \\[a=b\\] y \\(z \\quad (3)\\)"
    )
    assert strip_equation_tags("\\[\n a \\quad (4)\n\\]") == "\\[a\\]"


def test_simple_table_to_pipe_table():
    html = (
        "<table><thead><tr><td>Name</td><td>Value</td></tr></thead>"
        "<tbody><tr><td>a|b</td><td><b>1</b><br>2</td></tr>"
        "<tr><td>x &amp; y</td><td colspan='1'></td></tr></tbody></table>"
    )
    assert html_table_to_markdown(html) == (
        "| Name | Value |\n| --- | --- |\n| a\\|b | <b>1</b><br>2 |\n| x &amp; y |  |"
    )
    block = Block("table", [(1, 1, 2, 2)], [], "Caption\n" + html)
    md = to_markdown([block], html_tables_to_markdown=True)
    assert md.startswith("Caption\n\n| Name | Value |") and "<table>" not in md


def test_complex_tables_stay_html():
    span = "<table><tr><td rowspan=2>a</td><td>b</td></tr><tr><td>c</td></tr></table>"
    cspan = '<table><tr><td colspan="2">a</td></tr><tr><td>b</td><td>c</td></tr></table>'
    nested = "<table><tr><td><table><tr><td>x</td></tr></table></td></tr></table>"
    ragged = "<table><tr><td>a</td><td>b</td></tr><tr><td>c</td></tr></table>"
    for html in (span, cspan, nested, ragged):
        assert html_table_to_markdown(html) is None
        md = to_markdown([Block("table", text=html)], html_tables_to_markdown=True)
        assert md == html


def test_newline_collapsing():
    blocks = [Block("text", text="a\n\n\n\nb"), Block("text", text=""), Block("text", text="c")]
    assert to_markdown(blocks) == "a\n\nb\n\nc"


def test_crop_size_matches_scaled_box():
    img = Image.new("RGB", (800, 600), "white")
    blocks = parse_grounded(
        "<|ref|>text<|/ref|><|det|>[[0, 0, 999, 999]]<|/det|>\nno crop\n\n"
        "<|ref|>image<|/ref|><|det|>[[100, 200, 600, 700], [5, 5, 5, 900]]<|/det|>\n\n"
        "<|ref|>image<|/ref|><|det|>[[0, 0, 999, 999]]<|/det|>\n",
        800,
        600,
    )
    crops = crop_figures(img, blocks)
    assert [i for i, _ in crops] == [1, 2]  # the zero-width box is skipped
    x1, y1, x2, y2 = (
        int(100 / 999 * 800),
        int(200 / 999 * 600),
        int(600 / 999 * 800),
        int(700 / 999 * 600),
    )
    assert crops[0][1].size == (x2 - x1, y2 - y1)
    assert crops[1][1].size == (800, 600)
    rgba = crop_figures(Image.new("RGBA", (800, 600)), blocks)
    assert all(c.mode == "RGB" for _, c in rgba)


def test_draw_layout_same_size_and_changed():
    img = Image.new("RGB", (400, 300), "white")
    blocks = parse_grounded(RAW, *img.size)
    out = draw_layout(img, blocks)
    assert out.size == img.size and out.mode == "RGB"
    assert ImageChops.difference(out, img).getbbox() is not None
    assert img.getextrema() == ((255, 255), (255, 255), (255, 255))  # input untouched


def test_repetition_loop_heuristic():
    normal = " ".join(f"Sentence number {i} says something different." for i in range(200))
    assert not is_repetition_loop(normal)
    assert not is_repetition_loop("short " * 5)
    loop = normal[:500] + "the same phrase again and " * 300
    assert is_repetition_loop(loop)
    assert is_repetition_loop(loop[:-7])  # cut mid-unit by the token limit
    assert is_repetition_loop("intro\n" + "<tr><td></td></tr>" * 100)
    assert is_repetition_loop(normal + "." * 400)
    # a long table that ends properly is not a loop
    assert not is_repetition_loop("<table>" + "<tr><td>1</td></tr>" * 100 + "</table>")


def test_page_flags():
    assert page_flags(RAW) == []
    assert page_flags(RAW.replace(EOS, "")) == ["truncated"]
    assert page_flags(RAW.replace(EOS, ""), stopped_at_eos=True) == []
    looped = "<|ref|>text<|/ref|><|det|>[[1,2,3,4]]<|/det|>\n" + "again " * 200
    assert page_flags(looped) == ["truncated", "repetition_loop"]
    assert page_flags(EOS) == ["empty"]
    assert page_flags("plain text" + EOS) == ["ungrounded"]


def test_join_pages():
    joined = join_pages(["page one", "page two"])
    assert joined == "page one\n<--- Page Split --->\npage two"
    assert PAGE_SPLIT == "\n<--- Page Split --->\n"
    assert split_pages(joined) == ["page one", "page two"]
