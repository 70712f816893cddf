"""Token accounting for optical compression: text tokens vs vision tokens, and their ratio.

Paper §4.1 / Table 2 (arXiv 2510.18234; spec §9.1): "compression = text tokens / vision tokens",
where text tokens are counted with the DeepSeek(-V3) tokenizer and vision tokens are the *grid*
tokens the paper names for each mode: 64 (Tiny, 512 px), 100 (Small, 640 px), 256 (Base), 400
(Large), n*100 + 256 (Gundam, n tiles of 640 px), n*256 + 400 (Gundam-M). Table 2's columns
"@64" and "@100" divide by 64 and 100: grid tokens, not the 73 / 111 ``<image>`` placeholders the
decoder really consumes (grid + one newline per row + the view separator) and not the "valid"
tokens of paper Eq. 1 (which only differ from the grid count for padded views).

We report all three denominators so a reader can compare like with like:

- ``vision_tokens``: grid tokens, the paper's Table 2 denominator (``ratio`` uses it);
- ``placeholder_tokens``: ``count_image_tokens``, the decoder's real context cost;
- ``valid_tokens``: ``valid_image_tokens`` (paper Eq. 1, ceil), the denominator of the official
  ``test_compress`` report.

Grid tokens are derived from the mode and ``crop_grid`` (the same tile choice the preprocessor
makes), so they cannot drift from ``vision/preprocess.py``; the placeholder count stays the one
source of truth for the prompt/embedding layout.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from PIL import Image

from dsocr.configs import Mode, get_mode
from dsocr.language.tokenizer import count_text_tokens
from dsocr.vision.preprocess import count_image_tokens, crop_grid, valid_image_tokens

PIXELS_PER_TOKEN = 64  # every shipped config: patch 16 then two stride-2 convs


def grid_image_tokens(
    width: int, height: int, mode: str | Mode, pixels_per_token: int = PIXELS_PER_TOKEN
) -> int:
    """Vision tokens as the paper counts them: g^2 for the global view plus t^2 per tile.

    64 / 100 / 256 / 400 for Tiny / Small / Base / Large; n*100 + 256 for Gundam with n tiles
    (n = 0 when the image is within the 640 px crop threshold). No newline/separator tokens.
    """
    mode = get_mode(mode)
    g = mode.base_size // pixels_per_token
    total = g * g
    cols, rows = crop_grid(width, height, mode)
    if cols > 1 or rows > 1:
        total += cols * rows * (mode.image_size // pixels_per_token) ** 2
    return total


def model_token_count(tokenizer, text: str) -> int:
    """Tokens of ``text`` under a loaded model's tokenizer (dsocr ``Tokenizer`` or HF ``tokenizers``).

    No BOS/EOS. dsocr's ``Tokenizer.encode`` returns ids; ``tokenizers.Tokenizer.encode`` returns
    an ``Encoding`` (its ``.ids`` are used, without special tokens).
    """
    try:
        out = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:  # dsocr Tokenizer.encode(text) never adds specials
        out = tokenizer.encode(text)
    return len(out.ids if hasattr(out, "ids") else out)


def readback_budget(tokenizer, text: str, max_positions: int) -> int:
    """Decode budget for reading back a page of known text ``text``: 1.2x its tokens under the
    model's tokenizer + 32, at least 16, and at most ``max_positions`` - 512 (room for the prompt
    and the vision tokens). The benchmarks and the bundle's mode measurement share this rule."""
    need = int(1.2 * model_token_count(tokenizer, text)) + 32
    return max(16, min(need, max_positions - 512))


@dataclass(frozen=True)
class CompressionStats:
    """Text vs vision tokens for some text rendered onto ``pages`` images in ``mode``.

    ``text_tokens``: DeepSeek-V3 tokenizer, as the paper counts (``count_text_tokens``).
    ``model_text_tokens``: the loaded model's own tokenizer, when one was given (None otherwise);
    for dsocr-mini (8k byte-level BPE) this is larger than the V3 count.
    ``vision_tokens``: grid tokens, the paper's Table 2 denominator (64 Tiny, 100 Small, ...).
    ``placeholder_tokens``: ``<image>`` placeholders the decoder consumes (73 Tiny, 111 Small...).
    ``valid_tokens``: paper Eq. 1 valid tokens (equal to the grid count for Tiny/Small).
    ``ratio`` = text_tokens / vision_tokens, i.e. the paper's "compression" (10.5x = 672 / 64).
    """

    mode: str
    pages: int
    text_tokens: int
    vision_tokens: int
    placeholder_tokens: int
    valid_tokens: int
    model_text_tokens: int | None = None

    @property
    def ratio(self) -> float:
        """Paper Table 2 compression: V3 text tokens / grid vision tokens."""
        return self.text_tokens / self.vision_tokens if self.vision_tokens else 0.0

    @property
    def ratio_placeholder(self) -> float:
        """V3 text tokens / placeholders: the saving in the decoder's real context length."""
        return self.text_tokens / self.placeholder_tokens if self.placeholder_tokens else 0.0

    @property
    def ratio_valid(self) -> float:
        """V3 text tokens / valid tokens (paper Eq. 1), as the official test_compress reports."""
        return self.text_tokens / self.valid_tokens if self.valid_tokens else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            ratio=round(self.ratio, 4),
            ratio_placeholder=round(self.ratio_placeholder, 4),
            ratio_valid=round(self.ratio_valid, 4),
        )
        return d


def _size(item) -> tuple[int, int]:
    if isinstance(item, Image.Image):
        return item.size
    image = getattr(item, "image", None)  # dsocr.render.Page
    if isinstance(image, Image.Image):
        return image.size
    w, h = item
    return int(w), int(h)


def vision_token_counts(
    pages_or_sizes: Iterable, mode: str | Mode, pixels_per_token: int = PIXELS_PER_TOKEN
) -> tuple[int, int, int, int]:
    """(pages, grid, placeholder, valid) token totals over pages / images / (w, h) sizes."""
    mode = get_mode(mode)
    n = grid = placeholder = valid = 0
    for item in pages_or_sizes:
        w, h = _size(item)
        n += 1
        grid += grid_image_tokens(w, h, mode, pixels_per_token)
        placeholder += count_image_tokens(w, h, mode, pixels_per_token)
        valid += valid_image_tokens(w, h, mode, pixels_per_token)
    return n, grid, placeholder, valid


def compression_stats(
    text: str,
    pages_or_sizes: Sequence | Image.Image | tuple[int, int],
    mode: str | Mode,
    tokenizer=None,
    pixels_per_token: int = PIXELS_PER_TOKEN,
) -> CompressionStats:
    """Token accounting for ``text`` shown on ``pages_or_sizes`` in ``mode``.

    ``pages_or_sizes``: dsocr ``Page`` objects, PIL images or (width, height) pairs (or one of
    them). ``tokenizer``: the loaded model's tokenizer, to also report its own count.

    >>> compression_stats("x" * 10, [(512, 512)], "tiny").vision_tokens
    64
    """
    mode = get_mode(mode)
    if isinstance(pages_or_sizes, Image.Image) or hasattr(pages_or_sizes, "image"):
        pages_or_sizes = [pages_or_sizes]
    elif (
        isinstance(pages_or_sizes, (tuple, list))
        and len(pages_or_sizes) == 2
        and all(isinstance(v, numbers.Real) for v in pages_or_sizes)
    ):  # one (width, height), numpy integers included
        pages_or_sizes = [pages_or_sizes]
    n, grid, placeholder, valid = vision_token_counts(pages_or_sizes, mode, pixels_per_token)
    return CompressionStats(
        mode=mode.name,
        pages=n,
        text_tokens=count_text_tokens(text),
        vision_tokens=grid,
        placeholder_tokens=placeholder,
        valid_tokens=valid,
        model_text_tokens=None if tokenizer is None else model_token_count(tokenizer, text),
    )
