"""``--backend vllm``: the official checkpoint through vLLM's own DeepSeek-OCR support (GPU only).

vLLM (>= 0.11.1) ships ``DeepseekOCRForCausalLM`` and the official ``NGramPerReqLogitsProcessor``.
:class:`VllmEngine` puts vLLM's ``LLMEngine`` behind the ``add_request`` / ``step`` / ``reset`` API
that ``pipeline.convert.Generate`` drives, so conversion keeps its stages, output layout, resume
and flags, and only the decoding moves to vLLM. Settings follow the vLLM DeepSeek-OCR recipe:
greedy, ``skip_special_tokens=False``, prefix caching and the multimodal processor cache off, and
the n-gram ban passed per request as ``extra_args`` (``ngram_size``, ``window_size``,
``whitelist_token_ids`` = ``<td>``, ``</td>``).

Gotchas:
- vLLM's processor tiles every image the Gundam way (1024 global view, 640 tiles, 2 to 6 of
  them, where HF's ``infer()`` and our ``gundam`` allow 9); it takes no mode. Other modes are
  refused rather than silently ignored, and the pipeline counts vision tokens with
  :attr:`VllmEngine.tiling_mode` (:data:`VLLM_MODE`).
- vLLM takes the raw page image and the prompt text (it expands ``<image>`` itself), so
  :attr:`VllmEngine.wants_raw_images` tells ``Generate`` to send the page image, not our tensors.
- Optional extra: ``pip install 'dsocr[vllm]'``, on Linux with a CUDA GPU. Without either,
  :func:`check_vllm` raises :class:`BackendUnavailable` with a one-line reason.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

from dsocr.configs import MODES, get_mode, load_config
from dsocr.engine.generate import Result, StreamEvent
from dsocr.language.tokenizer import Tokenizer

BACKENDS = ("dsocr", "vllm")

# How vLLM's DeepSeek-OCR processor tiles (upstream: MIN_CROPS 2, MAX_CROPS 6), as a dsocr mode.
VLLM_MODE = replace(MODES["gundam"], max_crops=6)


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; ``str(e)`` is one line saying why."""


def check_vllm() -> None:
    """Raise :class:`BackendUnavailable` unless vLLM with DeepSeek-OCR support and a GPU exist."""
    try:
        import vllm
    except ImportError:
        raise BackendUnavailable(
            "--backend vllm needs vLLM, which is not installed: pip install 'dsocr[vllm]' "
            "(Linux with a CUDA GPU)"
        ) from None
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailable(
            "--backend vllm needs a CUDA GPU, and torch sees none; use the default backend "
            "(--backend dsocr), which also runs on CPU"
        )
    try:
        from vllm.model_executor.models.deepseek_ocr import NGramPerReqLogitsProcessor  # noqa: F401
    except ImportError:
        raise BackendUnavailable(
            f"vLLM {getattr(vllm, '__version__', '?')} has no DeepSeek-OCR support "
            "(vllm.model_executor.models.deepseek_ocr); it needs vLLM >= 0.11.1"
        ) from None


class VllmOCR:
    """What ``Converter`` needs of an ``OCR`` (tokenizer, config, source), without torch weights:
    vLLM holds the only copy of the model."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: not a checkpoint folder (no config.json)")
        self.source = str(folder)
        self.tokenizer = Tokenizer.from_folder(folder)
        self.model = SimpleNamespace(config=load_config(folder), dtype=None)


class VllmEngine:
    """vLLM's continuous batching behind dsocr's engine API (``add_request`` / ``step``)."""

    wants_raw_images = True
    tiling_mode = VLLM_MODE  # how vLLM tiles pages, whatever the pipeline was asked for

    def __init__(self, ocr: VllmOCR, prompt: str, mode, max_batch_size: int = 64, **llm_kwargs):
        check_vllm()
        if get_mode(mode).name != "gundam":
            raise ValueError(
                f"vLLM's DeepSeek-OCR processor always tiles in Gundam mode; got mode "
                f"{get_mode(mode).name!r} (pass --mode gundam, or use --backend dsocr)"
            )
        from vllm import LLM
        from vllm.model_executor.models.deepseek_ocr import NGramPerReqLogitsProcessor

        self.prompt = prompt
        self.tokenizer = ocr.tokenizer
        self.llm = LLM(
            model=ocr.source,
            enable_prefix_caching=False,
            mm_processor_cache_gb=0,
            logits_processors=[NGramPerReqLogitsProcessor],
            max_num_seqs=max_batch_size,
            **llm_kwargs,
        )
        self.engine = self.llm.llm_engine
        self._ids: dict[str, tuple[Hashable, float, int]] = {}
        self._next = 0

    def add_request(self, req) -> Hashable:
        from vllm import SamplingParams

        p = req.params
        extra = {}
        if p.ngram_size:
            extra = dict(
                ngram_size=p.ngram_size,
                window_size=p.ngram_window,
                whitelist_token_ids=set(p.ngram_whitelist or ()),  # <td>, </td> in its ids
            )
        params = SamplingParams(
            temperature=0.0,
            max_tokens=p.max_new_tokens,
            skip_special_tokens=False,
            extra_args=extra or None,
        )
        key = f"dsocr-{self._next}"
        self._next += 1
        image = req.images[0]
        self.engine.add_request(
            key, {"prompt": self.prompt, "multi_modal_data": {"image": image}}, params
        )
        self._ids[key] = (req.request_id, time.perf_counter(), len(req.prompt_ids))
        return req.request_id

    def step(self) -> list[StreamEvent]:
        events = []
        for out in self.engine.step():
            if not out.finished or out.request_id not in self._ids:
                continue
            request_id, t0, n_prompt = self._ids.pop(out.request_id)
            comp = out.outputs[0]
            ids = list(comp.token_ids)
            reason = {"stop": "eos", "length": "length"}.get(comp.finish_reason, "eos")
            dt = time.perf_counter() - t0
            result = Result(
                request_id, ids, comp.text, reason, n_prompt, len(ids), 0.0, 0.0, dt, dt, dt
            )
            events.append(StreamEvent(request_id, ids, comp.text, result))
        return events

    def reset(self) -> None:
        if self._ids:
            self.engine.abort_request(list(self._ids))
        self._ids.clear()
