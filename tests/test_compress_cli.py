"""dsocr compress / decompress / tokens: one-line errors (rc 2), style flags, CRLF, token columns."""

import hashlib
import json
import re

import pytest

import dsocr.api as api
from dsocr.cli import main

TEXT = "Optical compression keeps old context as pages of text. " * 3


@pytest.fixture()
def src(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text(TEXT)
    return p


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err, *parts):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsocr: error: "), err
    for part in parts:
        assert part in lines[0], (part, lines[0])


@pytest.mark.parametrize(
    "content,reason",
    [
        ("Linear B: \U00010000\n", "unknown script: no shipped font has"),
        ("x\x00y\n", "control character '\\x00'"),
        ("a\nb\x01\n", "line 2: control character '\\x01'"),
    ],
)
def test_cli_compress_names_the_file_of_unrenderable_text(tmp_path, capsys, content, reason):
    bad = tmp_path / "bad.txt"
    bad.write_text(content)
    code, out, err = _run(capsys, "compress", bad, "-o", tmp_path / "o")
    _one_line_error(code, err, f"{bad}: ", reason)
    assert not out and not (tmp_path / "o").exists()


def test_cli_output_paths_under_a_file_are_one_line_errors(tmp_path, capsys, src):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for out_dir, why in ((afile, "exists and is not a folder"), (afile / "sub", "cannot create")):
        code, _, err = _run(capsys, "compress", src, "-o", out_dir)
        _one_line_error(code, err, f"{out_dir}: {why}")
    assert afile.read_text() == "mine"
    assert _run(capsys, "compress", src, "-o", tmp_path / "c", "--model", "tiny")[0] == 0
    code, _, err = _run(capsys, "decompress", tmp_path / "c", "--model", "tiny", "-o", afile / "x")
    _one_line_error(code, err, f"{afile / 'x'}: ", "is a file, not a folder")
    code, _, err = _run(capsys, "decompress", tmp_path / "c", "--model", "tiny", "-o", tmp_path)
    _one_line_error(code, err, f"{tmp_path}: is a folder")


def test_cli_decompress_creates_the_output_folder(tmp_path, capsys, src, monkeypatch):
    assert _run(capsys, "compress", src, "-o", tmp_path / "c", "--model", "tiny")[0] == 0
    monkeypatch.setattr(api.OCR, "generate", lambda self, *a, **k: TEXT.strip())
    out = tmp_path / "new" / "dir" / "back.txt"
    argv = ["decompress", tmp_path / "c", "--model", "tiny", "--source", src, "-o", out]
    code, _, err = _run(capsys, *argv, "--device", "cpu")
    assert code == 0 and out.read_text() == TEXT.strip() + "\n"
    assert not list(out.parent.glob(".*.tmp"))
    # decompress reports the model tokenizer count of the manifest beside the V3 count
    n = len(TEXT.encode())  # the tiny variant's byte tokenizer: one token per byte
    assert f"(DeepSeek-V3, {n} tiny (byte tokenizer))" in err
    assert f"source: {n} text tokens with the decoding model's tokenizer" in err
    assert "precision 1.0000" in err


def test_cli_compress_direction_flag_mirrors_the_layout(tmp_path, capsys):
    src = tmp_path / "ar.txt"
    src.write_text("مرحبا بالعالم، هذه فقرة قصيرة.\n", encoding="utf-8")
    pages = {}
    for d in ("auto", "ltr", "rtl"):
        assert _run(capsys, "compress", src, "-o", tmp_path / d, "--direction", d)[0] == 0
        manifest = json.loads((tmp_path / d / "manifest.json").read_text())
        assert manifest["style"]["direction"] == d
        pages[d] = sorted((tmp_path / d).glob("*.png"))[0].read_bytes()
    assert pages["auto"] == pages["rtl"] != pages["ltr"]  # Arabic is right-to-left by itself


@pytest.mark.parametrize(
    "argv,reason",
    [
        (["--font-size", "0"], "--font-size must be > 0, got 0"),
        (["--font-size", "-4"], "--font-size must be > 0, got -4"),
        (["--line-height", "0"], "--line-height must be > 0, got 0.0"),
        (["--margin", "-1"], "--margin must be >= 0, got -1"),
        (["--margin", "300"], "style flags do not fit a tiny page"),
    ],
)
def test_cli_compress_rejects_bad_numbers(tmp_path, capsys, src, argv, reason):
    code, out, err = _run(capsys, "compress", src, "-o", tmp_path / "o", *argv)
    _one_line_error(code, err, reason)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("n", ["0", "-3"])
def test_cli_decompress_rejects_bad_max_new_tokens(tmp_path, capsys, src, n):
    assert _run(capsys, "compress", src, "-o", tmp_path / "c", "--model", "tiny")[0] == 0
    code, out, err = _run(capsys, "decompress", tmp_path / "c", "--max-new-tokens", n)
    _one_line_error(code, err, f"--max-new-tokens must be > 0, got {n}")


@pytest.mark.parametrize(
    "damage,reason",
    [
        (lambda t: t[:200], "manifest.json: not a readable dsocr-compress/1 manifest"),
        (lambda t: '{"format": "dsocr-compress/1"}', "manifest.json: damaged"),
    ],
)
def test_cli_decompress_reports_a_damaged_manifest(tmp_path, capsys, src, damage, reason):
    assert _run(capsys, "compress", src, "-o", tmp_path / "c", "--model", "tiny")[0] == 0
    path = tmp_path / "c" / "manifest.json"
    path.write_text(damage(path.read_text()))
    code, out, err = _run(capsys, "decompress", tmp_path / "c", "--model", "tiny")
    _one_line_error(code, err, str(path), reason)


def test_cli_style_flag_changes_only_that_property(tmp_path, capsys, src):
    styles = {}
    for name, flags in (("plain", []), ("serif", ["--font", "serif"])):
        assert _run(capsys, "compress", src, "-o", tmp_path / name, *flags)[0] == 0
        styles[name] = json.loads((tmp_path / name / "manifest.json").read_text())["style"]
    assert styles["serif"] == {**styles["plain"], "font": "serif"}
    assert (styles["plain"]["font_size"], styles["plain"]["margin"]) == (10, 16)  # 512 px page
    # validated against the mode's page (1280 px), not an A4 page
    argv = ["compress", src, "--mode", "large", "--margin", "450", "-o", tmp_path / "l"]
    assert _run(capsys, *argv)[0] == 0
    large = json.loads((tmp_path / "l" / "manifest.json").read_text())["style"]
    assert (large["margin"], large["width"], large["font_size"]) == (450, 1280, 24)


def test_cli_crlf_file_hashes_as_its_decoded_text(tmp_path, capsys):
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"first line\r\nsecond line\r\n")
    assert _run(capsys, "compress", crlf, "-o", tmp_path / "c")[0] == 0
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["source_sha256"] == hashlib.sha256(crlf.read_bytes()).hexdigest()
    assert m["source_chars"] == len(crlf.read_bytes().decode("utf-8")) == 25
    from dsocr.compress import compress

    plain = compress("first line\nsecond line\n", "tiny")  # the CRs are not drawn
    page = (tmp_path / "c" / "page_0001.png").read_bytes()
    from dsocr.compress.codec import png_bytes

    assert page == png_bytes(plain.pages[0].image)


def test_cli_compress_prints_both_ratios_and_the_model_count(tmp_path, capsys, src):
    code, out, _ = _run(capsys, "compress", src, "-o", tmp_path / "c", "--model", "tiny")
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())["totals"]
    assert code == 0 and m["model_text_tokens"] == len(TEXT.encode())
    assert f"{m['text_tokens']} text tokens (DeepSeek-V3, {len(TEXT)} tiny)" in out
    assert f"{m['ratio']:.1f}x compression per grid token" in out
    assert f"{m['ratio_valid']:.1f}x per valid token" in out
    assert "64 vision tokens (64 valid, 73 placeholders)" in out
    # default --model: the bundled dsocr-mini's tokenizer.json, weights never loaded
    code, out, _ = _run(capsys, "compress", src, "-o", tmp_path / "d")
    d = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert code == 0 and isinstance(d["totals"]["model_text_tokens"], int)
    assert d["model_tokenizer"]["source"].endswith("dsocr-mini/tokenizer.json")
    assert f"{d['totals']['model_text_tokens']} dsocr-mini)" in out
    code, _, err = _run(capsys, "compress", src, "-o", tmp_path / "e", "--model", tmp_path)
    _one_line_error(code, err, f"{tmp_path}: no tokenizer.json")


def test_cli_tokens_shows_grid_tokens_and_validates_first(capsys):
    code, out, _ = _run(capsys, "tokens", "1920", "1280")
    assert code == 0 and out.splitlines()[0].split() == [
        "mode",
        "crops",
        "placeholders",
        "valid",
        "grid",
    ]
    assert re.search(r"gundam\s+3x2\s+893\s+\d+\s+856\n", out)
    assert re.search(r"tiny\s+1x1\s+73\s+64\s+64\n", out)
    assert re.search(r"small\s+1x1\s+111\s+100\s+100\n", out)
    for w, h in (("0", "0"), ("640", "-1")):
        code, out, err = _run(capsys, "tokens", w, h)
        assert not out  # nothing printed before the error
        _one_line_error(code, err, "width and height must be >= 1 px")
