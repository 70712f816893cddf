"""Resumable batch workspace: one output folder per document, done markers, staging, summary.

After olmocr's workspace (done flags, a rerun skips finished work) without its queue machinery:

    OUT/<stem>/...                    a complete document folder (``output.py``)
    OUT/.dsocr/done/<stem>.json       its done marker: key, source, sha256, pages, flags
    OUT/.dsocr/tmp/<pid>.<host>.<r>.<stem>/  staging folder while a document is being written
    OUT/.dsocr/tmp/<pid>.<host>.<r>-spill.<stem>/  its crops and layout pages while it is decoded
    OUT/.dsocr/summary.json           the last run's summary (``BatchSummary``)

Contract:
- A document is *done* when its marker exists, the marker's key matches, and its folder's JSON
  exists. The key is ``sha256(source bytes) + sha256(output-affecting options and model)``, so a
  changed file or changed options redo the document; an unchanged one is skipped.
- A document is written completely into a staging folder, then renamed into ``OUT/<stem>``
  (an older folder of the same stem is renamed away first and deleted after; if the rename in
  fails, or the process dies in between, the older folder goes back), then its marker is
  written. Ctrl-C or a crash at any point leaves either no folder, the old complete folder or the
  new complete one, and only complete documents have markers; the staging folder is removed on
  any exception (``KeyboardInterrupt`` included), and stale staging folders of dead processes are
  removed when a workspace is opened.
- While a document is being decoded, the converter keeps each page's figure crops and layout
  JPEG in a spill folder (``spill_folder``), not in memory, and removes it when the document is
  written or fails; it is named like a staging folder, so a crashed run's spill goes the same way.
- Names come from ``providers.safe_stem`` / ``unique_stems``; ``folder()`` also checks that the
  result stays inside ``OUT`` (no path traversal). Stems never start with ``.``, so ``.dsocr``
  cannot collide with a document.
- Anything that cannot be written raises :class:`OutputError`, one line naming the folder.

Several processes may share a workspace only when they write different stems (the distributed
runner hands each replica its own documents); there is no locking.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsocr.fileio import atomic_write_json, fsync_dir, sha256_text

if TYPE_CHECKING:  # pragma: no cover
    from dsocr.pipeline.convert import Document

META_DIR = ".dsocr"
# This machine in staging-folder names: "h" + 8 hex digits of its host name's hash.
HOST_TAG = "h" + sha256_text(socket.gethostname())[:8]
MARKER_VERSION = 1
SUMMARY_FILE = "summary.json"  # OUT/.dsocr/summary.json


class OutputError(OSError):
    """An output folder or file that cannot be written. ``str(e)`` is ``"<folder>: <reason>"``."""

    def __init__(self, folder: str | os.PathLike, reason: str):
        self.folder = str(folder)
        self.reason = " ".join(str(reason).split())
        super().__init__(f"{self.folder}: {self.reason}")

    def __str__(self) -> str:
        return f"{self.folder}: {self.reason}"


def _why(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def options_fingerprint(settings: dict[str, Any]) -> str:
    """Hex sha256 of the canonical JSON of ``settings`` (the options that change the output)."""
    return sha256_text(json.dumps(settings, sort_keys=True, ensure_ascii=True, default=str))


def document_key(source_sha256: str, fingerprint: str) -> str:
    return sha256_text(f"{source_sha256}:{fingerprint}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but not ours, or the platform cannot tell: keep it
    return True


def _tag() -> str:
    """``<pid>.<host>.<random>``: the head of a staging or spill folder's name (clean_stale
    reads the pid and host)."""
    return f"{os.getpid()}.{HOST_TAG}.{secrets.token_hex(4)}"


class Workspace:
    """An output folder for a batch; see the module docstring for the layout and contract."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.meta = self.root / META_DIR
        self.done_dir = self.meta / "done"
        self.tmp_dir = self.meta / "tmp"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.done_dir.mkdir(parents=True, exist_ok=True)
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.tmp_dir, prefix=".probe.")
            os.close(fd)
            os.unlink(probe)
        except (FileExistsError, NotADirectoryError):
            raise OutputError(
                self.root, "cannot create output folder: a file is in the way"
            ) from None
        except OSError as e:
            raise OutputError(self.root, f"cannot write output folder: {_why(e)}") from None
        self.clean_stale()

    # ---------------------------------------------------------------- names
    def folder(self, stem: str) -> Path:
        """``OUT/<stem>``; asserts the name is one safe path component."""
        assert stem and stem not in (".", "..") and not stem.startswith("."), stem
        assert "/" not in stem and "\\" not in stem and "\x00" not in stem, stem
        path = self.root / stem
        assert path.parent == self.root, f"{stem!r} escapes {self.root}"
        return path

    def marker_path(self, stem: str) -> Path:
        self.folder(stem)  # same checks
        return self.done_dir / f"{stem}.json"

    # ---------------------------------------------------------------- done markers
    def read_marker(self, stem: str) -> dict | None:
        try:
            return json.loads(self.marker_path(stem).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def is_done(self, stem: str, key: str) -> bool:
        """True if ``stem`` was completed with this key and its folder is still complete."""
        marker = self.read_marker(stem)
        if marker is None or marker.get("key") != key:
            return False
        return (self.folder(stem) / f"{stem}.json").is_file()

    def document_json(self, stem: str) -> dict:
        """The JSON of a finished document (``OUT/<stem>/<stem>.json``)."""
        path = self.folder(stem) / f"{stem}.json"
        return json.loads(path.read_text(encoding="utf-8"))

    def previous_stems(self) -> dict[Path, str]:
        """Resolved source path -> stem, for every document an earlier run finished here, so
        that a rerun with a different set or order of inputs keeps each file's folder."""
        out: dict[Path, str] = {}
        for marker in sorted(self.done_dir.glob("*.json")):
            try:
                record = json.loads(marker.read_text(encoding="utf-8"))
                stem = record["stem"]
                source = Path(record.get("source_path") or Path(record["source"]).resolve())
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if isinstance(stem, str) and marker.stem == stem and (self.root / stem).is_dir():
                out[source] = stem
        return out

    # ---------------------------------------------------------------- writing
    def _restore(self, old: Path | None, final: Path, marker: Path, old_marker: bytes | None):
        """Undo a failed replacement: the earlier complete folder and its done marker go back,
        so a failed rerun loses nothing that was finished before."""
        try:
            if old is not None and not final.exists():
                os.rename(old, final)
            if old_marker is not None and final.is_dir():
                tmp = marker.with_name(f".{marker.name}.restore")
                tmp.write_bytes(old_marker)
                os.replace(tmp, marker)
        except OSError:
            pass  # the disk refuses even this: the old folder stays under .dsocr/tmp

    def commit(self, doc: Document, key: str, write: Callable[[Document, Path], Any]) -> Path:
        """Write ``doc`` via ``write(doc, staging_folder)``, move it to ``OUT/<stem>``, mark it done.

        Raises :class:`OutputError` naming the folder when something cannot be written; nothing
        partial is left behind in that case (or on KeyboardInterrupt).
        """
        final = self.folder(doc.stem)
        if final.is_symlink() or (final.exists() and not final.is_dir()):
            raise OutputError(final, "exists and is not a folder; not replaced")
        marker = self.marker_path(doc.stem)
        tag = _tag()
        staging = self.tmp_dir / f"{tag}.{doc.stem}"  # pid and host first: clean_stale reads them
        old = self.tmp_dir / f"{tag}-old.{doc.stem}"  # clean_stale puts it back if we die
        old_marker: bytes | None = None
        moved_away = replaced = False
        try:
            try:
                staging.mkdir()
                write(doc, staging)
                if marker.exists():
                    old_marker = marker.read_bytes()
                marker.unlink(missing_ok=True)
                if final.exists():
                    os.rename(final, old)
                    moved_away = True
                os.rename(staging, final)
                replaced = True
                fsync_dir(self.root)
            except OSError as e:
                if isinstance(e, OutputError):
                    raise
                where = getattr(e, "filename", None) or final
                raise OutputError(final, f"{_why(e)} ({where})") from None
        finally:
            if moved_away and not replaced:
                self._restore(old, final, marker, old_marker)
            elif not replaced and old_marker is not None and not marker.exists():
                self._restore(None, final, marker, old_marker)
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
        record = {
            "version": MARKER_VERSION,
            "key": key,
            "stem": doc.stem,
            "source": str(doc.source),
            "source_path": str(Path(doc.source).resolve()),
            "sha256": doc.sha256,
            "pages": len(doc.pages),
            "flagged_pages": [p.index + 1 for p in doc.pages if p.flags],
            "finished_at": time.time(),
        }
        try:
            atomic_write_json(marker, record)
        except OSError as e:
            raise OutputError(marker.parent, f"cannot write done marker: {_why(e)}") from None
        return final

    def spill_folder(self, stem: str) -> Path:
        """A new empty folder ``.dsocr/tmp/<pid>.<host>.<r>-spill.<stem>`` where the pages of
        document ``stem`` wait (crops, layout JPEGs) until it is written. The caller removes it;
        ``clean_stale`` removes it once this process is gone. Raises :class:`OutputError`."""
        final = self.folder(stem)  # same checks
        path = self.tmp_dir / f"{_tag()}-spill.{stem}"
        try:
            path.mkdir()
        except OSError as e:
            raise OutputError(final, f"cannot stage pages: {_why(e)} ({path})") from None
        return path

    def write_summary(self, summary: BatchSummary) -> Path:
        path = self.meta / SUMMARY_FILE
        try:
            atomic_write_json(path, summary.to_json())
        except OSError as e:
            raise OutputError(self.meta, f"cannot write summary: {_why(e)}") from None
        return path

    def clean_stale(self) -> None:
        """Remove staging and spill folders left by processes of this host that no longer run
        (crash, kill -9). Another host's (a shared folder in a distributed run) are left alone:
        their pids mean nothing here."""
        for entry in self.tmp_dir.iterdir():
            head, _, rest = entry.name.partition(".")
            host = rest.split(".", 1)[0]
            if host.startswith("h") and host != HOST_TAG:
                continue
            pid = int(head) if head.isdigit() else None
            if pid is None or not _pid_alive(pid):
                parts = entry.name.split(".", 3)
                if len(parts) == 4 and parts[2].endswith("-old") and entry.is_dir():
                    final = self.root / parts[3]  # a complete folder moved away, then a crash
                    if parts[3] and not parts[3].startswith(".") and not final.exists():
                        try:
                            os.rename(entry, final)
                            continue
                        except OSError:
                            pass
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Summary


@dataclass
class BatchSummary:
    """Counts for one run of a batch. ``exit_code``: 0 when nothing failed, else 1."""

    documents: int = 0
    converted: int = 0
    skipped: int = 0  # done in an earlier run (resume)
    failed: int = 0
    pages: int = 0  # pages converted in this run
    skipped_pages: int = 0  # pages of the skipped documents
    skipped_flagged_pages: int = 0  # their pages flagged when they were converted
    flagged_pages: int = 0  # flagged pages converted in this run
    flag_counts: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # one line per failed document
    flagged: list[str] = field(default_factory=list)  # "<source>: page N: flag, flag"
    wall_s: float = 0.0
    interrupted: bool = False

    @property
    def pages_per_s(self) -> float:
        return self.pages / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.failed == 0 and not self.interrupted

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    @classmethod
    def from_documents(
        cls, docs: Iterable[Document], wall_s: float | None = None, interrupted: bool = False
    ) -> BatchSummary:
        """Summarise converted, skipped and failed documents.

        ``wall_s`` defaults to the span from the earliest document's run start to the latest
        finish, as recorded in ``doc.timings`` (``started_at`` / ``finished_at``).
        """
        s = cls(interrupted=interrupted)
        starts, ends = [], []
        for doc in docs:
            s.documents += 1
            starts.append(doc.timings.get("started_at"))
            ends.append(doc.timings.get("finished_at"))
            if doc.status == "failed":
                s.failed += 1
                s.errors.append(doc.error or f"{doc.source}: failed")
                continue
            if doc.status == "skipped":
                s.skipped += 1
                s.skipped_pages += len(doc.pages)
                s.skipped_flagged_pages += sum(1 for p in doc.pages if p.flags)
                continue
            if doc.status != "converted":
                continue  # still pending (interrupted run)
            s.converted += 1
            s.pages += len(doc.pages)
            for page in doc.pages:
                if page.flags:
                    s.flagged_pages += 1
                    s.flagged.append(
                        f"{doc.source}: page {page.index + 1}: {', '.join(page.flags)}"
                    )
                for flag in page.flags:
                    s.flag_counts[flag] = s.flag_counts.get(flag, 0) + 1
        if wall_s is None:
            starts = [t for t in starts if t is not None]
            ends = [t for t in ends if t is not None]
            wall_s = max(ends) - min(starts) if starts and ends else 0.0
        s.wall_s = max(0.0, wall_s)
        return s

    @classmethod
    def read(cls, out_dir: str | os.PathLike) -> BatchSummary | None:
        """The last run's summary from ``OUT/.dsocr/summary.json`` (None if missing/unreadable);
        the derived fields of ``to_json`` are dropped."""
        names = {f.name for f in fields(cls)}
        try:
            data = json.loads((Path(out_dir) / META_DIR / SUMMARY_FILE).read_text(encoding="utf-8"))
            return cls(**{k: v for k, v in data.items() if k in names})
        except (OSError, ValueError, TypeError, AttributeError):
            return None

    def to_json(self) -> dict:
        d = asdict(self)
        d["pages_per_s"] = round(self.pages_per_s, 4)
        d["exit_code"] = self.exit_code
        return d

    def format(self) -> str:
        """A short human summary (several lines) for the end of a CLI run."""
        done_before = (
            f" (+ {self.skipped_pages} done before, {self.skipped_flagged_pages} of them flagged)"
            if self.skipped
            else ""
        )
        head = (
            f"{self.documents} document(s): {self.converted} converted, {self.skipped} skipped "
            f"(already done), {self.failed} failed; {self.pages} page(s){done_before}, "
            f"{self.flagged_pages} flagged, in {self.wall_s:.1f} s ({self.pages_per_s:.2f} pages/s)"
        )
        lines = [head]
        if self.flagged_pages:
            counts = ", ".join(f"{k} {v}" for k, v in sorted(self.flag_counts.items()))
            lines.append(f"{self.flagged_pages} flagged page(s) ({counts}); see the JSON:")
            lines += [f"  {line}" for line in self.flagged]
        if self.errors:
            lines.append(f"{self.failed} failed:")
            lines += [f"  {line}" for line in self.errors]
        if self.interrupted:
            lines.append("interrupted: finished documents are kept; rerun to resume")
        return "\n".join(lines)
