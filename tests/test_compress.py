"""dsocr.compress: token accounting, the page codec, vision-embedding files and optical memory.

Where decoded text matters, ``OCR.generate`` is patched with a lookup from page pixels to the
text rendered on them (a perfect reader), so tests are fast and exact; the tiny random model is
only used for shapes and the embedding path.
"""

import dataclasses
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
    default_style,
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
from dsocr.configs import get_mode
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


def test_compress_deletes_and_replaces_only_pages_it_wrote(tmp_path):
    out = tmp_path / "userdir"
    out.mkdir()
    mine = {"page_scan.png": b"user scan", "page_0007.png": b"user page 7", "notes.md": b"x"}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    compress(FOX, TEST_BASE, out_dir=out)
    assert {n: (out / n).read_bytes() for n in mine} == mine  # nothing of the user's deleted
    long = compress(_long_text(40), TEST_BASE, out_dir=out)
    assert len(long.entries) > 2
    (out / long.entries[1].file).write_bytes(b"edited by the user")  # not ours any more
    compress(FOX, TEST_BASE, out_dir=out)  # shorter: stale pages of the previous manifest go
    pages = sorted(p.name for p in out.glob("page_0*.png"))
    assert pages == ["page_0001.png", long.entries[1].file, "page_0007.png"]
    assert (out / long.entries[1].file).read_bytes() == b"edited by the user"
    # a page file in the way that no earlier compress wrote: refused before anything is written
    other = tmp_path / "other"
    other.mkdir()
    (other / "page_0001.png").write_bytes(b"someone else's")
    with pytest.raises(ValueError, match=r"other/page_0001.png: exists and was not written"):
        compress(FOX, TEST_BASE, out_dir=other)
    assert sorted(p.name for p in other.iterdir()) == ["page_0001.png"]


def test_compress_output_folder_errors_name_the_path(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match=r"afile: exists and is not a folder"):
        compress(FOX, TEST_BASE, out_dir=afile)
    with pytest.raises(ValueError, match=r"afile/sub: cannot create the output folder"):
        compress(FOX, TEST_BASE, out_dir=afile / "sub")


@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda t: t[:300], r"manifest.json: not a readable dsocr-compress/1 manifest"),
        (lambda t: "", r"manifest.json: not a readable"),
        (lambda t: '{"format": "dsocr-compress/1"}', r"manifest.json: damaged .*no 'pages' field"),
        (lambda t: "[1, 2]", r"manifest.json: not a dsocr-compress/1 manifest \(a JSON list\)"),
    ],
)
def test_damaged_manifest_is_a_clear_error(tmp_path, damage, match):
    compress(_long_text(), TEST_BASE, out_dir=tmp_path)
    path = tmp_path / "manifest.json"
    path.write_text(damage(path.read_text()))
    with pytest.raises(ValueError, match=match):
        load_manifest(tmp_path)
    with pytest.raises(ValueError, match=match + ".*refusing to overwrite"):
        compress(FOX, TEST_BASE, out_dir=tmp_path)  # not ours to overwrite or clean up after
    assert len(list(tmp_path.glob("page_*.png"))) > 1


def test_blank_stretches_make_no_pages_and_join_back_to_the_stripped_source(ocr, reader):
    for text in (
        "alpha\n" + "\n" * 200 + "omega\n",
        "\n" * 120 + "alpha beta\n" + " \n" * 90 + "\f\f\fomega\n" + "\n" * 150,
        "  \n\n\t\n",
    ):
        m = compress(text, "tiny")
        assert "".join(p.text for p in m.pages) == text
        assert sum(1 for p in m.pages if not p.text.strip()) == (0 if text.strip() else 1)
        assert len(m.pages) == max(1, text.count("a") and 2)  # alpha..., omega (2 pages)
        reader.learn(m.pages)
        got = decompress(m, ocr, source=text)
        assert got.text == text.strip() and got.precision == 1.0
    # the joiners alone, with blank pages between, before and after
    texts = ["\n\n", "one\n", " \n", "\n\n", "two  ", "\n", ""]
    joiners = codec._joiners(texts)
    assert joiners == ["", "\n \n\n\n", "", "", "", "", ""]
    assert codec.join_pages([t.strip() for t in texts], joiners) == "".join(texts).strip()


def test_default_style_overrides_change_one_field_at_the_mode_size():
    base = default_style("tiny")
    assert default_style("tiny", font="serif") == dataclasses.replace(base, font="serif")
    large = default_style("large", margin=450)  # validated against the 1280 px page, not A4
    assert large.margin == 450 and large.size == (1280, 1280)
    assert large.font_size == default_style("large").font_size
    with pytest.raises(ValueError, match="too narrow"):
        default_style("tiny", margin=300)


def test_fit_one_page_warns_when_it_paginates():
    with pytest.warns(UserWarning, match="fit_one_page: .* paginated instead"):
        m = compress("word " * 3000, "tiny", fit_one_page=True)
    assert len(m.pages) > 1


def test_vision_embeddings_keep_a_count_key_of_the_callers(tmp_path):
    from safetensors.torch import save

    embeds = [torch.randn(3, 4), torch.randn(5, 4)]
    save_vision_embeddings(tmp_path / "e.safetensors", embeds, {"count": 99, "mode": "tiny"})
    back, meta = load_vision_embeddings(tmp_path / "e.safetensors")
    assert meta == {"count": 99, "mode": "tiny"} and len(back) == 2
    # files written before the count had its own header key still load
    old = {"image.0000": embeds[0], "image.0001": embeds[1]}
    header = {"dsocr_meta": json.dumps({"mode": "tiny", "count": 2})}
    (tmp_path / "old.safetensors").write_bytes(save(old, metadata=header))
    back, meta = load_vision_embeddings(tmp_path / "old.safetensors")
    assert meta == {"mode": "tiny"} and [e.shape[0] for e in back] == [3, 5]


def test_decompress_rejects_max_new_tokens_below_one(tmp_path, ocr, reader):
    m = compress(FOX, TEST_BASE)
    for bad in (0, -3):
        with pytest.raises(ValueError, match=f"max_new_tokens must be >= 1, got {bad}"):
            decompress(m, ocr, max_new_tokens=bad)
    reader.learn(m.pages)
    decompress(m, ocr, max_new_tokens=1)
    assert [n for _, _, n in reader.calls] == [1]


def test_manifest_records_the_model_tokenizer(tmp_path):
    tok = Tokenizer(byte_tokenizer(), source="tiny-bytes")
    m = compress(FOX, TEST_BASE, out_dir=tmp_path, tokenizer=tok)
    back = load_manifest(tmp_path)
    assert back.stats.model_text_tokens == len(FOX) == m.stats.model_text_tokens
    assert back.model_tokenizer == {"source": "tiny-bytes", "sha256": tok.sha256}


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


def _journal_and_config(tmp_path):
    mem = _memory(tmp_path, token_budget=900)
    _fill(mem, 5)
    mem.context()  # renders the image turns
    return mem, tmp_path / "mem"


@pytest.mark.parametrize(
    "damage",
    ["empty", "truncated", "deleted", "not-json-object", "bad-config", "no-turns"],
)
def test_memory_rebuilds_a_damaged_memory_json_from_the_journal(tmp_path, damage):
    mem, folder = _journal_and_config(tmp_path)
    path = folder / "memory.json"
    text = path.read_text()
    d = json.loads(text)
    if damage == "empty":
        path.write_text("")
    elif damage == "truncated":
        path.write_text(text[: len(text) // 2])
    elif damage == "deleted":
        path.unlink()
        with pytest.raises(FileExistsError, match="use OpticalMemory.load"):
            _memory(tmp_path)  # the constructor points to load(), which now recovers
    elif damage == "not-json-object":
        path.write_text("[]")
    elif damage == "bad-config":
        del d["config"]["schedule"]
        path.write_text(json.dumps(d))
    else:
        del d["turns"]
        path.write_text(json.dumps(d))
    with pytest.warns(MemoryRecoveryWarning, match=r"memory\.json: .*rebuilding it from turns"):
        back = OpticalMemory.load(folder)
    assert back.turns == mem.turns and back.config() == mem.config()  # config from config.json
    assert back.plan() == mem.plan()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = OpticalMemory.load(folder)  # repaired for good
    assert again.add("user", "after recovery") == 5


def test_memory_without_any_config_uses_the_defaults_and_says_so(tmp_path):
    mem, folder = _journal_and_config(tmp_path)
    (folder / "memory.json").unlink()
    (folder / "config.json").write_text("{trunc")
    with pytest.warns(MemoryRecoveryWarning) as got:
        back = OpticalMemory.load(folder)
    msgs = " ".join(str(w.message) for w in got)
    assert (
        "memory.json: is missing" in msgs
        and "the default config (config.json is unreadable" in msgs
    )
    assert back.turns == mem.turns and back.keep_text_turns == 4
    # no journal either: a clear error, not a JSONDecodeError
    (folder / "memory.json").write_text("{")
    (folder / "turns.jsonl").unlink()
    with pytest.raises(ValueError, match=r"memory\.json: is unreadable .* no turns.jsonl"):
        OpticalMemory.load(folder)


@pytest.mark.parametrize("key", ["joiners", "files", "mode", "vision_tokens"])
def test_memory_rerenders_a_cache_entry_whose_index_lost_a_key(tmp_path, key):
    mem, folder = _journal_and_config(tmp_path)
    before = [im.tobytes() for im, _ in mem.context().images()]
    index = sorted((folder / "pages").rglob("index.json"))[0]
    d = json.loads(index.read_text())
    del d[key]
    index.write_text(json.dumps(d))
    with pytest.warns(MemoryRecoveryWarning, match=rf"unreadable index.json \(no '{key}' field\)"):
        back = OpticalMemory.load(folder)
    assert not index.exists()
    assert [im.tobytes() for im, _ in back.context().images()] == before
    assert json.loads(index.read_text())["joiners"] is not None


def test_memory_keeps_renders_cached_before_style_direction_existed(tmp_path):
    """An index.json written before ``PageStyle.direction`` (no such key) still matches for text
    without right-to-left letters (laid out exactly as now); an Arabic turn's render, laid out
    unmirrored then, is redone."""
    import warnings

    mem = _memory(tmp_path)
    _fill(mem, 3)
    mem.add("user", "مرحبا بالعالم، هذه فقرة قصيرة باللغة العربية. " * 3)
    mem.add("assistant", "ok")
    mem.add("user", "ok")
    before = [im.tobytes() for im, _ in mem.context().images()]
    indexes = sorted((tmp_path / "mem" / "pages").rglob("index.json"))
    assert len(indexes) == 4
    for index in indexes:
        d = json.loads(index.read_text())
        del d["style"]["direction"]
        index.write_text(json.dumps(d))
    arabic = [i for i in indexes if i.parts[-3] == "t000003"]
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        back = OpticalMemory.load(tmp_path / "mem")
    assert [str(w.message) for w in got] == [
        f"{arabic[0].parent}: rendered with another style; deleted the cached render "
        "(re-rendered when needed)"
    ]
    assert all(i.is_file() for i in indexes if i not in arabic)  # kept, not re-rendered
    assert [im.tobytes() for im, _ in back.context().images()] == before
    assert "direction" in json.loads(arabic[0].read_text())["style"]  # redone with today's style


def test_prompt_inputs_escape_image_markers_in_the_question(tmp_path, ocr):
    mem = _memory(tmp_path, tokenizer=ocr.tokenizer)
    _fill(mem, 3)
    ids, embeds = mem.context().prompt_inputs(ocr, "user: what is <image>?")
    assert ids.count(ocr.tokenizer.image_id) == embeds.shape[0]


def test_memory_text_when_cheaper_keeps_short_old_turns_as_text(tmp_path):
    kw = dict(keep_text_turns=1, schedule=("tiny",), age_steps=(0,))
    plain = OpticalMemory(tmp_path / "a", **kw)
    cheap = OpticalMemory(tmp_path / "b", text_when_cheaper=True, **kw)
    long = "word " * 200  # ~200 V3 tokens, one Tiny page: 73 placeholders
    for mem in (plain, cheap):
        for text in ("", "hi", long, "ok", "last"):
            mem.add("user", text)
    assert [plain.plan()[t] for t in range(5)] == [get_mode("tiny")] * 4 + ["text"]
    assert [cheap.plan()[t] for t in range(5)] == ["text", "text", get_mode("tiny"), "text", "text"]
    assert cheap.report().context_tokens < plain.report().context_tokens
    assert cheap.report().context_tokens == 73 + sum(cheap._tokens) - cheap._tokens[2]
    # persisted; budgets still drop old turns kept as text
    assert OpticalMemory.load(tmp_path / "b").text_when_cheaper
    cheap.token_budget = cheap._tokens[4]
    assert [cheap.plan()[t] for t in range(5)] == ["dropped"] * 4 + ["text"]


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


def test_densest_layout_says_why_no_layout_could_render():
    from dsocr.compress.codec import densest_layout

    with pytest.raises(ValueError, match=r"mode tiny: unknown script: .*U\+1200 ETHIOPIC"):
        densest_layout("hello \u1200 world", "tiny", None)
