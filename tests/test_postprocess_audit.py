"""Post-processing against official-style raw outputs: edges, malformed tags, crops, JSON."""

from __future__ import annotations

import json

from PIL import Image

from dsocr.pipeline.postprocess import (
    EOS,
    crop_figures,
    draw_layout,
    figure_links,
    grid_to_pixels,
    html_table_to_markdown,
    page_flags,
    parse_grounded,
    to_markdown,
)

W, H = 640, 480

PAGE = (
    "<|ref|>title<|/ref|><|det|>[[0, 0, 999, 40]]<|/det|>\n# Über die Größe — 概要\n\n"
    "<|ref|>sub_title<|/ref|><|det|>[[50, 50, 500, 70]]<|/det|>\n## 1.1 a < b | c\n\n"
    "<|ref|>text<|/ref|><|det|>[[900, 200, 100, 100]]<|/det|>\n"
    "Let \\(x \\coloneqq 1\\) and \\(y \\eqqcolon 2\\); |x| < 3.\n\n"
    "<|ref|>equation<|/ref|><|det|>[[100, 210, 900, 260]]<|/det|>\n\\[ a = b \\quad (2) \\]\n\n"
    "<|ref|>image<|/ref|><|det|>[[0, 300, 499, 600], [500, 300, 999, 999]]<|/det|>\n\n"
    "<|ref|>image<|/ref|><|det|>[[500, 500, 500, 600]]<|/det|>\n\n"
    "<|ref|>image_caption<|/ref|><|det|>[[100, 610, 899, 630]]<|/det|>\n"
    "<center>Figure 1</center>\n\n\n\n\n"
    "<|ref|>table<|/ref|><|det|>[[100, 650, 899, 800]]<|/det|>\n"
    "<table><tr><td>a|b</td><td></td></tr><tr><td>1</td><td>2</td></tr></table>\n\n"
    "<|ref|>text<|/ref|><|det|>[[100, 810, 899, 900]]<|/det|>\n- item 1\n- item 2\n\n"
)


def test_truncated_or_abandoned_ref_label_is_not_content():
    blocks = parse_grounded(PAGE + "<|ref|>tex", W, H)  # cut off by the token limit
    assert blocks[-1].text == "- item 1\n- item 2"
    md = to_markdown(blocks)
    assert md.endswith("- item 2") and "tex" not in md.splitlines()[-1]
    blocks = parse_grounded(
        "<|ref|>text<|ref|>title<|/ref|><|det|>[[5, 6, 7, 8]]<|/det|>\n# T", W, H
    )
    assert [(b.label, b.text) for b in blocks] == [("title", "# T")]
    # an unmatched ref followed by real lines keeps the lines (only the tag goes)
    blocks = parse_grounded("<|ref|>text\nReal content.", W, H)
    assert to_markdown(blocks) == "text\nReal content."


def test_unclosed_det_keeps_the_content_after_it():
    raw = (
        "<|ref|>text<|/ref|><|det|>[[1, 2, 3, 4]]\n2023 was good.\n\n"
        "<|ref|>text<|/ref|><|det|>[[1, 2, 3, 4], [5, 6, 7, 8]]\n- 1, 2\n- 3\n\n"
        "<|ref|>text<|/ref|><|det|>[[10, 20, 3"
    )
    blocks = parse_grounded(raw, W, H)
    assert [b.text for b in blocks] == ["2023 was good.", "- 1, 2\n- 3", ""]
    assert [b.boxes for b in blocks] == [[(1, 2, 3, 4)], [(1, 2, 3, 4), (5, 6, 7, 8)], []]


def test_realistic_page_markdown_boxes_and_crops():
    blocks = parse_grounded(PAGE + EOS, W, H)
    assert [b.label for b in blocks] == [
        "title", "sub_title", "text", "equation", "image", "image", "image_caption", "table", "text",
    ]  # fmt: skip
    assert blocks[0].pixel_boxes == [(0, 0, W, int(40 / 999 * H))]  # 999 -> the full size
    assert blocks[2].boxes == [(100, 100, 900, 200)]  # corners sorted
    assert blocks[4].pixel_boxes[1] == (int(500 / 999 * W), int(300 / 999 * H), W, H)
    page = Image.new("RGB", (W, H), "white")
    crops = crop_figures(page, blocks)
    assert [i for i, _ in crops] == [4, 4]  # the zero-width box of block 5 is skipped
    for (_, crop), box in zip(crops, blocks[4].pixel_boxes):
        assert crop.size == (box[2] - box[0], box[3] - box[1]) and min(crop.size) > 0
    links = figure_links(crops, page=3)
    md = to_markdown(blocks, links, html_tables_to_markdown=True)
    assert "<|" not in md and "\n\n\n" not in md
    assert "\\(x := 1\\) and \\(y =: 2\\); |x| < 3." in md
    assert "\\quad (2)" in md  # equation tags are kept (eval runner option only)
    assert "<center>Figure 1</center>" in md  # as the official image/PDF runners
    assert md.count("![](images/") == 2 and "![](images/3_0.jpg)\n\n![](images/3_1.jpg)" in md
    assert "| a\\|b |  |\n| --- | --- |\n| 1 | 2 |" in md
    assert md.startswith("# Über die Größe — 概要\n\n## 1.1 a < b | c\n\n")
    assert page_flags(PAGE + EOS) == [] and page_flags(PAGE) == ["truncated"]
    out = draw_layout(page, blocks)
    assert out.size == page.size and out.mode == "RGB"


def test_grid_rounding_matches_official_and_crops_stay_inside():
    # the official int(v / 999 * W) in floats: 63 / 999 * 111 = 6.999..., not 63 * 111 // 999 = 7
    assert grid_to_pixels((63, 0, 999, 999), 111, 50) == (6, 0, 111, 50)
    for size in [(1, 1), (2, 3), (999, 999), (3000, 7)]:
        raw = "<|ref|>image<|/ref|><|det|>[[0, 0, 999, 999], [998, 998, 999, 999], [0, 0, 0, 0]]"
        page = Image.new("RGB", size)
        blocks = parse_grounded(raw + "<|/det|>", *size)
        for _, crop in crop_figures(page, blocks):
            assert 0 < crop.size[0] <= size[0] and 0 < crop.size[1] <= size[1]


def test_block_json_is_strict_and_stable():
    raw = "<|ref|>text<|/ref|><|det|>[[nan, 1, inf, 4], [1e3, -5, 2000, 10.6]]<|/det|>\nx\n\n"
    raw += "<|ref|><|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\nempty ref"
    blocks = parse_grounded(raw, W, H)
    assert blocks[0].boxes == [(999, 0, 999, 11)] and blocks[1].label == "text"
    for b in blocks:
        d = json.loads(json.dumps(b.to_dict(), allow_nan=False))
        assert list(d) == ["label", "boxes", "pixel_boxes", "text", "span"]


def test_pipe_table_cases():
    assert html_table_to_markdown("<table><tr><td colspan='2'>h</td></tr></table>") is None
    assert html_table_to_markdown("<table><tr><td rowspan=2>h</td></tr></table>") is None
    assert html_table_to_markdown("<table><tr><td>a</td><td>b</td></tr><tr><td>1</td></tr>") is None
    got = html_table_to_markdown(
        "<table><thead><tr><th>A</th><th>B</th></tr></thead>"
        "<tbody><tr><td>x &amp; y</td><td>l1<br>l2</td></tr></tbody></table>"
    )
    assert got == "| A | B |\n| --- | --- |\n| x &amp; y | l1<br>l2 |"
