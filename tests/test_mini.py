"""The bundled default model, dsocr-mini: repository limits, strict loading, and real reading.

These run the shipped weights (dsocr/assets/dsocr-mini, about 20 MB) on CPU. The text checks use
pages the model never saw (Austen, not in the Debian-docs training corpus), and bounds well inside
what docs/benchmarks/mini.md measured, so they fail when reading breaks, not on noise.
"""

import json
from pathlib import Path

import pytest

import dsocr
from dsocr.api import ASSETS, DEFAULT_MODEL, model_defaults
from dsocr.eval.metrics import cer
from dsocr.pipeline.postprocess import PAGE_SPLIT
from dsocr.render import PageStyle, render_text
from dsocr.weights import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ASSETS / DEFAULT_MODEL
# Whitespace-normalised CER bounds (the measured values are in docs/benchmarks/mini.md).
SAMPLE_CER = 0.25
PDF_CER = 0.35

pytestmark = pytest.mark.skipif(
    not (BUNDLE / "config.json").is_file(), reason="dsocr-mini weights are not bundled"
)

PASSAGES = [
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy "
    "disposition, seemed to unite some of the best blessings of existence.",
    "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, for his own "
    "amusement, never took up any book but the Baronetage.",
]


@pytest.fixture(scope="module")
def mini():
    return dsocr.load_model(device="cpu")


def test_bundle_fits_the_repository_limits_and_loads_strictly():
    sizes = {p.name: p.stat().st_size for p in BUNDLE.iterdir() if p.is_file()}
    assert all(s <= 15_000_000 for s in sizes.values()), sizes
    assert sum(sizes.values()) <= 60_000_000
    assert {"config.json", "tokenizer.json", "meta.json"} <= set(sizes)
    assert any(n.endswith(".safetensors") for n in sizes)
    model = load_checkpoint(BUNDLE, device="cpu")  # strict: every key, every shape
    meta = json.loads((BUNDLE / "meta.json").read_text())
    assert model.config.name == meta["config"]["name"]
    assert meta["tokenizer_sha256"] and meta["step"] > 0
    assert model_defaults() == meta["defaults"]


def test_default_model_reads_the_bundled_sample(mini):
    truth = (ROOT / "samples" / "austen-512.txt").read_text()
    text = mini.generate(ROOT / "samples" / "austen-512.png", mode=model_defaults()["mode"])
    assert cer(text, truth, normalize_whitespace=True) < SAMPLE_CER, text


def test_convert_a_generated_pdf_end_to_end(mini, tmp_path):
    """A two-page PDF (page = 256 pt, so 512 px at the official 144 dpi) -> Markdown and JSON."""
    style = PageStyle(font="serif", font_size=22, margin=32, width=512, height=512)
    pages = [render_text(p, style)[0].image.convert("RGB") for p in PASSAGES]
    pdf = tmp_path / "austen.pdf"
    pages[0].save(pdf, "PDF", save_all=True, append_images=pages[1:], resolution=144)
    (doc,) = dsocr.convert([pdf], mini, tmp_path / "out")
    assert doc.status == "converted", doc.error
    assert [(p.width, p.height) for p in doc.pages] == [(512, 512)] * 2
    for page, truth in zip(doc.pages, PASSAGES):
        assert cer(page.markdown, truth, normalize_whitespace=True) < PDF_CER, page.markdown
    md = (tmp_path / "out" / "austen" / "austen.md").read_text()
    assert md.count(PAGE_SPLIT.strip()) == 1
    saved = json.loads((tmp_path / "out" / "austen" / "austen.json").read_text())
    assert [p["markdown"] for p in saved["pages"]] == [p.markdown for p in doc.pages]
    assert saved["mode"] == model_defaults()["mode"]
