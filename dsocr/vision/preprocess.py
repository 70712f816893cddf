"""Image preprocessing for the resolution modes, and the one source of truth for token counts.

Spec §2.5-§3 (after the official ``process/image_process.py`` and HF ``infer()``; InternVL2's
``dynamic_preprocess`` for the tile grid). Pure: PIL, numpy and torch tensors, no model.

Rules:
- Everything is converted to RGB after ``ImageOps.exif_transpose``.
- Native modes: Tiny/Small (size <= 640) plain bicubic ``resize((s, s))`` (aspect ratio NOT kept);
  Base/Large ``ImageOps.pad`` to s x s (aspect kept, centred, grey 127 borders).
- Crop modes (Gundam, Gundam-M): if both sides are <= ``crop_threshold`` (640, hard-coded in every
  official path) there are no tiles and only the global view is encoded. Otherwise the InternVL grid
  is chosen (below), the whole image is resized to (tile*cols, tile*rows) without keeping the aspect
  ratio and cut into row-major tiles. The global view is always ``ImageOps.pad(original, base)``.
- Normalisation: [0, 1] then (x - 0.5) / 0.5, i.e. [-1, 1].
- No tiles is an explicit empty tensor (0, 3, tile, tile), not the official all-zeros sentinel.

Gotcha: the valid-token count (paper Eq. 1) uses ceil as the paper does; the official code floors.
It only matters for reporting compression ratios.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from dsocr.configs import Mode, get_mode

PAD_COLOR = (127, 127, 127)  # int(0.5 * 255): the normalisation mean
MAX_IMAGE_PIXELS = 100_000_000  # refuse larger images before decoding them


# --------------------------------------------------------------------------------------------------
# grid choice and token counts (pure integer functions)
# --------------------------------------------------------------------------------------------------


def candidate_grids(min_crops: int, max_crops: int) -> list[tuple[int, int]]:
    """(cols, rows) grids with min <= cols*rows <= max, in InternVL's order.

    InternVL builds a *set* and sorts it by tile count; ties keep the set's iteration order, which
    for small int tuples is fixed in CPython. We build it the same way to pick the same grid.
    """
    grids = {
        (i, j)
        for n in range(min_crops, max_crops + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_crops <= i * j <= max_crops
    }
    return sorted(grids, key=lambda g: g[0] * g[1])


def crop_grid(width: int, height: int, mode: str | Mode) -> tuple[int, int]:
    """The tile grid (cols, rows); (1, 1) means no tiles (native modes and small images)."""
    mode = get_mode(mode)
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


def count_image_tokens(
    width: int, height: int, mode: str | Mode, pixels_per_token: int = 64
) -> int:
    """Number of ``<image>`` placeholders for an image: THE count (prompt and model assert it).

    g(g+1) + 1 for the global view (g = base/64) and its separator, plus (rows*t)(cols*t + 1) for
    the stitched tiles (t = tile/64) when tiled: 73/111/273/421 for Tiny/Small/Base/Large.
    """
    mode = get_mode(mode)
    g = mode.base_size // pixels_per_token
    total = g * (g + 1) + 1
    cols, rows = crop_grid(width, height, mode)
    if cols > 1 or rows > 1:
        t = mode.image_size // pixels_per_token
        total += (rows * t) * (cols * t + 1)
    return total


def valid_image_tokens(
    width: int, height: int, mode: str | Mode, pixels_per_token: int = 64
) -> int:
    """Grid tokens that cover image content (paper Eq. 1), without newlines and separator.

    Padded views (Base/Large and every crop-mode global view) count ceil(g^2 * min/max); resized
    views (Tiny/Small) and tiles are all content.
    """
    mode = get_mode(mode)
    g = mode.base_size // pixels_per_token
    padded = mode.crop_mode or mode.base_size > 640
    if padded:
        valid = math.ceil(g * g * min(width, height) / max(width, height))
    else:
        valid = g * g
    cols, rows = crop_grid(width, height, mode)
    if cols > 1 or rows > 1:
        valid += cols * rows * (mode.image_size // pixels_per_token) ** 2
    return valid


# --------------------------------------------------------------------------------------------------
# pixels
# --------------------------------------------------------------------------------------------------


def check_image_size(image: Image.Image, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Raise ValueError for an image over the pixel limit (PIL reads the size without decoding)."""
    w, h = image.size
    if w * h > max_pixels:
        raise ValueError(
            f"image is {w} x {h} = {w * h:,} pixels, over the limit of {max_pixels:,}; "
            "downscale it first or raise the limit"
        )


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1]."""
    arr = np.asarray(image, dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0  # (3, H, W) in [0, 1]
    return (x - 0.5) / 0.5


def native_view(image: Image.Image, size: int) -> Image.Image:
    """Tiny/Small: squash to size x size; Base/Large: pad to a centred grey square."""
    if size <= 640:
        return image.resize((size, size), Image.Resampling.BICUBIC)
    return ImageOps.pad(image, (size, size), method=Image.Resampling.BICUBIC, color=PAD_COLOR)


def cut_tiles(image: Image.Image, grid: tuple[int, int], tile: int) -> list[Image.Image]:
    """Resize to (tile*cols, tile*rows) ignoring aspect, then cut row-major tiles."""
    cols, rows = grid
    resized = image.resize((tile * cols, tile * rows), Image.Resampling.BICUBIC)
    return [
        resized.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
        for r in range(rows)
        for c in range(cols)
    ]


@dataclass
class ImageInputs:
    """One preprocessed image. Shapes are validated on construction.

    global_view (3, base, base) float32; tiles (n, 3, tile, tile), n = cols*rows or 0;
    grid (cols, rows); orig_size (w, h); num_tokens / valid_tokens from the count functions.
    """

    global_view: torch.Tensor
    tiles: torch.Tensor
    grid: tuple[int, int]
    mode: Mode
    orig_size: tuple[int, int]
    num_tokens: int
    valid_tokens: int

    def __post_init__(self):
        b, s = self.mode.base_size, self.mode.image_size
        assert tuple(self.global_view.shape) == (3, b, b), (
            f"global view {tuple(self.global_view.shape)} != (3, {b}, {b}) for mode {self.mode.name}"
        )
        n = self.grid[0] * self.grid[1] if self.grid != (1, 1) else 0
        assert tuple(self.tiles.shape) == (n, 3, s, s), (
            f"tiles {tuple(self.tiles.shape)} != ({n}, 3, {s}, {s}) for grid {self.grid}"
        )

    @property
    def has_tiles(self) -> bool:
        return self.tiles.shape[0] > 0


def preprocess_image(
    image: Image.Image, mode: str | Mode, pixels_per_token: int = 64
) -> ImageInputs:
    """A PIL image -> the mode's views as normalised tensors, plus its token counts."""
    mode = get_mode(mode)
    image = ImageOps.exif_transpose(image).convert("RGB")
    w, h = image.size
    if mode.crop_mode:
        glob = ImageOps.pad(
            image, (mode.base_size,) * 2, method=Image.Resampling.BICUBIC, color=PAD_COLOR
        )
        grid = crop_grid(w, h, mode)
        tiles = cut_tiles(image, grid, mode.image_size) if grid != (1, 1) else []
    else:
        glob, grid, tiles = native_view(image, mode.base_size), (1, 1), []
    tile_t = (
        torch.stack([to_tensor(t) for t in tiles])
        if tiles
        else torch.zeros(0, 3, mode.image_size, mode.image_size)
    )
    return ImageInputs(
        global_view=to_tensor(glob),
        tiles=tile_t,
        grid=grid,
        mode=mode,
        orig_size=(w, h),
        num_tokens=count_image_tokens(w, h, mode, pixels_per_token),
        valid_tokens=valid_image_tokens(w, h, mode, pixels_per_token),
    )
