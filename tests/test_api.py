"""Public API and CLI on the tiny variant; package-wide hygiene checks."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TEST_BASE
from PIL import Image

import dsocr
from dsocr.cli import main
from dsocr.language.tokenizer import Tokenizer, build_prompt_ids, byte_tokenizer
from dsocr.weights import save_checkpoint

PKG = Path(dsocr.__file__).parent


def _page(path, w=100, h=80):
    img = Image.new("RGB", (w, h), "white")
    img.save(path)
    return path


def test_load_variant_and_generate(tmp_path):
    ocr = dsocr.load_model("tiny", device="cpu")
    text = ocr.generate(_page(tmp_path / "p.png"), mode=TEST_BASE, max_new_tokens=5)
    assert isinstance(text, str)
    # The same call on the same weights is deterministic (greedy).
    assert text == ocr.generate(Image.open(tmp_path / "p.png"), mode=TEST_BASE, max_new_tokens=5)


def test_generate_matches_manual_pipeline(tiny_model, tmp_path):
    """OCR.generate = prompt expansion + encode + greedy loop, with nothing else mixed in."""
    tok = Tokenizer(byte_tokenizer())
    folder = save_checkpoint(tiny_model, tmp_path / "ckpt", tokenizer=tok)
    ocr = dsocr.load_model(folder, device="cpu")
    img = Image.open(_page(tmp_path / "p.png", 120, 70))
    inputs = ocr.preprocess(img, TEST_BASE)
    ids = build_prompt_ids(tok, "<image>\nFree OCR.", [inputs.num_tokens])
    assert ids[0] == tok.bos_id and ids.count(tok.image_id) == inputs.num_tokens
    with torch.no_grad():
        logits = tiny_model(torch.tensor([ids]), image_embeds=tiny_model.encode_images([inputs])[0])
    first = int(logits[0, -1].argmax())
    out = ocr.generate(img, "<image>\nFree OCR.", mode=TEST_BASE, max_new_tokens=1)
    expected = "" if first == tok.eos_id else tok.decode([first]).strip()
    assert out == expected


def test_run_many_equals_run_one_by_one(tmp_path):
    """Batched decoding (different images, budgets) returns what each image returns alone."""
    ocr = dsocr.load_model("tiny", device="cpu")
    images = []
    for i, (w, h) in enumerate([(100, 80), (140, 60), (90, 120)]):
        img = Image.new("RGB", (w, h), "white")
        img.paste((40 * i, 0, 0), (5, 5, 30 + 10 * i, 25))
        images.append(img)
    budgets = [6, 3, 9]
    many = ocr.run_many(images, mode=TEST_BASE, max_new_tokens=budgets, batch_size=2)
    for img, n, got in zip(images, budgets, many):
        alone = ocr.run(img, mode=TEST_BASE, max_new_tokens=n)
        assert got.token_ids == alone.token_ids and got.text == alone.text
    with pytest.raises(ValueError, match="2 max_new_tokens values for 3 images"):
        ocr.run_many(images, mode=TEST_BASE, max_new_tokens=[1, 2])


def test_checkpoint_defaults_fill_in_mode_and_task(tiny_model, tmp_path, capsys):
    """A checkpoint's meta.json "defaults" pick the mode/task the caller left out; explicit wins."""
    from dsocr.api import model_defaults

    meta = {"defaults": {"mode": "tiny", "task": "free", "other": 1}}
    folder = save_checkpoint(
        tiny_model, tmp_path / "ckpt", tokenizer=Tokenizer(byte_tokenizer()), meta=meta
    )
    assert model_defaults(folder) == {"mode": "tiny", "task": "free"}
    assert model_defaults("tiny") == {} and model_defaults(tmp_path / "nowhere") == {}
    src = _page(tmp_path / "p.png")
    (doc,) = dsocr.convert([src], str(folder), max_new_tokens=2, batch_size=1)
    assert (doc.mode, doc.task) == ("tiny", "free")
    (doc,) = dsocr.convert([src], str(folder), max_new_tokens=2, batch_size=1, mode=TEST_BASE)
    assert doc.task == "free" and doc.mode != "tiny"


def test_default_model_missing_is_a_clear_error(monkeypatch, tmp_path):
    import dsocr.api as api

    monkeypatch.setattr(api, "ASSETS", tmp_path)
    with pytest.raises(FileNotFoundError, match="bundled dsocr-mini weights are not in"):
        dsocr.load_model()


def test_cli_info_names_the_model_and_the_cpu_kernel(capsys):
    assert main(["info", "--model", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "(tiny)" in out and "cpu kernel: fewrow ok" in out


def test_cli_tokens(capsys):
    assert main(["tokens", "1920", "1280"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"gundam\s+3x2\s+893\s", out)
    assert re.search(r"tiny\s+1x1\s+73\s+64", out)


def test_cli_ocr_bad_files_are_one_line_errors_and_others_carry_on(tmp_path, capsys):
    from test_providers import png_header_only

    bad = [tmp_path / "broken.png", tmp_path / "empty.png", tmp_path / "notes.txt"]
    bad[0].write_bytes(b"\x89PNG not really")
    bad[1].write_bytes(b"")
    bad[2].write_text("not an image")
    bad.append(png_header_only(tmp_path / "bomb.png", 50_000, 50_000))  # never decoded
    good = _page(tmp_path / "good.png", 64, 64)
    args = ["ocr", *map(str, bad), str(good), "--model", "tiny", "--mode", "tiny"]
    code = main([*args, "--max-new-tokens", "2", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 1
    errors = [x for x in captured.err.splitlines() if x.startswith("dsocr: error: ")]
    assert len(errors) == len(bad)
    for path, line in zip(bad, errors):
        assert line.startswith(f"dsocr: error: {path}: ")
    assert f"==> {good} <==" in captured.out


def test_no_cuda_only_calls_in_package():
    offenders = []
    for f in PKG.rglob("*.py"):
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if re.search(
                r"\.cuda\(|torch\.cuda\.(?!is_available|set_device|device_count|get_device_name"
                r"|get_device_capability|is_bf16_supported)|device=['\"]cuda",
                line,
            ):
                offenders.append(f"{f.name}:{n}: {line.strip()}")
    assert not offenders


@pytest.mark.parametrize(
    "module,forbidden",
    [
        ("dsocr.vision.sam", ("dsocr.model", "dsocr.engine", "dsocr.api", "dsocr.cli")),
        (
            "dsocr.vision.preprocess",
            ("dsocr.model", "dsocr.engine", "dsocr.vision.sam", "dsocr.api"),
        ),
        ("dsocr.language.decoder", ("dsocr.model", "dsocr.engine", "dsocr.vision", "dsocr.api")),
        ("dsocr.language.tokenizer", ("torch", "dsocr.model", "dsocr.vision")),
        ("dsocr.model", ("dsocr.engine", "dsocr.api", "dsocr.cli")),
    ],
)
def test_imports_point_one_way(module, forbidden):
    code = (
        f"import sys, {module}; bad = [m for m in sys.modules if m.startswith({forbidden!r})];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cli_compress_then_decompress(tmp_path, capsys, monkeypatch):
    import dsocr.api as api

    src = tmp_path / "notes.txt"
    src.write_text("Optical compression keeps old context as pages of text. " * 3)
    assert main(["compress", str(src), "--mode", "tiny", "-o", str(tmp_path / "c")]) == 0
    assert "64 vision tokens" in capsys.readouterr().out
    assert (tmp_path / "c" / "manifest.json").is_file()
    # A perfect reader recovers the text exactly: precision 1.
    text = src.read_text().strip()
    monkeypatch.setattr(api.OCR, "generate", lambda self, *a, **k: text)
    out = tmp_path / "back.txt"
    args = ["decompress", str(tmp_path / "c"), "--model", "tiny", "--source", str(src), "-o"]
    assert main([*args, str(out), "--device", "cpu"]) == 0
    assert out.read_text().strip() == src.read_text().strip()
    assert "precision 1.0000" in capsys.readouterr().err


def test_run_reports_finish_reason_and_uses_the_official_ngram_ban(tmp_path, monkeypatch):
    import dsocr.api as api

    seen = {}
    real = api.Engine.generate

    def spy(self, requests, *a, **k):
        seen["params"] = requests[0].params
        return real(self, requests, *a, **k)

    monkeypatch.setattr(api.Engine, "generate", spy)
    ocr = dsocr.load_model("tiny", device="cpu")
    res = ocr.run(_page(tmp_path / "p.png"), mode=TEST_BASE, max_new_tokens=3)
    assert res.finish_reason in ("eos", "length") and res.num_generated_tokens <= 3
    p = seen["params"]
    assert (p.ngram_size, p.ngram_window) == (30, 90)  # the official single-image setting
    assert p.ngram_whitelist == frozenset({ocr.tokenizer.token_to_id(t) for t in ("<td>", "</td>")})


# --------------------------------------------------------------------------- loading checks


def test_the_bundled_model_loads_without_warnings():
    import warnings

    from dsocr.api import ASSETS, DEFAULT_MODEL

    if not (ASSETS / DEFAULT_MODEL / "config.json").is_file():
        pytest.skip("dsocr-mini weights are not bundled")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ocr = dsocr.load_model(device="cpu")  # config.json checks pass on the shipped model
    assert ocr.model.config.name == "mini-cpu" and len(ocr.tokenizer) == 384


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tiny_model, tmp_path):
    import shutil

    from dsocr.api import ASSETS

    mini = ASSETS / "dsocr-mini" / "tokenizer.json"  # ids up to 383; tiny has 320
    if not mini.is_file():
        pytest.skip("dsocr-mini is not bundled")
    folder = save_checkpoint(tiny_model, tmp_path / "ckpt")
    shutil.copy(mini, folder / "tokenizer.json")
    with pytest.raises(ValueError, match=r"tokenizer.json: token ids up to 383 do not fit .* 320"):
        dsocr.load_model(folder, device="cpu")
    assert main(["info", "--model", str(folder)]) == 2


def test_a_folder_without_tokenizer_json_warns_a_variant_name_does_not(tiny_model, tmp_path):
    import warnings

    folder = save_checkpoint(tiny_model, tmp_path / "ckpt")
    with pytest.warns(UserWarning, match="no tokenizer.json; using a byte tokenizer"):
        dsocr.load_model(folder, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dsocr.load_model("tiny", device="cpu")


def test_run_refuses_a_prompt_without_one_image_marker(tmp_path):
    ocr = dsocr.load_model("tiny", device="cpu")
    page = _page(tmp_path / "p.png")
    for prompt in ("Free OCR.", "<image><image>x"):
        with pytest.raises(ValueError, match="needs exactly 1 <image>"):
            ocr.run(page, prompt, mode=TEST_BASE, max_new_tokens=2)
    with pytest.raises(ValueError, match="needs no <image>"):
        ocr.run(None, "<image>\nFree OCR.", max_new_tokens=2)


# --------------------------------------------------------------------------- dsocr ocr


def _no_load(monkeypatch):
    import dsocr.api as api

    def refuse(*a, **k):
        raise AssertionError("the model must not load before the flags are checked")

    monkeypatch.setattr(api, "load_model", refuse)


@pytest.mark.parametrize(
    "flags,why",
    [
        (["--max-new-tokens", "0"], "--max-new-tokens must be > 0, got 0"),
        (["--max-new-tokens", "-5"], "--max-new-tokens must be > 0, got -5"),
        (["--prompt", "Hello"], "has 0 <image> marker(s)"),
        (["--prompt", "<image><image>x"], "has 2 <image> marker(s)"),
    ],
)
def test_cli_ocr_checks_flags_before_loading_the_model(tmp_path, capsys, monkeypatch, flags, why):
    _no_load(monkeypatch)
    page = _page(tmp_path / "p.png")
    assert main(["ocr", str(page), "--model", "tiny", *flags]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert why in captured.err


def _fake_result(finish_reason, text="Hiw", loop_period=None):
    from dsocr.engine.generate import Result

    return Result(0, [5, 6, 7], text, finish_reason, 10, 3, 0, 0, 0, 0, 0, loop_period)


@pytest.mark.parametrize(
    "reason,notice",
    [
        ("length", "stopped at the token limit (3 tokens) before the end of the page"),
        ("loop", "stopped by the loop detector (a 4-token block repeating)"),
        ("eos", None),
        ("stop", None),
    ],
)
def test_cli_ocr_says_on_stderr_when_a_page_did_not_end(
    tmp_path, capsys, monkeypatch, reason, notice
):
    import dsocr.api as api

    monkeypatch.setattr(api.OCR, "run", lambda self, *a, **k: _fake_result(reason, loop_period=4))
    page = _page(tmp_path / "p.png")
    assert main(["ocr", str(page), "--model", "tiny", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "Hiw\n"  # stdout: the text only
    if notice is None:
        assert captured.err == ""
    else:
        assert captured.err == f"dsocr: warning: {page}: {notice}" + (
            "; the text may be cut (raise --max-new-tokens)\n"
            if reason == "length"
            else "; the text ends early\n"
        )


def test_cli_ocr_of_a_pdf_reads_page_one_and_says_so(tmp_path, capsys, monkeypatch):
    from test_providers import blank_pdf

    import dsocr.api as api

    seen = []

    def run(self, image, *a, **k):
        seen.append(image)
        return _fake_result("eos")

    monkeypatch.setattr(api.OCR, "run", run)
    pdf = blank_pdf(tmp_path / "doc.pdf", 2, size=(100, 80))
    one = blank_pdf(tmp_path / "one.pdf", 1, size=(100, 80))
    assert main(["ocr", str(pdf), str(one), "--model", "tiny", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"==> {pdf} <==\nHiw\n==> {one} <==\nHiw\n"
    assert (
        captured.err == f"dsocr: warning: {pdf}: read page 1 of 2; dsocr convert reads every page\n"
    )
    assert all(isinstance(im, Image.Image) for im in seen) and len(seen) == 2


def test_cli_ocr_real_run_at_the_token_limit_warns(tmp_path, capsys):
    page = _page(tmp_path / "p.png", 64, 64)
    args = ["ocr", str(page), "--model", "tiny", "--mode", "tiny", "--device", "cpu"]
    assert main([*args, "--max-new-tokens", "3"]) == 0
    captured = capsys.readouterr()
    ocr = dsocr.load_model("tiny", device="cpu")
    res = ocr.run(page, mode="tiny", max_new_tokens=3)
    assert captured.out == res.text.strip() + "\n"
    assert ("stopped at the token limit" in captured.err) == (res.finish_reason == "length")
