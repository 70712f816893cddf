"""Crash-safe writes and the report writer that keeps hand-written notes."""

from dsocr.fileio import carry_notes, note_block, save_report


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
