"""Image preprocessing for the resolution modes, and the one source of truth for token counts.

Spec §2.5-§3, after the official ``process/image_process.py`` (vLLM) and the HF ``infer()`` path;
the tile grid is InternVL2's ``dynamic_preprocess``. Pure: PIL, numpy and torch, no model, and
nothing global is set in PIL at import time.

Rules:
- ``ImageOps.exif_transpose`` first (it needs the EXIF block), then convert to RGB.
- Native modes: Tiny/Small (image_size <= 640) plain bicubic ``resize((s, s))``, aspect ratio NOT
  kept; Base/Large ``ImageOps.pad`` to s x s (bicubic "contain" resize, centred, grey 127 borders).
- Crop modes (Gundam, Gundam-M): if both sides are <= ``crop_threshold`` (640, hard-coded in every
  official path) there are no tiles and only the global view is encoded. Otherwise the InternVL grid
  is chosen (:func:`crop_grid`), the whole image is resized to (tile*cols, tile*rows) without
  keeping the aspect ratio and cut into row-major tiles. The global view is always
  ``ImageOps.pad(original, (base, base))``, from the original image, not the tiled one.
- Normalisation: ToTensor's [0, 1] then (x - 0.5) / 0.5, i.e. [-1, 1] (done with numpy; no
  torchvision).
- No tiles is an explicit empty tensor (0, 3, tile, tile), not the official all-zeros sentinel.

Token counts (spec §2.5): g = base/64 and t = tile/64 tokens per side; the placeholder count is
g(g+1) + 1 (global rows, each with a newline, then the view separator) plus (rows*t)(cols*t + 1)
for the stitched tile grid when tiled. Tiny/Small/Base/Large give 73/111/273/421 for any image.

Gotchas:
- InternVL builds its candidate grids as a *set* and sorts by tile count only, so the order among
  grids with the same count is CPython's set order. We use a documented order instead (generation
  order n -> i -> j, stable-sorted by count). For the official bounds (2..9 and 2..6) no two grids
  with the same count can tie, so the chosen grid is the same (tested against a literal copy).
- Valid tokens (paper Eq. 1) use ceil as the paper does; the official code floors (``int()``).
  They only matter for reporting compression ratios.

Legend: W, H image width and height in pixels; S view side; n tiles; C=3 channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from dsocr.configs import Mode, get_mode

PAD_COLOR = (127, 127, 127)  # int(0.5 * 255): the normalisation mean, so borders map to ~0
MAX_IMAGE_PIXELS = 100_000_000  # default refusal limit for check_image_size (callers opt in)
SQUASH_MAX_SIZE = 640  # native views up to this size are resized without padding (Tiny/Small)


# --------------------------------------------------------------------------------------------------
# grid choice and token counts (pure integer functions)
# --------------------------------------------------------------------------------------------------


def _check_size(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width} x {height}")


def candidate_grids(min_crops: int, max_crops: int) -> list[tuple[int, int]]:
    """(cols, rows) grids with min_crops <= cols*rows <= max_crops, in a deterministic order.

    Generated as InternVL does (n in min..max, i in 1..n, j in 1..n; first occurrence kept), then
    stable-sorted by tile count, so grids with equal counts keep generation order.
    """
    grids: dict[tuple[int, int], None] = {}  # an ordered set
    for n in range(min_crops, max_crops + 1):
        for i in range(1, n + 1):
            for j in range(1, n + 1):
                if min_crops <= i * j <= max_crops:
                    grids.setdefault((i, j))
    return sorted(grids, key=lambda g: g[0] * g[1])


def crop_grid(width: int, height: int, mode: str | Mode) -> tuple[int, int]:
    """The tile grid (cols, rows); (1, 1) means no tiles (native modes and small images).

    InternVL2 ``find_closest_aspect_ratio``: the grid whose cols/rows is closest to width/height
    wins; on an exact tie in the difference, a later (larger) grid replaces the best only if the
    image area exceeds half the tiles' area (0.5 * tile^2 * cols * rows). Floats as in the original.
    """
    mode = get_mode(mode)
    _check_size(width, height)
    if not mode.crop_mode or (width <= mode.crop_threshold and height <= mode.crop_threshold):
        return (1, 1)
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(mode.min_crops, mode.max_crops):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * mode.image_size**2 * cols * rows:
            best = (cols, rows)
    return best


def _is_tiled(grid: tuple[int, int]) -> bool:
    return grid[0] > 1 or grid[1] > 1  # spec §2.5: tiles only if W_t > 1 or H_t > 1


def count_image_tokens(
    width: int, height: int, mode: str | Mode, pixels_per_token: int = 64
) -> int:
    """Number of ``<image>`` placeholders for an image: THE count (prompt and model assert it).

    g(g+1) + 1 for the global view and its separator (g = base/ppt), plus (rows*t)(cols*t + 1) for
    the stitched tiles (t = tile/ppt) when tiled: 73/111/273/421 for Tiny/Small/Base/Large, and
    273 + (10 rows)(10 cols + 1) for Gundam (3 wide x 2 high -> 893).
    """
    mode = get_mode(mode)
    for key in ("base_size", "image_size") if mode.crop_mode else ("base_size",):
        if getattr(mode, key) % pixels_per_token:
            raise ValueError(
                f"mode {mode.name!r}: {key} {getattr(mode, key)} is not a multiple of "
                f"{pixels_per_token} (the pixels per vision token side)"
            )
    g = mode.base_size // pixels_per_token
    total = g * (g + 1) + 1
    cols, rows = crop_grid(width, height, mode)
    if _is_tiled((cols, rows)):
        t = mode.image_size // pixels_per_token
        total += (rows * t) * (cols * t + 1)
    return total


def squashes(mode: Mode) -> bool:
    """True if the mode's single view is a plain resize (Tiny/Small), False if it is padded."""
    return not mode.crop_mode and mode.image_size <= SQUASH_MAX_SIZE


def valid_image_tokens(
    width: int, height: int, mode: str | Mode, pixels_per_token: int = 64
) -> int:
    """Grid tokens that cover image content (paper Eq. 1), without newlines and separator.

    Padded views (Base/Large and every crop-mode global view) count ceil(g^2 * min/max); squashed
    views (Tiny/Small) and tiles are all content. The official code floors instead of ceil.
    """
    mode = get_mode(mode)
    _check_size(width, height)
    g = mode.base_size // pixels_per_token
    if squashes(mode):
        valid = g * g
    else:
        valid = -(-g * g * min(width, height) // max(width, height))  # exact integer ceil
    cols, rows = crop_grid(width, height, mode)
    if _is_tiled((cols, rows)):
        valid += cols * rows * (mode.image_size // pixels_per_token) ** 2
    return valid


# --------------------------------------------------------------------------------------------------
# pixels
# --------------------------------------------------------------------------------------------------


def check_image_size(image: Image.Image, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Raise ValueError for an image over the pixel limit. Reads only ``image.size``, so it can run
    right after ``Image.open`` and before the pixels are decoded."""
    w, h = image.size
    if w * h > max_pixels:
        raise ValueError(
            f"image is {w} x {h} = {w * h:,} pixels, over the limit of {max_pixels:,}; "
            "downscale it first or raise the limit"
        )


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> (3, H, W) float32 in [-1, 1] (ToTensor, then Normalize(0.5, 0.5))."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    arr = np.array(image, dtype=np.uint8)  # (H, W, 3), a writable copy
    x = torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0  # (3, H, W) in [0, 1]
    return (x - 0.5) / 0.5


def pad_to_square(image: Image.Image, size: int) -> Image.Image:
    """Aspect-preserving bicubic resize so the longer side is ``size``, centred on grey."""
    return ImageOps.pad(image, (size, size), method=Image.Resampling.BICUBIC, color=PAD_COLOR)


def native_view(image: Image.Image, mode: Mode) -> Image.Image:
    """The one view of a native mode: Tiny/Small squash to (S, S); Base/Large pad to (S, S)."""
    s = mode.base_size  # == image_size for the native presets
    if squashes(mode):
        return image.resize((s, s), Image.Resampling.BICUBIC)
    return pad_to_square(image, s)


def cut_tiles(image: Image.Image, grid: tuple[int, int], tile: int) -> list[Image.Image]:
    """Resize to (tile*cols, tile*rows) ignoring aspect, then cut cols*rows tiles, row-major."""
    cols, rows = grid
    resized = image.resize((tile * cols, tile * rows), Image.Resampling.BICUBIC)
    return [
        resized.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
        for r in range(rows)
        for c in range(cols)
    ]


@dataclass
class ImageInputs:
    """One preprocessed image, validated on construction.

    global_view: (3, base, base) float32 in [-1, 1].
    tiles: (n, 3, tile, tile) float32, n = cols*rows when tiled, else an empty (0, 3, tile, tile).
    grid: (cols, rows), (1, 1) when not tiled. orig_size: (w, h) after EXIF rotation.
    num_tokens: count_image_tokens(w, h, mode); valid_tokens: valid_image_tokens(w, h, mode).
    """

    global_view: torch.Tensor
    tiles: torch.Tensor
    grid: tuple[int, int]
    mode: Mode
    orig_size: tuple[int, int]
    num_tokens: int
    valid_tokens: int

    def __post_init__(self):
        b, s, name = self.mode.base_size, self.mode.image_size, self.mode.name
        if tuple(self.global_view.shape) != (3, b, b):
            raise ValueError(
                f"global_view has shape {tuple(self.global_view.shape)}, expected (3, {b}, {b}) "
                f"for mode {name}"
            )
        cols, rows = self.grid
        if cols < 1 or rows < 1:
            raise ValueError(f"grid must be (cols, rows) >= 1, got {self.grid}")
        n = cols * rows if _is_tiled(self.grid) else 0
        if tuple(self.tiles.shape) != (n, 3, s, s):
            raise ValueError(
                f"tiles have shape {tuple(self.tiles.shape)}, expected ({n}, 3, {s}, {s}) for "
                f"grid {self.grid} in mode {name}"
            )
        for label, t in (("global_view", self.global_view), ("tiles", self.tiles)):
            if t.dtype != torch.float32:
                raise ValueError(f"{label} has dtype {t.dtype}, expected torch.float32")

    @property
    def has_tiles(self) -> bool:
        return self.tiles.shape[0] > 0


def preprocess_image(
    image: Image.Image, mode: str | Mode, pixels_per_token: int = 64
) -> ImageInputs:
    """A PIL image -> the mode's views as normalised tensors, plus its token counts.

    Does not check the pixel limit; callers that open untrusted files call check_image_size first.
    """
    mode = get_mode(mode)
    image = ImageOps.exif_transpose(image).convert("RGB")
    w, h = image.size
    if mode.crop_mode:
        glob = pad_to_square(image, mode.base_size)
        grid = crop_grid(w, h, mode)
        tiles = cut_tiles(image, grid, mode.image_size) if _is_tiled(grid) else []
    else:
        glob, grid, tiles = native_view(image, mode), (1, 1), []
    s = mode.image_size
    tile_t = torch.stack([to_tensor(t) for t in tiles]) if tiles else torch.empty(0, 3, s, s)
    return ImageInputs(
        global_view=to_tensor(glob),  # (3, base, base)
        tiles=tile_t,  # (n, 3, tile, tile)
        grid=grid,
        mode=mode,
        orig_size=(w, h),
        num_tokens=count_image_tokens(w, h, mode, pixels_per_token),
        valid_tokens=valid_image_tokens(w, h, mode, pixels_per_token),
    )
