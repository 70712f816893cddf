"""Long conversions keep no per-page or per-request state (a 1,000-page PDF, a long-lived server).

Regression for an RSS that grew by ~0.8 MB per page of a long PDF. The live heap was flat (Python
objects, tensors; jemalloc's RSS stayed flat): glibc kept the freed page buffers, which the
converter now hands back with ``release_free_memory`` every ``TRIM_EVERY_PAGES`` pages. These
tests pin what can be checked without measuring RSS: what stays alive, counted by object type,
does not depend on how many pages went through, and the engine forgets a request's images once
they are in the KV cache and the request itself when it finishes.
"""

from __future__ import annotations

import gc
import platform
import weakref
from collections import Counter

import pytest
import torch
from conftest import TEST_BASE, text_pdf
from PIL import Image

import dsocr
import dsocr.pipeline.convert as convert_mod
from dsocr.engine import generate as engine_mod
from dsocr.engine.generate import Engine, GenerationParams, Request
from dsocr.language.tokenizer import PROMPTS, build_prompt_ids
from dsocr.pipeline.convert import Converter, ConvertOptions
from dsocr.pipeline.providers import PageImage
from dsocr.vision.preprocess import ImageInputs, preprocess_image

pytest.importorskip("pypdfium2")

# What a page or a request leaves behind if something keeps it: its tensors, page images,
# preprocessed views, jobs and engine sequences.
WATCHED = (
    torch.Tensor,
    Image.Image,
    ImageInputs,
    PageImage,
    convert_mod.PageJob,
    Request,
    engine_mod._Sequence,
    engine_mod.Result,
)


@pytest.fixture(scope="module")
def ocr():
    return dsocr.load_model("tiny", device="cpu")


def live(collect: bool = True) -> Counter:
    """Live objects of the watched types, by type name (tensor subclasses count as tensors)."""
    if collect:
        gc.collect()
    counts: Counter = Counter()
    for obj in gc.get_objects():
        t = type(obj)  # not isinstance: that reads __class__, which some lazy modules warn on
        if issubclass(t, WATCHED):
            counts["Tensor" if issubclass(t, torch.Tensor) else t.__name__] += 1
    return counts


def options(**kw) -> ConvertOptions:
    base = dict(mode=TEST_BASE, dpi=36, task="free", max_new_tokens=3, batch_size=2, prefetch=2)
    return ConvertOptions(**(base | kw))


def long_pdf(path, n):
    return text_pdf(path, [[f"page {k + 1}", "some words on it"] for k in range(n)])


def test_what_stays_alive_does_not_grow_with_the_pages(ocr, tmp_path):
    """During a 24-page document the live pages, views and tensors stay bounded (their count at
    the last pages is no higher than at the first ones), and after it the converter holds
    exactly what it held after a 2-page one."""
    conv = Converter(ocr, options())
    seen: list[Counter] = []
    conv.convert([long_pdf(tmp_path / "warmup.pdf", 2)])  # engine cache and kernels exist now
    after_short = live()
    (doc,) = conv.convert(
        [long_pdf(tmp_path / "long.pdf", 24)], on_page=lambda doc, page: seen.append(live(False))
    )
    after_long = live()
    assert doc.status == "converted" and len(doc.pages) == 24, doc.error
    del doc
    assert after_long == after_short, "a conversion left objects behind"
    engine = conv.stages[2].engine
    assert not engine.waiting and not engine.active and not engine._live
    early, late = seen[:8], seen[-8:]
    for name in set().union(*seen):
        most_early = max(c[name] for c in early)
        most_late = max(c[name] for c in late)
        # a leak of one object per page would add 16 here; prefetch timing moves a few
        assert most_late <= most_early + 3, (name, most_early, most_late)


def test_a_decoding_request_no_longer_holds_its_images(ocr, monkeypatch):
    """Once a request's prompt is in the KV cache, its preprocessed views and vision embeddings
    are released, though it decodes on; when it ends the engine keeps nothing of it."""
    inputs = preprocess_image(Image.new("RGB", (120, 90), "white"), TEST_BASE)
    ids = build_prompt_ids(ocr.tokenizer, PROMPTS["free"], [inputs.num_tokens])
    encoded = []
    real = ocr.model.encode_images

    def spy(images):
        out = real(images)
        encoded.extend(weakref.ref(t) for t in out)
        return out

    monkeypatch.setattr(ocr.model, "encode_images", spy)
    engine = Engine(ocr.model, ocr.tokenizer, max_batch_size=2)
    params = GenerationParams(max_new_tokens=20, ignore_eos=True, detect_loops=False)
    views = [weakref.ref(inputs.global_view), weakref.ref(inputs.tiles)]
    request = weakref.ref(r := Request(ids, params, images=[inputs], request_id="page"))
    engine.add_request(r)
    del r, inputs
    engine.step()  # prefill + one decode step
    gc.collect()
    assert len(engine.active) == 1 and encoded
    assert all(v() is None for v in views), "the page's views outlive its prefill"
    assert all(e() is None for e in encoded), "the vision embeddings outlive the prefill"
    assert request() is None, "the engine keeps the Request"
    (seq,) = engine.active
    assert seq.images is None and seq.image_embeds is None and seq.prompt_ids is None
    del seq
    results = [ev.result for _ in range(30) for ev in engine.step() if ev.result is not None]
    assert [r.request_id for r in results] == ["page"] and results[0].num_prompt_tokens == len(ids)
    assert not engine.has_unfinished() and not engine._live
    gc.collect()
    assert live()["_Sequence"] == 0


def test_freed_memory_is_handed_back_every_so_many_pages(ocr, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(convert_mod, "TRIM_EVERY_PAGES", 4)
    monkeypatch.setattr(convert_mod, "release_free_memory", lambda: calls.append(1) or True)
    (doc,) = Converter(ocr, options()).convert([long_pdf(tmp_path / "ten.pdf", 10)])
    assert doc.status == "converted", doc.error
    assert len(calls) == 3  # after pages 4 and 8, and once at the end for the last 2


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_release_free_memory_calls_glibc():
    assert convert_mod.release_free_memory() is True


def test_release_free_memory_is_a_no_op_without_glibc(monkeypatch):
    monkeypatch.setattr(convert_mod.sys, "platform", "darwin")
    convert_mod._malloc_trim.cache_clear()
    try:
        assert convert_mod.release_free_memory() is False
    finally:
        convert_mod._malloc_trim.cache_clear()
