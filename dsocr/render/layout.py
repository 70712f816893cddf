"""Text and light Markdown -> positioned layout items -> columns and pages (no drawing here).

The unit of layout is an Item: a horizontal band of a column (one text line, a table row, a code
block's padding, a vertical gap) with its height, its drawing ops relative to the band's top-left,
and the source offset where its text begins. An item's source span runs to the next item's start,
so every source character belongs to exactly one item and pages can be cut between any two items
with "".join(page texts) == source. Whitespace at a wrap point stays at the end of the line before
it (the wrap consumes nothing); newlines belong to the line they end.

Line breaking: greedy, by measured advance widths (cached per face and string), at spaces, and
between any two CJK characters (opening brackets stick to the next character, closing punctuation
to the previous one). A word wider than the line is cut at grapheme-ish boundaries (never before a
combining mark, ZWJ/ZWNJ, or after a virama).

Bidi: every block (a plain-text line; a Markdown paragraph, heading, list item, quote or table)
has a base direction (``Bases``): PageStyle.direction "ltr" or "rtl" forces it; "auto" (the
default) takes it from the block's first strong character (UAX #9 P2-P3), or, for a block with
none, from the block before it. A line with right-to-left text or base direction gets UAX #9
levels (weak types, bracket pairs, neutrals; no explicit embeddings or isolates) and is drawn as
runs of one face and level in rule-L2 order. raqm shapes and orders inside an RTL face's run;
brackets and punctuation of other faces at odd levels are reversed and mirrored. Lines with no
RTL text in a left-to-right block take the plain left-to-right path.

Right-to-left blocks are mirrored: lines are right-aligned, a list marker sits right of its text
with the indent taken from the right ("1." drawn ".1"), a quote's bar is on the right, and a
table's first column is at the right edge (each cell's text takes its own direction, the table's
when it has none). Code blocks always stay left to right. Mirroring moves only x positions, so
item heights, source offsets and pagination are the same in either direction.

Markdown subset: ATX headings, fenced code blocks, pipe tables, "-", "*", "+", "1." and "1)" lists
(nesting by indent), "> " quotes, thematic breaks, paragraphs, and inline **bold**, __bold__ and
`code` (markers are not drawn). Everything else is drawn literally.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dsocr.render.fonts import Face, baseline, face, resolver

if TYPE_CHECKING:
    from dsocr.render.render import PageStyle

TEXT, RECT = 0, 1  # op kinds: (TEXT, x, y_baseline, Face, str) / (RECT, x0, y0, x1, y1, fill, line)
TAB = 4  # tab stops every TAB characters
_SPECIAL = re.compile(r"[\t\r\f\v]")


@dataclass
class Item:
    """One horizontal band of a column; see the module docstring."""

    start: int  # source offset where this item's text begins
    height: int  # px
    ops: list[tuple] = field(default_factory=list)
    gap: bool = False  # vertical space, dropped at the top of a column
    keep_with_next: bool = False  # headings: move to the next column rather than end one
    page_break: bool = False  # start a new page before this item (form feed)


class Para:
    """Display text to wrap, with where each character came from and its family.

    src[i] is the source offset of text[i] (None: base + i); styles[i] is the family key of
    text[i] like "sans-bold" or "mono" (None: the caller's family for all).
    """

    __slots__ = ("text", "base", "src", "styles")

    def __init__(self, text: str, base: int, src=None, styles=None):
        self.text, self.base, self.src, self.styles = text, base, src, styles

    def source(self, i: int) -> int:
        return self.base + i if self.src is None else self.src[i]


# ---------------------------------------------------------------------------------------------
# Line breaking


_CJK = (
    "\u1100-\u11ff\u2e80-\u2fdf\u3040-\u30ff\u3100-\u312f\u3130-\u318f\u31f0-\u31ff"
    "\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
)
_OPEN = re.escape("「『（【〔〈《〝‘“［｛(")
_CLOSE = re.escape("、。，．・：；？！）」』】〕〉》〞’”…‥ー々〻")
_CLOSE += re.escape(
    "ぁぃぅぇぉっゃゅょゎァィゥェォッャュョヮヵヶ］｝"
)  # small kana never start a line
# A token is a break unit plus its trailing spaces: one CJK character (with its brackets), a run of
# other non-space characters, or leading spaces.
_TOKEN = re.compile(f"[{_OPEN}]*[{_CJK}][{_CLOSE}]*[ ]*|[^ {_CJK}]+[ ]*|[ ]+")
_NO_BREAK_AFTER = frozenset("\u200d\u094d")  # ZWJ, Devanagari virama
_NO_BREAK_BEFORE = frozenset("\u200c\u200d")


def faces_for(para: Para, family: str, size: int) -> list[Face] | None:
    """One Face per display character, or None when all are the family's own (the fast path)."""
    if para.styles is None:
        keys = resolver(family).faces(para.text)
    else:
        keys, i, text, styles = [], 0, para.text, para.styles
        while i < len(text):
            j = i + 1
            while j < len(text) and styles[j] == styles[i]:
                j += 1
            keys += resolver(styles[i]).faces(text[i:j]) or [styles[i]] * (j - i)
            i = j
        if all(k == family for k in keys):
            keys = None
    if keys is None:
        return None
    table = {k: face(k, size) for k in set(keys)}
    return [table[k] for k in keys]


def _measure(text: str, faces: list[Face] | None, prim: Face, s: int, e: int) -> float:
    """Width of text[s:e], measured run by run (one face per run)."""
    if faces is None:
        return prim.measure(text[s:e])
    total, i = 0.0, s
    while i < e:
        f, j = faces[i], i + 1
        while j < e and faces[j] is f:
            j += 1
        total += f.measure(text[i:j])
        i = j
    return total


def _cut_points(text: str, s: int, e: int) -> list[int]:
    """Positions in (s, e] where a too-long word may be cut."""
    out = []
    for p in range(s + 1, e):
        c = text[p]
        if c in _NO_BREAK_BEFORE or text[p - 1] in _NO_BREAK_AFTER:
            continue
        if unicodedata.category(c) in ("Mn", "Mc", "Me"):
            continue
        out.append(p)
    out.append(e)
    return out


def wrap(text: str, faces: list[Face] | None, prim: Face, width: float) -> list[tuple[int, int]]:
    """Greedy line breaking -> [(start, end)] spans of text covering it exactly, in order.

    A line's trailing spaces are in its span but not in its measured width (they hang).
    """
    lines: list[tuple[int, int]] = []
    line_start, x, empty = 0, 0.0, True
    space = prim.space
    for m in _TOKEN.finditer(text):
        s, e = m.span()
        v = e
        while v > s and text[v - 1] == " ":
            v -= 1
        w = _measure(text, faces, prim, s, v) if v > s else 0.0
        if not empty and x + w > width:
            lines.append((line_start, s))
            line_start, x, empty = s, 0.0, True
        if empty and w > width:  # hard-wrap a word longer than the line
            cut = s
            while w > width:
                points = _cut_points(text, cut, v)
                lo, hi = 0, len(points) - 1  # find the last point that fits; at least one
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    if _measure(text, faces, prim, cut, points[mid]) <= width:
                        lo = mid
                    else:
                        hi = mid - 1
                if points[lo] == v:
                    break
                lines.append((line_start, points[lo]))
                line_start = cut = points[lo]
                w = _measure(text, faces, prim, cut, v)
        if faces is None:
            x += w + (e - v) * space
        else:
            x += w + sum(faces[i].space for i in range(v, e))
        empty = False
    lines.append((line_start, len(text)))
    return lines


DIRECTIONS = ("auto", "ltr", "rtl")  # PageStyle.direction values


def _first_strong(text: str) -> bool | None:
    """UAX #9 rule P2: True if the first strong character is R or AL, False if it is L, None if
    the text has none (then P3 would say LTR; ``Bases`` lets the previous block decide)."""
    for ch in text:
        bidi = unicodedata.bidirectional(ch)
        if bidi == "L":
            return False
        if bidi in ("R", "AL"):
            return True
    return None


class Bases:
    """Base direction (True: right to left) of each block of one document, in document order.

    direction "ltr" / "rtl" forces it; "auto" takes it from the block's first strong character
    (UAX #9 P2-P3) and, for a block with none (a line of digits or punctuation), from the block
    before it (a higher-level protocol, HL1), left to right at the start of the document.
    """

    __slots__ = ("forced", "prev")

    def __init__(self, direction: str = "auto"):  # one of DIRECTIONS (PageStyle checks it)
        self.forced = None if direction == "auto" else direction == "rtl"
        self.prev = False

    def __call__(self, text: str) -> bool:
        """The direction of the next block, whose display text is text."""
        if self.forced is not None:
            return self.forced
        rtl = _first_strong(text)
        if rtl is None:
            return self.prev
        self.prev = rtl
        return rtl

    def inner(self, text: str, outer: bool) -> bool:
        """The direction of a part of a block (a table cell): its own first strong character,
        else the block's; forced like the blocks. Does not move the document's direction."""
        if self.forced is not None:
            return self.forced
        rtl = _first_strong(text)
        return outer if rtl is None else rtl


# Paired brackets (UAX #9 BD14-BD16) and mirrored glyphs (rule L4) for faces drawn without raqm.
_PAIRS = dict(zip("([{⁅⁽₍⌈⌊〈⟨⟦⟪〈《「『【〔（［｛", ")]}⁆⁾₎⌉⌋〉⟩⟧⟫〉》」』】〕）］｝"))
_MIRROR = {**_PAIRS, **{v: k for k, v in _PAIRS.items()}, "<": ">", ">": "<", "«": "»", "»": "«"}
_MIRROR.update({"‹": "›", "›": "‹", "≤": "≥", "≥": "≤"})
_BIDI_CHARS = frozenset("R AL AN".split())


@functools.lru_cache(maxsize=64)
def _bidi_levels(text: str, rtl: bool) -> tuple[int, ...]:
    """Embedding level per character of a paragraph: UAX #9 rules W1-W7, N0-N2, I1-I2, without
    explicit embeddings or isolates (the fonts refuse isolates; other format characters are
    neutral). Odd levels are drawn right to left."""
    e = int(rtl)
    sos = "R" if rtl else "L"
    t = [unicodedata.bidirectional(ch) for ch in text]
    n = len(t)
    prev = sos
    for i in range(n):  # W1 (BN treated as NSM)
        if t[i] in ("NSM", "BN"):
            t[i] = prev if prev not in ("LRI", "RLI", "FSI", "PDI") else "ON"
        prev = t[i]
    strong = sos
    for i in range(n):  # W2, W3
        if t[i] in ("L", "R", "AL"):
            strong = t[i]
        if t[i] == "EN" and strong == "AL":
            t[i] = "AN"
        if t[i] == "AL":
            t[i] = "R"
    for i in range(1, n - 1):  # W4
        if t[i] == "ES" and t[i - 1] == t[i + 1] == "EN":
            t[i] = "EN"
        elif t[i] == "CS" and t[i - 1] == t[i + 1] and t[i - 1] in ("EN", "AN"):
            t[i] = t[i - 1]
    i = 0
    while i < n:  # W5
        if t[i] == "ET":
            j = i
            while j < n and t[j] == "ET":
                j += 1
            if (i > 0 and t[i - 1] == "EN") or (j < n and t[j] == "EN"):
                t[i:j] = ["EN"] * (j - i)
            i = j
        else:
            i += 1
    strong = sos
    for i in range(n):  # W6, W7
        if t[i] in ("ES", "ET", "CS"):
            t[i] = "ON"
        elif t[i] in ("L", "R"):
            strong = t[i]
        elif t[i] == "EN" and strong == "L":
            t[i] = "L"

    def direction(k: int) -> str | None:
        return "L" if t[k] == "L" else "R" if t[k] in ("R", "EN", "AN") else None

    stack, pairs = [], []  # N0: bracket pairs, resolved in order of their openers
    for i, ch in enumerate(text):
        if t[i] != "ON":
            continue
        if ch in _PAIRS and len(stack) < 63:
            stack.append((_PAIRS[ch], i))
        else:
            for k in range(len(stack) - 1, -1, -1):
                if stack[k][0] == ch:
                    pairs.append((stack[k][1], i))
                    del stack[k:]
                    break
    embed = "R" if rtl else "L"
    for a, b in sorted(pairs):
        inside = {direction(k) for k in range(a + 1, b)} - {None}
        if embed in inside:
            t[a] = t[b] = embed
        elif inside:
            before = next((d for k in range(a - 1, -1, -1) if (d := direction(k))), sos)
            t[a] = t[b] = before  # N0 c: the context's direction, else the embedding's
    i = 0
    while i < n:  # N1, N2
        if direction(i) is None:
            j = i
            while j < n and direction(j) is None:
                j += 1
            left = direction(i - 1) if i > 0 else sos
            right = direction(j) if j < n else sos
            t[i:j] = [left if left == right else embed] * (j - i)
            i = j
        else:
            i += 1
    levels = []
    for k in range(n):  # I1, I2
        if t[k] == "L":
            levels.append(e + e % 2)
        elif t[k] == "R":
            levels.append(e + 1 - e % 2)
        else:  # EN, AN
            levels.append(e + 2 - e % 2)
    return tuple(levels)


def line_ops(
    text: str,
    faces: list[Face] | None,
    prim: Face,
    s: int,
    e: int,
    x0: float,
    width: float,
    y: int,
    rtl: bool,
) -> list[tuple]:
    """Text ops drawing text[s:e] with its baseline at y, from x0, or right-aligned in
    [x0, x0 + width] if rtl (the paragraph's base direction; then faces must not be None).

    Lines with right-to-left text or base direction are ordered by ``_bidi_levels``: runs of one
    face and level, reversed per UAX #9 rule L2; raqm shapes and orders inside an RTL face's run,
    and a run of another face at an odd level (brackets, punctuation) is drawn reversed with
    mirrored glyphs.
    Such an op carries a sixth field: its characters in drawn order, unmirrored.
    """
    while e > s and text[e - 1] == " ":
        e -= 1
    if e == s:
        return []
    if faces is None:
        return [(TEXT, int(x0 + 0.5), y, prim, text[s:e])]
    if rtl or any(unicodedata.bidirectional(c) in _BIDI_CHARS for c in text[s:e]):
        return _bidi_line_ops(text, faces, s, e, x0, width, y, rtl)
    runs, i = [], s
    while i < e:
        f, j = faces[i], i + 1
        while j < e and faces[j] is f:
            j += 1
        runs.append((f, text[i:j]))
        i = j
    if len(runs) == 1:
        return [(TEXT, int(x0 + 0.5), y, runs[0][0], runs[0][1])]
    ops = []
    x = x0
    for f, run in runs:
        visible = run.rstrip(" ")
        if visible:
            ops.append((TEXT, int(x + 0.5), y, f, visible))
            x += f.measure(visible)
        x += (len(run) - len(visible)) * f.space  # towards the next run
    return ops


def _bidi_line_ops(text, faces, s, e, x0, width, y, rtl) -> list[tuple]:
    levels = _bidi_levels(text, rtl)
    units, i = [], s  # (level, face, start, end) in logical order
    while i < e:
        f, j = faces[i], i + 1
        odd = levels[i] % 2
        while j < e and faces[j] is f:
            if f.spec.rtl and odd and levels[j] >= 1:
                j += 1  # raqm orders digits and spaces inside an RTL run itself
            elif levels[j] == levels[i]:
                j += 1
            else:
                break
        units.append((min(levels[i:j]), f, i, j))
        i = j
    for top in range(max(u[0] for u in units), 0, -1):  # L2: reverse runs at >= top
        k = 0
        while k < len(units):
            if units[k][0] >= top:
                m = k
                while m < len(units) and units[m][0] >= top:
                    m += 1
                units[k:m] = units[k:m][::-1]
                k = m
            else:
                k += 1
    pieces = []  # (left space px, face, drawn text, glyph order or None, right space px)
    for level, f, a, b in units:
        run = text[a:b]
        body = run.strip(" ")
        lead = len(run) - len(run.lstrip(" "))
        trail = len(run) - len(run.rstrip(" ")) if body else 0
        if level % 2:
            lead, trail = trail, lead  # logical trailing spaces sit on the left
        order = None
        if level % 2 and not f.spec.shaped:
            order = body[::-1]
            body = "".join(_MIRROR.get(c, c) for c in order)
        pieces.append((lead * f.space, f, body, order, trail * f.space))
    total = sum(a + (f.measure(t) if t else 0.0) + b for a, f, t, _, b in pieces)
    x = x0 + width - total if rtl else x0
    ops = []
    for left, f, body, order, right in pieces:
        x += left
        if body:
            op = (TEXT, int(x + 0.5), y, f, body)
            ops.append(op if order is None else op + (order,))
            x += f.measure(body)
        x += right
    return ops


def para_items(
    para: Para,
    family: str,
    size: int,
    line_px: int,
    width: int,
    start: int,
    x0: int = 0,
    pre_ops: tuple = (),
    first_ops: tuple = (),
    rtl: bool = False,
) -> list[Item]:
    """Wrap a paragraph into line items; the first starts at `start`, the rest at their text.

    Lines span [x0, width]: from x0, or right-aligned at width when rtl (the paragraph's base
    direction, see ``Bases``). pre_ops are drawn under every line (e.g. a code block's shading),
    first_ops on the first line only (a list marker).
    """
    prim = face(family, size)
    faces = faces_for(para, family, size)
    if rtl and faces is None:
        faces = [prim] * len(para.text)  # the bidi path orders even one-face lines
    base = baseline(family, size, line_px)
    items = []
    for k, (s, e) in enumerate(wrap(para.text, faces, prim, width - x0)):
        ops = list(pre_ops)
        if k == 0:
            ops += first_ops
        ops += line_ops(para.text, faces, prim, s, e, x0, width - x0, base, rtl)
        items.append(Item(start if k == 0 else para.source(s), line_px, ops))
    return items


def _expand(line: str, base: int) -> Para:
    """A source line as display text: tabs to spaces (stops every TAB), "\\r" dropped, "\\f" and
    "\\v" drawn as a space (Markdown treats them as whitespace; plain text splits on "\\f")."""
    if not _SPECIAL.search(line):
        return Para(line, base)
    chars, src = [], []
    for i, ch in enumerate(line):
        if ch == "\t":
            n = TAB - len(chars) % TAB
            chars += " " * n
            src += [base + i] * n
        elif ch != "\r":
            chars.append(" " if ch in "\f\v" else ch)
            src.append(base + i)
    return Para("".join(chars), base, src)


# ---------------------------------------------------------------------------------------------
# Plain text


def layout_text(text: str, style: PageStyle) -> list[Item]:
    """Plain text: every source line is a paragraph; "\\f" (form feed) also starts a new page.

    Each line takes its own base direction (``Bases``): right-aligned when right to left."""
    items: list[Item] = []
    size, line_px, width = style.font_size, style.line_px, style.column_width
    start, page_break, n = 0, False, len(text)
    bases = Bases(style.direction)
    for m in re.finditer(r"[\n\f]|\Z", text):
        end = m.start()
        if start == n and n > 0:  # text ends with a newline: no empty trailing line
            break
        para = _expand(text[start:end], start)
        lines = para_items(para, style.font, size, line_px, width, start, rtl=bases(para.text))
        lines[0].page_break = page_break
        items += lines
        page_break = m.group() == "\f"
        start = end + 1
    return items


# ---------------------------------------------------------------------------------------------
# Markdown

_FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")
_HEADING = re.compile(r" {0,3}(#{1,6})(?:[ \t]+|$)")
_HR = re.compile(r" {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$")
_LIST = re.compile(r"([ \t]*)([-*+]|\d{1,9}[.)])(?:[ \t]+|$)")
_QUOTE = re.compile(r" {0,3}>[ ]?")
_TABLE_SEP = re.compile(r" {0,3}\|? *:?-+:? *(?:\| *:?-+:? *)*\|? *$")
_INLINE = re.compile(r"\\([\\`*_#|\[\]()>+\-.!~])|(\*\*|__)(?=\S)(.+?)(?<=\S)\2|(`+)(.+?)\4")
_BULLETS = "•◦▪"


def _inline(pieces: list[tuple[str, int]], family: str, mono: str) -> Para:
    """Join source pieces with spaces and parse **bold**, __bold__, `code` and \\-escapes."""
    text, src = [], []
    for k, (piece, off) in enumerate(pieces):
        if k:
            text.append(" ")
            src.append(src[-1] + 1 if src else off)
        text.append(piece)
        src += range(off, off + len(piece))
    joined = "".join(text)
    bold = family if family.endswith("-bold") else family + "-bold"
    out, out_src, styles = [], [], []

    def copy(a: int, b: int, sty: str) -> None:
        out.append(joined[a:b])
        out_src.extend(src[a:b])
        styles.extend([sty] * (b - a))

    pos = 0
    for m in _INLINE.finditer(joined):
        copy(pos, m.start(), family)
        if m.group(1) is not None:
            copy(m.start(1), m.end(1), family)
        elif m.group(2) is not None:
            copy(m.start(3), m.end(3), bold)
        else:
            copy(m.start(5), m.end(5), mono)
        pos = m.end()
    copy(pos, len(joined), family)
    display = "".join(out)
    para = _expand_para(display, out_src, styles)
    if all(s == family for s in para.styles):
        para.styles = None
    return para


def _expand_para(text: str, src: list[int], styles: list[str]) -> Para:
    """Inline text: tabs, "\\f" and "\\v" to single spaces, "\\r" dropped."""
    if not _SPECIAL.search(text):
        return Para(text, src[0] if src else 0, src, styles)
    keep = [i for i, c in enumerate(text) if c != "\r"]
    return Para(
        "".join(" " if text[i] in "\t\f\v" else text[i] for i in keep),
        src[0] if src else 0,
        [src[i] for i in keep],
        [styles[i] for i in keep],
    )


def _piece(line: str, off: int, skip: int = 0) -> tuple[str, int]:
    """line[skip:] stripped of surrounding whitespace, with the source offset of its first char."""
    body = line[skip:].rstrip("\r")
    return body.strip(), off + skip + len(body) - len(body.lstrip())


def _split_row(line: str, off: int) -> list[tuple[str, int]]:
    """A pipe-table row -> [(cell text, source offset)], outer pipes optional, "\\|" kept."""
    cells, start, i = [], 0, 0
    bounds = []
    while i < len(line):
        if line[i] == "\\":
            i += 2
            continue
        if line[i] == "|":
            bounds.append(i)
        i += 1
    edges = [-1] + bounds + [len(line)]
    for a, b in zip(edges, edges[1:]):
        cell = line[a + 1 : b]
        if not cell.strip() and (a == -1 or b == len(line)):
            continue  # before the leading / after the trailing pipe
        start = a + 1 + len(cell) - len(cell.lstrip())
        cells.append((cell.strip(), off + start))
    return cells


def _is_table_start(lines: list[str], i: int) -> bool:
    return (
        i + 1 < len(lines)
        and "|" in lines[i]
        and "|" in lines[i + 1]
        and _TABLE_SEP.match(lines[i + 1].rstrip("\r")) is not None
    )


def _starts_block(lines: list[str], i: int) -> bool:
    line = lines[i]
    return bool(
        not line.strip()
        or _FENCE.match(line)
        or _HEADING.match(line)
        or _HR.match(line)
        or _LIST.match(line)
        or _QUOTE.match(line)
        or _is_table_start(lines, i)
    )


def _column_widths(natural: list[float], avail: int) -> list[int]:
    """Share avail px among columns: narrow ones get their natural width, wide ones the rest."""
    n = len(natural)
    if sum(natural) <= avail:
        return [int(w + 0.999) for w in natural]
    fixed: dict[int, float] = {}
    while True:
        rest = [i for i in range(n) if i not in fixed]
        share = (avail - sum(fixed.values())) / max(1, len(rest))
        small = [i for i in rest if natural[i] <= share]
        if not small or len(small) == len(rest):
            break
        fixed.update((i, natural[i]) for i in small)
    left = avail - sum(fixed.values())
    total_rest = sum(natural[i] for i in rest) or 1.0
    widths = [
        int(fixed[i]) if i in fixed else int(left * natural[i] / total_rest) for i in range(n)
    ]
    return widths


def layout_markdown(md: str, style: PageStyle) -> list[Item]:
    """Light Markdown -> items; see the module docstring for the subset."""
    fam, size, line_px, width = style.font, style.font_size, style.line_px, style.column_width
    mono = "mono"
    bold = fam + "-bold"
    shade = (RECT, 0, 0, width - 1, line_px - 1, "shade", None)
    pad = max(2, size // 3)
    gap_px = line_px // 2
    lines = md.split("\n")
    offs, o = [], 0
    for line in lines:
        offs.append(o)
        o += len(line) + 1
    items: list[Item] = []
    prev_kind, blank = None, False
    bases = Bases(style.direction)
    i, n = 0, len(lines)
    if n and lines[-1] == "":
        n -= 1  # trailing newline: no empty last line

    def gap(px: int, at: int) -> None:
        if items:
            items.append(Item(at, px, gap=True))

    while i < n:
        line = lines[i].rstrip("\r")
        start = offs[i]
        if not line.strip():
            blank = True
            i += 1
            continue
        kind = "para"
        if m := _FENCE.match(line):
            kind = "code"
            fence = m.group(1)
            j = i + 1
            while j < n and not lines[j].lstrip().startswith(fence):
                j += 1
            gap(gap_px, start)
            box = Item(start, pad, [(RECT, 0, 0, width - 1, pad - 1, "shade", None)])
            items.append(box)
            for k in range(i + 1, j):
                items += para_items(
                    _expand(lines[k], offs[k]),
                    mono,
                    size,
                    line_px,
                    width - pad,
                    offs[k],
                    x0=pad,
                    pre_ops=(shade,),
                    rtl=False,  # code stays left to right, whatever the document's direction
                )
            end_at = offs[j] if j < n else len(md)
            items.append(Item(end_at, pad, [(RECT, 0, 0, width - 1, pad - 1, "shade", None)]))
            i = j + 1
        elif m := _HEADING.match(line):
            kind = "heading"
            level = len(m.group(1))
            body = re.sub(r"[ \t]+#+[ \t]*$|^#+[ \t]*$", "", line[m.end() :]).rstrip()
            hsize = round(size * (2.0, 1.6, 1.3, 1.15, 1.0, 1.0)[level - 1])
            hline = round(hsize * style.line_height)
            gap(line_px if items else 0, start)
            para = _inline([(body, start + m.end())], bold, "mono-bold")
            hitems = para_items(para, bold, hsize, hline, width, start, rtl=bases(para.text))
            hitems[-1].keep_with_next = True
            items += hitems
            i += 1
        elif _HR.match(line):
            kind = "hr"
            gap(gap_px, start)
            mid = line_px // 2
            items.append(Item(start, line_px, [(RECT, 0, mid, width - 1, mid, None, "rule")]))
            i += 1
        elif _is_table_start(lines, i):
            kind = "table"
            rows = [(_split_row(line, start), start)]
            j = i + 2
            while j < n and "|" in lines[j] and lines[j].strip():
                rows.append((_split_row(lines[j].rstrip("\r"), offs[j]), offs[j]))
                j += 1
            gap(gap_px, start)
            items += _table_items(rows, fam, bold, mono, size, line_px, width, pad, bases)
            i = j
        elif (m := _LIST.match(line)) or (q := _QUOTE.match(line)):
            kind = "list" if m else "quote"
            pieces = [_piece(line, start, (m or q).end())]
            j = i + 1
            while j < n and lines[j].strip():  # continuation lines ("lazy" ones too)
                if kind == "quote" and (q := _QUOTE.match(lines[j])):
                    pieces.append(_piece(lines[j], offs[j], q.end()))
                elif not _starts_block(lines, j):
                    pieces.append(_piece(lines[j], offs[j]))
                else:
                    break
                j += 1
            para = _inline([p for p in pieces if p[0]] or [("", start)], fam, mono)
            if kind != prev_kind or blank:
                gap(gap_px, start)
            rtl = bases(para.text)  # right to left: bar, marker and indent on the right
            if kind == "quote":
                bar_w = max(1, size // 6)
                if rtl:
                    bar = (RECT, width - bar_w, 0, width - 1, line_px - 1, "rule", None)
                    items += para_items(
                        para, fam, size, line_px, width - size, start, 0, (bar,), (), True
                    )
                else:
                    bar = (RECT, 0, 0, bar_w - 1, line_px - 1, "rule", None)
                    items += para_items(para, fam, size, line_px, width, start, size, (bar,))
            else:
                level = min(len(m.group(1).expandtabs(4)) // 2, 5)
                marker = _BULLETS[level % 3] if m.group(2) in "-*+" else m.group(2)
                indent = round(size * 1.5) * (level + 1)
                mface = face(fam, size)
                mbase = baseline(fam, size, line_px)
                if rtl:  # "1." reads ".1" from the left, "1)" reads "(1"
                    mx = width - indent + mface.space
                    mops = line_ops(
                        marker, [mface] * len(marker), mface, 0, len(marker), mx, 0.0, mbase, True
                    )  # right-aligned at mx: shift it to start there
                    shift = int(mx + 0.5) - mops[0][1]
                    mops = [(op[0], op[1] + shift, *op[2:]) for op in mops]
                    items += para_items(
                        para, fam, size, line_px, width - indent, start, 0, (), tuple(mops), True
                    )
                else:
                    mx = indent - mface.measure(marker) - mface.space
                    mop = (TEXT, int(mx + 0.5), mbase, mface, marker)
                    items += para_items(para, fam, size, line_px, width, start, indent, (), (mop,))
            i = j
        else:
            pieces = [_piece(line, start)]
            j = i + 1
            while j < n and not _starts_block(lines, j):
                pieces.append(_piece(lines[j], offs[j]))
                j += 1
            gap(gap_px, start)
            para = _inline(pieces, fam, mono)
            items += para_items(para, fam, size, line_px, width, start, rtl=bases(para.text))
            i = j
        prev_kind, blank = kind, False
    return items


def _table_items(rows, fam, bold, mono, size, line_px, width, pad, bases=None) -> list[Item]:
    """Pipe-table rows -> one item per row (header bold), drawn as a grid of cells.

    The table's base direction is its first strong character's (``Bases``, all cells in reading
    order); a right-to-left table runs its columns from the right edge leftwards. Each cell's text
    takes its own direction (``Bases.inner``), the table's when it has no strong character.
    """
    bases = bases or Bases()
    ncol = max(len(cells) for cells, _ in rows)
    paras = []
    for r, (cells, _) in enumerate(rows):
        family = bold if r == 0 else fam
        row = []
        for c in range(ncol):
            text, off = cells[c] if c < len(cells) else ("", 0)
            row.append((_inline([(text, off)], family, mono), family))
        paras.append(row)
    natural = [0.0] * ncol
    for row in paras:
        for c, (para, family) in enumerate(row):
            prim = face(family, size)
            w = _measure(para.text, faces_for(para, family, size), prim, 0, len(para.text))
            natural[c] = max(natural[c], w + 2 * pad + 1)
    widths = _column_widths(natural, width - 1)
    xs = [0]
    for w in widths:
        xs.append(xs[-1] + w)
    table_rtl = bases(" ".join(para.text for row in paras for para, _ in row))
    if table_rtl:  # column c spans [xs[c], xs[c + 1]] from the right edge
        xs = [width - 1 - x for x in xs]
    base = baseline(fam, size, line_px)
    items = []
    for row, (_, row_start) in zip(paras, rows):
        cell_lines = []
        for c, (para, family) in enumerate(row):
            prim = face(family, size)
            faces = faces_for(para, family, size)
            rtl = bases.inner(para.text, table_rtl)
            if rtl and faces is None:
                faces = [prim] * len(para.text)
            inner = max(1, widths[c] - 2 * pad)
            spans = wrap(para.text, faces, prim, inner)
            cell_lines.append((para, faces, prim, rtl, inner, spans))
        height = max(len(cl[5]) for cl in cell_lines) * line_px + 2 * pad
        ops = []
        for c, (para, faces, prim, rtl, inner, spans) in enumerate(cell_lines):
            x0, x1 = min(xs[c], xs[c + 1]), max(xs[c], xs[c + 1])
            ops.append((RECT, x0, 0, x1, height, None, "fg"))
            for k, (s, e) in enumerate(spans):
                y = pad + k * line_px + base
                ops += line_ops(para.text, faces, prim, s, e, x0 + pad, inner, y, rtl)
        items.append(Item(row_start, height, ops))
    return items


# ---------------------------------------------------------------------------------------------
# Pagination


@dataclass
class Placed:
    """Items placed on one page: (column, y, item) triples, and the page's first item index."""

    first: int
    items: list[tuple[int, int, Item]]


def paginate(items: list[Item], columns: int, column_height: int) -> tuple[list[Placed], bool]:
    """Flow items down columns and across pages -> (pages, overflow).

    overflow is True when some item is taller than a whole column (it is placed anyway, clipped).
    """
    pages: list[Placed] = []
    cur = Placed(0, [])
    col, y, overflow = 0, 0, False
    heights_after = _next_heights(items)
    for idx, it in enumerate(items):
        if it.page_break and cur.items:
            pages.append(cur)
            cur, col, y = Placed(idx, []), 0, 0
        if it.gap:
            y = min(y + it.height, column_height) if y else 0
            continue
        need = it.height + (heights_after[idx] if it.keep_with_next else 0)
        if y > 0 and y + need > column_height:
            col, y = col + 1, 0
            if col == columns:
                pages.append(cur)
                cur, col = Placed(idx, []), 0
        if y == 0 and it.height > column_height:
            overflow = True
        cur.items.append((col, y, it))
        y += it.height
    pages.append(cur)
    return pages, overflow


def _next_heights(items: list[Item]) -> list[int]:
    """For each item, the height of the next non-gap item (0 at the end)."""
    out, nxt = [0] * len(items), 0
    for idx in range(len(items) - 1, -1, -1):
        out[idx] = nxt
        if not items[idx].gap:
            nxt = items[idx].height
    return out


def page_texts(source: str, items: list[Item], pages: list[Placed]) -> list[str]:
    """Each page's source span: from its first item's start to the next page's."""
    starts = [0] + [items[p.first].start for p in pages[1:]]
    ends = starts[1:] + [len(source)]
    return [source[a:b] for a, b in zip(starts, ends)]
