"""Scale-out: the Ray path gives the single-process output; the vLLM backend fails clearly."""

import builtins
import json
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from conftest import TEST_BASE
from PIL import Image, ImageDraw

import dsocr
from dsocr.engine.sampling import ngram_whitelist_for
from dsocr.language.tokenizer import Tokenizer, byte_tokenizer
from dsocr.vision.preprocess import count_image_tokens
from dsocr.vllm_backend import VLLM_MODE
from dsocr.weights import save_checkpoint


def _docs(folder: Path) -> list[Path]:
    """Two PDFs (2 and 3 pages) and a PNG, every page different."""
    folder.mkdir()
    out = []
    for name, n in (("alpha.pdf", 2), ("beta.pdf", 3)):
        pages = []
        for k in range(n):
            img = Image.new("RGB", (160, 200), "white")
            ImageDraw.Draw(img).rectangle((10 + 9 * k, 10, 60 + 20 * k, 40 + 7 * k), fill="black")
            pages.append(img)
        pages[0].save(folder / name, "PDF", save_all=True, append_images=pages[1:], resolution=72)
        out.append(folder / name)
    img = Image.new("RGB", (150, 110), (230, 230, 230))
    ImageDraw.Draw(img).ellipse((20, 20, 90, 70), fill="black")
    img.save(folder / "gamma.png")
    return out + [folder / "gamma.png"]


def _page_texts(out: Path, stem: str) -> list[str]:
    d = json.loads((out / stem / f"{stem}.json").read_text())
    return [(p["raw"], p["markdown"], p["finish_reason"]) for p in d["pages"]]


def test_ray_output_equals_single_process_and_resumes(tiny_model, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'dsocr[ray]'")
    from dsocr.distributed import RayUnavailable, convert_ray

    folder = save_checkpoint(tiny_model, tmp_path / "ckpt", tokenizer=Tokenizer(byte_tokenizer()))
    inputs = _docs(tmp_path / "in")
    kw = dict(mode=TEST_BASE, task="free", max_new_tokens=12, batch_size=2)
    single = dsocr.convert(inputs, str(folder), tmp_path / "single", **kw)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        docs = convert_ray(inputs, tmp_path / "ray", model=str(folder), replicas=2, **kw)
        assert [d.status for d in docs] == ["converted"] * 3
        for a, b in zip(single, docs):
            assert a.stem == b.stem
            assert [p.raw for p in a.pages] == [p.raw for p in b.pages]
            assert _page_texts(tmp_path / "single", a.stem) == _page_texts(tmp_path / "ray", b.stem)
            md = f"{a.stem}/{a.stem}.md"
            assert (tmp_path / "single" / md).read_text() == (tmp_path / "ray" / md).read_text()
        again = convert_ray(inputs, tmp_path / "ray", model=str(folder), replicas=2, **kw)
        assert [d.status for d in again] == ["skipped"] * 3
        assert [p.raw for d in again for p in d.pages] == [p.raw for d in docs for p in d.pages]
        missing = convert_ray(
            [tmp_path / "in" / "nope.pdf"], tmp_path / "ray", model=str(folder), **kw
        )
        assert missing[0].status == "failed" and "nope.pdf" in missing[0].error
        # a replica the cluster cannot hold is refused, not waited for forever
        with pytest.raises(RayUnavailable, match=r"asks for 1 GPU\(s\), but the Ray cluster has 0"):
            convert_ray(inputs, tmp_path / "gpu", model=str(folder), num_gpus=1, **kw)
        with pytest.raises(ValueError, match="replicas must be an integer >= 1, got 0"):
            convert_ray(inputs, tmp_path / "none", model=str(folder), replicas=0, **kw)
    finally:
        ray.shutdown()


def test_ray_missing_is_a_clear_error(monkeypatch, tmp_path):
    from dsocr import distributed

    real_import = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(name=name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(distributed.RayUnavailable, match=r"pip install 'dsocr\[ray\]'"):
        distributed.convert_ray([tmp_path], tmp_path / "out", model="tiny")


def test_vllm_backend_without_vllm_or_gpu_is_a_one_line_error(tmp_path, capsys):
    from dsocr.cli import main
    from dsocr.vllm_backend import BackendUnavailable, check_vllm

    page = tmp_path / "p.png"
    Image.new("RGB", (64, 64), "white").save(page)
    try:
        check_vllm()
    except BackendUnavailable as e:
        reason = str(e)
    else:  # pragma: no cover - a machine with vLLM and a GPU
        pytest.skip("vLLM and a GPU are present: the error path cannot happen here")
    assert "\n" not in reason
    assert "pip install 'dsocr[vllm]'" in reason or "CUDA GPU" in reason
    code = main(["convert", str(page), "-o", str(tmp_path / "out"), "--backend", "vllm"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"dsocr: error: {reason}"]
    with pytest.raises(BackendUnavailable):
        dsocr.convert([page], "tiny", tmp_path / "out2", backend="vllm")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        dsocr.convert([page], "tiny", tmp_path / "out3", backend="nope")


class _FakeVllm:
    """Stand-ins for the parts of vLLM's API that ``dsocr.vllm_backend`` calls (LLM, its engine,
    SamplingParams, the n-gram processor); ``sent`` records each request as dsocr made it."""

    def __init__(self):
        self.llm_kwargs, self.pending, self.sent, self.aborted = None, {}, [], []
        fake = self

        class SamplingParams(SimpleNamespace):
            pass

        class NGramPerReqLogitsProcessor:
            pass

        class Engine:
            def add_request(self, key, inputs, params):
                fake.pending[key] = inputs
                fake.sent.append((inputs, vars(params)))

            def step(self):  # finishes every pending request; its text names the page width
                outs = [
                    SimpleNamespace(
                        request_id=key,
                        finished=True,
                        outputs=[
                            SimpleNamespace(
                                token_ids=[7, 8],
                                text=f"page {inputs['multi_modal_data']['image'].size[0]}",
                                finish_reason="stop",
                            )
                        ],
                    )
                    for key, inputs in fake.pending.items()
                ]
                fake.pending.clear()
                return outs

            def abort_request(self, ids):
                fake.aborted += ids

        class LLM:
            def __init__(self, **kw):
                fake.llm_kwargs = kw
                self.llm_engine = Engine()

        self.LLM, self.SamplingParams, self.processor = (
            LLM,
            SamplingParams,
            NGramPerReqLogitsProcessor,
        )

    def install(self, monkeypatch):
        vllm = ModuleType("vllm")
        vllm.__version__, vllm.LLM, vllm.SamplingParams = "0.11.1", self.LLM, self.SamplingParams
        ocr_mod = ModuleType("vllm.model_executor.models.deepseek_ocr")
        ocr_mod.NGramPerReqLogitsProcessor = self.processor
        for name in ("vllm.model_executor", "vllm.model_executor.models"):
            monkeypatch.setitem(sys.modules, name, ModuleType(name))
        monkeypatch.setitem(sys.modules, "vllm", vllm)
        monkeypatch.setitem(sys.modules, ocr_mod.__name__, ocr_mod)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_vllm_backend_drives_vllm_with_the_official_settings(tiny_model, tmp_path, monkeypatch):
    """The adapter, against a stand-in vLLM (no vLLM or GPU here): settings, requests, output."""
    fake = _FakeVllm()
    fake.install(monkeypatch)
    folder = save_checkpoint(tiny_model, tmp_path / "ckpt", tokenizer=Tokenizer(byte_tokenizer()))
    pages = []
    for w in (96, 80):
        pages.append(tmp_path / f"p{w}.png")
        Image.new("RGB", (w, 64), "white").save(pages[-1])
    big = tmp_path / "big.png"  # 3x3 tiles in our gundam (max 9), 2x2 in vLLM's (max 6)
    Image.new("RGB", (1920, 1920), "white").save(big)
    (doc,) = dsocr.convert([big], str(folder), backend="vllm", mode="gundam", max_new_tokens=4)
    assert doc.pages[0].tokens.vision == count_image_tokens(1920, 1920, VLLM_MODE) == 693
    fake.sent.clear()
    with pytest.raises(ValueError, match="always tiles in Gundam mode"):
        dsocr.convert(pages, str(folder), tmp_path / "base", backend="vllm", mode="base")
    docs = dsocr.convert(
        pages, str(folder), tmp_path / "out", backend="vllm", mode="gundam", task="free",
        batch_size=3, max_new_tokens=40,
    )  # fmt: skip
    assert [d.status for d in docs] == ["converted"] * 2
    assert [d.pages[0].raw for d in docs] == ["page 96", "page 80"]
    assert (tmp_path / "out" / "p96" / "p96.md").read_text().strip() == "page 96"
    kw = fake.llm_kwargs
    assert kw["model"] == str(folder) and kw["max_num_seqs"] == 3
    assert kw["enable_prefix_caching"] is False and kw["mm_processor_cache_gb"] == 0
    assert kw["logits_processors"] == [fake.processor]
    assert [inputs["multi_modal_data"]["image"].size for inputs, _ in fake.sent] == [
        (96, 64),
        (80, 64),
    ]
    inputs, params = fake.sent[0]
    assert inputs["prompt"] == "<image>\nFree OCR."
    assert params["temperature"] == 0.0 and params["skip_special_tokens"] is False
    assert params["max_tokens"] == 40
    whitelist = set(ngram_whitelist_for(Tokenizer(byte_tokenizer())))
    assert whitelist  # the byte tokenizer carries <td> and </td> as special tokens
    assert params["extra_args"] == {
        "ngram_size": 20,
        "window_size": 50,
        "whitelist_token_ids": whitelist,
    }
