"""Build the text corpus for dsocr-mini from documentation installed by Debian packages.

Sources (all GPL-2+/CC-BY-SA/PSF-licensed documentation, installable offline here):
- debian-handbook: the same book in up to 26 locales (HTML);
- debian-reference-{en,de,fr,ja,zh-cn}: HTML;
- python3.11-doc: the Python documentation (HTML, English).

Install them first (as root)::

    apt-get install -y --no-install-recommends debian-handbook debian-reference-en \\
        debian-reference-de debian-reference-fr debian-reference-ja debian-reference-zh-cn \\
        python3.11-doc

Then::

    python scripts/build_corpus.py --out data/corpus

The held-out split is by *document group*: a chapter is held out in every language at once, so no
translation of a held-out chapter reaches training. Membership is a hash of the group name, so it
does not depend on which packages are installed. Held-out lines that also occur in training text
(``SHARED_LINE_CHARS``) are dropped from the held-out rows. Writes ``train.jsonl``,
``heldout.jsonl`` (rows: doc, group, lang, source, text) and ``manifest.json`` (counts, skipped
sources, and sha256 of each file).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

HELDOUT_PERCENT = 8
# A held-out line of at least this many characters that also occurs in a training document (a
# footer, an untranslated paragraph, a chapter title in another chapter's table of contents) is
# dropped from the held-out text, so that no held-out text is trained on.
SHARED_LINE_CHARS = 40
SKIP_TAGS = {"script", "style", "nav", "head", "title", "pre"}
BLOCK_TAGS = {
    "p",
    "div",
    "li",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "br",
    "tr",
    "table",
    "dt",
    "dd",
    "section",
    "blockquote",
    "ul",
    "ol",
    "dl",
    "td",
    "th",
}


class _Text(HTMLParser):
    """HTML -> paragraphs of plain text (block tags end a paragraph)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in SKIP_TAGS:
            self.skip += 1
        elif tag in BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in SKIP_TAGS:
            self.skip = max(0, self.skip - 1)
        elif tag in BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    p = _Text()
    p.feed(html)
    paras = []
    for block in "".join(p.parts).split("\n"):
        block = re.sub(r"\s+", " ", block).strip()
        if len(block) >= 3 and block not in ("¶", "#"):
            paras.append(block.replace("¶", "").strip())
    return "\n".join(paras)


def is_heldout(group: str) -> bool:
    h = int.from_bytes(hashlib.sha256(group.encode()).digest()[:4], "big")
    return h % 100 < HELDOUT_PERCENT


def _line_key(line: str) -> bytes:
    return hashlib.blake2b(line.casefold().encode(), digest_size=8).digest()


def sources():
    """(doc id, group, lang, source, path) for every document found."""
    hb = Path("/usr/share/doc/debian-handbook/html")
    if hb.is_dir():
        for locale in sorted(p for p in hb.iterdir() if p.is_dir()):
            for f in sorted(locale.glob("*.html")):
                yield (
                    f"handbook/{locale.name}/{f.stem}",
                    f"handbook/{f.stem}",
                    locale.name.split("-")[0],
                    "debian-handbook",
                    f,
                )
    ref = Path("/usr/share/debian-reference")
    if ref.is_dir():
        for f in sorted(ref.glob("*.html")):
            m = re.fullmatch(r"(.+)\.([a-z]{2}(?:-[a-z]{2})?)\.html", f.name)
            if m:
                yield (
                    f"reference/{m.group(2)}/{m.group(1)}",
                    f"reference/{m.group(1)}",
                    m.group(2).split("-")[0],
                    "debian-reference",
                    f,
                )
    py = Path("/usr/share/doc/python3.11/html")
    if py.is_dir():
        for f in sorted(py.rglob("*.html")):
            rel = f.relative_to(py).with_suffix("").as_posix()
            if rel.startswith(("_", "genindex", "py-modindex", "search")):
                continue
            yield (f"python/{rel}", f"python/{rel}", "en", "python3.11-doc", f)


class NoDocuments(ValueError):
    """No source document was found (or none long enough): nothing is written."""


def build(out: Path, min_chars: int = 500, docs=None) -> dict:
    """Write train/heldout JSONL (plain and gzipped) and a manifest from `docs` (default: every
    installed source; the same 5-tuples as `sources()`).

    Every file is written under a temporary name first and renamed into place only once all of
    them are complete, so a failure leaves an existing corpus as it was; with no documents at all
    it raises NoDocuments and writes nothing (an existing corpus is kept, not emptied).
    """
    counts = {"train": 0, "heldout": 0}
    chars = {"train": 0, "heldout": 0}
    langs: dict[str, int] = {}
    train_lines: set[bytes] = set()
    held: list[dict] = []  # written last, without the lines training text also has
    skipped = {"unreadable": 0, "too_short": 0}
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    tmp = {s: out / f".{s}.jsonl.tmp" for s in counts}
    staged: dict[Path, Path] = {}  # temporary file -> final name
    try:
        files = {s: tmp[s].open("w", encoding="utf-8") for s in counts}
        try:
            for doc, group, lang, source, path in sources() if docs is None else docs:
                try:
                    text = html_to_text(path.read_text(encoding="utf-8", errors="replace"))
                except OSError as e:
                    print(f"skipped {doc}: cannot read {path}: {e}", file=sys.stderr)
                    skipped["unreadable"] += 1
                    continue
                if len(text) < min_chars:
                    skipped["too_short"] += 1
                    continue
                row = {"doc": doc, "group": group, "lang": lang, "source": source, "text": text}
                if is_heldout(group):
                    held.append(row)
                    continue
                train_lines.update(
                    _line_key(x) for x in text.split("\n") if len(x) >= SHARED_LINE_CHARS
                )
                _write(files["train"], row, counts, chars, langs, "train")
            shared = 0
            for row in held:
                lines = row["text"].split("\n")
                kept = [
                    x
                    for x in lines
                    if len(x) < SHARED_LINE_CHARS or _line_key(x) not in train_lines
                ]
                shared += len(lines) - len(kept)
                row["text"] = "\n".join(kept)
                if len(row["text"]) < min_chars:
                    skipped["too_short"] += 1
                    continue
                _write(files["heldout"], row, counts, chars, langs, "heldout")
        finally:
            for f in files.values():
                f.close()
        if not sum(counts.values()):
            raise NoDocuments(
                f"no documents found (of at least {min_chars} characters): install the packages "
                f"listed in this script's docstring; {out} left as it was"
            )
        manifest = {
            "heldout_percent": HELDOUT_PERCENT,
            "documents": counts,
            "skipped_documents": skipped,
            "heldout_lines_dropped_as_in_train": shared,
            "chars": chars,
            "chars_by_lang": dict(sorted(langs.items())),
            "files": {},
        }
        for s, t in tmp.items():
            data = t.read_bytes()
            staged[t] = out / f"{s}.jsonl"
            manifest["files"][f"{s}.jsonl"] = hashlib.sha256(data).hexdigest()
            # A compressed copy (mtime 0: byte-identical rebuilds) to carry to a training machine.
            gz_tmp = out / f".{s}.jsonl.gz.tmp"
            with gzip.GzipFile(gz_tmp, "wb", mtime=0) as gz:
                gz.write(data)
            staged[gz_tmp] = out / f"{s}.jsonl.gz"
        man_tmp = out / ".manifest.json.tmp"
        man_tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        staged[man_tmp] = out / "manifest.json"
        for t, final in staged.items():  # all complete: now into place (the manifest last)
            t.replace(final)
        return manifest
    finally:
        for t in (*tmp.values(), *staged):
            t.unlink(missing_ok=True)
        if made and not any(out.iterdir()):
            out.rmdir()


def _write(f, row: dict, counts: dict, chars: dict, langs: dict, split: str) -> None:
    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    counts[split] += 1
    chars[split] += len(row["text"])
    langs[row["lang"]] = langs.get(row["lang"], 0) + len(row["text"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default="data/corpus")
    ap.add_argument("--min-chars", type=int, default=500)
    args = ap.parse_args(argv)
    try:
        m = build(Path(args.out), args.min_chars)
    except NoDocuments as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    keys = ("documents", "chars", "skipped_documents", "heldout_lines_dropped_as_in_train")
    print(json.dumps({k: m[k] for k in keys}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
