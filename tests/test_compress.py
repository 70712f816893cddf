"""dsocr.compress: token accounting, the page codec, vision-embedding files and optical memory.

Where decoded text matters, ``OCR.generate`` is patched with a lookup from page pixels to the
text rendered on them (a perfect reader), so tests are fast and exact; the tiny random model is
only used for shapes and the embedding path.
"""

import json
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import TEST_BASE, TEST_SMALL
from PIL import Image

import dsocr
from dsocr.api import OCR
from dsocr.compress import (
    LayoutCandidates,
    MemoryRecoveryWarning,
    OpticalMemory,
    TextItem,
    codec,
    compress,
    compression_stats,
    decompress,
    densest_layout,
    embeddings_prompt,
    grid_image_tokens,
    load_manifest,
    load_vision_embeddings,
    save_vision_embeddings,
    word_precision,
    word_recall,
)
from dsocr.compress.accounting import readback_budget
from dsocr.compress.codec import sha256_text
from dsocr.language.tokenizer import Tokenizer, byte_tokenizer, count_text_tokens

FOX = "The quick brown fox jumps over the lazy dog."
# "The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", "." (V3 BPE)
FOX_V3_TOKENS = 10
PARAGRAPH = (
    "Optical compression renders long text into page images. A vision encoder turns each page "
    "into a few tokens, and the decoder reads the text back. "
)


@pytest.fixture(scope="module")
def ocr():
    return dsocr.load_model("tiny", device="cpu")


@pytest.fixture()
def reader(monkeypatch):
    """Patch OCR.generate with a perfect reader; register pages with reader.learn(pages)."""

    class Reader:
        def __init__(self):
            self.table, self.calls = {}, []

        def learn(self, pages):
            for p in pages:
                self.table[p.image.tobytes()] = p.text

        def generate(self, ocr_self, image, prompt="", mode="base", max_new_tokens=512):
            self.calls.append((image.copy(), mode, max_new_tokens))
            return self.table.get(image.tobytes(), "").strip()

    r = Reader()
    monkeypatch.setattr(OCR, "generate", lambda self, *a, **k: r.generate(self, *a, **k))
    return r


# --------------------------------------------------------------------------------------------------
# accounting
# --------------------------------------------------------------------------------------------------


def test_text_tokens_match_the_paper_tokenizer():
    assert count_text_tokens(FOX) == FOX_V3_TOKENS


def test_compression_stats_hand_computed():
    s = compression_stats(FOX, [(512, 512)], "tiny")
    assert (s.pages, s.text_tokens, s.vision_tokens) == (1, 10, 64)
    assert (s.placeholder_tokens, s.valid_tokens) == (73, 64)  # 8*9+1; Tiny is resized, all valid
    assert s.ratio == pytest.approx(10 / 64) and s.ratio_placeholder == pytest.approx(10 / 73)
    # Table 2's first row: 600-700 text tokens on one Tiny page is ~10.5x (672 / 64)
    assert compression_stats(FOX, Image.new("L", (640, 640)), "small").vision_tokens == 100
    two = compression_stats(FOX * 2, [(640, 640)] * 2, "small")
    assert (two.vision_tokens, two.placeholder_tokens) == (200, 222)
    base = compression_stats(FOX, (1024, 512), "base")  # padded: valid = ceil(256 * 1/2)
    assert (base.vision_tokens, base.placeholder_tokens, base.valid_tokens) == (256, 273, 128)
    assert grid_image_tokens(1280, 1920, "large") == 400
    assert grid_image_tokens(1280, 1920, "gundam") == 6 * 100 + 256  # 2 x 3 tiles
    assert grid_image_tokens(600, 600, "gundam") == 256  # under the 640 px crop threshold
    # the model's own tokenizer: the tiny byte-level BPE has no merges, one token per byte
    tok = Tokenizer(byte_tokenizer())
    assert compression_stats(FOX, [(512, 512)], "tiny", tok).model_text_tokens == len(FOX)
    assert compression_stats(FOX, [(512, 512)], "tiny").model_text_tokens is None


def test_readback_budget_hand_computed():
    tok = Tokenizer(byte_tokenizer())  # one token per byte
    assert readback_budget(tok, "x" * 100, 4096) == 152  # 1.2 * 100 + 32
    assert readback_budget(tok, "", 4096) == 32
    assert readback_budget(tok, "x" * 5000, 2048) == 1536  # clamped to positions - 512
    assert readback_budget(tok, "x", 520) == 16  # never below 16


def test_word_precision_is_a_multiset_precision():
    assert word_precision("alpha beta gamma epsilon zeta", "alpha beta gamma delta") == 0.6
    assert word_precision("the the the", "the cat") == pytest.approx(1 / 3)
    assert word_precision("cat the", "the cat") == 1.0  # order-free
    assert word_precision("", "the cat") == 0.0 and word_precision("", "") == 1.0
    assert word_recall("the", "the cat") == 0.5


# --------------------------------------------------------------------------------------------------
# codec
# --------------------------------------------------------------------------------------------------


def _long_text(n=12):
    return "\n".join(f"{k}. {PARAGRAPH}" for k in range(n)) + "\n"


def test_compress_writes_pages_and_manifest(tmp_path):
    text = _long_text()
    m = compress(text, TEST_BASE, out_dir=tmp_path)
    assert len(m.entries) > 1, "the test text should paginate"
    assert "".join(p.text for p in m.pages) == text
    saved = json.loads((tmp_path / "manifest.json").read_text())
    assert saved["source_sha256"] == sha256_text(text) and saved["mode"] == "test-base"
    assert saved["totals"]["pages"] == len(m.entries)
    assert saved["totals"]["vision_tokens"] == 4 * len(m.entries)  # (128 / 64)^2 per page
    for page, entry in zip(m.pages, load_manifest(tmp_path).entries):
        assert (tmp_path / entry.file).is_file()
        assert (
            entry.text_sha256
            == sha256_text(page.text)
            == sha256_text(text[entry.start : entry.end])
        )
        assert Image.open(tmp_path / entry.file).tobytes() == page.image.tobytes()
        assert entry.text_tokens == count_text_tokens(page.text)
    assert sum(e.text_tokens for e in m.entries) >= m.stats.text_tokens - len(m.entries)
    assert not list(tmp_path.glob(".*.tmp")), "temp files left behind"
    back = load_manifest(tmp_path)
    assert back.style == m.style and back.mode == TEST_BASE and back.stats == m.stats
    compress(FOX, TEST_BASE, out_dir=tmp_path)  # a shorter text in the same folder
    assert sorted(p.name for p in tmp_path.glob("page_*.png")) == ["page_0001.png"]


def test_compress_fit_one_page_uses_the_largest_font():
    m = compress(FOX, "tiny", fit_one_page=True)
    assert len(m.pages) == 1 and m.page_size == (512, 512) and m.style.font_size > 20
    assert m.stats.vision_tokens == 64


def test_decompress_joins_pages_and_scores(tmp_path, ocr, reader):
    text = _long_text()
    m = compress(text, TEST_BASE, out_dir=tmp_path)
    reader.learn(m.pages)
    got = decompress(tmp_path, ocr, source=text)
    assert got.text == text.strip() and str(got) == got.text
    assert got.source_verified and got.precision == 1.0 and got.recall == 1.0
    assert got.page_precision == [1.0] * len(m.entries)
    assert [mode for _, mode, _ in reader.calls] == [TEST_BASE] * len(m.entries)
    with pytest.raises(ValueError, match="is not the compressed text"):
        decompress(tmp_path, ocr, source=text + "x")
    assert decompress(tmp_path, ocr).precision is None  # no source, no score


def test_decompress_reports_a_lower_precision_for_a_bad_decode(tmp_path, ocr, reader):
    source = "alpha beta gamma delta"
    m = compress(source, TEST_BASE, out_dir=tmp_path)
    reader.table[m.pages[0].image.tobytes()] = "alpha beta gamma epsilon zeta"
    got = decompress(tmp_path, ocr, source=source)
    assert got.precision == pytest.approx(0.6) and got.recall == pytest.approx(0.75)


def test_decompress_rejects_a_changed_page(tmp_path, ocr, reader):
    m = compress(_long_text(), TEST_BASE, out_dir=tmp_path)
    Image.new("L", m.page_size, 0).save(tmp_path / m.entries[0].file)
    with pytest.raises(ValueError, match="sha256 differs"):
        decompress(tmp_path, ocr)


def test_vision_embeddings_round_trip(tmp_path, ocr):
    m = compress(_long_text(3), TEST_SMALL)
    inputs = [ocr.preprocess(im.convert("RGB"), TEST_SMALL) for im in m.images()]
    with torch.no_grad():
        embeds = ocr.model.encode_images(inputs)
    meta = {"mode": "test-small", "model": ocr.source, "pages": len(embeds)}
    save_vision_embeddings(tmp_path / "e.safetensors", embeds, meta)
    back, meta_back = load_vision_embeddings(tmp_path / "e.safetensors")
    assert meta_back == meta and len(back) == len(embeds)
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(embeds, back))
    # straight into the decoder's context: same logits as a fresh encode
    ids, image_embeds = embeddings_prompt(ocr.tokenizer, back)
    assert ids.count(ocr.tokenizer.image_id) == sum(e.shape[0] for e in embeds)
    with torch.no_grad():
        a = ocr.model(torch.tensor([ids]), image_embeds=image_embeds)
        b = ocr.model(torch.tensor([ids]), image_embeds=torch.cat(embeds))
    assert torch.equal(a, b)
    save_vision_embeddings(tmp_path / "h.safetensors", [e.bfloat16() for e in embeds], {})
    assert load_vision_embeddings(tmp_path / "h.safetensors")[0][0].dtype == torch.bfloat16


def test_densest_layout_finds_the_smallest_readable_font(monkeypatch, ocr):
    """A fake reader that can only read fonts >= 9 px: the search must settle on 9 px."""
    fonts = {}
    real = codec.render_pages

    def spy(*a, **k):
        pages, style = real(*a, **k)
        for p in pages:
            fonts[p.image.tobytes()] = (p.text, style.font_size)
        return pages, style

    def fake_generate(self, image, prompt="", mode="base", max_new_tokens=512):
        text, size = fonts[image.tobytes()]
        return text.strip() if size >= 9 else "garbled"

    monkeypatch.setattr(codec, "render_pages", spy)
    monkeypatch.setattr(OCR, "generate", fake_generate)
    cands = LayoutCandidates(
        fonts=("sans",), min_font_size=6, max_font_size=14, line_heights=(1.2,)
    )
    choice = densest_layout(_long_text(4), TEST_BASE, ocr, cands, threshold=0.97)
    assert choice.passed and choice.style.font_size == 9 and choice.precision == 1.0
    assert choice.ratio == max(t.ratio for t in choice.trials if t.precision >= 0.97)
    assert len(choice.trials) <= 4  # binary search over 6..14


# --------------------------------------------------------------------------------------------------
# optical memory
# --------------------------------------------------------------------------------------------------


def _memory(tmp_path, **kw):
    kw = {"keep_text_turns": 2, "schedule": (TEST_BASE, TEST_SMALL), "age_steps": (0, 2), **kw}
    return OpticalMemory(tmp_path / "mem", **kw)


def _fill(mem, n):
    for k in range(n):
        mem.add("user" if k % 2 == 0 else "assistant", f"turn {k}: " + PARAGRAPH[: 40 + 7 * k])


def test_memory_decay_schedule(tmp_path):
    mem = _memory(tmp_path)
    _fill(mem, 7)  # ages 6..0: two text turns, then base for 2 turns, then small
    plan = mem.plan()
    assert [plan[t] for t in range(7)] == [TEST_SMALL] * 3 + [TEST_BASE] * 2 + ["text"] * 2
    # the default schedule: gundam 2 turns, large 2, base 4, small 8, then tiny
    default = OpticalMemory(tmp_path / "d", keep_text_turns=4)
    for k in range(40):
        default.turns.append(dsocr.compress.memory.Turn(k, "user", "x"))
    names = [
        default.schedule[lv].name if lv is not None else "text"
        for lv in (default.scheduled_level(t) for t in range(40))
    ][::-1]  # by age 0..39
    assert names[:4] == ["text"] * 4
    assert names[4:6] == ["gundam"] * 2 and names[6:8] == ["large"] * 2
    assert names[8:12] == ["base"] * 4 and names[12:20] == ["small"] * 8
    assert set(names[20:]) == {"tiny"}
    with pytest.raises(ValueError, match="age_steps"):
        OpticalMemory(tmp_path / "bad", schedule=("base", "tiny"), age_steps=(1, 2))


def test_memory_budget_downgrades_the_oldest_then_drops(tmp_path):
    mem = _memory(tmp_path, keep_text_turns=1, age_steps=(0, 10))
    _fill(mem, 5)  # turns 0..3 as TEST_BASE images (7 placeholders per page), turn 4 text
    free = mem.context()
    assert [type(i).__name__ for i in free.items] == ["ImageItem"] * 4 + ["TextItem"]
    base_cost = {t: mem._render(t, TEST_BASE).placeholder_tokens for t in range(4)}
    small_cost = {t: mem._render(t, TEST_SMALL).placeholder_tokens for t in range(4)}
    assert all(small_cost[t] < base_cost[t] for t in range(4))
    assert free.total_tokens == sum(base_cost.values()) + free.items[-1].tokens
    # just enough budget for turn 0 to step down: only the oldest changes
    mem.token_budget = free.total_tokens - 1
    plan = mem.plan()
    assert plan[0] == TEST_SMALL and all(plan[t] == TEST_BASE for t in (1, 2, 3))
    assert mem.context().total_tokens <= mem.token_budget
    # everything at the lowest mode is still too much: the oldest turns are dropped
    text_tokens = free.items[-1].tokens
    mem.token_budget = text_tokens + small_cost[3] + small_cost[2]
    ctx = mem.context()
    assert ctx.dropped == [0, 1] and ctx.total_tokens <= mem.token_budget
    assert [i.turn for i in ctx.items] == [2, 3, 4]
    # a budget below the text turns alone: reported, not met
    mem.token_budget = 1
    rep = mem.report()
    assert rep.over_budget and rep.dropped == 4 and rep.context_tokens == text_tokens


def test_memory_context_order_and_report(tmp_path):
    mem = _memory(tmp_path)
    _fill(mem, 5)
    ctx = mem.context()
    assert [i.turn for i in ctx.items] == list(range(5))
    assert [isinstance(i, TextItem) for i in ctx.items] == [False] * 3 + [True] * 2
    assert ctx.items[0].role == "user" and ctx.items[1].role == "assistant"
    n_pages = sum(len(i.pages) for i in ctx.items if not isinstance(i, TextItem))
    assert ctx.prompt().count("<image>") == n_pages == len(ctx.images())
    assert ctx.prompt().splitlines()[-1] == f"user: {mem.turns[4].text}"
    rep = mem.report()
    assert rep.plain_tokens == sum(count_text_tokens(t.text) for t in mem.turns)
    assert rep.tokens_saved == rep.plain_tokens - ctx.total_tokens == mem.tokens_saved()
    assert rep.image_turns == {"test-small": 1, "test-base": 2} and rep.text_turns == 2


def test_memory_prompt_inputs_feed_the_decoder(tmp_path, ocr):
    mem = _memory(tmp_path, tokenizer=ocr.tokenizer)
    _fill(mem, 3)
    ids, embeds = mem.context().prompt_inputs(ocr, "user: what came first?")
    assert ids.count(ocr.tokenizer.image_id) == embeds.shape[0]
    with torch.no_grad():
        logits = ocr.model(torch.tensor([ids]), image_embeds=embeds)
    assert logits.shape[:2] == (1, len(ids))


def test_memory_persistence_round_trip(tmp_path):
    mem = _memory(tmp_path, token_budget=500)
    _fill(mem, 6)
    ctx = mem.context()
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "mem" / "pages").rglob("*.png")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = OpticalMemory.load(tmp_path / "mem")
    assert back.turns == mem.turns and back.config() == mem.config()
    assert back.plan() == mem.plan()
    ctx2 = back.context()
    assert [(i.turn, type(i)) for i in ctx2.items] == [(i.turn, type(i)) for i in ctx.items]
    assert ctx2.total_tokens == ctx.total_tokens
    for a, b in zip(ctx.images(), ctx2.images()):
        assert a[0].tobytes() == b[0].tobytes() and a[1] == b[1]
    # the cache was reused, not re-rendered
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}
    back.add("user", "one more")
    assert OpticalMemory.load(tmp_path / "mem").turns[-1].id == 6
    with pytest.raises(FileExistsError):
        _memory(tmp_path)


def test_memory_recovers_a_partial_journal_line(tmp_path):
    mem = _memory(tmp_path)
    _fill(mem, 3)
    journal = tmp_path / "mem" / "turns.jsonl"
    with open(journal, "ab") as f:  # a crash in the middle of appending turn 3
        f.write(b'{"turn": 3, "role": "assistant", "te')
    with pytest.warns(MemoryRecoveryWarning, match="partial last line"):
        back = OpticalMemory.load(tmp_path / "mem")
    assert back.turns == mem.turns
    assert journal.read_bytes().endswith(b"\n")
    assert (tmp_path / "mem" / "turns.jsonl.discarded").read_bytes().startswith(b'{"turn": 3')
    assert back.add("user", "after recovery") == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(OpticalMemory.load(tmp_path / "mem")) == 4


def test_memory_recovers_a_truncated_journal(tmp_path):
    mem = _memory(tmp_path)
    _fill(mem, 3)
    journal = tmp_path / "mem" / "turns.jsonl"
    journal.write_bytes(journal.read_bytes()[:-5])  # the last committed line lost its tail
    with pytest.warns(MemoryRecoveryWarning) as got:
        back = OpticalMemory.load(tmp_path / "mem")
    msgs = " ".join(str(w.message) for w in got)
    assert "partial last line" in msgs and "recorded 3 turns but the journal holds 2" in msgs
    assert back.turns == mem.turns[:2]


def test_memory_recovers_a_missing_page_file(tmp_path):
    mem = _memory(tmp_path)
    _fill(mem, 4)
    before = [im.tobytes() for im, _ in mem.context().images()]
    page = sorted((tmp_path / "mem" / "pages").rglob("page_*.png"))[0]
    page.unlink()
    with pytest.warns(MemoryRecoveryWarning, match="is missing"):
        back = OpticalMemory.load(tmp_path / "mem")
    assert not page.parent.exists()  # the incomplete render was deleted...
    assert [im.tobytes() for im, _ in back.context().images()] == before  # ...and redone
    assert page.is_file()
    (page.parent / "index.json").unlink()  # a render interrupted before its index
    with pytest.warns(MemoryRecoveryWarning, match="no index.json"):
        OpticalMemory.load(tmp_path / "mem")


def test_recall_decodes_the_right_turn(tmp_path, ocr, reader):
    mem = _memory(tmp_path)
    _fill(mem, 5)
    ctx = mem.context()
    item = next(i for i in ctx.items if i.turn == 1)
    reader.table.update({im.tobytes(): f"page {k}" for k, im in enumerate(item.pages)})
    got = mem.recall(1, ocr)
    assert [im.tobytes() for im, _, _ in reader.calls] == [im.tobytes() for im in item.pages]
    assert all(mode == item.mode for _, mode, _ in reader.calls)
    assert got.startswith("page 0")
    reader.calls.clear()
    assert mem.recall(4, ocr) == mem.turns[4].text and not reader.calls  # still text
    mem.recall(4, ocr, mode=TEST_SMALL)  # a text turn can be read through images too
    assert reader.calls and reader.calls[0][1] == TEST_SMALL


def test_compress_imports_point_one_way():
    """dsocr.compress sits beside pipeline: no model, engine, api, cli, eval or train imports."""
    forbidden = (
        "dsocr.model",
        "dsocr.engine",
        "dsocr.api",
        "dsocr.cli",
        "dsocr.eval",
        "dsocr.train",
    )
    code = (
        "import sys, dsocr.compress; "
        f"bad = [m for m in sys.modules if m.startswith({forbidden!r})]; print(bad); "
        "sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
