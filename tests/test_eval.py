"""dsocr eval: page-set manifests, peers, evaluate() and the Markdown report.

The end-to-end test renders three clean English pages, runs the tiny random-weight dsocr model
and Tesseract over them, and checks the report. Only the Tesseract-specific checks skip when
tesserocr or the English traineddata is absent (apt-get install tesseract-ocr tesseract-ocr-eng;
pip install tesserocr).
"""

import json
import math

import pytest
from PIL import Image

import dsocr
from dsocr.configs import Mode
from dsocr.eval.datasets import load_pages, rendered_pages, sha256_file, write_set
from dsocr.eval.peers import DsocrPeer, Peer, RapidOCRPeer, TesseractPeer, join_lines, make_peers
from dsocr.eval.run import (
    ReportRow,
    evaluate,
    report_markdown,
    score,
    standing_lines,
    write_report,
)
from dsocr.vision.preprocess import valid_image_tokens

TEST_BASE = Mode("test-base", 128, 128)

TEXTS = [
    (
        "test:gpl",
        "The licenses for most software and other practical works are designed\n"
        "to take away your freedom to share and change the works. By contrast,\n"
        "the GNU General Public License is intended to guarantee your freedom to\n"
        "share and change all versions of a program to make sure it remains free\n"
        "software for all its users. We, the Free Software Foundation, use the\n"
        "GNU General Public License for most of our software.",
    ),
    (
        "test:apt",
        "The apt command line tool installs, upgrades and removes packages.\n"
        "Run apt update to refresh the package index from the configured sources,\n"
        "then apt upgrade to install newer versions of every installed package.\n"
        "Packages that are no longer needed can be removed with apt autoremove,\n"
        "and apt show prints the description and dependencies of a package.",
    ),
    (
        "test:python",
        "Python is an easy to learn, powerful programming language. It has\n"
        "efficient high-level data structures and a simple but effective approach\n"
        "to object-oriented programming. Its elegant syntax and dynamic typing,\n"
        "together with its interpreted nature, make it an ideal language for\n"
        "scripting and rapid application development in many areas.",
    ),
]


@pytest.fixture(scope="module")
def page_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "rendered-test"
    write_set(out, rendered_pages(TEXTS, n_pages=3, seed=0, chars_per_page=1500))
    return out


def test_manifest_roundtrip_and_checksum(page_set):
    pages = load_pages(page_set)
    assert len(pages) == 3 and all(p.dataset == "rendered-test" for p in pages)
    rows = [json.loads(x) for x in (page_set / "manifest.jsonl").read_text().splitlines()]
    assert set(rows[0]) == {"id", "image", "text", "source", "sha256"}
    assert {p.source for p in pages} == {s for s, _ in TEXTS}
    assert all(p.sha256 == sha256_file(p.image_path) for p in pages)
    assert len(load_pages(page_set, limit=2)) == 2
    # Same seed, same pages.
    again = rendered_pages(TEXTS, n_pages=3, seed=0)
    assert [t for _, _, t, _ in again] == [p.text for p in pages]


def test_changed_image_is_an_error(tmp_path):
    write_set(tmp_path, [("a", Image.new("RGB", (8, 8), "white"), "x", "s")])
    Image.new("RGB", (8, 8), "black").save(tmp_path / "images" / "a.png")
    with pytest.raises(ValueError, match="sha256"):
        load_pages(tmp_path)


def test_join_lines_orders_boxes_top_to_bottom_left_to_right():
    def box(x0, y0, x1, y1):
        return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]

    boxes = [
        box(200, 52, 300, 70),
        box(10, 10, 100, 30),
        box(10, 50, 150, 70),
        box(120, 11, 180, 29),
    ]
    assert join_lines(boxes, ["d", "a", "c", "b"]) == "a b\nc d"


def test_score_perfect_and_empty():
    s = score("hello world", "hello  world\n")
    assert s["cer"] == 0 and s["wer"] == 0 and s["fox_precision"] == 1 and s["text_edit"] == 0
    assert score("", "hello")["cer"] == 1


def test_unavailable_peer_gets_a_skipped_row(page_set):
    class Missing:
        name = "missing"

        def available(self):
            return False, "not installed"

        def ocr(self, image):
            raise AssertionError("must not be called")

    (row,) = evaluate([Missing()], load_pages(page_set))
    assert row.skipped == "not installed" and row.pages == 0
    assert "skipped: not installed" in report_markdown([row])


def test_make_peers():
    peers = make_peers("tesseract, rapidocr")
    assert [p.name for p in peers] == ["tesseract", "rapidocr"]
    assert all(isinstance(p, Peer) for p in peers)
    assert isinstance(peers[1], RapidOCRPeer)
    with pytest.raises(ValueError, match="unknown"):
        make_peers("tesseract,nope")


def test_end_to_end_tiny_model_and_tesseract(page_set, tmp_path):
    pages = load_pages(page_set)
    tiny = DsocrPeer(
        dsocr.load_model("tiny", device="cpu"), mode=TEST_BASE, max_new_tokens=8, name="dsocr-tiny"
    )
    tess = TesseractPeer()
    tess_ok, why = tess.available()
    rows = evaluate([tiny, tess], pages)
    assert [r.peer for r in rows] == ["dsocr-tiny", "tesseract"]

    row = rows[0]
    assert row.pages == 3 and not row.skipped
    for v in (row.cer, row.wer, row.fox_precision, row.text_edit, row.s_per_page):
        assert math.isfinite(v)
    assert len(row.per_page) == 3

    report = write_report(rows, tmp_path / "eval.md", command="dsocr eval --test")
    md = report.read_text()
    assert "dsocr eval --test" in md and "Machine:" in md and "Date:" in md
    tokens = valid_image_tokens(*pages[0].load_image().size, TEST_BASE)
    assert row.mode == TEST_BASE.name and row.vision_tokens == tokens
    assert md.count(f"| dsocr-tiny | {TEST_BASE.name} | {tokens} | 3 |") == 1
    assert "### rendered-test" in md and "eval_tokens.png" in md
    assert (tmp_path / "eval_tokens.png").stat().st_size > 1000

    if not tess_ok:
        pytest.skip(f"Tesseract unavailable: {why}")
    trow = rows[1]
    assert trow.pages == 3 and not trow.skipped
    assert trow.cer < 0.05, trow.per_page
    assert "| tesseract | — | — | 3 |" in md
    assert "## Where dsocr stands" in md and "rendered-test, dsocr-tiny in" in md


def test_report_without_rows_numbers_is_markdown(tmp_path):
    rows = [
        ReportRow(
            "p", "d", pages=1, cer=0.1, wer=0.2, fox_precision=0.9, text_edit=0.1, s_per_page=1.5
        )
    ]
    md = report_markdown(rows, command="x")
    assert "| p | — | — | 1 | 0.1000 | 0.2000 | 0.9000 | 0.1000 | 1.50 |" in md
    assert "Where dsocr stands" not in md  # no dsocr row to place


def test_standing_lines_per_mode():
    def row(peer, mode, cer, tokens=math.nan):
        return ReportRow(peer, "d", mode=mode, vision_tokens=tokens, pages=1, cer=cer)

    rows = [
        row("dsocr:m", "tiny", 0.05, 64),
        row("dsocr:m", "large", 0.01, 400),
        row("tesseract", "", 0.02),
        row("rapidocr", "", 0.03),
    ]
    tiny, large = standing_lines(rows)
    assert "in tiny (64 vision tokens, within 256 vision tokens)" in tiny
    assert "tesseract 0.0200 (dsocr worse), rapidocr 0.0300 (dsocr worse)" in tiny
    assert "does not beat every peer" in tiny
    assert "above 256 tokens" in large and "it beats every peer on CER" in large


def test_main_writes_report_and_json(page_set, tmp_path, capsys):
    from dsocr.eval.run import main

    out = tmp_path / "r.md"
    args = ["--dataset", str(page_set), "--model", "tiny", "--device", "cpu", "--mode", "tiny"]
    args += [
        "--max-new-tokens",
        "4",
        "--limit",
        "1",
        "-o",
        str(out),
        "--json",
        str(tmp_path / "r.json"),
    ]
    assert main(args) == 0
    assert "| dsocr:tiny | tiny | " in out.read_text()
    (row,) = json.loads((tmp_path / "r.json").read_text())
    assert row["pages"] == 1 and len(row["per_page"]) == 1
    assert row["mode"] == "tiny" and row["vision_tokens"] == row["per_page"][0]["vision_tokens"]
    args[args.index("--mode") + 1] = "tiny,small"
    assert main(args) == 0
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [r["mode"] for r in rows] == ["tiny", "small"]
    assert rows[0]["vision_tokens"] < rows[1]["vision_tokens"]
    assert main(["--dataset", str(page_set)]) == 2
