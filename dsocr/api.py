"""The small public API: load a model (folder or variant name) and run it on an image.

``OCR`` ties together preprocessing, the tokenizer's placeholder expansion, vision encoding and the
engine's generation loop. It owns no model math (``model.py``) and no sampling logic (``engine/``).

The embedded default, dsocr-mini, lives in ``dsocr/assets/dsocr-mini/`` once trained; until then
``load_model()`` with no argument says so instead of running random weights silently.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from dsocr.configs import CONFIGS, Mode, get_mode
from dsocr.engine.generate import Engine, GenerationParams, Request, Result
from dsocr.engine.sampling import OFFICIAL_NGRAM_SETTINGS, ngram_whitelist_for
from dsocr.language.tokenizer import (
    IMAGE_TOKEN,
    PROMPTS,
    Tokenizer,
    build_prompt_ids,
    byte_tokenizer,
)
from dsocr.model import DeepseekOCRForCausalLM
from dsocr.pipeline.providers import PageImage, iter_pages
from dsocr.vision.preprocess import ImageInputs, check_image_size, preprocess_image
from dsocr.weights import load_checkpoint

ASSETS = Path(__file__).parent / "assets"
DEFAULT_MODEL = "dsocr-mini"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str | torch.device | None) -> str:
    """``device`` (None: ``default_device()``) as a string, or a ValueError that says why it
    cannot be used here: an unknown name, or CUDA/MPS missing from this torch build or machine."""
    if device is None:
        return default_device()
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(
            f"device {str(device)!r}: not a device name (use cpu, cuda, cuda:N or mps)"
        ) from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU found"
            raise ValueError(f"device {str(device)!r}: CUDA is not available ({why})")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r}: MPS is not available on this machine")
    elif d.type not in ("cpu", "cuda", "mps"):
        raise ValueError(
            f"device {str(device)!r}: unsupported device type {d.type!r} (cpu, cuda, mps)"
        )
    return str(device)


def resolve_model_source(source: str | Path | None) -> Path | str:
    """A checkpoint folder for ``source``: a path, a bundled model name, or a config variant name."""
    source = DEFAULT_MODEL if source is None else source
    if Path(source).exists():
        return Path(source)
    bundled = ASSETS / str(source)
    if (bundled / "config.json").is_file():
        return bundled
    if str(source) == DEFAULT_MODEL:
        raise FileNotFoundError(
            f"the bundled {DEFAULT_MODEL} weights are not in {bundled} yet; pass --model with a "
            "checkpoint folder (e.g. the official DeepSeek-OCR download) or a variant name"
        )
    if str(source) in CONFIGS:
        return str(source)
    raise FileNotFoundError(
        f"{source}: no such checkpoint folder, bundled model or variant ({', '.join(CONFIGS)})"
    )


def model_defaults(source: str | Path | None = None) -> dict:
    """The settings a checkpoint says it was trained for: ``meta.json``'s ``"defaults"`` (``mode``,
    ``task``), read without loading weights. Empty for official checkpoints and variant names, whose
    callers keep the official defaults (Base for one image, Gundam for documents)."""
    try:
        folder = resolve_model_source(source)
    except FileNotFoundError:
        return {}
    meta = Path(folder) / "meta.json" if isinstance(folder, Path) else None
    if meta is None or not meta.is_file():
        return {}
    try:
        defaults = json.loads(meta.read_text()).get("defaults", {})
    except (json.JSONDecodeError, OSError):
        return {}
    return {k: v for k, v in defaults.items() if k in ("mode", "task") and isinstance(v, str)}


def first_page(path: str | Path) -> PageImage:
    """The first page of an image or PDF file; its ``page_count`` says how many the file has.

    Problems with the file raise ``InputError`` ("<path>: <reason>"); the file is closed after.
    """
    pages = iter_pages(path, pages=[0], extract_text=False)
    try:
        return next(pages)
    finally:
        pages.close()


def check_prompt(prompt: str, n_images: int) -> None:
    """A ValueError unless ``prompt`` holds one ``<image>`` per image (none for text only)."""
    n = prompt.count(IMAGE_TOKEN)
    if n != n_images:
        want = f"exactly {n_images} {IMAGE_TOKEN}" if n_images else f"no {IMAGE_TOKEN}"
        raise ValueError(
            f"prompt {prompt[:60]!r} has {n} {IMAGE_TOKEN} marker(s); it needs {want} "
            f"(one per image), e.g. {PROMPTS['free']!r}"
        )


@dataclass
class OCR:
    """A loaded model plus its tokenizer; ``generate(image, prompt)`` returns the decoded text."""

    model: DeepseekOCRForCausalLM
    tokenizer: Tokenizer
    source: str = ""

    def preprocess(self, image: Image.Image | str | Path, mode: str | Mode) -> ImageInputs:
        """An image, or the first page of an image/PDF file, as the mode's tensors.

        Files go through ``pipeline.providers`` (type by magic bytes, pixel limit before decoding,
        EXIF); their problems raise ``InputError`` with a one-line "<path>: <reason>".
        """
        if not isinstance(image, Image.Image):
            image = first_page(image).image
        else:
            check_image_size(image)
        return preprocess_image(image, get_mode(mode))

    @torch.no_grad()
    def run(
        self,
        image: Image.Image | str | Path | None,
        prompt: str = PROMPTS["free"],
        mode: str | Mode = "base",
        max_new_tokens: int = 512,
        ngram: tuple[int, int] | None = OFFICIAL_NGRAM_SETTINGS["image"],
    ) -> Result:
        """Decode one image (or a text-only prompt when ``image`` is None) greedily.

        Returns the engine's ``Result``: text, token ids, ``finish_reason`` ("eos", "length",
        "loop") and timings. ``ngram`` = (size, window) of the official no-repeat ban; the default is
        the official single-image setting (30, 90) with the ``<td>``/``</td>`` whitelist.
        """
        (result,) = self.run_many([image], prompt, mode, max_new_tokens, ngram, batch_size=1)
        return result

    @torch.no_grad()
    def run_many(
        self,
        images: Sequence[Image.Image | str | Path | None],
        prompt: str = PROMPTS["free"],
        mode: str | Mode = "base",
        max_new_tokens: int | Sequence[int] = 512,
        ngram: tuple[int, int] | None = OFFICIAL_NGRAM_SETTINGS["image"],
        batch_size: int = 8,
    ) -> list[Result]:
        """:meth:`run` over many images, ``batch_size`` decoding together in one engine (continuous
        batching); results in input order. ``max_new_tokens`` may be one value per image."""
        budgets = (
            [max_new_tokens] * len(images)
            if isinstance(max_new_tokens, int)
            else list(max_new_tokens)
        )
        if len(budgets) != len(images):
            raise ValueError(f"{len(budgets)} max_new_tokens values for {len(images)} images")
        for n_images in {0 if image is None else 1 for image in images}:  # before any decoding
            check_prompt(prompt, n_images)
        requests = []
        for image, budget in zip(images, budgets):
            params = GenerationParams(
                max_new_tokens=budget,
                ngram_size=ngram[0] if ngram else None,
                ngram_window=ngram[1] if ngram else 100,
                ngram_whitelist=ngram_whitelist_for(self.tokenizer),
            )
            if image is None:
                requests.append(Request(build_prompt_ids(self.tokenizer, prompt, []), params))
                continue
            inputs = self.preprocess(image, mode)
            ids = build_prompt_ids(self.tokenizer, prompt, [inputs.num_tokens])
            requests.append(Request(ids, params, images=[inputs]))
        engine = Engine(
            self.model,
            self.tokenizer,
            max_batch_size=max(1, batch_size),
            dtype=self.model.dtype,
            eos_id=self.tokenizer.eos_id,
        )
        return engine.generate(requests)

    def generate(
        self,
        image: Image.Image | str | Path | None,
        prompt: str = PROMPTS["free"],
        mode: str | Mode = "base",
        max_new_tokens: int = 512,
    ) -> str:
        """The decoded text of :meth:`run`, stripped."""
        return self.run(image, prompt, mode, max_new_tokens).text.strip()


def load_model(
    source: str | Path | None = None, device: str | None = None, dtype: torch.dtype | None = None
) -> OCR:
    """Load a checkpoint folder, a bundled model (default: dsocr-mini) or a random-weight variant.

    ``dtype=None`` picks float32 on CPU and bfloat16 on GPUs with native bf16
    (:func:`dsocr.weights.default_dtype`). A folder needs ``tokenizer.json``; a random-weight
    variant (and, with a warning, a folder of a model under 1,000 ids) gets a byte tokenizer.
    The tokenizer must fit the model: every id, ``<image>`` and EOS included, inside its
    vocabulary, else a ValueError naming tokenizer.json.
    """
    device = check_device(device)
    resolved = resolve_model_source(source)
    model = load_checkpoint(resolved, device=device, dtype=dtype)
    cfg = model.config
    vocab = cfg.language.vocab_size
    where = f"{resolved}/tokenizer.json" if isinstance(resolved, Path) else str(resolved)
    if isinstance(resolved, Path) and (resolved / "tokenizer.json").is_file():
        tok = Tokenizer.from_folder(resolved)
    elif vocab < 1000:
        if isinstance(resolved, Path):
            warnings.warn(
                f"{resolved}: no tokenizer.json; using a byte tokenizer of {vocab} ids "
                "(right only for random-weight test models)",
                stacklevel=2,
            )
        tok = Tokenizer(byte_tokenizer(vocab_size=vocab))
    else:
        raise FileNotFoundError(f"{resolved}: no tokenizer.json beside the weights")
    top = max(tok.backend.get_vocab(with_added_tokens=True).values(), default=-1)
    if top >= vocab:
        raise ValueError(
            f"{where}: token ids up to {top} do not fit the model's vocabulary of {vocab} "
            "(config.json vocab_size); a tokenizer of another model?"
        )
    if tok.image_id != cfg.image_token_id:
        raise ValueError(
            f"{resolved}: tokenizer's <image> id {tok.image_id} != config image_token_id "
            f"{cfg.image_token_id}"
        )
    return OCR(model, tok, str(resolved))
