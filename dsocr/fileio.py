"""Crash-safe file writes, shared by checkpoints, conversion output and optical memory.

Every writer goes to a temporary file in the destination folder, is fsynced, then renamed over the
target, and the folder is fsynced: a crash or Ctrl-C leaves the old file or the new one, never a
torn one (at worst a stray ``.<name>.*.tmp``, which readers ignore).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    return sha256_bytes(text.encode("utf-8"))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks. Raises OSError."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _process_umask() -> int:
    """The umask, read once at import (setting it to read it back is not thread-safe later)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _process_umask()


def _file_mode(path: Path) -> int:
    """The permission bits a plain ``open(path, "w")`` would leave: the existing file's, or
    0o666 less the umask for a new one."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~_UMASK


def atomic_write_with(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, fsync it, rename it over ``path``.

    The result has the mode ``open(path, "w")`` would give (``mkstemp`` alone makes it 0o600,
    unreadable to the group and others who share the output)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)  # some writers (safetensors) replace the file: set the mode afterwards
        os.chmod(tmp, _file_mode(path))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write_with(path, lambda t: Path(t).write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


NOTE_BLOCK = re.compile(r"<!-- notes: ([\w-]+) -->\n(.*?)<!-- /notes -->", re.S)


def note_block(name: str, body: str = "") -> str:
    """A named slot for hand-written notes in a generated report (kept by ``save_report``)."""
    return f"<!-- notes: {name} -->\n{body}<!-- /notes -->"


def carry_notes(old: str, new: str) -> str:
    """``new`` with each ``note_block`` filled from the same-named block of ``old``.

    A regenerated report keeps what a person wrote into its slots. A block of ``old`` that ``new``
    has no slot for is appended at the end, never dropped; an empty block in ``old`` leaves ``new``'s
    default text in place.
    """
    kept = {m.group(1): m.group(2) for m in NOTE_BLOCK.finditer(old) if m.group(2).strip()}
    slots = {m.group(1) for m in NOTE_BLOCK.finditer(new)}
    out = NOTE_BLOCK.sub(lambda m: note_block(m.group(1), kept.get(m.group(1), m.group(2))), new)
    orphans = [note_block(k, v) for k, v in kept.items() if k not in slots]
    if orphans:
        out = out.rstrip("\n") + "\n\n" + "\n\n".join(orphans) + "\n"
    return out


def save_report(path: str | Path, text: str) -> Path:
    """Write a generated Markdown report atomically, keeping the notes of the file it replaces."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        text = carry_notes(path.read_text(encoding="utf-8"), text)
    atomic_write_text(path, text)
    return path
