"""Resolution modes: grid choice, token counts (the single source of truth), pixels."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dsocr.configs import MODES, Mode
from dsocr.vision.preprocess import (
    MAX_IMAGE_PIXELS,
    check_image_size,
    count_image_tokens,
    crop_grid,
    preprocess_image,
    to_tensor,
    valid_image_tokens,
)

GREY = (127 / 255 - 0.5) / 0.5


@pytest.mark.parametrize("size", [(512, 512), (1000, 300), (300, 2000), (4000, 3000), (17, 9)])
def test_native_mode_counts_do_not_depend_on_the_image(size):
    assert [count_image_tokens(*size, m) for m in ("tiny", "small", "base", "large")] == [
        73,
        111,
        273,
        421,
    ]


def test_gundam_formula_for_every_grid():
    mode = MODES["gundam"]
    for cols in range(1, 10):
        for rows in range(1, 10):
            if not 2 <= cols * rows <= 9:
                continue
            # An image of exactly the grid's aspect ratio, big enough to tile.
            w, h = 700 * cols, 700 * rows
            got_grid = crop_grid(w, h, mode)
            assert got_grid[0] / got_grid[1] == cols / rows
            c, r = got_grid
            assert count_image_tokens(w, h, mode) == 273 + (10 * r) * (10 * c + 1)


def test_gundam_three_wide_two_high_is_893():
    assert crop_grid(1920, 1280, "gundam") == (3, 2)
    assert count_image_tokens(1920, 1280, "gundam") == 273 + 20 * 31 == 893


def test_gundam_m_formula():
    assert crop_grid(2048, 1024, "gundam-m") == (2, 1)
    assert count_image_tokens(2048, 1024, "gundam-m") == 421 + 16 * 33


def test_small_images_are_not_tiled():
    for size in [(640, 640), (300, 600), (640, 10)]:
        assert crop_grid(*size, "gundam") == (1, 1)
        assert count_image_tokens(*size, "gundam") == 273
    assert crop_grid(641, 100, "gundam") != (1, 1)


@pytest.mark.parametrize(
    "size,grid",
    [
        ((1280, 640), (2, 1)),  # aspect 2: (2,1) exact; the (4,2) tie loses (area too small)
        ((640, 1920), (1, 3)),
        ((1000, 1000), (2, 2)),  # tie with (3,3): 1e6 px <= 0.5 * 640^2 * 9 = 1.84e6 -> keep (2,2)
        ((2000, 2000), (3, 3)),  # 4e6 px > 1.84e6 -> the later (3,3) replaces (2,2)
        ((700, 600), (2, 2)),
        ((5000, 500), (9, 1)),  # aspect 10: the widest allowed grid
    ],
)
def test_crop_grid_hand_worked(size, grid):
    assert crop_grid(*size, "gundam") == grid


def test_max_crops_bound():
    narrow = Mode("g6", 1024, 640, crop_mode=True, max_crops=6)
    assert crop_grid(5000, 500, narrow) == (6, 1)
    assert crop_grid(2000, 2000, narrow) == (2, 2)  # (3,3) is not a candidate


def test_valid_tokens_paper_eq1():
    assert valid_image_tokens(1000, 500, "base") == 128  # ceil(256 * 500/1000)
    assert valid_image_tokens(1000, 333, "base") == math.ceil(256 * 333 / 1000)  # 86, not floor 85
    assert valid_image_tokens(1000, 500, "tiny") == 64  # resized, no padding
    assert valid_image_tokens(1280, 640, "gundam") == 128 + 2 * 100


def _solid(w, h, color=(200, 30, 30)):
    return Image.new("RGB", (w, h), color)


def test_base_mode_pads_centred_with_grey():
    x = preprocess_image(_solid(200, 100), "base")
    assert x.global_view.shape == (3, 1024, 1024) and not x.has_tiles
    assert x.global_view.min() >= -1 and x.global_view.max() <= 1
    col = x.global_view[0, :, 512]  # one column, top to bottom
    content = (col - GREY).abs() > 1e-3
    top = int(content.float().argmax())
    bottom = 1024 - 1 - int(content.flip(0).float().argmax())
    assert abs(top - (1023 - bottom)) <= 1  # centred
    assert top == 256 and torch.allclose(col[:top], torch.full((top,), GREY))


def test_tiny_mode_squashes_without_padding():
    x = preprocess_image(_solid(200, 100), "tiny")
    assert x.global_view.shape == (3, 512, 512)
    red = (200 / 255 - 0.5) / 0.5
    assert torch.allclose(x.global_view[0], torch.full((512, 512), red), atol=1e-6)


def test_gundam_tiles_are_row_major_crops_of_the_resized_image():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (650, 1300, 3), dtype=np.uint8))
    x = preprocess_image(img, "gundam")
    assert x.grid == (2, 1) and x.tiles.shape == (2, 3, 640, 640)
    resized = img.resize((1280, 640), Image.Resampling.BICUBIC)
    torch.testing.assert_close(x.tiles[1], to_tensor(resized.crop((640, 0, 1280, 640))))
    assert x.num_tokens == count_image_tokens(1300, 650, "gundam") == 273 + 10 * 21


def test_exif_orientation_is_applied():
    img = _solid(200, 100)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    img.info["exif"] = exif.tobytes()
    img2 = Image.open(_roundtrip(img, exif))
    assert preprocess_image(img2, "base").orig_size == (100, 200)


def _roundtrip(img, exif):
    import io

    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    buf.seek(0)
    return buf


def test_pixel_limit_message():
    big = SimpleNamespace(size=(20_000, 10_000))  # only the header size is read, never pixels
    with pytest.raises(ValueError, match=r"20000 x 10000 = 200,000,000 pixels, over the limit"):
        check_image_size(big)
    check_image_size(SimpleNamespace(size=(10_000, 10_000)), MAX_IMAGE_PIXELS)  # exactly the limit
