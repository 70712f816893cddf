"""Resolution modes: grid choice, token counts (the single source of truth), pixels."""

import io
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dsocr.configs import MODES, Mode
from dsocr.vision.preprocess import (
    MAX_IMAGE_PIXELS,
    ImageInputs,
    candidate_grids,
    check_image_size,
    count_image_tokens,
    crop_grid,
    preprocess_image,
    to_tensor,
    valid_image_tokens,
)

GREY = (127 / 255 - 0.5) / 0.5  # the pad colour after normalisation


def _norm(v: int) -> float:
    return (v / 255 - 0.5) / 0.5


# ------------------------------------------------------------------------------------------------
# token counts
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(512, 512), (1000, 300), (300, 2000), (4000, 3000), (17, 9)])
def test_native_mode_counts_do_not_depend_on_the_image(size):
    got = [count_image_tokens(*size, m) for m in ("tiny", "small", "base", "large")]
    assert got == [73, 111, 273, 421]


def test_gundam_three_wide_two_high_is_893():
    assert crop_grid(1920, 1280, "gundam") == (3, 2)
    assert count_image_tokens(1920, 1280, "gundam") == 273 + 20 * 31 == 893


def test_gundam_formula_for_every_grid():
    seen = set()
    for cols in range(1, 10):
        for rows in range(1, 10):
            if not 2 <= cols * rows <= 9:
                continue
            # An image of exactly the grid's aspect ratio and > 0.5 tile^2 per tile, so a ratio tie
            # (e.g. (1,2) vs (2,4)) goes to the later grid; the count must follow whatever grid won.
            w, h = 700 * cols, 700 * rows
            c, r = crop_grid(w, h, "gundam")
            assert c / r == cols / rows
            assert count_image_tokens(w, h, "gundam") == 273 + (10 * r) * (10 * c + 1)
            seen.add((c, r))
    assert len(seen) >= 15  # most grids really are exercised


def test_gundam_m_formula():
    for size in [(2048, 1024), (1024, 3000), (3000, 3000)]:
        c, r = crop_grid(*size, "gundam-m")
        assert (c, r) != (1, 1)
        assert count_image_tokens(*size, "gundam-m") == 421 + (16 * r) * (16 * c + 1)
    assert crop_grid(2048, 1024, "gundam-m") == (2, 1)
    assert count_image_tokens(2048, 1024, "gundam-m") == 421 + 16 * 33 == 949


def test_small_images_are_not_tiled():
    for size in [(640, 640), (300, 600), (640, 10), (1, 1)]:
        assert crop_grid(*size, "gundam") == (1, 1)
        assert count_image_tokens(*size, "gundam") == 273
    assert crop_grid(641, 100, "gundam") != (1, 1)  # either side over the threshold tiles
    assert crop_grid(100, 641, "gundam") != (1, 1)


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="0 x 10"):
        count_image_tokens(0, 10, "gundam")
    with pytest.raises(ValueError, match="10 x 0"):
        valid_image_tokens(10, 0, "base")


# ------------------------------------------------------------------------------------------------
# crop grid
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size,grid",
    [
        # aspect 2: (2,1) exact; the tie with (4,2) loses: 819,200 <= 0.5 * 640^2 * 8 = 1,638,400
        ((1280, 640), (2, 1)),
        ((2560, 1280), (4, 2)),  # same aspect, 3,276,800 px > 1,638,400 -> the later (4,2) wins
        ((640, 1920), (1, 3)),  # (1,3) exact, no other grid with aspect 1/3 within 9 tiles
        ((1000, 1000), (2, 2)),  # tie with (3,3): 1e6 <= 0.5 * 640^2 * 9 = 1,843,200 -> keep (2,2)
        ((2000, 2000), (3, 3)),  # 4e6 > 1,843,200 -> the later (3,3) replaces (2,2)
        ((700, 600), (2, 2)),  # 1.167: |1-1.167| = 0.167 < |1.5-1.167| = 0.333
        ((1900, 1300), (3, 2)),  # 1.46: closest to 1.5
        ((5000, 500), (9, 1)),  # aspect 10: the widest allowed grid
        ((500, 5000), (1, 9)),
    ],
)
def test_crop_grid_hand_worked(size, grid):
    assert crop_grid(*size, "gundam") == grid


def test_native_modes_never_tile():
    for m in ("tiny", "small", "base", "large"):
        assert crop_grid(5000, 500, m) == (1, 1)


def test_max_and_min_crops_bounds():
    six = Mode("g6", 1024, 640, crop_mode=True, max_crops=6)
    assert crop_grid(5000, 500, six) == (6, 1)
    assert crop_grid(2000, 2000, six) == (2, 2)  # (3,3) is not a candidate
    four = Mode("g4", 1024, 640, crop_mode=True, min_crops=4)
    assert crop_grid(1280, 640, four) == (4, 2)  # (2,1) is below min_crops
    assert all(4 <= c * r <= 9 for c, r in candidate_grids(4, 9))


def test_candidate_order_is_pinned():
    assert candidate_grids(2, 9) == [
        (1, 2), (2, 1), (1, 3), (3, 1), (2, 2), (1, 4), (4, 1), (1, 5), (5, 1), (2, 3), (3, 2),
        (1, 6), (6, 1), (1, 7), (7, 1), (2, 4), (4, 2), (1, 8), (8, 1), (3, 3), (1, 9), (9, 1),
    ]  # fmt: skip


def _internvl_grid(width, height, min_num, max_num, tile):
    """A literal copy of InternVL2's dynamic_preprocess grid choice (set order and all)."""
    target_ratios = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    aspect_ratio = width / height
    best_diff, best = float("inf"), (1, 1)
    area = width * height
    for ratio in target_ratios:
        diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff and area > 0.5 * tile * tile * ratio[0] * ratio[1]:
            best = ratio
    return best


@pytest.mark.parametrize("max_crops", [6, 9])
def test_crop_grid_matches_internvl_for_official_bounds(max_crops):
    mode = Mode("g", 1024, 640, crop_mode=True, max_crops=max_crops)
    sizes = [(w, h) for w in range(650, 6000, 137) for h in range(650, 6000, 151)]
    # exact tie points between neighbouring ratios, small and large
    for a_num, a_den in [(5, 4), (3, 4), (7, 4), (5, 2), (1, 1), (2, 1), (1, 2), (13, 12)]:
        sizes += [(a_num * k, a_den * k) for k in (200, 300, 500, 1000)]
    for w, h in sizes:
        if w > 640 or h > 640:
            assert crop_grid(w, h, mode) == _internvl_grid(w, h, 2, max_crops, 640), (w, h)


# ------------------------------------------------------------------------------------------------
# valid tokens (paper Eq. 1, ceil)
# ------------------------------------------------------------------------------------------------


def test_valid_tokens_paper_eq1():
    assert valid_image_tokens(1000, 500, "base") == 128  # ceil(256 * 500/1000), exact
    assert valid_image_tokens(1000, 333, "base") == 86  # ceil(85.25); the official floor gives 85
    assert valid_image_tokens(333, 1000, "base") == 86  # min/max: orientation does not matter
    assert valid_image_tokens(1000, 300, "large") == 120  # ceil(400 * 0.3)
    assert valid_image_tokens(800, 800, "base") == 256  # square: nothing padded
    assert valid_image_tokens(1000, 500, "tiny") == 64  # squashed, no padding
    assert valid_image_tokens(1000, 10, "small") == 100
    assert valid_image_tokens(600, 300, "gundam") == 128  # small: padded global view only
    assert valid_image_tokens(1280, 640, "gundam") == 128 + 2 * 100  # + every tile's 10x10
    assert valid_image_tokens(2048, 1024, "gundam-m") == 200 + 2 * 256
    assert valid_image_tokens(1000, 333, "base") == math.ceil(256 * 333 / 1000)


# ------------------------------------------------------------------------------------------------
# pixels
# ------------------------------------------------------------------------------------------------


def _solid(w, h, color=(200, 30, 30)):
    return Image.new("RGB", (w, h), color)


def test_base_mode_pads_centred_with_grey():
    x = preprocess_image(_solid(200, 100), "base")
    assert x.global_view.shape == (3, 1024, 1024) and x.global_view.dtype == torch.float32
    assert not x.has_tiles and x.tiles.shape == (0, 3, 1024, 1024)
    assert x.global_view.min() >= -1 and x.global_view.max() <= 1
    col = x.global_view[:, :, 512]  # (3, 1024): one column, top to bottom
    content = ((col - GREY).abs() > 1e-3).any(0)
    top = int(content.float().argmax())
    bottom = 1024 - int(content.flip(0).float().argmax())  # first grey row below the content
    assert abs(top - (1024 - bottom)) <= 1  # centred: equal grey bands above and below
    assert top == 256 and bottom == 768  # 200x100 -> 1024x512 content
    torch.testing.assert_close(col[:, :top], torch.full((3, top), GREY))
    torch.testing.assert_close(col[:, bottom:], torch.full((3, 1024 - bottom), GREY))
    torch.testing.assert_close(col[:, 512], torch.tensor([_norm(200), _norm(30), _norm(30)]))


def test_tiny_mode_squashes_without_padding():
    img = _solid(200, 100, (255, 0, 0))
    img.paste((0, 0, 255), (0, 50, 200, 100))  # bottom half blue
    x = preprocess_image(img, "tiny")
    assert x.global_view.shape == (3, 512, 512) and not x.has_tiles
    # No grey band: the top half fills rows 0..255 (stretched 5x vertically, 2.56x horizontally).
    torch.testing.assert_close(x.global_view[:, :250], _expand(1.0, -1.0, -1.0, 250, 512))
    torch.testing.assert_close(x.global_view[:, 262:], _expand(-1.0, -1.0, 1.0, 250, 512))
    assert x.num_tokens == 73 and x.valid_tokens == 64


def _expand(r, g, b, h, w):
    return torch.tensor([r, g, b]).view(3, 1, 1).expand(3, h, w)


def test_gundam_tiles_are_row_major_crops_of_the_resized_image():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (1300, 1900, 3), dtype=np.uint8))  # (H, W, 3)
    x = preprocess_image(img, "gundam")
    assert x.grid == (3, 2) and x.has_tiles
    assert x.tiles.shape == (6, 3, 640, 640) and x.global_view.shape == (3, 1024, 1024)
    assert x.tiles.min() >= -1 and x.tiles.max() <= 1
    resized = img.resize((3 * 640, 2 * 640), Image.Resampling.BICUBIC)
    for k in range(6):
        r, c = divmod(k, 3)
        crop = resized.crop((c * 640, r * 640, (c + 1) * 640, (r + 1) * 640))
        torch.testing.assert_close(x.tiles[k], to_tensor(crop), msg=f"tile {k}")
    assert x.num_tokens == count_image_tokens(1900, 1300, "gundam") == 273 + 20 * 31
    assert x.valid_tokens == valid_image_tokens(1900, 1300, "gundam")


def test_gundam_global_view_is_padded_original():
    x = preprocess_image(_solid(1300, 650), "gundam")  # 2:1 -> 1024x512 content, centred
    assert x.grid == (2, 1) and x.tiles.shape[0] == 2
    torch.testing.assert_close(x.global_view[:, :250], _expand(GREY, GREY, GREY, 250, 1024))
    torch.testing.assert_close(x.global_view[:, 780:], _expand(GREY, GREY, GREY, 244, 1024))
    assert abs(float(x.global_view[0, 512, 512]) - _norm(200)) < 1e-6


def test_gundam_small_image_has_global_view_only():
    x = preprocess_image(_solid(600, 400), "gundam")
    assert x.grid == (1, 1) and not x.has_tiles and x.tiles.shape == (0, 3, 640, 640)
    assert x.global_view.shape == (3, 1024, 1024)
    assert x.num_tokens == 273
    assert x.valid_tokens == math.ceil(256 * 400 / 600)


def test_non_rgb_inputs_are_converted():
    for mode in ("L", "RGBA", "P", "1"):
        x = preprocess_image(Image.new(mode, (100, 60)), "small")
        assert x.global_view.shape == (3, 640, 640)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buf = io.BytesIO()
    _solid(200, 100).save(buf, format="JPEG", exif=exif)
    buf.seek(0)
    x = preprocess_image(Image.open(buf), "base")
    assert x.orig_size == (100, 200)
    # now tall: the grey bands are left and right, not top and bottom
    torch.testing.assert_close(x.global_view[:, 512, :200], _expand(GREY, GREY, GREY, 1, 200)[:, 0])


def test_image_inputs_validates_shapes():
    mode = MODES["gundam"]
    good = dict(
        global_view=torch.zeros(3, 1024, 1024),
        tiles=torch.zeros(2, 3, 640, 640),
        grid=(2, 1),
        mode=mode,
        orig_size=(1300, 650),
        num_tokens=483,
        valid_tokens=328,
    )
    ImageInputs(**good)
    with pytest.raises(
        ValueError, match=r"global_view has shape \(3, 512, 512\).*\(3, 1024, 1024\)"
    ):
        ImageInputs(**{**good, "global_view": torch.zeros(3, 512, 512)})
    with pytest.raises(
        ValueError, match=r"tiles have shape \(3, 3, 640, 640\).*\(2, 3, 640, 640\)"
    ):
        ImageInputs(**{**good, "tiles": torch.zeros(3, 3, 640, 640)})
    with pytest.raises(ValueError, match=r"expected \(0, 3, 640, 640\) for grid \(1, 1\)"):
        ImageInputs(**{**good, "grid": (1, 1)})
    with pytest.raises(ValueError, match="dtype torch.float16"):
        ImageInputs(**{**good, "tiles": torch.zeros(2, 3, 640, 640, dtype=torch.float16)})


def test_pixel_limit_message():
    big = SimpleNamespace(size=(20_000, 10_000))  # only the header size is read, never pixels
    with pytest.raises(ValueError, match=r"20000 x 10000 = 200,000,000 pixels, over the limit of"):
        check_image_size(big)
    check_image_size(SimpleNamespace(size=(10_000, 10_000)), MAX_IMAGE_PIXELS)  # exactly the limit
    with pytest.raises(ValueError, match=r"over the limit of 1,000;"):
        check_image_size(_solid(50, 50), max_pixels=1000)


def test_a_mode_with_bad_sizes_is_refused_when_built_or_counted():
    with pytest.raises(ValueError, match="'x': base_size must be a positive integer, got 0"):
        Mode("x", 0, 64)
    with pytest.raises(ValueError, match="image_size must be a positive integer, got 64.0"):
        Mode("x", 64, 64.0)
    with pytest.raises(ValueError, match="min_crops 4 is above max_crops 3"):
        Mode("x", 64, 64, min_crops=4, max_crops=3)
    with pytest.raises(ValueError, match="'odd': base_size 500 is not a multiple of 64"):
        count_image_tokens(100, 100, Mode("odd", 500, 500))
    with pytest.raises(ValueError, match="image_size 600 is not a multiple of 64"):
        count_image_tokens(1000, 1000, Mode("odd", 512, 600, crop_mode=True))
    assert count_image_tokens(100, 100, Mode("odd", 512, 600)) == 73  # no tiles: unused
