"""The GPU pages/s benchmark's arithmetic, and its plumbing on a tiny model."""

from bench.pages import decode_roofline, expected_experts, main
from dsocr.configs import CONFIGS


def test_expected_experts():
    assert expected_experts(64, 6, 0) == 0
    assert expected_experts(64, 6, 1) == 6
    assert abs(expected_experts(64, 6, 64) - 64 * (1 - (58 / 64) ** 64)) < 1e-9  # 63.88


def test_decode_roofline_counts_the_official_active_parameters():
    """By hand: attention 12 x 4 x 1280^2 = 78,643,200; dense layer 0: 3 x 1280 x 6848 =
    26,296,320; 11 MoE layers x (shared 2 x 3 x 1280 x 896 + 6 experts x 3 x 1280 x 896) =
    302,776,320; lm_head 129,280 x 1280 = 165,478,400: 573,194,240, the paper's "570M active"."""
    r = decode_roofline(CONFIGS["deepseek-ocr"], batch=1, context=0, bytes_per_el=2)
    assert r["flops"] == 2 * 573_194_240
    router = 11 * 64 * 1280
    assert r["bytes"] == 2 * (573_194_240 + router)
    r8 = decode_roofline(CONFIGS["deepseek-ocr"], batch=8, context=100, bytes_per_el=2)
    kv = 8 * 12 * 2 * 1280 * 100
    assert r8["flops"] == 8 * (2 * 573_194_240 + 12 * 4 * 1280 * 100)
    weights = 573_194_240 + router + 11 * (r8["touched_experts"] - 6) * 3 * 1280 * 896
    assert abs(r8["bytes"] - 2 * (weights + kv)) < 1e3


def test_pages_bench_runs_and_writes_its_report(tmp_path):
    md = tmp_path / "pages.md"
    args = ["--config", "tiny", "--mode", "tiny", "--pages", "3", "--concurrency", "2"]
    assert main([*args, "--new-tokens", "4", "--device", "cpu", "--md", str(md)]) == 0
    text = md.read_text()
    assert "| pages/s |" in text and "3 pages, 2 in flight, 4 generated tokens" in text
