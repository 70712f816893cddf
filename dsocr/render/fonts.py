"""Shipped fonts: the face table, per-character font fallback, cached FreeType fonts and widths.

Every glyph the renderer draws comes from a file in fonts/ next to this module, never from a system
font, so a page is pixel-identical on any machine with the same Pillow wheel (FreeType 2.14,
raqm 0.11, HarfBuzz 14 inside it; fribidi is the system's). fonts/fonts.json, written by
build_fonts.py, records each file's sha256, origin, license and cmap coverage; coverage is read from
it because Pillow does not expose a font's cmap (fontTools is only a build-time tool).

Faces:
- Families a PageStyle can name: "sans", "serif", "mono" (DejaVu; Latin, Greek, Cyrillic and many
  symbols), each with a "-bold" face.
- Script faces, chosen per character: "arabic" (Noto Naskh Arabic), "hebrew" (Noto Sans Hebrew),
  "devanagari" (Noto Sans Devanagari), each with "-bold", and "cjk" (Noto Sans CJK SC subset, no
  bold). A script face owns the characters of its Unicode blocks even where DejaVu also has a
  glyph (DejaVu Sans has basic Arabic), so each script always gets its proper font.

Layout engines: the three complex-script faces are shaped with raqm (Arabic joining and RTL,
Devanagari conjuncts); everything else uses Pillow's BASIC engine, so Latin and CJK pages come out
the same whether or not raqm is present, and are cheaper to lay out.
"""

from __future__ import annotations

import functools
import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from PIL import ImageFont, features

FONT_DIR = Path(__file__).with_name("fonts")

ARABIC = ((0x0600, 0x06FF), (0x0750, 0x077F), (0x08A0, 0x08FF), (0xFB50, 0xFDFF), (0xFE70, 0xFEFF))
HEBREW = ((0x0590, 0x05FF), (0xFB1D, 0xFB4F))
DEVANAGARI = ((0x0900, 0x097F), (0xA8E0, 0xA8FF), (0x1CD0, 0x1CFF))
CJK = (
    (0x1100, 0x11FF),  # Hangul jamo
    (0x2E80, 0x2FDF),  # radicals
    (0x3000, 0x303F),  # CJK symbols and punctuation
    (0x3040, 0x30FF),  # kana
    (0x3100, 0x318F),  # bopomofo, Hangul compatibility jamo
    (0x31F0, 0x31FF),
    (0x3400, 0x4DBF),
    (0x4E00, 0x9FFF),
    (0xAC00, 0xD7AF),  # Hangul syllables
    (0xF900, 0xFAFF),
    (0xFF00, 0xFFEF),  # full-width forms
)


@dataclass(frozen=True)
class FaceSpec:
    """One shipped font file and how the renderer uses it."""

    file: str
    script: tuple[tuple[int, int], ...] = ()  # code-point blocks this face owns over the families
    shaped: bool = False  # needs raqm (complex script)
    rtl: bool = False  # draw right to left


FACES: dict[str, FaceSpec] = {
    "sans": FaceSpec("DejaVuSans.ttf"),
    "sans-bold": FaceSpec("DejaVuSans-Bold.ttf"),
    "serif": FaceSpec("DejaVuSerif.ttf"),
    "serif-bold": FaceSpec("DejaVuSerif-Bold.ttf"),
    "mono": FaceSpec("DejaVuSansMono.ttf"),
    "mono-bold": FaceSpec("DejaVuSansMono-Bold.ttf"),
    "arabic": FaceSpec("NotoNaskhArabic-Regular.ttf", ARABIC, shaped=True, rtl=True),
    "arabic-bold": FaceSpec("NotoNaskhArabic-Bold.ttf", ARABIC, shaped=True, rtl=True),
    "hebrew": FaceSpec("NotoSansHebrew-Regular.ttf", HEBREW, shaped=True, rtl=True),
    "hebrew-bold": FaceSpec("NotoSansHebrew-Bold.ttf", HEBREW, shaped=True, rtl=True),
    "devanagari": FaceSpec("NotoSansDevanagari-Regular.ttf", DEVANAGARI, shaped=True),
    "devanagari-bold": FaceSpec("NotoSansDevanagari-Bold.ttf", DEVANAGARI, shaped=True),
    "cjk": FaceSpec("NotoSansCJKsc-Regular-subset.otf", CJK),
}
FAMILIES = ("sans", "serif", "mono")  # valid PageStyle.font values
SCRIPT_FACES = ("arabic", "hebrew", "devanagari", "cjk")  # fallback order after the families

HAS_RAQM = features.check("raqm")


@functools.cache
def manifest() -> dict:
    """fonts/fonts.json: per file sha256, bytes, source, license, change, coverage."""
    with open(FONT_DIR / "fonts.json") as f:
        return json.load(f)


@functools.cache
def coverage(face: str) -> frozenset[str]:
    """The characters the face's cmap maps (from fonts.json)."""
    chars = set()
    for run in manifest()[FACES[face].file]["coverage"].split():
        lo, _, hi = run.partition("-")
        chars.update(map(chr, range(int(lo, 16), int(hi or lo, 16) + 1)))
    return frozenset(chars)


def _bold(face: str) -> str:
    return face + "-bold" if face + "-bold" in FACES else face


def _is_neutral(ch: str) -> bool:
    """Spaces, punctuation, symbols and format chars take the font of the run they sit in.

    Control characters (Cc) are not neutral: they are not text, and ``Resolver._find`` rejects
    them (some script fonts map U+0000 to an empty glyph, which would draw a NUL as nothing)."""
    cat = unicodedata.category(ch)
    return cat[0] in "ZPSC" and cat != "Cc"


class Resolver:
    """Maps each character of a string to a face key, for one family key like "serif-bold".

    Order: the script face owning the character's block; else, for a neutral character (space,
    punctuation, ZWJ), the previous character's face if it has the glyph (so an Arabic phrase with
    spaces stays one run and is ordered right to left as a whole; digits also stick to RTL runs);
    else the family; else the other families and script faces. No font: ValueError.
    """

    def __init__(self, family: str):
        self.family = family
        bold = family.endswith("-bold")
        base = family.removesuffix("-bold")
        self.owned: dict[str, str] = {}
        for key in SCRIPT_FACES:
            owner = _bold(key) if bold else key
            for lo, hi in FACES[key].script:
                self.owned.update((chr(cp), owner) for cp in range(lo, hi + 1))
        for ch in [ch for ch, key in self.owned.items() if ch not in coverage(key)]:
            del self.owned[ch]
        self.chain = [family] + [base] * bold
        self.chain += [f for f in FAMILIES if f != base] + list(SCRIPT_FACES)
        # Characters that always resolve to the family: the fast path for plain paragraphs.
        self.plain = coverage(family) - self.owned.keys()
        self._fallback: dict[str, str] = {}

    def faces(self, text: str) -> list[str] | None:
        """One face key per character, or None when every character is the family's."""
        if self.plain.issuperset(text):
            return None
        out = []
        prev = None
        owned, family_cov = self.owned, coverage(self.family)
        for ch in text:
            face = owned.get(ch)
            if face is None:
                if (
                    prev is not None
                    and ch in coverage(prev)
                    and (_is_neutral(ch) or (FACES[prev].rtl and unicodedata.category(ch) == "Nd"))
                ):
                    face = prev
                elif ch in family_cov:
                    face = self.family
                else:
                    face = self._fallback.get(ch) or self._find(ch)
            out.append(face)
            prev = face
        return out

    def _find(self, ch: str) -> str:
        if unicodedata.category(ch) == "Cc":
            raise ValueError(
                f"control character {ch!r} (U+{ord(ch):04X}) is not text and cannot be drawn "
                "(only tab, newline, CR, form feed and vertical tab are laid out)"
            )
        for key in self.chain:
            if ch in coverage(key):
                self._fallback[ch] = key
                return key
        name = unicodedata.name(ch, "unnamed")
        raise ValueError(
            f"unknown script: no shipped font has {ch!r} (U+{ord(ch):04X} {name}); "
            "see dsocr/render/fonts/fonts.json for coverage"
        )


@functools.cache
def resolver(family: str) -> Resolver:
    if family not in FACES or family.removesuffix("-bold") not in FAMILIES:
        raise ValueError(f"unknown font family {family!r}; choose from {FAMILIES}")
    return Resolver(family)


def missing_chars(text: str, font: str = "sans") -> list[str]:
    """The distinct characters of text that no shipped font can draw (newlines/tabs excluded).

    Control characters other than tab, newline, CR, form feed and vertical tab (which the layout
    handles) count as missing, NUL included. Use it to filter a corpus before rendering:
    render_text raises ValueError on the first one.
    """
    res = resolver(font)
    out = []
    for ch in dict.fromkeys(text):
        if ch in "\n\t\r\f\v" or ch in res.plain or ch in res.owned:
            continue
        try:
            res._find(ch)
        except ValueError:
            out.append(ch)
    return out


def unrenderable(text: str, font: str = "sans") -> str | None:
    """Why ``text`` cannot be rendered in ``font``, or None: the first character no shipped font
    draws (a control character, or an unknown script), with its line number and how many distinct
    characters are missing in all. For one-line errors that name the input."""
    bad = missing_chars(text, font)
    if not bad:
        return None
    first = min(bad, key=text.index)
    try:
        resolver(font)._find(first)
        reason = f"cannot draw {first!r}"  # not reached: missing_chars found no font
    except ValueError as e:
        reason = str(e)
    line = text.count("\n", 0, text.index(first)) + 1
    more = f" ({len(bad)} distinct characters cannot be drawn)" if len(bad) > 1 else ""
    return f"line {line}: {reason}{more}"


class Face:
    """A FreeType font at one pixel size, with a cache of measured string widths."""

    __slots__ = ("key", "size", "spec", "font", "direction", "widths", "space")

    def __init__(self, key: str, size: int):
        spec = FACES[key]
        if spec.shaped and not HAS_RAQM:
            raise RuntimeError(
                f"the {key!r} font needs text shaping, but this Pillow has no libraqm "
                "(PIL.features.check('raqm') is False); install a Pillow wheel with raqm"
            )
        self.key, self.size, self.spec = key, size, spec
        engine = ImageFont.Layout.RAQM if spec.shaped else ImageFont.Layout.BASIC
        self.font = ImageFont.truetype(str(FONT_DIR / spec.file), size, layout_engine=engine)
        self.direction = ("rtl" if spec.rtl else "ltr") if spec.shaped else None
        self.widths: dict[str, float] = {}
        self.space = self.measure(" ")

    def measure(self, text: str) -> float:
        """Advance width of text in px (shaped for complex scripts); cached per string."""
        w = self.widths.get(text)
        if w is None:
            w = self.font.getlength(text, direction=self.direction)
            if len(self.widths) > 100_000:  # bound memory over long runs
                self.widths.clear()
            self.widths[text] = w
        return w


@functools.lru_cache(maxsize=512)
def face(key: str, size: int) -> Face:
    """The cached Face for a face key at a pixel size (ImageFont.truetype is slow)."""
    return Face(key, size)


@functools.lru_cache(maxsize=512)
def baseline(family: str, size: int, line_px: int) -> int:
    """Baseline offset from a line box's top: the family's ascent+descent centred in the box."""
    ascent, descent = face(family, size).font.getmetrics()
    return (line_px - ascent - descent) // 2 + ascent
