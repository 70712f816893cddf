"""dsocr eval: page-set manifests, peers, evaluate() and the Markdown report.

The end-to-end test renders three clean English pages, runs the tiny random-weight dsocr model
and Tesseract over them, and checks the report. Only the Tesseract-specific checks skip when
tesserocr or the English traineddata is absent (apt-get install tesseract-ocr tesseract-ocr-eng;
pip install tesserocr).
"""

import json
import math
import shlex

import pytest
from conftest import text_pdf
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
    assert set(rows[0]) == {"id", "image", "text", "source", "sha256", "text_sha256"}
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


def test_report_adds_table_teds_only_for_sets_with_tables(tmp_path):
    table = "| a | b |\n|---|---|\n| 1 | 2 |\n"
    ids = [("plain", "hello world"), ("tab", f"# T\n\n{table}")]
    root = write_set(
        tmp_path / "set", [(i, Image.new("RGB", (32, 32), "white"), t, "") for i, t in ids]
    )

    class Echo:  # reads the table page's table, with one cell wrong
        name = "echo"

        def available(self):
            return True, ""

        def ocr(self, image):
            return "<table><tr><td>a</td><td>b</td></tr><tr><td>1</td><td>3</td></tr></table>"

    (row,) = evaluate([Echo()], load_pages(root))
    assert row.table_pages == 1 and row.table_teds == pytest.approx(1 - 1 / 6)
    assert [("table_teds" in r) for r in row.per_page] == [False, True]
    md = report_markdown([row, ReportRow("off", "other", pages=1, cer=0.5)])
    assert "| text edit | table TEDS | s/page |" in md and "| 0.8333 (1 page) |" in md
    other = md[md.index("### other") :]
    assert "table TEDS" not in other and "| off | — | — | 1 | 0.5000 |" in other


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
    assert "; not run" not in tiny + large
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
    (row,) = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert row["pages"] == 1 and len(row["per_page"]) == 1
    assert row["mode"] == "tiny" and row["vision_tokens"] == row["per_page"][0]["vision_tokens"]
    args[args.index("--mode") + 1] = "tiny,small"
    assert main(args) == 0
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [r["mode"] for r in rows] == ["tiny", "small"]
    assert rows[0]["vision_tokens"] < rows[1]["vision_tokens"]
    assert main(["--dataset", str(page_set), "--model", "none"]) == 2


# --------------------------------------------------------------------------------------------
# Manifests: checksums of image and ground truth, one-line errors naming file and line


def _rows(folder):
    return [json.loads(x) for x in (folder / "manifest.jsonl").read_text().splitlines()]


def _write_rows(folder, rows, raw_line2=None):
    lines = [json.dumps(r) for r in rows]
    if raw_line2 is not None:
        lines.insert(1, raw_line2)
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")


def _small_set(folder, n=2):
    items = [(f"p{i}", Image.new("RGB", (8, 8), "white"), f"text {i}", "s") for i in range(n)]
    write_set(folder, items)
    return folder


def test_changed_ground_truth_is_an_error(tmp_path):
    rows = _rows(_small_set(tmp_path / "set"))
    rows[1]["text"] = "another text"
    _write_rows(tmp_path / "set", rows)
    with pytest.raises(ValueError, match=r"manifest\.jsonl:2: ground-truth text differs"):
        load_pages(tmp_path / "set")


def test_bad_manifests_are_one_line_errors_naming_file_and_line(tmp_path):
    folder = _small_set(tmp_path / "set")
    rows = _rows(folder)
    _write_rows(folder, rows, raw_line2="{bad json")
    with pytest.raises(ValueError, match=r"manifest\.jsonl:2: bad JSON"):
        load_pages(folder)
    no_sha = [dict(rows[0]), rows[1]]
    del no_sha[0]["sha256"]
    _write_rows(folder, no_sha)
    with pytest.raises(ValueError, match=r"manifest\.jsonl:1: missing .*sha256"):
        load_pages(folder)
    _write_rows(folder, [rows[0], rows[0]])
    with pytest.raises(ValueError, match=r"manifest\.jsonl:2: duplicate page id 'p0'"):
        load_pages(folder)
    # a file that is no image, with a matching checksum
    (folder / "images" / "p1.png").write_bytes(b"not an image")
    rows[1]["sha256"] = sha256_file(folder / "images" / "p1.png")
    _write_rows(folder, rows)
    with pytest.raises(ValueError, match=r"manifest\.jsonl:2: .*not a readable image"):
        load_pages(folder)
    (folder / "manifest.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no pages"):
        load_pages(folder)


@pytest.mark.parametrize("limit", [0, -1])
def test_limit_below_one_is_refused(page_set, limit):
    with pytest.raises(ValueError, match="limit"):
        load_pages(page_set, limit=limit)


def test_write_set_replaces_an_earlier_larger_set(tmp_path):
    _small_set(tmp_path / "set", n=3)
    _small_set(tmp_path / "set", n=1)
    assert sorted(p.name for p in (tmp_path / "set" / "images").iterdir()) == ["p0.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["set"]  # no temporary folders left
    assert len(load_pages(tmp_path / "set")) == 1


def test_datasets_with_the_same_name_are_refused(tmp_path):
    from dsocr.eval.datasets import load_datasets

    a = _small_set(tmp_path / "a" / "rendered-en")
    b = _small_set(tmp_path / "b" / "rendered-en")
    with pytest.raises(ValueError, match="two datasets are named 'rendered-en'"):
        load_datasets([a, b])
    assert len(load_datasets([a, _small_set(tmp_path / "other")])) == 4


# --------------------------------------------------------------------------------------------
# Held-out PDF pages: overlap of text-layer lines with the corpus splits


def lines_pdf(path, pages: list[list[str]]):
    """One Letter page per list of lines (Helvetica 10 pt)."""
    return text_pdf(path, pages, font_size=10, leading=14, top=740)


def _sentence(tag, k):
    return f"{tag} sentence number {k} says something long enough"


@pytest.fixture
def overlap_pdf(tmp_path):
    """Pages 1-6: train text, held-out text (x3, one with one train line), mixed, unknown text;
    a corpus folder whose train/heldout rows hold those sentences in other line breaks."""
    pytest.importorskip("pypdfium2")
    train = [_sentence("Trained", k) for k in range(12)]
    held = [_sentence("Heldout", k) for k in range(20)]
    pages = [
        train[0:4],  # 1: train
        held[0:4],  # 2: held-out
        held[4:8] + ["short line"],  # 3: held-out; the short line is not measured
        held[8:11] + train[4:5],  # 4: held-out but one train line
        held[11:13] + train[5:9],  # 5: mixed -> not held-out
        [_sentence("Nowhere", k) for k in range(4)],  # 6: in neither split
        held[13:17],  # 7: held-out
    ]
    pdf = lines_pdf(tmp_path / "doc.pdf", pages)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    # the corpus wraps lines differently and adds spaces: matching is whitespace-normalised
    (corpus / "train.jsonl").write_text(
        json.dumps({"text": "intro\n" + "  ".join(train) + "\nend", "lang": "en"}) + "\n"
    )
    (corpus / "heldout.jsonl").write_text(
        "".join(
            json.dumps({"text": "\n".join(held[i : i + 5]), "lang": "en"}) + "\n"
            for i in range(0, 20, 5)
        )
    )
    return pdf, corpus


def test_pdf_line_overlap_counts_train_and_heldout_lines(overlap_pdf):
    from dsocr.eval.datasets import pdf_line_overlap

    pdf, corpus = overlap_pdf
    got = [(o.page, o.lines, o.train, o.heldout) for o in pdf_line_overlap(pdf, corpus)]
    assert got == [
        (1, 4, 4, 0),
        (2, 4, 0, 4),
        (3, 4, 0, 4),
        (4, 4, 1, 3),
        (5, 6, 4, 2),
        (6, 4, 0, 0),
        (7, 4, 0, 4),
    ]
    assert [o.page for o in pdf_line_overlap(pdf, corpus, pages=[4, 2])] == [2, 4]
    with pytest.raises(ValueError, match="1-based"):
        pdf_line_overlap(pdf, corpus, pages=[0])
    with pytest.raises(ValueError, match="has 7 pages"):
        pdf_line_overlap(pdf, corpus, pages=[99])


def test_select_heldout_pages_is_deterministic_and_spread(overlap_pdf):
    from dsocr.eval.datasets import select_heldout_pages

    pdf, corpus = overlap_pdf
    # zero-train pages first: 2, 3, 7 (page 4 has one train line)
    assert [o.page for o in select_heldout_pages(pdf, corpus, n=2)] == [2, 7]
    assert [o.page for o in select_heldout_pages(pdf, corpus, n=3)] == [2, 3, 7]
    # not enough zero-train pages: page 4 (one train line) joins
    assert [o.page for o in select_heldout_pages(pdf, corpus, n=10)] == [2, 3, 4, 7]
    assert [o.page for o in select_heldout_pages(pdf, corpus, n=4, max_train=0)] == [2, 3, 7]


def test_build_pdf_set_records_overlap_and_refuses_train_pages(overlap_pdf, tmp_path):
    from dsocr.eval.datasets import build_pdf_set

    pdf, corpus = overlap_pdf
    out = tmp_path / "pdf-test"
    build_pdf_set(out, pdf, corpus=corpus, n_pages=3, dpi=20, prefix="t", lang="en")
    rows = _rows(out)
    assert [r["id"] for r in rows] == ["t-p0002", "t-p0003", "t-p0007"]
    assert [r["train_overlap"] for r in rows] == [0, 0, 0]
    assert rows[0]["heldout_overlap"] == 4 and rows[0]["overlap_lines"] == 4
    assert rows[0]["lang"] == "en" and "Heldout sentence number 0" in rows[0]["text"]
    pages = load_pages(out)
    assert pages[0].lang == "en" and pages[0].source.endswith("doc.pdf#2")
    # explicit pages that are in the training text: refused, unless forced (then warned, recorded)
    with pytest.raises(ValueError, match=r"training corpus: 1 \(4/4 lines\), 5 \(4/6 lines\)"):
        build_pdf_set(out, pdf, pages=(1, 2, 5), corpus=corpus, dpi=20)
    assert len(load_pages(out)) == 3  # the earlier set is untouched
    with pytest.warns(UserWarning, match="recorded as train_overlap"):
        build_pdf_set(out, pdf, pages=(1, 2), corpus=corpus, dpi=20, allow_overlap=True)
    assert [r["train_overlap"] for r in _rows(out)] == [4, 0]


def test_build_script_validates_pages_and_fails_when_nothing_is_built(overlap_pdf, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    pdf, corpus = overlap_pdf
    script = Path(__file__).resolve().parents[1] / "scripts" / "build_eval_sets.py"

    def run(*args):
        cmd = [sys.executable, str(script), "--out", str(tmp_path / "out"), *args]
        return subprocess.run(cmd, capture_output=True, text=True)

    one = ["--sets", "pdf-debref-en", "--pdf", str(pdf), "--corpus-dir", str(corpus)]
    for pages, msg in [("0", "1-based"), ("99", "has 7 pages"), ("x", "not a page number")]:
        r = run(*one, "--pdf-pages", pages)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    r = run("--sets", "pdf-debref-en,pdf-debref-de", "--pdf", str(pdf))
    assert r.returncode == 2 and "one PDF set" in r.stderr
    r = run(*one[:4], "--corpus-dir", str(tmp_path / "nocorpus"))
    assert r.returncode == 1 and "no corpus" in r.stderr and "Traceback" not in r.stderr
    r = run("--sets", "pdf-debref-en", "--pdf", str(tmp_path / "absent.pdf"))
    assert r.returncode == 1 and "nothing was built" in r.stderr
    r = run(*one, "--pdf-n", "2")
    assert r.returncode == 0, r.stderr
    assert [x["id"] for x in _rows(tmp_path / "out" / "pdf-debref-en")] == [
        "debref-en-p0002",
        "debref-en-p0007",
    ]
    r = run(*one, "--pdf-pages", "1,2")
    assert r.returncode == 0 and "warning:" in r.stderr and "training corpus" in r.stderr


# --------------------------------------------------------------------------------------------
# Tesseract languages


def test_tesseract_language_follows_the_set_and_missing_packs_say_what_to_install(
    tmp_path, monkeypatch
):
    from dsocr.eval import peers

    (tmp_path / "eng.traineddata").write_bytes(b"")
    monkeypatch.setattr(peers, "_tessdata_dirs", lambda: [str(tmp_path)])
    assert peers.tesseract_lang("de") == "deu+eng" and peers.tesseract_lang("xx") == "eng"
    assert peers.tesseract_lang("zh-cn") == "chi_sim+eng" and peers.tesseract_lang("") == "eng"
    path, why = peers._find_tessdata("deu+eng")
    assert path is None and "deu.traineddata" in why and "tesseract-ocr-deu" in why
    assert "eng.traineddata" not in why and "\n" not in why
    assert peers._find_tessdata("chi_sim")[1].endswith("tesseract-ocr-chi-sim")
    assert peers._find_tessdata("eng") == (str(tmp_path), "")
    t = peers.TesseractPeer()
    pytest.importorskip("tesserocr")
    ok, why = t.use_language("fr")
    assert not ok and t.current_lang == "fra+eng" and "tesseract-ocr-fra" in why
    fixed = peers.TesseractPeer(lang="jpn")
    fixed.use_language("de")
    assert fixed.current_lang == "jpn"
    with pytest.raises(ValueError, match="bad Tesseract language"):
        make_peers("tesseract", tesseract_lang="eng;rm")


def test_peer_without_the_sets_language_is_skipped_for_that_set_only(tmp_path):
    write_set(tmp_path / "en", [("a", Image.new("RGB", (8, 8)), "x", "s")], lang="en")
    write_set(tmp_path / "de", [("a", Image.new("RGB", (8, 8)), "x", "s")], lang="de")

    class OnlyEnglish:
        name = "only-en"

        def available(self):
            return True, ""

        def use_language(self, lang):
            return (lang == "en", "" if lang == "en" else f"no pack for {lang}")

        def ocr(self, image):
            return "x"

    pages = load_pages(tmp_path / "en") + load_pages(tmp_path / "de")
    en, de = evaluate([OnlyEnglish()], pages)
    assert en.pages == 1 and en.cer == 0 and not en.skipped
    assert de.skipped == "no pack for de" and de.pages == 0


# --------------------------------------------------------------------------------------------
# dsocr eval: options checked before the model loads, outputs, standing, exit codes


@pytest.fixture
def no_model_load(monkeypatch):
    import dsocr.api

    def refuse(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(dsocr.api, "load_model", refuse)


@pytest.mark.parametrize(
    "extra, msg",
    [
        (["--mode", "huge"], "unknown mode 'huge'"),
        (["--mode", "tiny,huge"], "unknown mode 'huge'"),
        (["--mode", "tiny,tiny"], "named twice"),
        (["--limit", "0"], "--limit must be at least 1"),
        (["--limit", "-1"], "--limit must be at least 1"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--peers", "tesseract,nope"], "unknown peer"),
        (["--tesseract-lang", "deu"], "needs --peers tesseract"),
        (["--model", "/no/such/model"], "/no/such/model"),
        (["--model", "none"], "nothing to run"),
    ],
)
def test_bad_options_fail_in_one_line_before_the_model_loads(
    page_set, tmp_path, capsys, no_model_load, extra, msg
):
    from dsocr.cli import main

    args = ["eval", "--dataset", str(page_set), "--model", "tiny", "-o", str(tmp_path / "r.md")]
    assert main(args + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err
    assert not (tmp_path / "r.md").exists()


def test_bad_dataset_fails_in_one_line_before_the_model_loads(tmp_path, capsys, no_model_load):
    from dsocr.cli import main

    folder = _small_set(tmp_path / "set")
    (folder / "manifest.jsonl").write_text('{"id": "a"}\n')
    assert main(["eval", "--dataset", str(folder), "--model", "tiny"]) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert "manifest.jsonl:1: missing" in err


def test_default_model_is_dsocr_mini():
    from dsocr.cli import build_parser

    args = build_parser().parse_args(["eval", "--dataset", "x"])
    assert args.model == "dsocr-mini" and args.mode is None


def test_json_is_written_atomically_with_the_reports_run_info(page_set, tmp_path, monkeypatch):
    import sys

    from dsocr.cli import main

    prompt = "<image>\nFree `OCR`."
    argv = ["eval", "--dataset", str(page_set), "--model", "tiny", "--mode", "tiny"]
    argv += ["--max-new-tokens", "2", "--limit", "1", "--prompt", prompt]
    argv += ["-o", str(tmp_path / "a" / "r.md"), "--json", str(tmp_path / "new" / "dir" / "r.json")]
    monkeypatch.setattr(sys, "argv", ["dsocr", *argv])
    assert main(argv) == 0
    md = (tmp_path / "a" / "r.md").read_text()
    doc = json.loads((tmp_path / "new" / "dir" / "r.json").read_text())
    for key in ("machine", "date"):
        assert f"- {key.capitalize()}: {doc[key]}" in md
    assert doc["rows"][0]["pages"] == 1
    # the command is shell-quoted, and the report shows it in a fence that keeps the newline
    assert shlex.split(doc["command"]) == ["dsocr", *argv]
    fence = md.split("- Command:\n\n", 1)[1]
    assert fence.startswith("```sh\n") and "`OCR`" in fence
    block = fence.split("\n```\n", 1)[0].removeprefix("```sh\n")
    assert shlex.split(block) == ["dsocr", *argv]
    # nothing temporary left beside the outputs
    assert sorted(p.name for p in (tmp_path / "new" / "dir").iterdir()) == ["r.json"]
    assert all(not p.name.startswith(".") for p in (tmp_path / "a").iterdir())


def test_unavailable_requested_peer_gives_exit_3_and_is_named(
    page_set, tmp_path, monkeypatch, capsys
):
    from dsocr.eval import peers
    from dsocr.eval.run import main

    monkeypatch.setattr(peers.RapidOCRPeer, "available", lambda self: (False, "rapidocr gone"))
    args = ["--dataset", str(page_set), "--model", "tiny", "--mode", "tiny", "--limit", "1"]
    args += ["--max-new-tokens", "2", "--peers", "rapidocr", "-o", str(tmp_path / "r.md")]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "dsocr eval: peer not run: rapidocr on rendered-test: rapidocr gone" in err
    md = (tmp_path / "r.md").read_text()
    assert "not run: tesseract (not run), rapidocr (rapidocr gone)" in md
    assert "no peer ran, so its standing is not known" in md


def _row(peer, cer, mode="", tokens=math.nan, skipped=""):
    pages = 0 if skipped else 1
    return ReportRow(
        peer,
        "d",
        mode=mode,
        vision_tokens=tokens,
        pages=pages,
        cer=cer,
        skipped=skipped,
        s_per_page=0.5,
    )


def test_standing_never_claims_beating_a_peer_that_did_not_run():
    (line,) = standing_lines([_row("dsocr:m", 0.05, "tiny", 64), _row("tesseract", 0.10)])
    assert "beats every peer" not in line
    assert "tesseract 0.1000 (dsocr better); not run: rapidocr (not run)" in line
    assert "it beats tesseract on CER, but not every required peer ran" in line
    rows = [
        _row("dsocr:m", 0.05, "tiny", 64),
        _row("tesseract", 0.10),
        _row("rapidocr", math.nan, skipped="no onnxruntime"),
    ]
    (line,) = standing_lines(rows)
    assert "not run: rapidocr (no onnxruntime)" in line and "beats every peer" not in line
    (line,) = standing_lines([_row("dsocr:m", 0.05, "tiny", 64)])
    assert "not run: tesseract (not run), rapidocr (not run); no peer ran" in line


def test_standing_reports_ties_as_ties():
    rows = [_row("dsocr:m", 0.02, "tiny", 64), _row("tesseract", 0.02), _row("rapidocr", 0.03)]
    (line,) = standing_lines(rows)
    assert "tesseract 0.0200 (tie), rapidocr 0.0300 (dsocr better)" in line
    assert "it ties tesseract on CER, so it does not beat every peer" in line
    rows[1].cer = 0.03
    (line,) = standing_lines(rows)
    assert line.endswith("; it beats every peer on CER.")


def test_plots_clip_cer_above_one_and_say_so(tmp_path):
    pytest.importorskip("matplotlib")
    from dsocr.eval.run import _accuracy, plot, plot_tokens

    assert _accuracy(1.7) == (0.0, True) and _accuracy(0.25) == (0.75, False)
    rows = [_row("dsocr:m", 1.7, "tiny", 64), _row("dsocr:m", 0.5, "small", 100), _row("t", 0.1)]
    assert plot_tokens(rows, tmp_path / "sub" / "t.png").stat().st_size > 1000
    assert plot(rows, tmp_path / "s.png").stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.png", "sub"]


# ----------------------------------------------------------------------------------------------
# rendered-md-en: documentation HTML -> light Markdown -> rendered pages

DOC_HTML = """<html><head><title>T</title><script>x()</script></head><body>
<div id="banner"><a href="#"><span class="text">Download the ebook</span></a></div>
<ul class="docnav top"><li class="previous"><a href="a.html"><strong>Prev</strong></a></li>
<li class="next"><a href="b.html"><strong>Next</strong></a></li></ul>
<div class="sphinxsidebar"><h3>Table of Contents</h3><ul><li>side</li></ul></div>
<div class="body" role="main">
<h1>Chapter {n}. Sharing<a class="headerlink" href="#x">¶</a></h1>
<p>The <code class="literal">apt-get</code> tool and   <tt>dpkg</tt>
 share <em>the</em> same __init__ database; 5 * 3 ** 2.</p>
<h2>{n}.1. Steps</h2>
<ul><li>first step</li><li><div class="para">second step</div>
<ol><li>nested one</li><li>nested two</li></ol></li></ul>
<pre class="screen">$ sudo apt-get update
	indented | pipe</pre>
<table class="docutils"><thead><tr><th>package</th><th>size</th></tr></thead>
<tbody><tr><td><code>w3m</code></td><td>2828</td></tr><tr><td>a|b</td><td>1</td></tr></tbody>
</table>
<div class="tip"><table summary="Tip"><tr><td><img src="tip.png" alt="Tip"/></td></tr>
<tr><td><p>- not a list</p></td></tr></table></div>
{more}
</div>
<div class="navfooter"><table><tr><td><a href="p.html"><img alt="Prev"/></a></td>
<td>Chapter 5. Network setup</td></tr></table></div>
<div class="footer">© Copyright</div></body></html>"""

DOC_MD = (
    "# Chapter 1. Sharing\n\n"
    "The `apt-get` tool and `dpkg` share the same \\_\\_init\\_\\_ database; 5 * 3 \\*\\* 2.\n\n"
    "## 1.1. Steps\n\n"
    "- first step\n"
    "- second step\n"
    "  1. nested one\n"
    "  2. nested two\n\n"
    "```\n$ sudo apt-get update\n    indented | pipe\n```\n\n"
    "| package | size |\n| --- | --- |\n| `w3m` | 2828 |\n| a\\|b | 1 |\n\n"
    "\\- not a list"
)


def test_html_to_markdown_keeps_structure_and_drops_chrome():
    from dsocr.eval.datasets import html_to_markdown

    md = html_to_markdown(DOC_HTML.format(n=1, more=""))
    assert md == DOC_MD
    for chrome in ("Download", "Prev", "Next", "side", "Network setup", "Copyright", "¶", "x()"):
        assert chrome not in md


def test_html_to_markdown_renders_as_its_structure():
    from dsocr.eval.datasets import html_to_markdown
    from dsocr.render import PageStyle, render_markdown

    md = html_to_markdown(DOC_HTML.format(n=1, more=""))
    (page,) = render_markdown(md, PageStyle(font="sans", font_size=16, width=816, height=1056))
    assert page.text == md


def test_doc_html_path_follows_the_corpus_naming(tmp_path):
    from dsocr.eval.datasets import doc_html_path

    roots = {"debian-handbook": "/h", "debian-reference": "/r", "python3.11-doc": "/p"}
    assert str(doc_html_path("handbook/en-US/sect.backup", "debian-handbook", roots)) == (
        "/h/en-US/sect.backup.html"
    )
    assert str(doc_html_path("reference/en/ch06", "debian-reference", roots)) == "/r/ch06.en.html"
    assert str(doc_html_path("python/library/tty", "python3.11-doc", roots)) == (
        "/p/library/tty.html"
    )
    with pytest.raises(ValueError, match="unknown source"):
        doc_html_path("python/x", "nope", roots)


@pytest.fixture
def md_corpus(tmp_path):
    """A held-out corpus of three English documents (one French, one missing on disk, one from a
    plain-text source) whose HTML lies in a generated python3.11-doc folder."""
    root = tmp_path / "html"
    (root / "library").mkdir(parents=True)
    para = "<p>" + "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 6 + "</p>"
    rows = []
    for k in range(3):
        (root / "library" / f"doc{k}.html").write_text(
            DOC_HTML.format(n=k + 1, more=para * 4), encoding="utf-8"
        )
        rows.append({"doc": f"python/library/doc{k}", "lang": "en", "source": "python3.11-doc"})
    rows.append({"doc": "python/library/doc0", "lang": "fr", "source": "python3.11-doc"})
    rows.append({"doc": "python/library/gone", "lang": "en", "source": "python3.11-doc"})
    rows.append({"doc": "fortunes/en/wisdom/0", "lang": "en", "source": "fortunes"})  # no HTML
    corpus = tmp_path / "heldout.jsonl"
    corpus.write_text(
        "".join(json.dumps({**r, "group": r["doc"], "text": "x"}) + "\n" for r in rows)
    )
    return corpus, {"python3.11-doc": str(root)}


def test_build_markdown_set_ground_truth_is_the_page_markdown(md_corpus, tmp_path):
    from dsocr.eval.datasets import build_markdown_set
    from dsocr.render import PageStyle, render_markdown

    corpus, roots = md_corpus
    out = tmp_path / "rendered-md-en"
    m = build_markdown_set(out, corpus, n_pages=2, seed=0, roots=roots)
    pages = load_pages(m)
    assert len(pages) == 2
    rows = [json.loads(line) for line in m.read_text().splitlines()]
    style = PageStyle(font="sans", font_size=16, width=816, height=1056)
    for page, row in zip(pages, rows):
        assert row["lang"] == "en" and row["doc"].startswith("python/library/doc")
        assert row["source"].endswith(row["doc"].removeprefix("python/") + ".html")
        (drawn,) = render_markdown(page.text, style)
        assert drawn.text == page.text  # ground truth == the renderer's page text
        assert drawn.image.convert("RGB").tobytes() == page.load_image().tobytes()
        assert {"heading", "list", "table", "code"} <= set(row["structure"])
        assert "```" in page.text and "| --- |" in page.text and "\n- " in page.text
    again = build_markdown_set(tmp_path / "again", corpus, n_pages=2, seed=0, roots=roots)
    assert again.read_text() == m.read_text()  # deterministic for a seed


def test_markdown_pages_find_rare_tables_and_take_a_share_of_table_pages():
    from dsocr.eval.datasets import markdown_pages

    para = "<p>" + "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 8 + "</p>"
    table = "<table><tr><th>key</th><th>value</th></tr><tr><td>a</td><td>1</td></tr></table>"

    def doc(k, with_table):
        sections = [f"<h2>{k}.{s} Part</h2>{para}<pre>code {s}</pre>" for s in range(40)]
        if with_table:  # deep in the document, where one random start rarely lands
            sections[37] += table
        return (f"d{k}", f"d{k}.html", "<div>" + "".join(sections) + "</div>")

    docs = [doc(k, k in (1, 6)) for k in range(8)]  # the others have code: structure too
    pages = markdown_pages(docs, 3, seed=0, tries=1, table_share=0.7)
    assert {p[4]["doc"] for p in pages if "table" in p[4]["structure"]} == {"d1", "d6"}


def test_build_script_builds_or_skips_rendered_md(md_corpus, tmp_path, monkeypatch, capsys):
    import importlib.util
    from pathlib import Path

    import dsocr.eval.datasets as ds

    spec = importlib.util.spec_from_file_location(
        "build_eval_sets", Path(__file__).parent.parent / "scripts" / "build_eval_sets.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    corpus, roots = md_corpus
    argv = ["--sets", "rendered-md-en", "--out", str(tmp_path / "eval"), "--corpus", str(corpus)]
    monkeypatch.setattr(ds, "HTML_ROOTS", {"python3.11-doc": str(tmp_path / "none")})
    assert script.main([*argv, "--rendered", "2"]) == 1
    assert "skip rendered-md-en" in capsys.readouterr().err
    monkeypatch.setattr(ds, "HTML_ROOTS", roots)
    assert script.main([*argv, "--rendered", "2"]) == 0
    assert len(load_pages(tmp_path / "eval" / "rendered-md-en")) == 2
