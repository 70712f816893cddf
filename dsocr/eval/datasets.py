"""Evaluation page sets: a folder of PNG page images plus ``manifest.jsonl``.

Each manifest row is one page::

    {"id": "debref-en-p0133", "image": "images/debref-en-p0133.png", "text": "...",
     "source": "/usr/share/debian-reference/debian-reference.en.pdf#133", "lang": "en",
     "sha256": "<of the PNG>", "text_sha256": "<of text, UTF-8>",
     "overlap_lines": 23, "train_overlap": 0, "heldout_overlap": 16}

``image`` is relative to the manifest's folder. ``load_pages`` checks both checksums (image and
ground-truth text), so a set that changed on disk is an error, not a silent shift in the numbers.
The three ``*overlap*`` fields (PDF sets only) record how many of the page's text-layer lines
(whitespace-normalised, longer than 25 characters) occur in the training and held-out corpus.

Two builders (``scripts/build_eval_sets.py`` runs them, writing ``data/eval/<set>/``):

- :func:`build_pdf_set`: real PDF pages rasterised at 144 dpi (the official PDF runner's
  resolution) with the PDF's own text layer as ground truth. Pages are chosen from held-out text
  (:func:`select_heldout_pages`): the training corpus holds the same documents as HTML, so a
  page picked blindly is usually text the model was trained on. The text layer is a coarse
  reference (reading order of headers/footers, ligatures, no layout spaces), so numbers on this
  set are comparable between engines, not absolute.
- :func:`build_rendered_set`: held-out corpus text rendered with :mod:`dsocr.render` (fixed seed,
  fixed style), ground truth exact by construction.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from dsocr.fileio import fsync_dir, sha256_file, sha256_text

MANIFEST = "manifest.jsonl"
REQUIRED_FIELDS = ("id", "image", "text", "source", "sha256", "text_sha256")

# Real-PDF sets: the Debian Reference in each installed language (packages debian-reference-en,
# -de, -fr, -ja, -zh-cn). Set name -> (PDF, language of its text).
DEBREF = "/usr/share/debian-reference/debian-reference.{}.pdf"
PDF_SETS = {
    "pdf-debref-en": (DEBREF.format("en"), "en"),
    "pdf-debref-de": (DEBREF.format("de"), "de"),
    "pdf-debref-fr": (DEBREF.format("fr"), "fr"),
    "pdf-debref-ja": (DEBREF.format("ja"), "ja"),
    "pdf-debref-zh-cn": (DEBREF.format("zh-cn"), "zh-cn"),
}
DEFAULT_PDF = PDF_SETS["pdf-debref-en"][0]
# What select_heldout_pages(DEFAULT_PDF, "data/corpus") chose for debian-reference-en 2.x
# (261 pages): chapter 6 (network applications) and appendix A, the held-out chapters of
# scripts/build_corpus.py; none of these pages has a text-layer line in train.jsonl. The
# builder selects afresh each time (another package version may move the chapters); this
# constant documents the selection and serves callers that cannot measure.
DEFAULT_PDF_PAGES = (133, 135, 137, 139, 140, 142, 143, 145, 146, 261)

OVERLAP_MIN_CHARS = 25  # lines this long or shorter (headers, page numbers) are not measured


@dataclass
class EvalPage:
    id: str
    image_path: Path
    text: str
    source: str
    sha256: str
    dataset: str = ""
    lang: str = ""
    where: str = ""  # "<manifest>:<line>", for error messages

    def load_image(self) -> Image.Image:
        try:
            with Image.open(self.image_path) as im:
                return im.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"{self.where}: {self.image_path}: cannot read image ({e})") from None


def write_set(out_dir: str | os.PathLike, items: list[tuple], lang: str = "") -> Path:
    """Write (id, image, text, source[, extra fields]) items as ``out_dir/images/<id>.png`` +
    manifest.jsonl, replacing any earlier set in ``out_dir`` as a whole.

    The set is written into a temporary sibling folder that then takes ``out_dir``'s place, so
    images of an earlier, larger build never linger and a failed build leaves the old set.
    """
    out = Path(out_dir)
    ids = [it[0] for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError(
            f"{out}: duplicate page ids {sorted({i for i in ids if ids.count(i) > 1})}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        (tmp / "images").mkdir()
        rows = []
        for pid, image, text, source, *extra in items:
            rel = f"images/{pid}.png"
            image.save(tmp / rel, optimize=False)
            row = {"id": pid, "image": rel, "text": text, "source": source}
            if lang:
                row["lang"] = lang
            row["sha256"] = sha256_file(tmp / rel)
            row["text_sha256"] = sha256_text(text)
            for e in extra:
                row.update(e)
            rows.append(row)
        with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.chmod(tmp, 0o777 & ~_umask())
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out / MANIFEST


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def load_pages(
    manifest: str | os.PathLike, limit: int | None = None, verify: bool = True
) -> list[EvalPage]:
    """Read a manifest (or the folder holding one); the first ``limit`` rows; check checksums.

    Every problem is a ValueError naming the manifest and line: bad JSON, a missing field, a
    duplicate page id, an image that is missing, changed or not an image, ground-truth text that
    does not match its ``text_sha256``, and a manifest without pages.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    manifest = Path(manifest)
    if manifest.is_dir():
        manifest = manifest / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: no such manifest (scripts/build_eval_sets.py)")
    dataset = manifest.parent.name
    pages: list[EvalPage] = []
    seen: dict[str, str] = {}
    with open(manifest, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{manifest}:{lineno}"
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: bad JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(r, dict):
                raise ValueError(f"{where}: a row must be a JSON object")
            missing = [k for k in REQUIRED_FIELDS if not isinstance(r.get(k), str)]
            if missing:
                hint = (
                    " (rebuild with scripts/build_eval_sets.py)" if "text_sha256" in missing else ""
                )
                raise ValueError(
                    f"{where}: missing or non-string field(s) {', '.join(missing)}{hint}"
                )
            if r["id"] in seen:
                raise ValueError(
                    f"{where}: duplicate page id {r['id']!r} (first at {seen[r['id']]})"
                )
            seen[r["id"]] = where
            page = EvalPage(
                r["id"],
                manifest.parent / r["image"],
                r["text"],
                r["source"],
                r["sha256"],
                dataset,
                r.get("lang", "") if isinstance(r.get("lang", ""), str) else "",
                where,
            )
            if verify:
                _verify(page, r["text_sha256"])
            pages.append(page)
            if limit is not None and len(pages) >= limit:
                break
    if not pages:
        raise ValueError(f"{manifest}: no pages in the manifest")
    return pages


def _verify(page: EvalPage, text_sha256: str) -> None:
    try:
        digest = sha256_file(page.image_path)
    except OSError as e:
        raise ValueError(f"{page.where}: {page.image_path}: cannot read ({e.strerror})") from None
    if digest != page.sha256:
        raise ValueError(f"{page.where}: {page.image_path}: sha256 differs from the manifest")
    if sha256_text(page.text) != text_sha256:
        raise ValueError(f"{page.where}: ground-truth text differs from its text_sha256")
    try:
        with Image.open(page.image_path) as im:
            im.verify()
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise ValueError(f"{page.where}: {page.image_path}: not a readable image ({e})") from None


def load_datasets(paths, limit: int | None = None) -> list[EvalPage]:
    """Pages of several sets; two sets with the same name (folder basename) are refused, since
    the report would merge them into one table."""
    names: dict[str, str] = {}
    pages = []
    for d in paths:
        ps = load_pages(d, limit=limit)
        name = ps[0].dataset
        if name in names:
            raise ValueError(
                f"two datasets are named {name!r} ({names[name]} and {d}); the report names a set "
                "by its folder, so rename one"
            )
        names[name] = str(d)
        pages += ps
    return pages


# ----------------------------------------------------------------------------------------------
# Held-out PDF pages


def _norm_line(line: str) -> str:
    return " ".join(line.split())


def text_layer_lines(text: str) -> list[str]:
    """The lines of a page's text layer that the overlap measure looks at: whitespace-
    normalised, longer than ``OVERLAP_MIN_CHARS`` characters."""
    lines = (_norm_line(x) for x in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"))
    return [x for x in lines if len(x) > OVERLAP_MIN_CHARS]


class CorpusText:
    """The train and held-out split of a corpus folder (scripts/build_corpus.py) as two
    searchable strings: each row's text whitespace-normalised, rows joined by newlines."""

    def __init__(self, corpus_dir: str | os.PathLike):
        folder = Path(corpus_dir)
        self.splits = {}
        for split in ("train", "heldout"):
            path = folder / f"{split}.jsonl"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no corpus split (run scripts/build_corpus.py)")
            with open(path, encoding="utf-8") as f:
                self.splits[split] = "\n".join(
                    _norm_line(json.loads(line)["text"]) for line in f if line.strip()
                )

    def count(self, lines: list[str], split: str) -> int:
        """How many of ``lines`` occur verbatim in ``split`` ("train" or "heldout")."""
        text = self.splits[split]
        return sum(1 for x in lines if x in text)


@dataclass
class PageOverlap:
    page: int  # 1-based
    lines: int  # measured lines (see text_layer_lines)
    heldout: int  # of them found in heldout.jsonl
    train: int | None  # of them found in train.jsonl; None when not measured

    def as_fields(self) -> dict:
        return {
            "overlap_lines": self.lines,
            "train_overlap": self.train,
            "heldout_overlap": self.heldout,
        }


def pdf_page_count(pdf: str | os.PathLike) -> int:
    from dsocr.pipeline.providers import count_pages

    return count_pages(pdf)


def check_page_numbers(pages, n_pages: int, what: str = "page") -> tuple[int, ...]:
    """1-based page numbers, each in 1..n_pages (ValueError otherwise), order kept."""
    out = []
    for p in pages:
        if not isinstance(p, int) or p < 1:
            raise ValueError(f"{what} numbers are 1-based: got {p!r}")
        if p > n_pages:
            raise ValueError(f"{what} {p} is past the end: the PDF has {n_pages} pages")
        out.append(p)
    if len(set(out)) != len(out):
        raise ValueError(f"{what} numbers repeat: {list(pages)}")
    return tuple(out)


def _text_layers(pdf, pages=None):
    """(1-based page, text layer) for ``pages`` (all when None), rendered small (text only)."""
    from dsocr.pipeline.providers import iter_pages

    indices = None if pages is None else [n - 1 for n in pages]
    for p in iter_pages(pdf, dpi=9, pages=indices):
        yield p.index + 1, p.text_layer or ""


def pdf_line_overlap(
    pdf: str | os.PathLike,
    corpus: str | os.PathLike | CorpusText,
    pages=None,
    *,
    train_if=None,
) -> list[PageOverlap]:
    """Per page of ``pdf`` (1-based ``pages``, all when None): how many of its text-layer lines
    (:func:`text_layer_lines`) occur in the corpus folder's train.jsonl and heldout.jsonl.

    ``train_if(overlap) -> bool`` limits the (slower: the train split is ~20x larger) train
    search to the pages it accepts; the others get ``train=None``.
    """
    text = corpus if isinstance(corpus, CorpusText) else CorpusText(corpus)
    if pages is not None:
        pages = check_page_numbers(list(pages), pdf_page_count(pdf))
    out = []
    for number, layer in _text_layers(pdf, pages):
        lines = text_layer_lines(layer)
        ov = PageOverlap(number, len(lines), text.count(lines, "heldout"), None)
        if train_if is None or train_if(ov):
            ov.train = text.count(lines, "train")
        out.append(ov)
    return out


def _spread(items: list, n: int) -> list:
    """``n`` items spread evenly over ``items`` (first and last included), order kept."""
    if n >= len(items):
        return list(items)
    if n == 1:
        return [items[0]]
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def is_heldout_page(ov: PageOverlap, max_train: int = 1, min_heldout: int = 3) -> bool:
    """A page counts as held-out when at least ``min_heldout`` of its lines are in heldout.jsonl,
    those are at least half of its lines found in the corpus at all, and at most ``max_train``
    are in train.jsonl (lines that are not found anywhere, e.g. bullets or typographic quotes
    the HTML writes differently, count for neither side)."""
    train = ov.train or 0
    return ov.heldout >= min_heldout and ov.heldout >= train and train <= max_train


def select_heldout_pages(
    pdf: str | os.PathLike,
    corpus: str | os.PathLike | CorpusText,
    n: int = 10,
    *,
    max_train: int = 1,
    min_heldout: int = 3,
) -> list[PageOverlap]:
    """Choose ``n`` held-out pages of ``pdf`` (:func:`is_heldout_page`), deterministically.

    Pages with no train line are preferred; when there are at least ``n`` of them only those are
    used. The result is spread evenly over the candidates in page order. Fewer than ``n`` pages
    come back when the PDF has fewer held-out pages; ValueError when it has none.
    """
    if n < 1:
        raise ValueError(f"number of pages must be at least 1, got {n}")
    measured = pdf_line_overlap(pdf, corpus, train_if=lambda ov: ov.heldout >= min_heldout)
    cands = [
        ov
        for ov in measured
        if ov.train is not None and is_heldout_page(ov, max_train, min_heldout)
    ]
    clean = [ov for ov in cands if ov.train == 0]
    if len(clean) >= n:
        cands = clean
    if not cands:
        raise ValueError(
            f"{pdf}: no page has held-out text (>= {min_heldout} lines in heldout.jsonl, "
            f"<= {max_train} in train.jsonl); is the corpus built from this document?"
        )
    return _spread(cands, n)


def build_pdf_set(
    out_dir: str | os.PathLike,
    pdf: str | os.PathLike = DEFAULT_PDF,
    pages=None,
    dpi: float = 144,
    prefix: str = "debref-en",
    *,
    corpus: str | os.PathLike | CorpusText | None = "data/corpus",
    n_pages: int = 10,
    lang: str = "",
    allow_overlap: bool = False,
    max_train: int = 1,
) -> Path:
    """Rasterise pages of ``pdf`` at ``dpi``; ground truth = the page's text layer.

    ``pages=None`` chooses ``n_pages`` held-out pages with :func:`select_heldout_pages`. Given
    1-based ``pages`` are measured the same way; a page with more than ``max_train`` lines in the
    training corpus is refused (ValueError) unless ``allow_overlap``, which warns instead. Each
    manifest row records its page's overlap counts; ``corpus=None`` (explicit pages only) skips
    the measure and records ``train_overlap: null``.
    """
    from dsocr.pipeline.providers import iter_pages

    if pages is None:
        if corpus is None:
            raise ValueError("choosing held-out pages needs the corpus (or explicit pages)")
        overlap = select_heldout_pages(pdf, corpus, n_pages, max_train=max_train)
        pages = tuple(ov.page for ov in overlap)
    else:
        pages = check_page_numbers(list(pages), pdf_page_count(pdf))
        if corpus is None:
            if not allow_overlap:
                raise ValueError("cannot check the pages against the training corpus without it")
            warnings.warn(f"{pdf}: pages not checked against the training corpus", stacklevel=2)
            overlap = [PageOverlap(p, 0, 0, None) for p in pages]
        else:
            overlap = pdf_line_overlap(pdf, corpus, pages)
        bad = [ov for ov in overlap if ov.train is not None and ov.train > max_train]
        if bad:
            listing = ", ".join(f"{ov.page} ({ov.train}/{ov.lines} lines)" for ov in bad)
            msg = f"{pdf}: pages whose text is in the training corpus: {listing}"
            if not allow_overlap:
                raise ValueError(msg + "; not a held-out set (pass the pages explicitly to force)")
            warnings.warn(msg + "; recorded as train_overlap in the manifest", stacklevel=2)
    by_page = {ov.page: ov for ov in overlap}
    items = []
    for p in iter_pages(pdf, dpi=dpi, pages=[n - 1 for n in pages]):
        number = p.index + 1
        text = (p.text_layer or "").replace("\r\n", "\n").replace("\r", "\n").strip()
        items.append(
            (
                f"{prefix}-p{number:04d}",
                p.image,
                text,
                f"{pdf}#{number}",
                by_page[number].as_fields(),
            )
        )
    return write_set(out_dir, items, lang=lang)


def rendered_page_style():
    """The style of the rendered sets (rendered-en and rendered-md-en): sans 16 px on 816x1056,
    US Letter at 96 dpi."""
    from dsocr.render import PageStyle

    return PageStyle(font="sans", font_size=16, width=816, height=1056)


def rendered_pages(
    texts: list[tuple[str, str]], n_pages: int, seed: int = 0, chars_per_page: int = 1500
) -> list[tuple[str, Image.Image, str, str]]:
    """(source, text) pairs -> ``n_pages`` clean rendered pages (first page of a text slice each).

    Texts are drawn in a seeded order; each page takes a ``chars_per_page`` slice starting at a
    line boundary, rendered with a fixed style (sans 16 px, 816x1056 = US Letter at 96 dpi).
    Characters no shipped font has are dropped before rendering.
    """
    from dsocr.render import missing_chars, render_text

    rng = random.Random(seed)
    style = rendered_page_style()
    order = list(range(len(texts)))
    rng.shuffle(order)
    items = []
    for i in order:
        if len(items) >= n_pages:
            break
        source, text = texts[i]
        lines = [ln for ln in text.split("\n") if ln.strip()]
        if not lines:
            continue
        start = rng.randrange(max(1, len(lines) - 5))
        chunk = "\n".join(lines[start:])[:chars_per_page]
        bad = set(missing_chars(chunk))
        if bad:
            chunk = "".join(c for c in chunk if c not in bad)
        chunk = chunk.strip()
        if len(chunk) < 200:
            continue
        page = render_text(chunk, style)[0]
        items.append(
            (f"rendered-{len(items):03d}", page.image.convert("RGB"), page.text.strip(), source)
        )
    return items


def build_rendered_set(
    out_dir: str | os.PathLike,
    corpus: str | os.PathLike = "data/corpus/heldout.jsonl",
    n_pages: int = 10,
    lang: str = "en",
    seed: int = 0,
) -> Path:
    """Render ``n_pages`` pages of held-out corpus text in ``lang`` (fixed seed)."""
    texts = []
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r.get("lang") == lang:
                texts.append((f"{r['source']}:{r['doc']}", r["text"]))
    return write_set(out_dir, rendered_pages(texts, n_pages, seed=seed), lang=lang)


# ----------------------------------------------------------------------------------------------
# Rendered HTML documentation pages with their Markdown as ground truth (structure)

# Where the corpus's HTML came from (scripts/build_corpus.py sources()): corpus "source" field
# -> installed folder. A row's "doc" id names its file inside that folder (doc_html_path).
HTML_ROOTS = {
    "debian-handbook": "/usr/share/doc/debian-handbook/html",
    "debian-reference": "/usr/share/debian-reference",
    "python3.11-doc": "/usr/share/doc/python3.11/html",
}
STRUCTURE = ("heading", "list", "table", "code")  # block kinds a rendered-md page is scored on

# Page chrome of the three documentation styles, dropped with everything inside: Sphinx
# (python3.11-doc) sidebars, related-links bars, footer and mobile menu; DocBook (debian-
# reference) navheader/navfooter tables and tables of contents; Publican (debian-handbook)
# "Download the ebook" banner, logo bar and Prev/Next docnav lists; heading permalinks ("¶").
_SKIP_TAGS = {
    "head", "script", "style", "nav", "header", "footer", "noscript", "form", "svg",
    "button", "select", "textarea", "img", "map", "iframe", "object",
}  # fmt: skip
_SKIP_CLASSES = {
    "navheader", "navfooter", "docnav", "toc", "sphinxsidebar", "related", "footer",
    "mobile-nav", "menu-wrapper", "headerlink", "indexterm", "inline-search", "clearer",
    "version_switcher_placeholder", "language_switcher_placeholder", "toc-backref",
}  # fmt: skip
_SKIP_IDS = {"banner", "title", "searchbox"}
_VOID = {
    "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param",
    "source", "track", "wbr",
}  # fmt: skip
_BLOCKS = {
    "p", "div", "section", "article", "main", "blockquote", "dl", "dt", "dd", "figure",
    "figcaption", "caption", "center", "address", "aside", "hr", "br",
}  # fmt: skip
_CODE_TAGS = {"code", "tt", "kbd", "samp"}
_LAYOUT_TABLES = {"tip", "note", "caution", "warning", "important"}  # DocBook admonition tables
_MD_INLINE = re.compile(r"\*\*|__|`|\\(?=[\\`*_#|\[\]()>+\-.!~])")
_MD_LEAD = re.compile(r"(#{1,6}(?:\s|$)|[-*+>](?:\s|$)|\d{1,9}([.)])(?:\s|$)|`{3}|~{3}|[-*_]{3})")


def _escape_md(text: str, cell: bool = False) -> str:
    """Plain text as Markdown the renderer draws literally: ``**``, ``__``, backticks and
    backslash escapes get a backslash (a table cell's ``|`` too)."""
    text = _MD_INLINE.sub(lambda m: "".join("\\" + c for c in m.group(0)), text)
    return text.replace("|", "\\|") if cell else text


def _code_span(code: str) -> str:
    """``code`` as an inline code span (more backticks than it holds; empty -> "")."""
    code = code.strip()
    if not code:
        return ""
    ticks = "`" * (max((len(r) for r in re.findall("`+", code)), default=0) + 1)
    return f"{ticks}{code}{ticks}" if len(ticks) == 1 else f"{ticks} {code} {ticks}"


@dataclass
class MdBlock:
    """One Markdown block of a converted page: kind is "para", "heading", "list", "table" or
    "code"; md its Markdown (one line, except tables and code). List items of one list follow
    each other with a single newline (``tight``), every other block after a blank line."""

    kind: str
    md: str
    tight: bool = False


class _HtmlToMd(HTMLParser):
    """HTML -> MdBlocks; see :func:`html_to_markdown`."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.blocks: list[MdBlock] = []
        self.stack: list[tuple[str, bool]] = []  # open elements: (tag, starts a skipped subtree)
        self.skip = 0
        self.inline: list[tuple[str, bool]] = []  # (text, is code) of the block being read
        self.code = 0  # open inline code elements
        self.pre: list[str] | None = None  # text of an open <pre>
        self.heading = 0  # level of an open h1-h6
        self.lists: list[list] = []  # open ul/ol: [ordered, items so far]
        self.li_open = False  # an <li> whose text is not yet written
        self.tables: list[list] = []  # open data tables: rows of cells (lists of pieces)
        self.layout_tables = 0
        self.cell_open = False  # a td/th of the innermost data table is being read

    # -- structure

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        skip = (
            tag in _SKIP_TAGS
            or bool(classes & _SKIP_CLASSES)
            or a.get("id") in _SKIP_IDS
            or (tag == "div" and a.get("role") == "navigation")
        )
        if tag not in _VOID:
            self.stack.append((tag, skip))
        if skip:
            if tag not in _VOID:
                self.skip += 1
            return
        if self.skip:
            return
        if self.pre is not None:
            return
        if self.tables and tag not in ("table", "tr", "td", "th"):
            if tag in _BLOCKS or tag in ("li", "pre", "ul", "ol") or tag[:1] == "h":
                self.inline.append((" ", False))
            if tag in _CODE_TAGS:
                self.code += 1
            return
        if tag == "table":
            if (a.get("summary") or "").lower() in _LAYOUT_TABLES or classes & _LAYOUT_TABLES:
                self.layout_tables += 1
                self.stack[-1] = ("table-layout", False)
                self.flush()
                return
            self.flush()
            self.tables.append([])
        elif tag in ("tr", "td", "th"):
            if not self.tables:
                self.flush()
            elif tag != "tr":
                self._end_cell()  # an unclosed cell before this one
                self.inline, self.cell_open = [], True
        elif tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
            self.flush()
            self.heading = int(tag[1])
        elif tag in ("ul", "ol"):
            self.flush()
            self.lists.append([tag == "ol", 0])
        elif tag == "li":
            self.flush()
            if self.lists:
                self.lists[-1][1] += 1
            self.li_open = True
        elif tag == "pre":
            self.flush()
            self.pre = []
        elif tag in _CODE_TAGS:
            self.code += 1
        elif tag in _BLOCKS:
            self.flush()

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in _VOID:
            self.handle_endtag(tag)

    def handle_endtag(self, tag):
        if tag in _VOID:
            return
        names = [t for t, _ in self.stack]
        key = "table-layout" if tag == "table" and names and names[-1] == "table-layout" else tag
        if key not in names:
            return  # a stray end tag
        while self.stack:  # close what the HTML left open inside this element too
            t, skip = self.stack.pop()
            if skip:
                self.skip -= 1
            elif not self.skip:
                self._close(t)
            if t == key:
                break

    def _close(self, tag):
        if self.pre is not None:
            if tag == "pre":
                self._emit_code("".join(self.pre))
                self.pre = None
            return
        if tag in _CODE_TAGS:
            self.code = max(0, self.code - 1)
        elif tag == "table-layout":
            self.flush()
            self.layout_tables -= 1
        elif self.tables:
            if tag == "table":
                self._emit_table(self.tables.pop())
            elif tag in ("td", "th"):
                self._end_cell()
            elif tag == "tr":
                self._end_cell()
                self.tables[-1].append(None)  # row end
            elif tag in _BLOCKS or tag in ("li", "pre") or tag[:1] == "h":
                self.inline.append((" ", False))
        elif tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
            self.flush()
            self.heading = 0
        elif tag in ("ul", "ol"):
            self.flush()
            if self.lists:
                self.lists.pop()
        elif tag == "li" or tag in _BLOCKS:
            self.flush()
            if tag == "li":
                self.li_open = False

    def handle_data(self, data):
        if self.skip:
            return
        if self.pre is not None:
            self.pre.append(data)
        else:
            self.inline.append((data, self.code > 0))

    # -- output

    def _inline_md(self, cell: bool = False) -> str:
        """The pieces read since the last block as one line of Markdown, whitespace collapsed."""
        out, i, pieces = [], 0, self.inline
        while i < len(pieces):
            j = i
            while j < len(pieces) and pieces[j][1] == pieces[i][1]:
                j += 1
            text = re.sub(r"\s+", " ", "".join(p for p, _ in pieces[i:j]))
            if pieces[i][1]:
                lead = " " if text[:1] == " " else ""
                trail = " " if text[-1:] == " " and text.strip() else ""
                out.append(lead + _code_span(text) + trail)
            else:
                out.append(_escape_md(text, cell))
            i = j
        self.inline = []
        return re.sub(r" {2,}", " ", "".join(out)).replace("¶", "").strip()

    def _add(self, kind: str, md: str, tight: bool = False) -> None:
        self.blocks.append(MdBlock(kind, md, tight))

    def flush(self) -> None:
        """End the block being read (heading, list item or paragraph)."""
        if self.tables:
            return
        text = self._inline_md()
        if not text:
            return
        if self.heading:
            self._add("heading", "#" * self.heading + " " + text)
        elif self.lists and self.li_open:
            ordered, number = self.lists[-1]
            marker = f"{number}." if ordered else "-"
            prev = self.blocks[-1] if self.blocks else None
            self._add(
                "list",
                "  " * (len(self.lists) - 1) + f"{marker} {text}",
                bool(prev and prev.kind == "list"),
            )
            self.li_open = False  # more text in this item: a paragraph of its own
        else:
            if _MD_LEAD.match(text):
                text = "\\" + text  # would start a block: drawn literally
            self._add("para", text)

    def _end_cell(self) -> None:
        if self.cell_open:
            self.tables[-1].append(self._inline_md(cell=True))
        self.inline, self.cell_open = [], False

    def _emit_table(self, cells: list) -> None:
        rows, row = [], []
        for c in cells:
            if c is None:
                if row:
                    rows.append(row)
                row = []
            else:
                row.append(c or " ")
        if row:
            rows.append(row)
        rows = [r for r in rows if any(c.strip() for c in r)]
        if not rows:
            return
        ncol = max(len(r) for r in rows)
        rows = [r + [" "] * (ncol - len(r)) for r in rows]
        if ncol == 1:  # one column: not a table the renderer draws as one; paragraphs
            for r in rows:
                self._add("para", r[0])
            return
        lines = ["| " + " | ".join(c.strip() or " " for c in r) + " |" for r in rows]
        lines.insert(1, "|" + "|".join(" --- " for _ in range(ncol)) + "|")
        if self.tables:  # a table inside a table cell: its text joins the cell
            self.inline.append((" ".join(" ".join(r) for r in rows), False))
            return
        self._add("table", "\n".join(lines))

    def _emit_code(self, code: str) -> None:
        code = code.replace("\r\n", "\n").replace("\r", "\n").expandtabs(4)
        lines = [ln.rstrip() for ln in code.split("\n")]
        while lines and not lines[0]:
            lines.pop(0)
        while lines and not lines[-1]:
            lines.pop()
        if not lines:
            return
        fence = "`" * max(3, max((len(r) for r in re.findall("`{3,}", code)), default=0) + 1)
        if self.tables:
            self.inline.append((" ".join(lines), True))
            return
        self._add("code", "\n".join([fence, *lines, fence]))


def html_to_blocks(html: str) -> list[MdBlock]:
    """HTML -> the Markdown blocks of :func:`html_to_markdown`."""
    p = _HtmlToMd()
    p.feed(html)
    p.close()
    p.flush()
    return p.blocks


def join_blocks(blocks: list[MdBlock]) -> str:
    """Blocks -> Markdown: a blank line between blocks, one newline inside a list."""
    out = []
    for k, b in enumerate(blocks):
        if k:
            out.append("\n" if b.tight and b.kind == "list" else "\n\n")
        out.append(b.md)
    return "".join(out)


def html_to_markdown(html: str) -> str:
    """Documentation HTML (Sphinx, DocBook, Publican as Debian installs them) -> the light
    Markdown that :func:`dsocr.render.render_markdown` draws.

    h1-h6 -> ``#``..``######``; p/div -> paragraphs; ul/ol/li -> ``- `` / ``1. `` items,
    two spaces of indent per nesting level; pre -> fenced code blocks (tabs expanded to 4);
    code/tt/kbd/samp -> `code`; tables -> pipe tables (first row the header; nested blocks in a
    cell flattened into it; one-column and admonition-layout tables become paragraphs). Page
    chrome (navigation bars, sidebars, tables of contents, banners, footers, permalinks,
    images) is dropped. Everything else becomes plain text, escaped where the renderer would
    read it as Markdown. Emphasis is not kept.
    """
    return join_blocks(html_to_blocks(html))


def doc_html_path(doc: str, source: str, roots: dict | None = None) -> Path:
    """The HTML file a corpus row came from: its ``doc`` id and ``source`` package (the naming
    of scripts/build_corpus.py ``sources()``), under ``roots`` (default :data:`HTML_ROOTS`)."""
    roots = HTML_ROOTS if roots is None else roots
    if source not in roots:
        raise ValueError(f"{doc}: unknown source {source!r} (known: {sorted(roots)})")
    root = Path(roots[source])
    kind, _, rest = doc.partition("/")
    if kind == "reference":
        lang, _, name = rest.partition("/")
        return root / f"{name}.{lang}.html"
    if kind in ("handbook", "python") and rest:
        return root / f"{rest}.html"
    raise ValueError(f"{doc}: not a corpus document id (handbook/..., reference/..., python/...)")


def _page_structure(blocks: list[MdBlock]) -> list[str]:
    kinds = {b.kind for b in blocks}
    return [k for k in STRUCTURE if k in kinds]


def markdown_page(blocks: list[MdBlock], style) -> tuple[Image.Image, str, int] | None:
    """Render ``blocks`` from the first; keep the whole blocks that fit on one page.

    Returns (image, page text, blocks used), page text == the Markdown drawn on the page (the
    renderer's ``page.text``); None when not even the first block fits on a page.
    """
    from dsocr.render import render_markdown

    md = join_blocks(blocks)
    pages = render_markdown(md, style)
    used = len(blocks)
    if len(pages) > 1:
        room = len(pages[0].text)
        used = 0
        while used < len(blocks) and len(join_blocks(blocks[: used + 1])) <= room:
            used += 1
        while used > 1 and blocks[used - 1].kind == "heading":
            used -= 1  # a heading at the foot of the page belongs with what follows it
        if not used:
            return None
        pages = render_markdown(join_blocks(blocks[:used]), style)
        while len(pages) > 1 and used > 1:  # not expected: a prefix lays out the same
            used -= 1
            pages = render_markdown(join_blocks(blocks[:used]), style)
        if len(pages) > 1:
            return None
    return pages[0].image.convert("RGB"), pages[0].text, used


def _drop_missing(blocks: list[MdBlock]) -> list[MdBlock]:
    from dsocr.render import missing_chars

    bad = set(missing_chars("".join(b.md for b in blocks)))
    if not bad:
        return blocks
    out = []
    for b in blocks:
        md = "".join(c for c in b.md if c not in bad)
        if md.strip():
            out.append(MdBlock(b.kind, md, b.tight))
    return out


def markdown_pages(
    docs: list[tuple[str, str, str]],
    n_pages: int,
    seed: int = 0,
    *,
    tries: int = 6,
    max_chars: int = 4000,
    min_chars: int = 300,
    table_share: float = 0.4,
) -> list[tuple]:
    """(doc id, source, HTML) triples -> up to ``n_pages`` rendered Markdown pages, one per
    document, as :func:`write_set` items (id, image, page text, source, extra fields).

    Documents are put in a seeded order. For each, up to ``tries`` seeded start blocks
    (headings first), plus up to ``tries`` starts at the heading above a table (tables are rare
    and random starts miss them), are rendered (sans 16 px, 816x1056, as rendered-en) and the
    page with the most kinds of structure (:data:`STRUCTURE`; lists, tables and code before
    headings; a table breaks ties) is kept. The set takes pages with a table first, up to
    ``table_share`` of ``n_pages`` (TEDS needs more than one), then the first page with a list,
    code and a heading (where there is one), then pages with lists/tables/code, then
    heading-only pages, then pages without structure, in that order, and lists them in the
    seeded order. Characters no shipped font has are dropped.
    """
    rng = random.Random(seed)
    style = rendered_page_style()
    order = list(range(len(docs)))
    rng.shuffle(order)
    cands = []
    for i in order:
        doc, source, html = docs[i]
        blocks = _drop_missing(html_to_blocks(html))
        if sum(len(b.md) for b in blocks) < min_chars:
            continue
        heads = [k for k, b in enumerate(blocks) if b.kind == "heading"]
        others = [k for k, b in enumerate(blocks) if b.kind != "heading" and not b.tight]
        starts = rng.sample(heads, min(tries, len(heads)))
        if len(starts) < tries:
            starts += rng.sample(others, min(tries - len(starts), len(others)))
        above = {
            max((h for h in heads if h <= k and k - h <= 8), default=k)
            for k, b in enumerate(blocks)
            if b.kind == "table"
        }
        starts += rng.sample(sorted(above), min(tries, len(above)))
        best = None
        for s in sorted(set(starts)):
            chunk, size = [], 0
            for b in blocks[s:]:
                if chunk and size + len(b.md) > max_chars:
                    break
                chunk.append(b)
                size += len(b.md) + 2
            if chunk and chunk[0].tight:
                chunk[0] = MdBlock(chunk[0].kind, chunk[0].md.lstrip(), False)
            got = markdown_page(chunk, style)
            if got is None or len(got[1].strip()) < min_chars:
                continue
            structure = _page_structure(chunk[: got[2]])
            score = (
                len([k for k in structure if k != "heading"]),
                "table" in structure,
                len(structure),
            )
            if best is None or score > best[0]:
                best = (score, s, got[0], got[1], structure)
        if best is None:
            continue
        _, s, image, text, structure = best
        extra = {"doc": doc, "first_block": s, "structure": structure}
        cands.append((image, text, source, extra))
    # Every kind of structure on at least one page where possible (rarest first), then pages
    # with lists/tables/code, then headings only, then the rest; seeded order within each tier.
    with_table = [c for c in cands if "table" in c[3]["structure"]]
    chosen = with_table[: max(1, round(n_pages * table_share))]
    for kind in ("list", "code", "heading"):
        hit = next((c for c in cands if kind in c[3]["structure"] and c not in chosen), None)
        if hit is not None and len(chosen) < n_pages:
            chosen.append(hit)
    for tier in (lambda st: set(st) - {"heading"}, bool, lambda st: True):
        chosen += [c for c in cands if c not in chosen and tier(c[3]["structure"])]
    chosen = sorted(chosen[:n_pages], key=cands.index)
    return [(f"md-{k:03d}", im, text, src, ex) for k, (im, text, src, ex) in enumerate(chosen)]


def build_markdown_set(
    out_dir: str | os.PathLike,
    corpus: str | os.PathLike = "data/corpus/heldout.jsonl",
    n_pages: int = 10,
    seed: int = 0,
    *,
    lang: str = "en",
    roots: dict | None = None,
) -> Path:
    """Render ``n_pages`` pages of held-out HTML documentation as light Markdown (fixed seed).

    The documents are the ``lang`` rows of the held-out corpus split; each row's HTML file
    (:func:`doc_html_path`) is converted with :func:`html_to_markdown` and rendered by
    :func:`markdown_pages`. Ground truth = the Markdown on the page. Manifest rows add ``doc``,
    ``first_block`` (index of the page's first block) and ``structure`` (which of heading,
    list, table, code the page has). FileNotFoundError when none of the HTML is installed.
    """
    roots = HTML_ROOTS if roots is None else roots
    docs, missing = [], []
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            if r.get("lang") != lang or r.get("source") not in roots:
                continue  # another language, or a plain-text source (no HTML to convert)
            path = doc_html_path(r["doc"], r["source"], roots)
            if not path.is_file():
                missing.append(str(path))
                continue
            docs.append((r["doc"], str(path), path.read_text(encoding="utf-8", errors="replace")))
    if not docs:
        hint = f" (e.g. {missing[0]})" if missing else ""
        raise FileNotFoundError(f"{corpus}: no {lang!r} held-out HTML source is installed{hint}")
    items = markdown_pages(docs, n_pages, seed=seed)
    if not items:
        raise ValueError(f"{corpus}: no held-out {lang!r} document gave a page")
    return write_set(out_dir, items, lang=lang)
