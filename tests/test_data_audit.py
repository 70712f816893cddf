"""Data engine audit: held-out leakage, bad sources, scan rotation, the data benchmark."""

import itertools
import json
import math
import random
import sys
from pathlib import Path

from conftest import small_recipe

import dsocr.train.data as data
from dsocr.language.tokenizer import PROMPTS, Tokenizer, byte_tokenizer
from dsocr.train.data import StepBatches, batch_stream, make_sample

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import build_corpus  # noqa: E402

ROOT = Path(__file__).parents[1]


def _groups(held: bool, n: int) -> list[str]:
    return [
        g for g in (f"reference/ch{i}" for i in range(200)) if build_corpus.is_heldout(g) == held
    ][:n]


def _html(tmp_path, name: str, *paras: str) -> Path:
    page = tmp_path / "src" / f"{name}.html"
    page.parent.mkdir(exist_ok=True)
    page.write_text("<html><body>" + "".join(f"<p>{p}</p>" for p in paras) + "</body></html>")
    return page


def test_heldout_lines_shared_with_training_text_are_dropped(tmp_path):
    """A footer or an untranslated paragraph in both a held-out and a training chapter is
    trained on; build() keeps it in train and drops it from the held-out text."""
    shared = "This paragraph was left untranslated and appears in two chapters of the manual."
    (held,), (kept,) = _groups(True, 1), _groups(False, 1)
    own = "held-out words " * 50
    docs = [
        (f"{held}/en", held, "en", "t", _html(tmp_path, "h", own, shared)),
        (f"{kept}/en", kept, "en", "t", _html(tmp_path, "k", "train words " * 50, shared)),
    ]
    manifest = build_corpus.build(tmp_path / "corpus", docs=docs)
    rows = {
        s: [json.loads(x) for x in (tmp_path / "corpus" / f"{s}.jsonl").read_text().splitlines()]
        for s in ("train", "heldout")
    }
    assert [r["group"] for r in rows["heldout"]] == [held]
    assert shared in rows["train"][0]["text"]
    assert shared not in rows["heldout"][0]["text"] and own.strip() in rows["heldout"][0]["text"]
    assert manifest["heldout_lines_dropped_as_in_train"] == 1


def test_bad_sources_are_skipped_with_a_message(tmp_path, capsys):
    """An empty file and an unreadable one are skipped (counted in the manifest), not fatal."""
    (good,) = _groups(False, 1)
    empty = tmp_path / "empty.html"
    empty.write_text("")
    docs = [
        ("a/en", good, "en", "t", _html(tmp_path, "a", "word " * 200)),
        ("empty/en", good, "en", "t", empty),
        ("gone/en", good, "en", "t", tmp_path / "missing.html"),
        ("dir/en", good, "en", "t", tmp_path),
    ]
    manifest = build_corpus.build(tmp_path / "corpus", docs=docs)
    assert manifest["documents"] == {"train": 1, "heldout": 0}
    assert manifest["skipped_documents"] == {"unreadable": 2, "too_short": 1}
    err = capsys.readouterr().err
    assert "skipped gone/en: cannot read" in err and "skipped dir/en: cannot read" in err


def test_scan_rotation_keeps_the_text_area_on_the_page(monkeypatch):
    """With a 4 px margin on a 1024 px page, 1 degree turns the text area's corners off the page
    (text clipped but kept in the target); the rotation is capped by the margin."""
    seen = {}
    real_render, real_degrade = data.render_text, data.degrade

    def render(text, style):
        seen["style"] = style
        return real_render(text, style)

    def degrade(image, seed, **kw):
        seen["rotate"] = kw["rotate_deg"]
        return real_degrade(image, seed, **kw)

    monkeypatch.setattr(data, "render_text", render)
    monkeypatch.setattr(data, "degrade", degrade)
    recipe = small_recipe(page_size=1024, font_sizes=(12,), scan_prob=1.0, min_chars=4, max_chars=8)
    worst, small_margin = 0.0, 0
    for i in range(300):
        make_sample(recipe, random.Random(i), data.recipe_docs(None, "train"))
        m, a = seen["style"].margin, math.radians(abs(seen["rotate"]))
        c = 1024 / 2
        reach = (c - m) * (math.cos(a) + math.sin(a))  # farthest corner from the centre, per axis
        worst = max(worst, reach - (c - 1))
        small_margin += m < 10
    assert small_margin  # the case in question was drawn
    assert worst <= 1e-9, f"a text-area corner left the page by {worst:.2f} px"
    assert abs(data.max_rotation(512, 42) - 1.0) < 1e-12 and data.max_rotation(512, 4) < 0.7


def test_prompt_matches_label_type():
    """Free OCR samples carry the plain text; Markdown samples the Markdown source."""
    docs = ({"doc": "d", "text": "# Title\n\n- one item\n- two items"},)
    recipe = small_recipe(
        prompts=("free", "markdown"), min_chars=40, max_chars=40, font_sizes=(12,)
    )
    tasks = set()
    for i in range(12):
        s = make_sample(recipe, random.Random(i), docs)
        task = {v: k for k, v in PROMPTS.items()}[s.prompt]
        tasks.add(task)
        assert s.target == docs[0]["text"]
    assert tasks == {"free", "markdown"}


def test_stream_is_the_same_for_0_1_2_workers_and_on_resume(tiny_cfg):
    """Workers build different steps (no sample twice), in step order, whatever their number."""
    tok = Tokenizer(byte_tokenizer())
    recipe = small_recipe(corpus=None, min_chars=30, max_chars=120)

    def run(start, workers, n):
        s = StepBatches(recipe, tok, tiny_cfg, start_step=start, rank=0, batch_size=2, seed=5)
        out = []
        for b in itertools.islice(batch_stream(s, workers=workers), n):
            out.append((b.input_ids.tolist(), [im.global_view.sum().item() for im in b.images]))
        return out

    ref = run(0, 0, 6)
    assert run(0, 1, 6) == ref and run(0, 2, 6) == ref and run(4, 2, 2) == ref[4:]
    assert len({json.dumps(x) for x in ref}) == 6  # no two steps alike


def test_bench_data_measures_pages_per_s(tiny_cfg):
    """bench/data.py's measurement runs (it crashed: its batch count was shadowed)."""
    sys.path.insert(0, str(ROOT))
    from bench.data import pages_per_s

    tok = Tokenizer(byte_tokenizer())
    assert pages_per_s(small_recipe(), tok, tiny_cfg, 0, 2, 1) > 0
