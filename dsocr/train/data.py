"""Training data: rendered page/text pairs from real text, as seeded, streaming batches.

The paper's "data engine" (§3.4) at our scale: real text (Debian documentation and other packaged
corpora, built by ``scripts/build_corpus.py`` into ``train.jsonl`` / ``heldout.jsonl``, split by
document) is rendered with ``dsocr.render`` in varied styles (font, size, line height, margins,
columns), optionally degraded like a scan, and labelled with exactly the text placed on the page.
With ``DataRecipe.pdf_share`` > 0, that share of the training samples are real PDF pages instead
(the paper's coarse labels: rasterised at 144 dpi, labelled with their text layer), drawn from
the index of training pages that ``scripts/build_pdf_pages.py`` writes (``dsocr.train.pdf_pages``).

Determinism: every sample is a pure function of (seed, split, step, rank, index), so batches are
reproducible, resumable and identical across worker counts.

Legend: B batch, T tokens.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image

from dsocr.configs import DeepseekOCRConfig, Mode, get_mode
from dsocr.language.tokenizer import PROMPTS, Tokenizer, build_prompt_ids
from dsocr.render import (
    PageStyle,
    degrade,
    glyph_centers,
    missing_chars,
    render_markdown,
    render_text,
)
from dsocr.vision.preprocess import ImageInputs, preprocess_image, squashes

# A few real sentences (public-domain: Austen, the GNU GPL preamble is not used) for tests and
# for smoke runs without a corpus. Real training always uses a built corpus.
TOY_DOCS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.",
    "However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families.",
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition, "
    "seemed to unite some of the best blessings of existence.",
    "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, for his own "
    "amusement, never took up any book but the Baronetage.",
]


@dataclass(frozen=True)
class DataRecipe:
    """What a training sample looks like; saved in checkpoint metadata."""

    corpus: str | None = None  # folder with train.jsonl[.gz] / heldout.jsonl[.gz]; None: TOY_DOCS
    langs: tuple[str, ...] = ()  # keep only corpus rows with these "lang" codes; (): all
    modes: tuple[str | Mode, ...] = ("tiny", "small")  # names, or Mode objects (tests)
    prompts: tuple[str, ...] = ("free",)  # keys of PROMPTS; "markdown" samples use render_markdown
    min_chars: int = 40
    max_chars: int = 1500
    font_sizes: tuple[int, ...] = (9, 10, 11, 12, 13, 14, 16, 18)
    fonts: tuple[str, ...] = ("sans", "serif", "mono")
    scan_prob: float = 0.25  # share of pages degraded like a scan
    # Share of pages whose words are shuffled (within the passage). A language prior cannot
    # predict them, so only reading lowers their loss: from scratch, this is what makes the
    # decoder look at the image before the encoder collapses into a constant soft prompt.
    scramble_prob: float = 0.0
    max_target_tokens: int = 1024  # a longer target is cut and trained without EOS
    page_size: int | None = None  # square page side in px; None: the mode's base size
    # Also give each batch, per vision token of the global view, the characters drawn in its
    # 64 x 64 px cell (Batch.cell_targets), for the training loop's character loss.
    glyph_targets: bool = False
    # Share of training samples that are real PDF pages from the index (dsocr/train/pdf_pages.py;
    # the held-out split never draws them). 0 draws nothing: samples exactly as without it.
    pdf_share: float = 0.0
    pdf_index: str | None = None  # the index; None: <corpus>/pdf_pages.jsonl

    @classmethod
    def from_meta(cls, saved: dict) -> DataRecipe:
        """The recipe a checkpoint's meta.json stores under "data_recipe" (JSON lists back to
        tuples; unknown keys ignored). An empty dict gives the defaults."""
        names = {f.name for f in fields(cls)}
        return cls(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in names}
        )


@dataclass
class Sample:
    image: Image.Image
    prompt: str
    target: str
    mode: str
    glyphs: list[tuple[str, float, float]] | None = None  # (char, x, y) in page px; None: unknown


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) right-padded with pad_id
    labels: torch.Tensor  # (B, T): target ids (and EOS) where trained, else -100
    images: list[ImageInputs] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)  # the page's whole text, per sample
    # Per sample: the target was longer than max_target_tokens, cut, and trained without EOS.
    truncated: list[bool] = field(default_factory=list)
    # (B, t*t, V) multi-hot: which single-character tokens are drawn in each global-view token's
    # cell (row-major); None unless the recipe asks for glyph targets.
    cell_targets: torch.Tensor | None = None


@lru_cache(maxsize=4)
def load_corpus(folder: str | None, split: str) -> tuple[dict, ...]:
    """Rows {"doc", "text", ...} of ``<folder>/<split>.jsonl`` (or ``.jsonl.gz``); TOY_DOCS when
    folder is None."""
    if folder is None:
        docs = TOY_DOCS if split == "train" else TOY_DOCS[::-1]
        return tuple({"doc": f"toy-{i}", "text": t} for i, t in enumerate(docs))
    path = Path(folder) / f"{split}.jsonl"
    if not path.is_file() and path.with_suffix(".jsonl.gz").is_file():
        path = path.with_suffix(".jsonl.gz")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: corpus split not found (run scripts/build_corpus.py)")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        rows = tuple(json.loads(line) for line in f if line.strip())
    if not rows:
        raise ValueError(f"{path}: empty corpus split")
    return rows


def corpus_identity(path: str | Path, root: str | Path | None = None) -> str:
    """One Markdown line naming the held-out text a report read: ``heldout.jsonl`` (``path`` is
    it or its corpus folder), the first 12 hex digits of its sha256 and, from the corpus's
    manifest.json when there is one, its documents and sources, so that reports made on
    different corpora are told apart. The path is shown relative to ``root`` when under it."""
    path = Path(path)
    file = path / "heldout.jsonl" if path.is_dir() else path
    digest = hashlib.sha256(file.read_bytes()).hexdigest()[:12] if file.is_file() else "missing"
    shown = file
    if root is not None and file.resolve().is_relative_to(Path(root).resolve()):
        shown = file.resolve().relative_to(Path(root).resolve())
    line = f"`{shown.as_posix()}` (sha256 {digest}"
    try:
        manifest = json.loads((file.parent / "manifest.json").read_text(encoding="utf-8"))
        line += f", {manifest['documents']['heldout']} documents"
        if manifest.get("sources_requested"):
            line += f"; sources {', '.join(manifest['sources_requested'])}"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return line + ")"


@lru_cache(maxsize=8)
def recipe_docs(folder: str | None, split: str, langs: tuple[str, ...] = ()) -> tuple[dict, ...]:
    """The corpus rows a recipe draws from: ``load_corpus`` filtered to ``langs`` (all if empty)."""
    rows = load_corpus(folder, split)
    if not langs:
        return rows
    kept = tuple(r for r in rows if r.get("lang") in langs)
    if not kept:
        raise ValueError(f"{folder}/{split}: no documents in languages {', '.join(langs)}")
    return kept


def recipe_pdf_pages(recipe: DataRecipe, split: str) -> tuple[dict, ...]:
    """The index rows a recipe draws PDF pages from (() when it draws none: ``pdf_share`` 0, or
    not the train split). Checks the index and its PDFs (``PdfIndexError``, one line)."""
    if not recipe.pdf_share or split != "train":
        return ()
    from dsocr.train.pdf_pages import INDEX_NAME, PdfIndexError, load_pdf_index

    index = recipe.pdf_index
    if index is None:
        if recipe.corpus is None:
            raise PdfIndexError("pdf_share needs a PDF page index (pdf_index) or a corpus folder")
        index = str(Path(recipe.corpus) / INDEX_NAME)
    return load_pdf_index(index, tuple(recipe.langs))


def sample_seed(seed: int, split: str, step: int, rank: int, index: int) -> int:
    key = f"{seed}/{split}/{step}/{rank}/{index}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def _chunk(text: str, rng: random.Random, n_chars: int) -> str:
    """A slice of about n_chars starting at a word boundary."""
    if len(text) <= n_chars:
        return text
    start = rng.randrange(0, len(text) - n_chars)
    space = text.find(" ", start)
    start = space + 1 if 0 <= space < start + 40 else start
    return text[start : start + n_chars]


def make_sample(recipe: DataRecipe, rng: random.Random, docs) -> Sample:
    """One page: pick text and a style, render, maybe degrade; target = exactly the page's text."""
    mode = rng.choice(recipe.modes)
    task = rng.choice(recipe.prompts)
    size = recipe.page_size or get_mode(mode).base_size
    for _ in range(20):
        text = _chunk(
            rng.choice(docs)["text"], rng, rng.randint(recipe.min_chars, recipe.max_chars)
        )
        text = "".join(ch for ch in text if not missing_chars(ch))  # drop glyphs we cannot draw
        if text.strip():
            break
    if recipe.scramble_prob and rng.random() < recipe.scramble_prob:
        words = text.split()
        rng.shuffle(words)
        text = " ".join(words)
    style = PageStyle(
        font=rng.choice(recipe.fonts),
        font_size=rng.choice(recipe.font_sizes),
        line_height=rng.choice((1.1, 1.2, 1.3, 1.5)),
        margin=rng.randint(4, max(5, size // 12)),
        columns=1 if rng.random() < 0.85 else 2,
        width=size,
        height=size,
    )
    render = render_markdown if task == "markdown" else render_text
    page = render(text, style)[0]
    image = page.image
    glyphs = None
    if recipe.glyph_targets and task != "markdown":
        glyphs = glyph_centers(text, style)[0]
    if rng.random() < recipe.scan_prob:
        image = degrade(
            image,
            rng.randrange(2**31),
            blur=rng.choice((0, 0.5, 0.8)),
            noise=rng.choice((0, 4, 8)),
            jpeg_quality=rng.choice((None, 60, 85)),
            rotate_deg=rng.uniform(-1.0, 1.0) * max_rotation(size, style.margin),
        )
    target = page.text.strip()
    return Sample(image.convert("RGB"), PROMPTS[task], target, mode, glyphs)


def max_rotation(size: int, margin: int, limit: float = 1.0) -> float:
    """The largest rotation (degrees, at most ``limit``) about the centre of a ``size`` px square
    page that keeps the corners of its text area (``margin`` px in) on the page, 1 px to spare:
    text rotated off the page would still be in the target."""
    c = size / 2
    reach = (c - 1) / ((c - margin) * math.sqrt(2))  # sin(45 deg + max angle)
    return limit if reach >= 1 else max(0.0, min(limit, math.degrees(math.asin(reach)) - 45.0))


def cell_targets(
    sample: Sample, tok: Tokenizer, inputs: ImageInputs, pixels_per_token: int, vocab: int = 0
):
    """(t*t, V) multi-hot (V = ``vocab`` or ``len(tok)``) of the single-token characters in each cell of the global view's
    t x t token grid. A square page maps by scale alone; a non-square one (a PDF page) as the
    mode's global view maps it: resized to a square (Tiny, Small) or padded (Base and up)."""
    side = inputs.global_view.shape[-1]
    t = side // pixels_per_token
    out = torch.zeros(t * t, vocab or len(tok))
    W, H = sample.image.size
    sx, sy, ox, oy = side / W, side / H, 0.0, 0.0  # square pages, and Tiny/Small's plain resize
    if W != H and not squashes(get_mode(sample.mode)):  # ImageOps.pad: longer side, centred
        sx = sy = side / max(W, H)
        ox, oy = (side - round(W * sx)) // 2, (side - round(H * sy)) // 2
    memo: dict[str, list[int]] = {}
    for ch, x, y in sample.glyphs or ():
        ids = memo.get(ch) or memo.setdefault(ch, tok.encode(ch))
        if len(ids) != 1:
            continue
        r = min(t - 1, max(0, int((y * sy + oy) / pixels_per_token)))
        c = min(t - 1, max(0, int((x * sx + ox) / pixels_per_token)))
        out[r * t + c, ids[0]] = 1.0
    return out


def encode_sample(sample: Sample, tok: Tokenizer, cfg: DeepseekOCRConfig, max_target: int):
    """Sample -> (ids, labels, image inputs).

    A target of more than ``max_target`` tokens is cut there and trained without EOS: the page
    shows more text, so "stop here" would be a false label (the loss covers the kept prefix only).
    """
    inputs = preprocess_image(sample.image, get_mode(sample.mode))
    prompt_ids = build_prompt_ids(tok, sample.prompt, [inputs.num_tokens])
    target_ids = tok.encode(sample.target)
    end = [tok.eos_id] if len(target_ids) <= max_target else []
    target_ids = target_ids[:max_target] + end
    ids = prompt_ids + target_ids
    labels = [-100] * len(prompt_ids) + target_ids
    return ids, labels, inputs


def collate(encoded, pad_id: int, device="cpu") -> Batch:
    T = max(len(ids) for ids, _, _ in encoded)
    B = len(encoded)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for i, (ids, lab, _) in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
    return Batch(input_ids.to(device), labels.to(device), [e[2] for e in encoded])


def make_batch(
    recipe: DataRecipe,
    tok: Tokenizer,
    cfg: DeepseekOCRConfig,
    *,
    step: int,
    rank: int,
    batch_size: int,
    seed: int,
    split: str = "train",
    device="cpu",
) -> Batch:
    """The batch for one step: a pure function of its arguments."""
    docs = recipe_docs(recipe.corpus, split, tuple(recipe.langs))
    pdf_rows = recipe_pdf_pages(recipe, split)
    samples = []
    for i in range(batch_size):
        rng = random.Random(sample_seed(seed, split, step, rank, i))
        if pdf_rows and rng.random() < recipe.pdf_share:  # no draw at all when pdf_share is 0
            from dsocr.train.pdf_pages import make_pdf_sample

            samples.append(make_pdf_sample(recipe, rng, pdf_rows))
        else:
            samples.append(make_sample(recipe, rng, docs))
    encoded = [encode_sample(s, tok, cfg, recipe.max_target_tokens) for s in samples]
    batch = collate(encoded, tok.pad_id, device)
    batch.targets = [s.target for s in samples]
    batch.truncated = [lab[-1] != tok.eos_id for _, lab, _ in encoded]
    if recipe.glyph_targets:
        ppt = cfg.sam.pixels_per_token
        V = cfg.language.vocab_size
        rows = [cell_targets(s, tok, e[2], ppt, V) for s, e in zip(samples, encoded)]
        if len({r.shape for r in rows}) == 1:  # one global-view size: stackable
            batch.cell_targets = torch.stack(rows).to(device)
    return batch


class StepBatches(torch.utils.data.IterableDataset):
    """An endless stream of the batches for steps start, start+1, ... (CPU tensors).

    With N DataLoader workers, worker w builds steps start+w, start+w+N, ...; the loader reads the
    workers round-robin, so the stream is in step order and identical for any N.
    """

    def __init__(
        self,
        recipe: DataRecipe,
        tok: Tokenizer,
        cfg: DeepseekOCRConfig,
        *,
        start_step: int,
        rank: int,
        batch_size: int,
        seed: int,
        split: str = "train",
    ):
        super().__init__()
        self.recipe, self.tok, self.cfg = recipe, tok, cfg
        self.start_step, self.rank, self.batch_size = start_step, rank, batch_size
        self.seed, self.split = seed, split
        recipe_pdf_pages(recipe, split)  # a missing or changed PDF fails here, not mid-run

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.start_step + w
        while True:
            yield make_batch(
                self.recipe,
                self.tok,
                self.cfg,
                step=step,
                rank=self.rank,
                batch_size=self.batch_size,
                seed=self.seed,
                split=self.split,
            )
            step += n


def batch_stream(batches: StepBatches, workers: int = 0) -> Iterator[Batch]:
    """Iterate ``batches`` in step order, built by ``workers`` processes (0: in this process)."""
    if workers <= 0:
        return iter(batches)
    loader = torch.utils.data.DataLoader(
        batches, batch_size=None, num_workers=workers, prefetch_factor=4
    )
    return iter(loader)


def batch_to(batch: Batch, device) -> Batch:
    batch.input_ids = batch.input_ids.to(device, non_blocking=True)
    batch.labels = batch.labels.to(device, non_blocking=True)
    if batch.cell_targets is not None:
        batch.cell_targets = batch.cell_targets.to(device, non_blocking=True)
    return batch
