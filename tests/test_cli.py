"""The dsocr command line: one-line errors for common mistakes, flag checks, help, README usage."""

import re
import sys
from pathlib import Path

import pytest

from dsocr.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _one_line(capsys, *parts):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(p in err[0] for p in parts), err
    return err[0]


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if any command gets as far as loading a model or serving."""

    def boom(*a, **k):
        raise AssertionError("reached the model")

    import dsocr.api
    import dsocr.pipeline.convert
    import dsocr.serve

    monkeypatch.setattr(dsocr.api, "load_model", boom)
    monkeypatch.setattr(dsocr.pipeline.convert, "convert", boom)
    monkeypatch.setattr(dsocr.serve, "serve", boom)


@pytest.mark.parametrize(
    "argv, parts",
    [
        (["convrt", "page.png"], ["dsocr: error: unknown command 'convrt'", "'convert'"]),
        (["xyzzy"], ["unknown command 'xyzzy'", "commands: ocr, convert"]),
        (["ocr", "page.png", "--mode", "huge"], ["dsocr ocr: error:", "--mode", "'huge'"]),
        (["convert", "page.png"], ["dsocr convert: error:", "-o/--out"]),
        (["tokens", "wide", "1"], ["dsocr tokens: error:", "'wide'", "dsocr tokens --help"]),
    ],
)
def test_usage_errors_are_one_line(capsys, argv, parts):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    _one_line(capsys, *parts)


@pytest.mark.parametrize(
    "flags, msg",
    [
        (["--port", "-1"], "--port must be in 0-65535, got -1"),
        (["--port", "65536"], "--port must be in 0-65535, got 65536"),
        (["--batch-size", "0"], "--batch-size must be > 0, got 0"),
        (["--max-pages", "0"], "--max-pages must be > 0"),
        (["--timeout", "0"], "--timeout must be > 0"),
        (["--max-upload-mb", "-1"], "--max-upload-mb must be > 0"),
        (["--max-queue", "-1"], "--max-queue must be >= 0, got -1"),
    ],
)
def test_serve_rejects_bad_limits_before_the_model_loads(capsys, no_model, flags, msg):
    assert main(["serve", *flags]) == 2
    _one_line(capsys, msg)


def test_serve_passes_port_zero_and_an_empty_queue(monkeypatch):
    import dsocr.serve

    seen = {}
    monkeypatch.setattr(dsocr.serve, "serve", lambda **kw: seen.update(kw))
    assert main(["serve", "--port", "0", "--max-queue", "0", "--model", "tiny"]) == 0
    assert seen["port"] == 0 and seen["max_queue"] == 0 and seen["model"] == "tiny"


@pytest.mark.parametrize(
    "flags, msg",
    [
        (["--batch-size", "0"], "--batch-size must be > 0, got 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be > 0, got 0"),
        (["--ray", "--replicas", "0"], "--replicas must be > 0, got 0"),
        (["--ray", "--gpus-per-replica", "-1"], "--gpus-per-replica must be >= 0"),
    ],
)
def test_convert_names_the_bad_flag(tmp_path, capsys, no_model, flags, msg):
    assert main(["convert", "page.png", "-o", str(tmp_path / "out"), *flags]) == 2
    _one_line(capsys, msg)


def test_ray_address_with_no_cluster_is_one_line(tmp_path, capsys, monkeypatch):
    import dsocr.distributed

    def no_cluster(*a, **k):  # what ray.init(address="auto") raises with no cluster running
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(dsocr.distributed, "convert_ray", no_cluster)
    argv = ["convert", "page.png", "-o", str(tmp_path), "--ray", "--ray-address", "auto"]
    assert main(argv) == 2
    _one_line(capsys, "dsocr: error: --ray-address auto: Could not find any running Ray")


@pytest.fixture
def pages(tmp_path):
    """A dsocr compress folder of one page."""
    (tmp_path / "notes.txt").write_text("It is a truth universally acknowledged.\n")
    assert main(["compress", str(tmp_path / "notes.txt"), "-o", str(tmp_path / "pages")]) == 0
    return tmp_path / "pages"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")
def test_decompress_unwritable_output_fails_before_decoding(pages, capsys, no_model):
    capsys.readouterr()
    assert main(["decompress", str(pages), "-o", "/proc/dsocr-test/out.txt"]) == 2
    _one_line(capsys, "/proc/dsocr-test/out.txt: cannot write the text")


def test_decompress_output_permission_is_checked_before_decoding(
    pages, tmp_path, capsys, no_model, monkeypatch
):
    import tempfile

    def denied(*a, **k):  # a folder without write permission (root ignores chmod, so simulated)
        raise PermissionError(13, "Permission denied")

    capsys.readouterr()
    monkeypatch.setattr(tempfile, "TemporaryFile", denied)
    assert main(["decompress", str(pages), "-o", str(tmp_path / "ro" / "out.txt")]) == 2
    _one_line(capsys, "out.txt: cannot write the text (Permission denied)")


def test_interrupt_exits_130_without_a_traceback(capsys, monkeypatch):
    import dsocr.cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(dsocr.cli, "cmd_tokens", interrupted)
    try:
        assert main(["tokens", "10", "10"]) == 130
    except KeyboardInterrupt:
        pytest.fail("main() let KeyboardInterrupt through (a traceback for Ctrl-C)")
    _one_line(capsys, "dsocr: interrupted")


def _subparsers():
    p = build_parser()
    (sub,) = [a for a in p._actions if a.dest == "command"]
    return sub.choices


def test_bench_lists_every_script_in_bench():
    (name,) = [a for a in _subparsers()["bench"]._actions if a.dest == "name"]
    assert sorted(name.choices) == sorted(f.stem for f in (ROOT / "bench").glob("*.py"))


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_every_option_has_help(command):
    missing = [a.option_strings or a.dest for a in _subparsers()[command]._actions if not a.help]
    assert not missing, missing


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = " ".join(blocks).replace("\\\n", " ").splitlines()
    return [line.split("#")[0].split() for line in lines if line.strip().startswith("dsocr ")]


def test_readme_commands_parse():
    """Every ``dsocr ...`` line in README.md parses with the flags it shows."""
    commands = _readme_commands()
    assert {c[1] for c in commands} >= {"convert", "ocr", "tokens", "compress", "serve"}
    for argv in commands:
        args = build_parser().parse_args(argv[1:])
        assert args.command == argv[1]


def test_readme_flags_exist():
    """Every `--flag` README.md names in prose is an option of some dsocr command."""
    flags = {s for c in _subparsers().values() for a in c._actions for s in a.option_strings}
    named = set(re.findall(r"`(--[a-z-]+)`", (ROOT / "README.md").read_text()))
    assert named and named <= flags, named - flags


def test_serve_on_a_taken_port_is_one_line_before_the_model_loads(capsys, no_model):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    _one_line(capsys, f"dsocr: error: cannot listen on 127.0.0.1:{port}")


def test_locate_without_ref_names_the_flag(tmp_path, capsys, no_model):
    assert main(["convert", "page.png", "-o", str(tmp_path), "--task", "locate"]) == 2
    _one_line(capsys, "--task locate needs --ref")


def test_readme_status_numbers_come_from_the_linked_reports():
    """Each decimal, ratio, percentage and rate in a README status row is in a linked report."""
    rows = [r for r in (ROOT / "README.md").read_text().splitlines() if r.startswith("| ")]
    checked = 0
    for row in rows:
        links = re.findall(r"\]\((docs/[\w/.]+\.md)\)", row)
        text = "\n".join((ROOT / link).read_text() for link in links)
        numbers = re.findall(r"(?<![\w.])\d[\d,]*(?:\.\d+(?!\d)|(?=x|%| pages/s))", row)
        for number in numbers if links else []:
            assert number in text, f"{number} not in {links}: {row[:60]}"
            checked += 1
    assert checked > 10


def test_convert_counts_documents_and_shows_a_bar_on_a_terminal(tmp_path, capsys, monkeypatch):
    import io

    from PIL import Image

    import dsocr.cli as cli

    (tmp_path / "in").mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (64, 48), "white").save(tmp_path / "in" / f"{name}.png")
    (tmp_path / "in" / "empty.png").write_bytes(b"")
    argv = ["convert", str(tmp_path / "in"), str(tmp_path / "gone.png"), "-o", str(tmp_path / "o")]
    argv += ["--model", "tiny", "--device", "cpu", "--mode", "tiny", "--max-new-tokens", "2"]
    import dsocr.pipeline.providers as providers

    walks = []
    real_discover = providers.discover_inputs

    def discover(*a, **k):
        walks.append(a)
        return real_discover(*a, **k)

    monkeypatch.setattr(providers, "discover_inputs", discover)
    monkeypatch.setattr("dsocr.pipeline.convert.discover_inputs", discover)
    assert main(argv) == 1
    assert len(walks) == 2  # each input expanded once: the count comes from convert's plan
    err = capsys.readouterr().err.splitlines()
    counted = [line for line in err if line.startswith("[")]
    marks = [line.split("]")[0] for line in counted]  # "[k/4": errors count, unmarked
    assert len(set(marks)) == 2 and all(m.endswith("/4") for m in marks)
    assert all("(1 page, " in line for line in counted)
    assert sum(line.startswith("dsocr: error: ") for line in err) == 2

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    progress = cli._Progress(2)
    progress.page(None, None)
    progress.document("converted: x")
    progress.close()
    shown = term.getvalue()
    assert "[1/2] converted: x" in shown and "1/2" in shown and "pages/s" in shown
