"""Optical compression codec: text -> page images (+ manifest) -> text, and reusable embeddings.

Paper §4.1 and Table 2 (arXiv 2510.18234; spec §9.1): a page of N text tokens rendered into an
image that costs V vision tokens is "compressed" N/V times; the OCR decoder reads it back at some
precision (≈97% below 10x, ≈60% at 20x for DeepSeek-OCR).

    from dsocr.compress import compress, decompress
    m = compress(long_text, "small", out_dir="ctx/")      # ctx/page_0001.png ... ctx/manifest.json
    got = decompress("ctx/", dsocr.load_model(), source=long_text)
    got.text, got.precision                                # decoded text, word precision

On disk (``out_dir``): ``page_NNNN.png`` (greyscale) and ``manifest.json``, each written
atomically (temp file + fsync + rename, pages before the manifest, so a manifest never names a
page that is not complete). The manifest stores the mode, page size, renderer style, the sha256 of
the source text, and per page: file, png sha256, sha256 of the page's text, its [start, end) span in
the source, the whitespace joining it to the next page, and the token accounting (accounting.py),
plus which model tokenizer gave ``model_text_tokens``. It never stores the text itself: verifying
a decode needs the caller's copy of the source. A rerun into the same folder replaces and deletes
only the pages its previous manifest names; any other file is left alone (a ``page_NNNN.png`` in
the way is an error), and a damaged ``manifest.json`` is reported, never overwritten.

Vision embeddings (``save_vision_embeddings``) are the encoder's output per page, saved as
safetensors, so a caller can skip the vision encoder and put them straight into the decoder's
context: the model's ``embed()`` scatters them into the ``<image>`` placeholder positions
(``embeddings_prompt`` builds the matching ids).

Precision here is word-level *multiset* precision (``word_precision``). The Fox benchmark scores
word *sets* (a repeated word counts once; ``dsocr.eval.metrics.fox_scores``), which is what
bench/compression.py reports beside Table 2; the multiset form is stricter (a hallucinated loop
of one correct word is not rewarded) and keeps this module free of the eval package.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from dsocr.compress.accounting import CompressionStats, compression_stats, grid_image_tokens
from dsocr.configs import Mode, get_mode
from dsocr.fileio import (
    atomic_write_bytes,
    atomic_write_json,
    sha256_bytes,
    sha256_file,
    sha256_text,
)
from dsocr.language.tokenizer import PROMPTS, count_text_tokens
from dsocr.render import FAMILIES, Page, PageStyle, fit_to_mode, render_text
from dsocr.vision.preprocess import count_image_tokens, valid_image_tokens

FORMAT = "dsocr-compress/1"
MANIFEST = "manifest.json"
REFERENCE_SIZE = 640  # default_style scales a style designed for a Small (640 px) page
REFERENCE_STYLE = PageStyle(font_size=12, line_height=1.2, margin=20)  # mid dsocr-mini training


# --------------------------------------------------------------------------------------------------
# small helpers: hashing, atomic writes, modes as JSON
# --------------------------------------------------------------------------------------------------


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def mode_to_json(mode: str | Mode) -> dict:
    return dataclasses.asdict(get_mode(mode))


def mode_from_json(spec: str | dict) -> Mode:
    """A mode from its name or its full field dict (test modes are not in MODES)."""
    if isinstance(spec, str):
        return get_mode(spec)
    return Mode(**spec)


def style_from_json(d: dict) -> PageStyle:
    return PageStyle(**d)


# --------------------------------------------------------------------------------------------------
# page geometry and default style per mode
# --------------------------------------------------------------------------------------------------


def page_size_for_mode(mode: str | Mode) -> tuple[int, int]:
    """The page (width, height) rendered for a mode.

    Native modes: a base_size square (Tiny/Small squash any page to a square, Base/Large pad it, so
    a square page wastes nothing). Crop modes (Gundam): a 2 x 3 tile portrait page, which tiles into
    exactly 6 tiles (Gundam: 1280 x 1920, 6*100 + 256 grid tokens).
    """
    mode = get_mode(mode)
    if mode.crop_mode:
        return 2 * mode.image_size, 3 * mode.image_size
    return mode.base_size, mode.base_size


def default_style(mode: str | Mode, reference: PageStyle | None = None, **overrides) -> PageStyle:
    """``reference`` (a style for a 640 px Small page) scaled to the mode's page size.

    ``overrides`` (``font="serif"``, ``font_size=14``, ...) then replace single fields, in px of
    the mode's page, leaving the rest at the scaled default; the result is validated against the
    mode's real page size (a 450 px margin is fine on a 1280 px Large page).

    Font size, margin and column gap scale with the page width, so the same text lays out the same
    way at every mode and a lower mode is the same page downscaled (paper §9.6 "forgetting"). The
    default reference is 12 px DejaVu Sans, line height 1.2, margin 20 px: the middle of dsocr-mini's
    training distribution (9-18 px on 512/640 px pages), about 3x compression at Small. Denser
    layouts (Table 2 reaches 10-20x) are found per model with ``densest_layout``.
    """
    ref = reference or REFERENCE_STYLE
    w, h = page_size_for_mode(mode)
    s = w / REFERENCE_SIZE
    scaled = dict(
        width=w,
        height=h,
        font_size=max(4, round(ref.font_size * s)),
        margin=max(1, round(ref.margin * s)),
        column_gap=max(0, round(ref.column_gap * s)),
    )
    return dataclasses.replace(ref, **{**scaled, **overrides})


# --------------------------------------------------------------------------------------------------
# precision (word level)
# --------------------------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    """Whitespace-separated words, case and punctuation kept (a word must match exactly)."""
    return text.split()


def word_precision(pred: str, ref: str) -> float:
    """Share of predicted words that occur in the reference, counted as multisets.

    |multiset(pred) ∩ multiset(ref)| / |pred|: order-free, so a correct word in the wrong place
    still counts, but repeating a word more often than the reference has it does not. An empty
    prediction scores 0.0 against a non-empty reference (silence is not precise) and 1.0 against
    an empty one. Fox's scorer (``dsocr.eval.metrics.fox_precision``) uses word sets instead.
    """
    p, r = Counter(words(pred)), Counter(words(ref))
    n = sum(p.values())
    if n == 0:
        return 1.0 if not r else 0.0
    return sum((p & r).values()) / n


def word_recall(pred: str, ref: str) -> float:
    """Share of reference words recovered (multiset); reported beside precision, which alone
    rewards stopping early."""
    p, r = Counter(words(pred)), Counter(words(ref))
    n = sum(r.values())
    return 1.0 if n == 0 else sum((p & r).values()) / n


# --------------------------------------------------------------------------------------------------
# compress
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PageEntry:
    """One page of a manifest (see the module docstring)."""

    file: str
    png_sha256: str
    text_sha256: str
    start: int  # [start, end) span of the page's text in the source
    end: int
    joiner: str  # whitespace between this page's stripped text and the next one's ("" last)
    text_tokens: int  # DeepSeek-V3 tokens of the page's text
    vision_tokens: int  # grid tokens (paper)
    placeholder_tokens: int  # <image> placeholders (decoder)
    valid_tokens: int  # paper Eq. 1

    @property
    def ratio(self) -> float:
        return self.text_tokens / self.vision_tokens

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "ratio": round(self.ratio, 4)}


@dataclass
class Manifest:
    """What ``compress`` produced. ``pages``/``images`` are only filled in memory (not saved)."""

    mode: Mode
    page_size: tuple[int, int]
    style: PageStyle
    source_sha256: str
    source_chars: int
    entries: list[PageEntry]
    stats: CompressionStats
    folder: Path | None = None
    pages: list[Page] = field(default_factory=list, repr=False)  # in memory, with their text
    model_tokenizer: dict | None = None  # {"source", "sha256"} of the model_text_tokens count

    @property
    def ratio(self) -> float:
        return self.stats.ratio

    def images(self) -> list[Image.Image]:
        """Page images: in memory after compress, else read from ``folder`` (sha256 checked)."""
        if self.pages:
            return [p.image for p in self.pages]
        if self.folder is None:
            raise ValueError("manifest has neither in-memory pages nor a folder")
        return [read_page(self.folder, e) for e in self.entries]

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "mode": self.mode.name,
            "mode_spec": mode_to_json(self.mode),
            "page_size": list(self.page_size),
            "style": dataclasses.asdict(self.style),
            "source_sha256": self.source_sha256,
            "source_chars": self.source_chars,
            "totals": self.stats.to_dict(),
            "model_tokenizer": self.model_tokenizer,
            "pages": [e.to_dict() for e in self.entries],
        }

    @classmethod
    def from_json(cls, d: dict, folder: Path | None = None) -> Manifest:
        if d.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} manifest (format={d.get('format')!r})")
        fields = {f.name for f in dataclasses.fields(PageEntry)}
        entries = [PageEntry(**{k: v for k, v in e.items() if k in fields}) for e in d["pages"]]
        t = d["totals"]
        stats = CompressionStats(
            **{k: t[k] for k in (f.name for f in dataclasses.fields(CompressionStats))}
        )
        return cls(
            mode=mode_from_json(d["mode_spec"]),
            page_size=tuple(d["page_size"]),
            style=style_from_json(d["style"]),
            source_sha256=d["source_sha256"],
            source_chars=d["source_chars"],
            entries=entries,
            stats=stats,
            folder=folder,
            model_tokenizer=d.get("model_tokenizer"),
        )


def _joiners(texts: Sequence[str]) -> list[str]:
    """Per page, the whitespace between its stripped text and the next non-blank page's.

    ``join_pages([t.strip() for t in texts], _joiners(texts)) == "".join(texts).strip()``: the
    whitespace of a blank (whitespace-only) page goes into the joiner of the non-blank page before
    it, once; blank pages, the last non-blank page and blank pages at either end get "".
    """
    out = [""] * len(texts)
    solid = [k for k, t in enumerate(texts) if t.strip()]
    for a, b in zip(solid, solid[1:]):
        ta, tb = texts[a], texts[b]
        between = "".join(texts[a + 1 : b])  # blank pages
        out[a] = ta[len(ta.rstrip()) :] + between + tb[: len(tb) - len(tb.lstrip())]
    return out


def merge_blank_pages(pages: Sequence[Page]) -> list[Page]:
    """``pages`` without whitespace-only pages: their text joins the previous page's (the first
    non-blank page's for leading ones), so ``"".join(page texts)`` is unchanged and no blank
    image costs vision tokens. All blank: the first page, holding all the text."""
    solid = [k for k, p in enumerate(pages) if p.text.strip()]
    if not solid:
        return [Page(pages[0].image, "".join(p.text for p in pages))] if pages else []
    texts = {k: pages[k].text for k in solid}
    texts[solid[0]] = "".join(p.text for p in pages[: solid[0]]) + texts[solid[0]]
    owner = solid[0]
    for k in range(solid[0] + 1, len(pages)):
        if k in texts:
            owner = k
        else:
            texts[owner] += pages[k].text
    return [Page(pages[k].image, texts[k]) for k in solid]


def render_pages(
    text: str,
    mode: str | Mode,
    style: PageStyle | None = None,
    *,
    page_size: tuple[int, int] | None = None,
    fit_one_page: bool = False,
) -> tuple[list[Page], PageStyle]:
    """Render ``text`` onto pages sized for ``mode``; returns (pages, style used).

    ``style=None`` uses ``default_style(mode)``; a given style keeps its font/layout and gets the
    mode's page size (or ``page_size``). ``fit_one_page``: the largest font at which the whole
    text fits on one page (``fit_to_mode``, square pages of the mode's base size, as in the
    paper's Fox study); if it does not fit even at 6 px, warns (UserWarning) and paginates with
    the style. Whitespace-only pages are never emitted (``merge_blank_pages``).
    """
    mode = get_mode(mode)
    base = style or default_style(mode)
    w, h = page_size or page_size_for_mode(mode)
    base = dataclasses.replace(base, width=w, height=h)
    if fit_one_page:
        if w != h:
            raise ValueError(f"fit_one_page needs a square page, got {w}x{h} for {mode.name}")
        try:
            page, used = fit_to_mode(text, w, base)
            return [page], used
        except ValueError as e:
            pages = merge_blank_pages(render_text(text, base))
            warnings.warn(
                f"fit_one_page: {e}; paginated instead ({len(pages)} pages at {base.font_size} px)",
                UserWarning,
                stacklevel=3,
            )
            return pages, base
    return merge_blank_pages(render_text(text, base)), base


_PAGE_FILE = re.compile(r"page_\d{4,}\.png")


def _prepare_out_dir(folder: Path) -> dict[str, str]:
    """Create ``folder`` if needed; return {page file: png sha256} of the pages its previous
    manifest wrote (the only files ``compress`` may replace or delete). ValueError, naming the
    path, when the folder cannot be used or holds a manifest.json that is not a readable
    dsocr-compress manifest (it is not ours to overwrite)."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder}: exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{folder}: cannot create the output folder ({e.strerror})") from None
    if not (folder / MANIFEST).exists():
        return {}
    try:
        previous = load_manifest(folder)
    except ValueError as e:
        raise ValueError(
            f"{e}; refusing to overwrite it (remove it or choose another folder)"
        ) from None
    return {
        e.file: e.png_sha256
        for e in previous.entries
        if _PAGE_FILE.fullmatch(e.file) and e.png_sha256
    }


def compress(
    text: str,
    mode: str | Mode,
    style: PageStyle | None = None,
    out_dir: str | Path | None = None,
    *,
    page_size: tuple[int, int] | None = None,
    fit_one_page: bool = False,
    tokenizer=None,
) -> Manifest:
    """Render ``text`` to page images fitted to ``mode``; write them and a manifest to ``out_dir``.

    Long text is paginated by the renderer; ``"".join(page texts) == text`` exactly (kept in
    ``Manifest.pages`` in memory), and no page is blank. ``tokenizer`` (a model's) adds its count
    to the totals. Without ``out_dir`` nothing is written. Raises ValueError for characters no
    shipped font has (``dsocr.render.missing_chars`` finds them beforehand).

    In ``out_dir``, only files this function wrote are replaced or deleted: the pages named in
    the folder's previous manifest (when their sha256 still matches). Any other ``page_NNNN.png``
    in the way is an error, raised before anything is written.
    """
    mode = get_mode(mode)
    folder = Path(out_dir) if out_dir is not None else None
    previous = _prepare_out_dir(folder) if folder is not None else {}
    pages, used = render_pages(text, mode, style, page_size=page_size, fit_one_page=fit_one_page)
    texts = [p.text for p in pages]
    assert "".join(texts) == text, "renderer lost text across pages"
    blobs = [png_bytes(p.image) if folder is not None else b"" for p in pages]
    for k, data in enumerate(blobs if folder is not None else []):
        target = folder / f"page_{k + 1:04d}.png"
        if not target.exists():
            continue
        digest = sha256_file(target) if target.is_file() else None
        if digest != sha256_bytes(data) and (digest is None or previous.get(target.name) != digest):
            raise ValueError(
                f"{target}: exists and was not written by an earlier dsocr compress into this "
                f"folder (not in its {MANIFEST}); refusing to overwrite it"
            )
    entries, start = [], 0
    for k, (page, joiner, data) in enumerate(zip(pages, _joiners(texts), blobs)):
        w, h = page.image.size
        entries.append(
            PageEntry(
                file=f"page_{k + 1:04d}.png",
                png_sha256=sha256_bytes(data) if data else "",
                text_sha256=sha256_text(page.text),
                start=start,
                end=start + len(page.text),
                joiner=joiner,
                text_tokens=count_text_tokens(page.text),
                vision_tokens=grid_image_tokens(w, h, mode),
                placeholder_tokens=count_image_tokens(w, h, mode),
                valid_tokens=valid_image_tokens(w, h, mode),
            )
        )
        start += len(page.text)
        if folder is not None:
            atomic_write_bytes(folder / entries[-1].file, data)
    manifest = Manifest(
        mode=mode,
        page_size=pages[0].image.size if pages else used.size,
        style=used,
        source_sha256=sha256_text(text),
        source_chars=len(text),
        entries=entries,
        stats=compression_stats(text, pages, mode, tokenizer=tokenizer),
        folder=folder,
        pages=pages,
        model_tokenizer=_tokenizer_info(tokenizer),
    )
    if folder is not None:
        atomic_write_json(folder / MANIFEST, manifest.to_json())
        keep = {e.file for e in entries}
        for name, digest in previous.items():  # pages of an earlier, longer compress
            stale = folder / name
            if name not in keep and stale.is_file() and sha256_file(stale) == digest:
                stale.unlink()
    return manifest


def _tokenizer_info(tokenizer) -> dict | None:
    """Where a model tokenizer came from, for the manifest (dsocr ``Tokenizer``: file + sha256)."""
    if tokenizer is None:
        return None
    return {
        "source": str(getattr(tokenizer, "source", type(tokenizer).__name__)),
        "sha256": getattr(tokenizer, "sha256", None),
    }


def load_manifest(folder: str | Path) -> Manifest:
    """The manifest of a compress folder; ValueError naming the file when it is damaged."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {MANIFEST} (not a dsocr compress folder)")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: not a readable {FORMAT} manifest ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: not a {FORMAT} manifest (a JSON {type(d).__name__})")
    try:
        return Manifest.from_json(d, folder)
    except KeyError as e:
        raise ValueError(f"{path}: damaged {FORMAT} manifest (no {e} field)") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: damaged {FORMAT} manifest ({e})") from None


def read_page(folder: Path, entry: PageEntry) -> Image.Image:
    """A page image from disk, checked against its manifest sha256."""
    path = Path(folder) / entry.file
    if not path.is_file():
        raise FileNotFoundError(f"{path}: page named in the manifest is missing")
    data = path.read_bytes()
    if entry.png_sha256 and sha256_bytes(data) != entry.png_sha256:
        raise ValueError(f"{path}: sha256 differs from the manifest (file changed or torn)")
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


# --------------------------------------------------------------------------------------------------
# decompress
# --------------------------------------------------------------------------------------------------


@dataclass
class Decompressed:
    """Decoded text plus, when the source was given and matched, word precision/recall."""

    text: str
    page_texts: list[str]
    source_verified: bool = False  # the given source's sha256 matched the manifest
    precision: float | None = None  # word_precision(text, source)
    recall: float | None = None
    page_precision: list[float] = field(default_factory=list)

    def __str__(self) -> str:
        return self.text


def default_max_new_tokens(ocr, text_tokens: int, placeholder_tokens: int) -> int:
    """Room for a page's text: 4x its V3 tokens (+64), within the model's position limit."""
    want = 4 * text_tokens + 64
    limit = ocr.model.config.language.max_position_embeddings - placeholder_tokens - 32
    return max(1, min(want, limit))


def decode_images(
    ocr,
    images: Sequence[Image.Image],
    mode: str | Mode,
    prompt: str = PROMPTS["free"],
    max_new_tokens: int | Sequence[int] = 512,
) -> list[str]:
    """``ocr.generate`` on each image (one at a time: pages of a turn are few)."""
    if isinstance(max_new_tokens, int):
        max_new_tokens = [max_new_tokens] * len(images)
    return [
        ocr.generate(im, prompt, mode=mode, max_new_tokens=int(n)).strip()
        for im, n in zip(images, max_new_tokens)
    ]


def join_pages(texts: Sequence[str], joiners: Sequence[str]) -> str:
    out = []
    for t, j in zip(texts, joiners):
        out.append(t.strip())
        out.append(j)
    return "".join(out)


def decompress(
    manifest_dir: str | Path | Manifest,
    ocr,
    prompt: str = PROMPTS["free"],
    *,
    source: str | None = None,
    max_new_tokens: int | None = None,
) -> Decompressed:
    """Decode a compressed folder (or in-memory Manifest) back to text with ``ocr.generate``.

    Pages are decoded in order and joined with the whitespace recorded between them, so a perfect
    decode gives ``source.strip()`` back. With ``source`` whose sha256 matches the manifest, word
    precision and recall are measured overall and per page; a source that does not match raises
    ValueError (the hash is what makes the score meaningful). ``str(result)`` is the text.
    ``max_new_tokens`` (>= 1) caps every page; None: ``default_max_new_tokens`` per page.
    """
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    manifest = manifest_dir if isinstance(manifest_dir, Manifest) else load_manifest(manifest_dir)
    if source is not None and sha256_text(source) != manifest.source_sha256:
        raise ValueError(
            f"the given source (sha256 {sha256_text(source)[:12]}..., {len(source)} chars) is not "
            f"the compressed text (sha256 {manifest.source_sha256[:12]}..., "
            f"{manifest.source_chars} chars)"
        )
    limits = [
        max_new_tokens
        if max_new_tokens is not None
        else default_max_new_tokens(ocr, e.text_tokens, e.placeholder_tokens)
        for e in manifest.entries
    ]
    texts = decode_images(ocr, manifest.images(), manifest.mode, prompt, limits)
    out = Decompressed(join_pages(texts, [e.joiner for e in manifest.entries]), texts)
    if source is not None:
        out.source_verified = True
        out.precision = word_precision(out.text, source)
        out.recall = word_recall(out.text, source)
        out.page_precision = [
            word_precision(t, source[e.start : e.end]) for t, e in zip(texts, manifest.entries)
        ]
    return out


# --------------------------------------------------------------------------------------------------
# vision embeddings
# --------------------------------------------------------------------------------------------------

_EMBED_KEY = "image.{:04d}"
_META_KEY = "dsocr_meta"
_COUNT_KEY = "dsocr_count"  # beside the meta, so a caller's own "count" key survives


def save_vision_embeddings(path: str | Path, embeds: Sequence[torch.Tensor], meta: dict) -> None:
    """Save per-image (N_i, C) embeddings (``model.encode_images`` output) as safetensors.

    ``meta`` (JSON-serialisable: mode, model source/config name, page files...) is stored in the
    safetensors header. Written atomically. Tensors keep their dtype (bf16 included).
    """
    from safetensors.torch import save

    for i, e in enumerate(embeds):
        assert e.ndim == 2, f"embedding {i}: expected (N, C), got {tuple(e.shape)}"
    tensors = {_EMBED_KEY.format(i): e.detach().cpu().contiguous() for i, e in enumerate(embeds)}
    header = {_META_KEY: json.dumps(meta, ensure_ascii=False), _COUNT_KEY: str(len(embeds))}
    atomic_write_bytes(path, save(tensors, metadata=header))


def load_vision_embeddings(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[list[torch.Tensor], dict]:
    """(embeddings in saved order, meta) from ``save_vision_embeddings``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as f:
        header = f.metadata() or {}
        if _META_KEY not in header:
            raise ValueError(f"{path}: not a dsocr vision-embedding file (no {_META_KEY})")
        meta = json.loads(header[_META_KEY])
        # files from before _COUNT_KEY kept the count inside the meta
        count = int(header[_COUNT_KEY]) if _COUNT_KEY in header else meta.pop("count")
        embeds = [f.get_tensor(_EMBED_KEY.format(i)) for i in range(count)]
    return embeds, meta


def embeddings_prompt(
    tokenizer, embeds: Sequence[torch.Tensor], prompt: str | None = None
) -> tuple[list[int], torch.Tensor]:
    """Prompt ids and the (sum N_i, C) image_embeds to feed ``model(input_ids, image_embeds=...)``.

    ``prompt`` must hold one ``<image>`` per embedding (default: all images, then "Free OCR.").
    """
    from dsocr.language.tokenizer import IMAGE_TOKEN, build_prompt_ids

    if prompt is None:
        prompt = IMAGE_TOKEN * len(embeds) + "\nFree OCR."
    ids = build_prompt_ids(tokenizer, prompt, [e.shape[0] for e in embeds])
    return ids, torch.cat(list(embeds))


# --------------------------------------------------------------------------------------------------
# densest layout
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayoutCandidates:
    """The renderer parameters ``densest_layout`` searches. Sizes are for the mode's page.

    Font size is binary-searched per (family, line height, margin) between ``min_font_size`` and
    ``max_font_size`` (None: page width // 20); ``margins`` entries None mean page width // 32.
    """

    fonts: tuple[str, ...] = FAMILIES
    min_font_size: int = 6
    max_font_size: int | None = None
    line_heights: tuple[float, ...] = (1.0, 1.2)
    margins: tuple[int | None, ...] = (None,)


@dataclass(frozen=True)
class LayoutTrial:
    style: PageStyle
    precision: float
    ratio: float  # V3 text tokens / grid vision tokens over all pages
    pages: int


@dataclass
class LayoutChoice:
    """The chosen style and what it measured; ``passed`` False when no trial met the threshold
    (then ``style`` is the most precise trial)."""

    style: PageStyle
    precision: float
    ratio: float
    pages: int
    passed: bool
    trials: list[LayoutTrial]


def densest_layout(
    text: str,
    mode: str | Mode,
    ocr,
    candidates: LayoutCandidates = LayoutCandidates(),
    threshold: float = 0.97,
    *,
    prompt: str = PROMPTS["free"],
    max_new_tokens: int | None = None,
) -> LayoutChoice:
    """The densest renderer layout whose decoded word precision stays >= ``threshold``.

    For each (family, line height, margin) the smallest font size with precision >= threshold is
    binary-searched (precision assumed to grow with font size; each step renders, decodes every
    page with ``ocr`` and scores). Among passing layouts the highest compression ratio wins, then
    the higher precision. Cost: about log2(size range) decodes of the text per combination, so
    pass a representative sample of a few pages, not a whole corpus.
    """
    mode = get_mode(mode)
    w, _ = page_size_for_mode(mode)
    hi_font = candidates.max_font_size or max(candidates.min_font_size, w // 20)
    trials: dict[PageStyle, LayoutTrial] = {}
    refusals: list[str] = []  # why compress refused a style, for the error when all are refused

    def evaluate(style: PageStyle) -> LayoutTrial | None:
        if style in trials:
            return trials[style]
        try:
            m = compress(text, mode, style)
        except ValueError as e:  # e.g. margins leave no room at this size
            refusals.append(str(e))
            return None
        got = decompress(m, ocr, prompt, source=text, max_new_tokens=max_new_tokens)
        trials[style] = LayoutTrial(style, got.precision, m.ratio, len(m.entries))
        return trials[style]

    base = default_style(mode)
    passing: list[LayoutTrial] = []
    for font in candidates.fonts:
        for lh in candidates.line_heights:
            for margin in candidates.margins:
                m = margin if margin is not None else max(1, w // 32)

                def style_at(size: int, font=font, lh=lh, m=m) -> PageStyle:
                    return dataclasses.replace(
                        base, font=font, line_height=lh, margin=m, font_size=size
                    )

                lo, hi, best = candidates.min_font_size, hi_font, None
                while lo <= hi:  # smallest passing font size
                    mid = (lo + hi) // 2
                    t = evaluate(style_at(mid))
                    if t is not None and t.precision >= threshold:
                        best, hi = t, mid - 1
                    else:
                        lo = mid + 1
                if best is not None:
                    passing.append(best)
    pool = passing or list(trials.values())
    if not pool:
        why = f": {refusals[-1]}" if refusals else ""
        raise ValueError(f"no candidate layout could render the text for mode {mode.name}{why}")
    key = (lambda t: (t.ratio, t.precision)) if passing else (lambda t: (t.precision, t.ratio))
    best = max(pool, key=key)
    return LayoutChoice(
        style=best.style,
        precision=best.precision,
        ratio=best.ratio,
        pages=best.pages,
        passed=bool(passing),
        trials=list(trials.values()),
    )
