"""Real PDF page samples: the training-page index (scripts/build_pdf_pages.py), its disjointness
from the pdf-debref eval pages, and DataRecipe.pdf_share samples (dsocr/train/pdf_pages.py)."""

import hashlib
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from conftest import text_pdf

from dsocr.configs import CONFIGS
from dsocr.language.tokenizer import PROMPTS, Tokenizer, byte_tokenizer
from dsocr.train.data import DataRecipe, StepBatches, batch_stream, make_batch
from dsocr.train.pdf_pages import PdfIndexError, load_pdf_index

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import build_pdf_pages  # noqa: E402

TOK = Tokenizer(byte_tokenizer())
CFG = CONFIGS["tiny"]


def _lines(kind: str, n: int, start: int = 0) -> list[str]:
    return [f"{kind} sentence number {i} of the generated test document" for i in range(start, n)]


# page (1-based) -> its lines; each line is > 25 characters, so each is measured
PAGES = {
    1: _lines("Training", 6),  # all in train: indexed
    2: _lines("Heldout", 6),  # all held out: an eval page, never indexed
    3: _lines("Training", 11, 6) + _lines("Heldout", 7, 6),  # one held-out line: rejected
    4: _lines("Training", 14, 11) + _lines("Heldout", 10, 7),  # 3 + 3: rejected, not eval
    5: _lines("Training", 17, 14),  # 3 train lines, under 200 characters: rejected
    6: _lines("Nowhere", 6),  # in no split: rejected (too few train lines)
    7: _lines("Training", 22, 16),  # indexed
}


@pytest.fixture()
def corpus_pdf(tmp_path):
    """A corpus folder (train/heldout .jsonl) and a PDF of PAGES, before any index is built."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split, kind in (("train", "Training"), ("heldout", "Heldout")):
        text = " ".join(_lines(kind, 30))
        row = {"doc": f"{split}-doc", "lang": "en", "text": text}
        (corpus / f"{split}.jsonl").write_text(json.dumps(row) + "\n")
    pdf = text_pdf(tmp_path / "doc.en.pdf", [PAGES[k] for k in sorted(PAGES)], 12, 16)
    return corpus, pdf


@pytest.fixture()
def index(corpus_pdf, tmp_path):
    corpus, pdf = corpus_pdf
    build_pdf_pages.main(["--corpus", str(corpus), "--pdf", f"{pdf}=en"])
    return corpus / "pdf_pages.jsonl"


def _rows(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def test_index_takes_train_only_pages(index, corpus_pdf):
    rows = _rows(index)
    assert [r["page"] + 1 for r in rows] == [1, 7]
    assert all(r["heldout_lines"] == 0 and r["train_lines"] >= 3 for r in rows)
    assert rows[0]["lang"] == "en" and rows[0]["pdf"] == "../pdfs/doc.en.pdf"
    copy = index.parent.parent / "pdfs" / "doc.en.pdf"
    assert rows[0]["sha256"] == hashlib.sha256(copy.read_bytes()).hexdigest()
    # one held-out line is enough to reject a page otherwise full of training text
    assert not any(r["page"] + 1 == 3 for r in rows)


def test_index_and_eval_page_choice_are_disjoint(index, corpus_pdf):
    from dsocr.eval.datasets import pdf_line_overlap, select_heldout_pages

    corpus, pdf = corpus_pdf
    indexed = {r["page"] + 1 for r in _rows(index)}
    eval_pages = {ov.page for ov in select_heldout_pages(pdf, corpus, n=10)}
    assert eval_pages == {2}
    assert not indexed & eval_pages
    overlap = {ov.page: ov for ov in pdf_line_overlap(pdf, corpus)}
    assert all(overlap[p].heldout == 0 for p in indexed)  # the eval sets' own measure


def _pdf_recipe(corpus, **kw):
    return DataRecipe(corpus=str(corpus), modes=("base",), pdf_share=1.0, **kw)


def test_pdf_sample_is_the_page_at_144_dpi_with_its_text_layer(index, corpus_pdf, tmp_path):
    from dsocr.eval.datasets import build_pdf_set
    from dsocr.train.pdf_pages import make_pdf_sample

    corpus, pdf = corpus_pdf
    rows = load_pdf_index(str(index))
    sample = make_pdf_sample(_pdf_recipe(corpus), random.Random(0), rows[:1])
    assert sample.image.size == (1224, 1584)  # Letter, 612 x 792 pt, at 144 / 72
    assert sample.prompt == PROMPTS["free"] and sample.mode == "base"
    # the target is the text layer normalised as the eval sets store ground truth
    with pytest.warns(UserWarning, match="training corpus"):
        build_pdf_set(tmp_path / "ev", pdf, pages=[1], dpi=20, corpus=corpus, allow_overlap=True)
    manifest = json.loads((tmp_path / "ev" / "manifest.jsonl").read_text().splitlines()[0])
    assert sample.target == manifest["text"] == rows[0]["text"]
    assert sample.target.startswith(PAGES[1][0]) and PAGES[1][-1] in sample.target
    # a batch of such samples: its targets are trained (prompt masked, EOS at the end)
    b = make_batch(_pdf_recipe(corpus), TOK, CFG, step=0, rank=0, batch_size=2, seed=0)
    assert set(b.targets) <= {r["text"] for r in rows}
    assert tuple(b.images[0].global_view.shape) == (3, 1024, 1024)


def test_pdf_glyphs_land_in_their_cells(index, corpus_pdf):
    corpus, _ = corpus_pdf
    recipe = _pdf_recipe(corpus, glyph_targets=True)
    b = make_batch(recipe, TOK, CFG, step=0, rank=0, batch_size=1, seed=0)
    t = 1024 // CFG.sam.pixels_per_token
    occupied = b.cell_targets[0].sum(-1).gt(0).view(t, t)
    assert occupied.any()
    # ink (darker than the grey padding) per cell of the padded global view
    view = b.images[0].global_view[0]  # (H, W) in [-1, 1]
    ink = (view < -0.5).float().unfold(0, 64, 64).unfold(1, 64, 64).amax((-1, -2)).bool()
    assert bool((occupied <= ink).all())  # every cell named by a glyph has ink in it


def test_pdf_samples_are_deterministic(index, corpus_pdf):
    corpus, _ = corpus_pdf
    recipe = DataRecipe(corpus=str(corpus), modes=("tiny",), pdf_share=0.5)

    def batch(step):
        return make_batch(recipe, TOK, CFG, step=step, rank=0, batch_size=6, seed=3)

    a, b = batch(2), batch(2)
    assert torch.equal(a.input_ids, b.input_ids)
    assert all(torch.equal(x.global_view, y.global_view) for x, y in zip(a.images, b.images))
    pdf_texts = {r["text"] for r in _rows(index)}
    kinds = [t in pdf_texts for t in a.targets]
    assert any(kinds) and not all(kinds)  # both kinds at pdf_share 0.5
    assert [s.targets for s in (batch(3),)] != [a.targets]
    # identical streams in-process and from a worker process (documents opened per process)
    streams = []
    for workers in (0, 1):
        ds = StepBatches(recipe, TOK, CFG, start_step=0, rank=0, batch_size=3, seed=3)
        it = batch_stream(ds, workers=workers)
        streams.append([next(it) for _ in range(2)])
    for x, y in zip(*streams):
        assert torch.equal(x.input_ids, y.input_ids) and x.targets == y.targets


# HEAD's make_batch before PDF pages existed (hashes of global views, ids, labels, cell targets):
# pdf_share 0 must give exactly these. A deliberate renderer change would move them too.
HEAD_BATCHES = {
    "plain": "6e1e76207c985cd7b0c323439682caa1f1f00a139c1f73203e4188c3ff8bc1ee",
    "glyphs": "309caf44014c11541cd6bba49cc93d4a52cd85502a62b7a69a544a8bffda2a3a",
}


def _batch_hash(recipe) -> str:
    b = make_batch(recipe, TOK, CFG, step=3, rank=0, batch_size=3, seed=5)
    h = hashlib.sha256()
    for im in b.images:
        h.update(im.global_view.numpy().tobytes())
    h.update(b.input_ids.numpy().tobytes())
    h.update(b.labels.numpy().tobytes())
    if b.cell_targets is not None:
        h.update(b.cell_targets.numpy().tobytes())
    return h.hexdigest()


def test_pdf_share_zero_leaves_samples_unchanged(index, corpus_pdf):
    plain = DataRecipe(modes=("tiny",), max_chars=200)
    glyphs = DataRecipe(modes=("tiny", "base"), max_chars=200, glyph_targets=True, scan_prob=0.5)
    assert _batch_hash(plain) == HEAD_BATCHES["plain"]
    assert _batch_hash(glyphs) == HEAD_BATCHES["glyphs"]
    # pdf_share 0 never reads the index (even a missing one)
    assert (
        _batch_hash(DataRecipe(modes=("tiny",), max_chars=200, pdf_index="/nowhere"))
        == (HEAD_BATCHES["plain"])
    )
    # the held-out split (the loop's evaluation) never draws PDF pages
    corpus, _ = corpus_pdf
    kw = dict(corpus=str(corpus), modes=("tiny",), max_chars=200)
    a, b = (
        make_batch(
            DataRecipe(**kw, pdf_share=s),
            TOK,
            CFG,
            step=0,
            rank=0,
            batch_size=4,
            seed=1,
            split="heldout",
        )
        for s in (0.0, 1.0)
    )
    assert torch.equal(a.input_ids, b.input_ids)


def test_changed_or_missing_pdf_fails_at_loader_start(index, corpus_pdf, capsys):
    from dsocr.train import loop

    corpus, _ = corpus_pdf
    copy = index.parent.parent / "pdfs" / "doc.en.pdf"
    copy.write_bytes(copy.read_bytes() + b"\n% changed\n")
    recipe = _pdf_recipe(corpus)
    with pytest.raises(PdfIndexError, match=r"doc\.en\.pdf: sha256 .*\(the PDF changed") as e:
        StepBatches(recipe, TOK, CFG, start_step=0, rank=0, batch_size=2, seed=0)
    assert "\n" not in str(e.value)
    argv = [
        "--model",
        "tiny",
        "--data-corpus",
        str(corpus),
        "--data-pdf-share",
        "0.5",
        "--out",
        str(corpus.parent / "run"),
        "--steps",
        "1",
        "--device",
        "cpu",
    ]
    assert loop.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "doc.en.pdf: sha256" in err[0], err
    assert not (corpus.parent / "run").exists()
    copy.unlink()
    load_pdf_index.cache_clear()
    with pytest.raises(PdfIndexError, match=r"doc\.en\.pdf: PDF named by .* is missing"):
        StepBatches(recipe, TOK, CFG, start_step=0, rank=0, batch_size=2, seed=0)
