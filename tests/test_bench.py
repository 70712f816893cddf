"""The GPU pages/s benchmark's arithmetic, and its plumbing on a tiny model; bench/mini.py's
paired comparison of two models on the same held-out pages."""

import json

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


def _rows(cers, heads="abc"):
    return [
        {"reference_head": h, "v3_tokens": 10, "cer": c, "precision": 0.5, "recall": 0.5}
        | {"finish": "eos", "seconds": 0.1, "prediction_head": h}
        for h, c in zip(heads, cers)
    ]


def test_mini_paired_comparison_is_on_the_same_pages():
    from bench.mini import paired

    d = paired(_rows([0.1, 0.2, 0.3]), _rows([0.2, 0.2, 0.5]))
    assert d["pages"] == 3 and (d["better"], d["worse"]) == (2, 0)
    assert abs(d["diff"] + 0.1) < 1e-12 and abs(d["old_cer"] - 0.3) < 1e-12
    assert -0.2 - 1e-12 <= d["lo"] <= d["diff"] <= d["hi"] <= 0.0
    assert paired(_rows([0.1, 0.2, 0.3]), _rows([0.2, 0.2]))["pages"] == 2  # the common first pages
    assert paired(_rows([0.1, 0.2]), _rows([0.1, 0.2], heads="ax")) is None  # other pages


def test_mini_report_shows_the_comparison(tmp_path):
    from bench.mini import buckets, compare, main, summarise
    from dsocr.eval.run import run_info

    def result(cers, heads="abc"):
        rows = _rows(cers, heads)
        return {
            **run_info("python bench/mini.py"),
            **{"model": "m", "config": "tiny", "params": 1e6, "train_step": 5},
            **{"modes": ["tiny"], "heldout_pages": len(rows), "table2": [], "pdf": None},
            "heldout": {
                "recipe": {},
                "tiny": {"all": summarise(rows, "tiny"), "buckets": buckets(rows, "tiny")}
                | {"rows": rows},
            },
        }

    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(result([0.4, 0.5, 0.6])))
    new.write_text(json.dumps(result([0.3, 0.5, 0.4])))
    out = tmp_path / "m.md"
    args = ["--from-json", str(new), "--out", str(out), "--compare", str(old)]
    assert main([*args, "--compare-label", "phase 1"]) == 0
    text = out.read_text()
    assert "## 4. Against phase 1" in text
    assert "| tiny | 3 | 0.500 | 0.400 | -0.100 |" in text
    assert compare(result([0.1]), result([0.1], heads="z"), "x")["modes"]["tiny"] is None
    assert main(["--from-json", str(new), "--out", str(out), "--compare", str(tmp_path)]) == 2


def test_mini_font_sizes_replace_the_recipes_in_section_1(tmp_path):
    import types

    from bench.mini import heldout_pages
    from dsocr.api import load_model

    row = {"doc": "d", "group": "d", "lang": "en", "source": "s", "text": "Some held-out text."}
    (tmp_path / "heldout.jsonl").write_text(json.dumps(row) + "\n")
    ocr = load_model("tiny", device="cpu")
    args = types.SimpleNamespace(
        corpus=str(tmp_path), font_sizes=[20], modes=["tiny"], pages=2, seed=0, batch_size=2
    )
    out = heldout_pages(ocr, args)
    assert out["recipe"]["font_sizes"] == (20,)
    assert len(out["tiny"]["rows"]) == 2
