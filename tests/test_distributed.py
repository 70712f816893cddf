"""Scale-out: the Ray path gives the single-process output; the vLLM backend fails clearly."""

import builtins
import json
from pathlib import Path

import pytest
from conftest import TEST_BASE
from PIL import Image, ImageDraw

import dsocr
from dsocr.language.tokenizer import Tokenizer, byte_tokenizer
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
    from dsocr.distributed import convert_ray

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
