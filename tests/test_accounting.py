"""dsocr.compress.accounting: hand-computed vision-token counts and the forms a page size takes."""

import json

import numpy as np

from dsocr.compress.accounting import compression_stats, vision_token_counts


def test_gundam_counts_hand_computed():
    # 1920 x 1280: 3 x 2 tiles of 640 px. Grid 16^2 + 6 * 10^2; placeholders 16*17 + 1 + 20 * 31;
    # valid: the padded global view counts ceil(256 * 1280 / 1920) = 171, tiles all 600.
    assert vision_token_counts([(1920, 1280)], "gundam") == (1, 856, 893, 771)
    # 2480 x 3508 (A4 at 300 dpi): 2 x 3 tiles; valid ceil(256 * 2480 / 3508) = 181
    assert vision_token_counts([(2480, 3508)], "gundam") == (1, 856, 903, 781)
    assert vision_token_counts([(600, 600)], "gundam") == (1, 256, 273, 256)  # no tiles
    # Gundam-M 1024 x 1024: 2 x 2 tiles of 1024 px: 400 + 4 * 256; 421 + 32 * 33
    assert vision_token_counts([(1024, 1024)], "gundam-m") == (1, 1424, 1477, 1424)


def test_one_size_in_any_numeric_form():
    """A single (w, h) of numpy integers or a list used to fail with a bare unpacking TypeError."""
    want = compression_stats("abc", (512, 512), "tiny")
    for size in [(np.int64(512), np.int64(512)), [512, 512], (512.0, 512.0)]:
        got = compression_stats("abc", size, "tiny")
        assert (
            (got.pages, got.vision_tokens, got.valid_tokens)
            == (1, 64, 64)
            == (
                want.pages,
                want.vision_tokens,
                want.valid_tokens,
            )
        )
    two = compression_stats("abc", [(512, 512), (512, 512)], "tiny")
    assert (two.pages, two.vision_tokens) == (2, 128)


def test_no_pages_gives_json_safe_ratios():
    """ratio was inf for zero pages (and the other two 0.0): to_dict() was not valid JSON."""
    s = compression_stats("some text", [], "tiny")
    assert (s.pages, s.vision_tokens, s.ratio, s.ratio_valid, s.ratio_placeholder) == (
        0,
        0,
        0.0,
        0.0,
        0.0,
    )
    json.dumps(s.to_dict(), allow_nan=False)
