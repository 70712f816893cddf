"""Crash-safe writes and the report writer that keeps hand-written notes."""

import os
import stat

from dsocr import fileio
from dsocr.fileio import atomic_write_text, carry_notes, note_block, save_report
from dsocr.weights import save_checkpoint


def test_regenerated_report_keeps_notes_and_takes_new_numbers(tmp_path):
    path = tmp_path / "r.md"
    save_report(path, f"# R\n\nCER 0.9\n\n{note_block('why')}\n")
    text = path.read_text().replace(note_block("why"), note_block("why", "Hand note.\n"))
    path.write_text(text)
    save_report(path, f"# R\n\nCER 0.5\n\n{note_block('why')}\n")
    out = path.read_text()
    assert "CER 0.5" in out and "CER 0.9" not in out
    assert note_block("why", "Hand note.\n") in out
    assert not list(tmp_path.glob(".*.tmp"))


def test_notes_without_a_slot_are_appended_not_dropped():
    keep, default = "Keep me.\n", "default\n"
    old = f"a\n{note_block('gone', keep)}\n{note_block('empty')}\n"
    new = f"b\n{note_block('empty', default)}\n"
    out = carry_notes(old, new)
    assert out.startswith("b\n")
    assert note_block("empty", "default\n") in out  # an empty old block keeps the new default
    assert out.rstrip().endswith(note_block("gone", "Keep me.\n"))


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writes_get_the_mode_open_would_give(tmp_path, tiny_model, monkeypatch):
    """mkstemp makes 0o600 files; outputs others share (Markdown, checkpoints) must not be.
    The umask the module read at import is pinned to 0o022, so this holds on any machine."""
    monkeypatch.setattr(fileio, "_UMASK", 0o022)
    expected = 0o644
    new = tmp_path / "new.md"
    atomic_write_text(new, "x")
    assert _mode(new) == expected
    kept = tmp_path / "kept.md"
    kept.write_text("old")
    os.chmod(kept, 0o640)
    atomic_write_text(kept, "new")
    assert kept.read_text() == "new" and _mode(kept) == 0o640
    files = list(save_checkpoint(tiny_model, tmp_path / "ckpt", max_shard_bytes=1 << 20).iterdir())
    assert len(files) > 2 and {_mode(f) for f in files} == {expected}
