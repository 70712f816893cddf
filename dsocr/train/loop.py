"""The training loop: resumable, seeded, single-process or DDP under ``torchrun``.

After nanochat's base_train (one config dataclass, a thin ``main(argv)``) and the DeepSeek-OCR
recipe (paper §3.5): AdamW with linear warmup then cosine decay, gradient clipping, bfloat16
autocast on GPUs with native bf16 (float32 on CPU, which has no bf16 units here, and on older GPUs),
and optional freezing of SAM and the 16x compressor (the paper's stage 2 treats them as a frozen
"vision tokenizer").

Checkpoints use the official folder layout (``dsocr.weights.save_checkpoint``) plus ``meta.json``
(config, tokenizer hash, data recipe, step, git commit) and ``trainer.pt`` (optimizer state), written
to a temporary folder and renamed, so an interrupted run never leaves a half-written checkpoint.

Determinism: the batch for step s is a pure function of (seed, s, rank) (see ``train/data.py``), so a
run stopped at any checkpoint and resumed reaches the same weights as an uninterrupted run.

Resuming: rerunning a command whose ``--out`` holds a checkpoint continues it (after repairing a
checkpoint swap that was interrupted). Run-control settings (``--steps``, ``--stop-at``,
``--max-minutes``, ``--workers``, the intervals, ``--device``) and the phase switches (``--freeze``,
``--vision-lr-scale``, ``--char-loss``, ``--input-noise``, ``--grad-clip``, ``--weight-decay``)
may change; a change of the model, tokenizer, seed, batch size, data recipe or learning-rate
schedule is refused unless ``--new-phase`` (or a new ``--schedule-start``) says that this run
continues as another phase. Every invocation is recorded in meta.json's "invocations".

Usage::

    python -m dsocr.train.loop --model tiny --steps 20 --out runs/smoke          # CPU smoke test
    torchrun --nproc_per_node 8 -m dsocr.train.loop --model mini --steps 20000 --batch-size 64 \\
        --tokenizer data/mini/tokenizer.json --data-corpus data/corpus --out runs/mini \\
        --max-minutes 8                                                           # resumable chunks
    python -m dsocr.train.loop --model runs/mini/latest --out runs/mini-b ...   # a later phase
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from dsocr.configs import CONFIGS, DeepseekOCRConfig, get_mode, load_config
from dsocr.language.tokenizer import PROMPTS, Tokenizer
from dsocr.model import DeepseekOCRForCausalLM
from dsocr.train.data import (
    Batch,
    DataRecipe,
    StepBatches,
    batch_stream,
    batch_to,
    make_batch,
    recipe_docs,
    recipe_pdf_pages,
    sample_seed,
)
from dsocr.weights import (
    CheckpointError,
    checkpoint_files,
    default_dtype,
    load_checkpoint,
    save_checkpoint,
)


class ConfigError(ValueError):
    """A setting that cannot run, reported by ``main`` as one line ``error: ...`` (exit status 2)
    before any folder is created or model built."""


@dataclass
class TrainConfig:
    model: str = "mini"  # variant name (random init) or a checkpoint folder to start from
    out: str = "runs/mini"
    tokenizer: str | None = None  # tokenizer.json; default: the start folder's, or a byte tokenizer
    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 100
    # Step at which the warmup + cosine schedule starts (a warm restart when a later phase resumes
    # a checkpoint whose schedule has already decayed); before it, the rate is the peak's floor.
    schedule_start: int = 0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    freeze: tuple[str, ...] = ()  # any of "sam" (SAM + neck + net_2/net_3), "clip", "decoder"
    # Learning-rate multiplier of SAM, CLIP and the projector. From scratch at a high rate, the
    # encoder collapses to an image-independent output before the decoder learns to read (the
    # image tokens are noise to a decoder that cannot read yet, so the gradient removes them).
    vision_lr_scale: float = 1.0
    # Weight of the character loss (``char_loss``: which characters each vision token's cell
    # holds; needs rendered plain-text pages). 0: off. It sets ``data.glyph_targets``.
    char_loss: float = 0.0
    # Share of the decoder's input text tokens replaced by other target tokens of the batch (the
    # labels stay the true ones), so that training sees histories with mistakes in them, as greedy
    # decoding does, and learns to recover from them by reading the image. 0: off.
    input_noise: float = 0.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 4
    # Pages per held-out batch, whatever batch_size is, so that eval losses (and the choice of
    # best/) compare across runs and phases of any batch size. 16: the CPU stand-in's batch size
    # (docs/training.md §4), whose eval pages it keeps.
    eval_batch_size: int = 16
    save_every: int = 200
    max_minutes: float | None = None  # stop with a checkpoint after this much wall time
    stop_at: int | None = None  # stop with a checkpoint at this step (a phase's end; the lr
    # schedule still runs over ``steps``)
    device: str | None = None
    workers: int = 0  # data-loader processes building batches ahead of the model (0: inline)
    # Resuming ``out`` with another seed, batch size, data recipe or lr schedule continues the run
    # as a new phase (recorded in meta.json) instead of being refused. A changed schedule_start
    # declares a new phase by itself.
    new_phase: bool = False
    data: DataRecipe = field(default_factory=DataRecipe)


# Resume compatibility (``check_resume``). Settings that define what a run is: changing one in a
# resumed ``out`` is refused unless the invocation starts a new phase (--new-phase, or a new
# --schedule-start). The model and tokenizer can never change in place (the run continues from
# its own latest/ weights and embeddings).
RUN_IDENTITY = ("seed", "batch_size", "lr", "min_lr_ratio", "warmup", "schedule_start")
# Switches that the documented phases change in place (§4: phase 0 -> 0c -> 0d, 3a -> 3b): allowed,
# recorded in the invocation's "changed".
PHASE_SWITCHES = (
    "freeze",
    "vision_lr_scale",
    "char_loss",
    "input_noise",
    "grad_clip",
    "weight_decay",
)
# Run control: free to change between invocations, recorded with each invocation.
RUN_CONTROL = (
    "steps",
    "stop_at",
    "max_minutes",
    "workers",
    "log_every",
    "eval_every",
    "eval_batches",
    "eval_batch_size",
    "save_every",
    "device",
)

# bfloat16 dense tensor-core peaks (no sparsity), FLOP/s, from NVIDIA's datasheets; matched as
# substrings of torch.cuda.get_device_name(), first match wins (so "H100 NVL" before "H100").
# A GPU not listed gets no share (null), never a guess.
BF16_PEAK_FLOPS = (
    ("H200 NVL", 835e12),
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
)


def bf16_peak_flops(device_name: str) -> float | None:
    """The bf16 dense peak of a GPU named ``device_name`` (``BF16_PEAK_FLOPS``), or None."""
    for key, peak in BF16_PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def count_flops(fn) -> tuple[object, int]:
    """(fn(), the FLOPs its matmuls, convolutions and attention ran, forward and backward), as
    ``torch.utils.flop_counter`` counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        out = fn()
    return out, int(counter.get_total_flops())


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``; both
    counted from ``schedule_start``."""
    step = max(0, step - cfg.schedule_start)
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.schedule_start - cfg.warmup)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos)


def loss_on(model: DeepseekOCRForCausalLM, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over the target tokens (prompt and padding are -100)."""
    return losses_on(model, batch)[0]


def losses_on(
    model: DeepseekOCRForCausalLM, batch: Batch, char_weight: float = 0.0, blank_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(text loss, character loss or None); see :func:`char_loss`."""
    embeds = model.encode_images(batch.images)
    logits = model(batch.input_ids, image_embeds=torch.cat(embeds) if embeds else None)
    text = F.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten(), ignore_index=-100
    )
    if not char_weight or batch.cell_targets is None:
        return text, None
    return text, char_loss(model, embeds, batch.cell_targets, blank_id)


def corrupt_inputs(batch: Batch, share: float, seed: int) -> Batch:
    """``batch`` with about ``share`` of its target-text input ids replaced by target ids drawn at
    random from the whole batch (so never a prompt, image or special id); labels untouched.

    Exposure-bias training: with true histories only (teacher forcing), the decoder learns to lean
    on its own previous tokens and, at greedy decoding, one wrong token derails the rest of the
    line. ``seed`` fixes the draw, so a resumed run sees the same corruption.
    """
    if share <= 0:
        return batch
    target = batch.labels != -100
    pool = batch.input_ids[target]
    if pool.numel() == 0:
        return batch
    g = torch.Generator().manual_seed(seed)
    hit = target & (torch.rand(batch.input_ids.shape, generator=g) < share)
    picks = torch.randint(pool.numel(), (int(hit.sum()),), generator=g)
    ids = batch.input_ids.clone()
    ids[hit] = pool[picks]
    return dataclasses.replace(batch, input_ids=ids)


def char_loss(model, embeds, cell_targets: torch.Tensor, blank_id: int) -> torch.Tensor:
    """Cross-entropy between what ``lm_head`` reads from each global-view vision token (through
    the final norm) and the characters drawn in that token's cell, spread evenly over them; an
    empty cell's target is ``blank_id`` (the space token).

    A dense, local signal for the encoder. From scratch on a CPU budget, the text loss alone
    teaches it only how much text a page holds; this teaches it which characters are where.
    No new parameters, so checkpoints keep the official layout.
    """
    logits = cell_logits(model, embeds, math.isqrt(cell_targets.shape[1])).float()
    target = cell_targets.clone()
    empty = target.sum(-1) == 0
    target[..., blank_id] += empty.float()
    target = target / target.sum(-1, keepdim=True)
    return F.cross_entropy(logits.flatten(0, 1), target.flatten(0, 1))


def cell_logits(model, embeds, t: int) -> torch.Tensor:
    """What ``lm_head`` reads (through the final norm) from each global-view vision token of each
    image's decoder embeddings: (B, t*t, V), cells row-major."""
    grids = torch.stack([global_view_tokens(e, t) for e in embeds])
    return model.lm_head(model.model.norm(grids))


def global_view_tokens(embeds: torch.Tensor, t: int) -> torch.Tensor:
    """One image's decoder embeddings -> its global view's (t*t, C) tokens, row-major: the last
    t*(t+1) + 1 rows are the view's rows with their newlines, then the view separator."""
    rows = embeds[-(t * (t + 1) + 1) : -1].view(t, t + 1, -1)
    return rows[:, :t].reshape(t * t, -1)


class LossModule(torch.nn.Module):
    """The whole loss as one forward, so DDP sees vision and decoder in the same call. Returns
    (total, text loss, character loss or None)."""

    def __init__(self, model: DeepseekOCRForCausalLM, char_weight: float = 0.0, blank_id: int = 0):
        super().__init__()
        self.model = model
        self.char_weight, self.blank_id = char_weight, blank_id

    def forward(self, batch: Batch):
        text, char = losses_on(self.model, batch, self.char_weight, self.blank_id)
        total = text if char is None else text + self.char_weight * char
        return total, text, char


def freeze_parts(model: DeepseekOCRForCausalLM, parts) -> None:
    m = model.model
    groups = {
        "sam": [m.sam_model],
        "clip": [m.vision_model],
        "decoder": [m.embed_tokens, m.layers, m.norm, model.lm_head],
    }
    for part in parts:
        if part not in groups:
            raise ValueError(f"unknown part to freeze {part!r}; known: {sorted(groups)}")
        for module in groups[part]:
            module.requires_grad_(False)


def vision_parameters(model: DeepseekOCRForCausalLM) -> list[torch.nn.Parameter]:
    """SAM (with the neck and the 16x compressor), CLIP and the projector."""
    m = model.model
    return [p for mod in (m.sam_model, m.vision_model, m.projector) for p in mod.parameters()]


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# --------------------------------------------------------------------------------------------------
# distributed helpers (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)
# --------------------------------------------------------------------------------------------------


def dist_setup(device: str) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend)
    rank = int(os.environ.get("RANK", "0"))
    return rank, world


def all_reduce_mean(x: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        torch.distributed.all_reduce(x)
        x = x / world
    return x


# --------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------


def _complete(folder: Path) -> bool:
    """A training checkpoint with everything written: ``trainer.pt`` is written last (and renamed
    into place), after the weights, config.json and meta.json."""
    return all((folder / n).is_file() for n in ("trainer.pt", "meta.json", "config.json"))


def save_training_state(
    folder: Path, model, tok: Tokenizer, opt, step: int, cfg: TrainConfig, extra: dict
) -> None:
    """Write a full checkpoint to ``folder`` atomically: a complete ``<folder>.tmp``, then
    ``folder`` -> ``<folder>.old``, ``.tmp`` -> ``folder``, and ``.old`` deleted. A kill at any
    point leaves a complete checkpoint that :func:`recover_checkpoint` puts back."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    meta = {
        "step": step,
        "config": dataclasses.asdict(model.config),
        "train": dataclasses.asdict(cfg),
        "tokenizer_sha256": tok.sha256,
        "data_recipe": dataclasses.asdict(cfg.data),
        "git_commit": git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }
    save_checkpoint(model, tmp, tokenizer=tok, meta=meta)
    torch.save({"optimizer": opt.state_dict(), "step": step}, tmp / "trainer.pt.part")
    (tmp / "trainer.pt.part").rename(tmp / "trainer.pt")  # the folder's completion mark
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def recover_checkpoint(folder: Path) -> str | None:
    """Finish or undo a checkpoint swap of :func:`save_training_state` that was interrupted;
    returns what was done (None: nothing to do).

    A complete ``.tmp`` is the newest checkpoint and becomes ``folder``; otherwise, with
    ``folder`` missing, a complete ``.old`` goes back. Incomplete leftovers are deleted.
    """
    tmp = folder.with_name(folder.name + ".tmp")
    old = folder.with_name(folder.name + ".old")
    done = None
    if _complete(tmp):
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        done = f"{folder}: finished an interrupted checkpoint swap (from {tmp.name})"
    elif not folder.exists() and _complete(old):
        old.rename(folder)
        done = f"{folder}: put the previous checkpoint back (from {old.name})"
    shutil.rmtree(tmp, ignore_errors=True)
    if _complete(folder):
        shutil.rmtree(old, ignore_errors=True)
    return done


def _read_meta(folder: Path) -> dict:
    path = folder / "meta.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{path}: unreadable ({e}); move the folder away to start afresh"
        ) from None


# --------------------------------------------------------------------------------------------------
# settings: checked up front, and against the run a resume continues
# --------------------------------------------------------------------------------------------------


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_settings(cfg: TrainConfig) -> None:
    """Raise ConfigError (one line) for settings that cannot run. Touches nothing on disk."""
    d = cfg.data

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    for name in (
        "steps",
        "batch_size",
        "log_every",
        "eval_every",
        "eval_batches",
        "eval_batch_size",
        "save_every",
    ):
        v = getattr(cfg, name)
        need(v >= 1, f"{_flag(name)} {v}: must be at least 1")
    need(cfg.lr > 0, f"--lr {cfg.lr}: must be positive")
    need(0 <= cfg.min_lr_ratio <= 1, f"--min-lr-ratio {cfg.min_lr_ratio}: must be in [0, 1]")
    need(cfg.warmup >= 0, f"--warmup {cfg.warmup}: must be 0 or more")
    need(
        0 <= cfg.schedule_start < cfg.steps,
        f"--schedule-start {cfg.schedule_start}: must be in [0, --steps {cfg.steps})",
    )
    need(cfg.weight_decay >= 0, f"--weight-decay {cfg.weight_decay}: must be 0 or more")
    need(cfg.grad_clip > 0, f"--grad-clip {cfg.grad_clip}: must be positive")
    need(cfg.vision_lr_scale >= 0, f"--vision-lr-scale {cfg.vision_lr_scale}: must be 0 or more")
    need(cfg.char_loss >= 0, f"--char-loss {cfg.char_loss}: must be 0 or more")
    need(0 <= cfg.input_noise <= 1, f"--input-noise {cfg.input_noise}: must be in [0, 1]")
    need(
        cfg.max_minutes is None or cfg.max_minutes >= 0,
        f"--max-minutes {cfg.max_minutes}: must be 0 or more",
    )
    need(cfg.stop_at is None or cfg.stop_at >= 1, f"--stop-at {cfg.stop_at}: must be at least 1")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    need(
        0 <= cfg.workers <= (cpus or 1),
        f"--workers {cfg.workers}: must be in [0, {cpus or 1}] (this machine's CPUs)",
    )
    parts = ("sam", "clip", "decoder")
    bad = [p for p in cfg.freeze if p not in parts]
    need(not bad, f"--freeze {','.join(bad)}: unknown part; known: {', '.join(parts)}")
    if cfg.device is not None:
        try:
            dev = torch.device(cfg.device)
        except RuntimeError:
            raise ConfigError(
                f"--device {cfg.device}: not a device (cpu, cuda, cuda:1, ...)"
            ) from None
        if dev.type == "cuda":
            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            need(n > 0, f"--device {cfg.device}: no CUDA device here (use --device cpu)")
            need(
                (dev.index or 0) < n, f"--device {cfg.device}: this machine has {n} CUDA device(s)"
            )
        else:
            need(dev.type == "cpu", f"--device {cfg.device}: only cpu and cuda are supported")
    # where the run goes
    out = Path(cfg.out)
    for p in (out, *out.parents):
        if p.exists():
            need(p.is_dir(), f"--out {cfg.out}: {p} is a file, not a folder")
            break
    # the data recipe
    for m in d.modes:
        try:
            get_mode(m)
        except KeyError as e:
            raise ConfigError(f"--data-modes: {e.args[0]}") from None
    need(bool(d.modes), "--data-modes: give at least one mode")
    from dsocr.render.fonts import FAMILIES

    bad = [f for f in d.fonts if f not in FAMILIES]
    need(bool(d.fonts), "--data-fonts: give at least one font family")
    need(not bad, f"--data-fonts {','.join(bad)}: unknown; known: {', '.join(FAMILIES)}")
    bad = [x for x in d.prompts if x not in PROMPTS]
    need(bool(d.prompts), "--data-prompts: give at least one prompt")
    need(not bad, f"--data-prompts {','.join(bad)}: unknown; known: {', '.join(PROMPTS)}")
    need(bool(d.font_sizes), "--data-font-sizes: give at least one size")
    need(min(d.font_sizes) >= 1, f"--data-font-sizes {min(d.font_sizes)}: must be positive")
    need(d.min_chars >= 1, f"--data-min-chars {d.min_chars}: must be at least 1")
    need(
        d.max_chars >= d.min_chars,
        f"--data-max-chars {d.max_chars}: must be at least --data-min-chars {d.min_chars}",
    )
    for name in ("scan_prob", "scramble_prob", "pdf_share"):
        v = getattr(d, name)
        need(0 <= v <= 1, f"--data-{name.replace('_', '-')} {v}: must be in [0, 1]")
    need(d.max_target_tokens >= 1, f"--data-max-target-tokens {d.max_target_tokens}: must be >= 1")
    need(
        d.page_size is None or d.page_size >= 64,
        f"--data-page-size {d.page_size}: must be at least 64",
    )
    if d.corpus is not None:
        need(Path(d.corpus).is_dir(), f"--data-corpus {d.corpus}: no such folder")
    for split in ("train", "heldout"):  # both: the periodic evaluation reads the held-out split
        try:
            recipe_docs(d.corpus, split, tuple(d.langs))
        except (OSError, ValueError) as e:
            raise ConfigError(f"--data-corpus {d.corpus}: {e}") from None
    try:  # the PDF page index and its PDFs (sha256), when --data-pdf-share draws from them
        recipe_pdf_pages(d, "train")
    except ValueError as e:
        raise ConfigError(f"--data-pdf-share: {e}") from None


def model_config(source: Path | str) -> DeepseekOCRConfig:
    """The config of a checkpoint folder (checked, with its weight files present) or variant."""
    if not Path(source).exists():
        if str(source) not in CONFIGS:
            raise ConfigError(
                f"--model {source}: no such checkpoint folder or variant "
                f"(variants: {', '.join(CONFIGS)})"
            )
        return CONFIGS[str(source)]
    try:
        cfg = load_config(source)
        checkpoint_files(Path(source))
    except (OSError, CheckpointError) as e:
        raise ConfigError(f"--model {source}: {e}") from None
    return cfg


def load_tokenizer(cfg: TrainConfig, start: Path | None, mcfg: DeepseekOCRConfig) -> Tokenizer:
    """--tokenizer, else the start folder's tokenizer.json, else a byte tokenizer of the model's
    vocabulary; checked against the model (ids inside its vocabulary, the same <image> id)."""
    from dsocr.language.tokenizer import byte_tokenizer

    try:
        if cfg.tokenizer:
            tok = Tokenizer.from_file(cfg.tokenizer)
        elif start is not None and (start / "tokenizer.json").is_file():
            tok = Tokenizer.from_folder(start)
        else:
            tok = Tokenizer(byte_tokenizer(vocab_size=mcfg.language.vocab_size))
    except (OSError, ValueError) as e:
        raise ConfigError(f"--tokenizer: {e}") from None
    vocab = mcfg.language.vocab_size
    if len(tok) > vocab:
        raise ConfigError(
            f"tokenizer {tok.source or ''} has {len(tok)} tokens, more than the model's vocabulary "
            f"of {vocab} (resize the model with scripts/resize_vocab.py, or another --tokenizer)"
        )
    if tok.image_id != mcfg.image_token_id:
        raise ConfigError(
            f"tokenizer <image> id {tok.image_id} != the model's image_token_id "
            f"{mcfg.image_token_id}"
        )
    return tok


def _plain(v):
    """A JSON-comparable form (tuples as lists, dataclasses as dicts)."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        v = dataclasses.asdict(v)
    return json.loads(json.dumps(v))


def _same_place(a, b) -> bool:
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and Path(a).exists() and Path(b).exists():
        return os.path.realpath(a) == os.path.realpath(b)
    return False


def _show(v) -> str:
    if isinstance(v, list):
        return ",".join(map(str, v)) or '""'
    return "none" if v is None else str(v)


def check_resume(
    cfg: TrainConfig, prev: dict, tok: Tokenizer, world: int, where: Path
) -> tuple[dict, bool]:
    """Compare the settings of a resumed run (its latest/meta.json, ``prev``) with this
    invocation's; returns ({setting: [before, now]} for what changes, whether this invocation
    starts a new phase). Raises ConfigError (one line naming every differing setting and what to
    do instead) for changes that would make the resumed run something else."""
    saved = prev.get("train")
    step = prev.get("step", 0)
    if not isinstance(saved, dict):  # a checkpoint from before the loop recorded its settings
        return {}, cfg.new_phase
    defaults = dataclasses.asdict(TrainConfig())
    fixed = []  # never changeable in place
    if not _same_place(saved.get("model", defaults["model"]), cfg.model):
        fixed.append(f"--model {saved.get('model')} -> {cfg.model}")
    if prev.get("tokenizer_sha256") and prev["tokenizer_sha256"] != tok.sha256:
        fixed.append(
            f"tokenizer sha256 {prev['tokenizer_sha256'][:12]} -> {tok.sha256[:12]} ({tok.source})"
        )
    if prev.get("world_size", world) != world:
        fixed.append(f"processes {prev['world_size']} -> {world}")
    if fixed:
        raise ConfigError(
            f"{where} resumes a run at step {step} whose {'; '.join(fixed)} cannot change in "
            f"place: rerun with its settings, or start a new --out with --model {where}/latest"
        )
    changed = {}
    for name in (*RUN_IDENTITY, *PHASE_SWITCHES):
        before, now = _plain(saved.get(name, defaults[name])), _plain(getattr(cfg, name))
        if before != now:
            changed[name] = [before, now]
    saved_recipe = _plain(DataRecipe.from_meta(prev.get("data_recipe") or {}))
    recipe = _plain(cfg.data)
    for name in recipe:
        if name == "glyph_targets":  # follows --char-loss; adds targets, changes no sample
            continue
        before, now = saved_recipe[name], recipe[name]
        if before != now and not (name == "corpus" and _same_place(before, now)):
            changed["data_" + name] = [before, now]
    new_phase = cfg.new_phase or "schedule_start" in changed
    refused = [k for k in changed if k not in PHASE_SWITCHES]
    if refused and not new_phase:
        diffs = ", ".join(
            f"{_flag(k)} {_show(changed[k][0])} -> {_show(changed[k][1])}" for k in refused
        )
        raise ConfigError(
            f"{where} resumes a run at step {step} trained with other settings: {diffs}; rerun "
            f"with its settings, start a new --out (with --model {where}/latest for its weights), "
            f"or add --new-phase to continue this run from step {step} under the new settings"
        )
    return changed, new_phase and bool(changed)


def _eval_set(train: dict, recipe: dict) -> dict:
    """What the periodic evaluation's pages depend on (a changed one restarts best/)."""
    recipe = {k: v for k, v in _plain(recipe).items() if k != "glyph_targets"}
    sizes = {k: train.get(k) for k in ("seed", "eval_batches")}
    sizes["eval_batch_size"] = train.get("eval_batch_size", train.get("batch_size"))
    return sizes | {"data": recipe}


# --------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------


def train(cfg: TrainConfig, log=print) -> Path:
    """Train until ``cfg.steps`` (or ``stop_at`` / ``max_minutes``); returns the ``latest``
    checkpoint folder. Bad settings raise ConfigError before anything is written."""
    if cfg.char_loss and not cfg.data.glyph_targets:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, glyph_targets=True))
    check_settings(cfg)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = dist_setup(device)
    if device.startswith("cuda") and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    out = Path(cfg.out)
    latest = out / "latest"
    if rank == 0:
        for folder in (latest, out / "best"):
            note = recover_checkpoint(folder)
            if note:
                log(note)
    if world > 1:
        torch.distributed.barrier()
    resume = (latest / "trainer.pt").is_file()
    start = latest if resume else (Path(cfg.model) if Path(cfg.model).exists() else None)
    # (On a resume, --model need not exist any more: it is only compared with the run's.)
    model_cfg = model_config(cfg.model if start is None else start)
    tok = load_tokenizer(cfg, start, model_cfg)
    prev = _read_meta(latest) if resume else {}
    changed, new_phase = check_resume(cfg, prev, tok, world, out) if resume else ({}, False)
    step = int(prev.get("step", 0)) if resume else 0
    if step >= cfg.steps or (cfg.stop_at is not None and step >= cfg.stop_at):
        if rank == 0:
            end = cfg.steps if step >= cfg.steps else cfg.stop_at
            log(f"{latest} is at step {step}, at or past this run's end ({end}): nothing to do")
        if world > 1:
            torch.distributed.destroy_process_group()
        return latest

    torch.manual_seed(cfg.seed)
    try:
        model = load_checkpoint(
            start if start is not None else CONFIGS[cfg.model], device=device, dtype=torch.float32
        )
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    model.train()
    model.model.vision_model.embeddings.patch_embedding.requires_grad_(False)  # unused (spec)
    freeze_parts(model, cfg.freeze)
    params = [p for p in model.parameters() if p.requires_grad]
    vision = {id(p) for p in vision_parameters(model)}
    groups = []
    for is_vision in (False, True):
        for decays in (True, False):
            ps = [p for p in params if (id(p) in vision) == is_vision and (p.ndim >= 2) == decays]
            if ps:
                groups.append(
                    {
                        "params": ps,
                        "weight_decay": cfg.weight_decay if decays else 0.0,
                        "lr_scale": cfg.vision_lr_scale if is_vision else 1.0,
                    }
                )
    opt = torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=cfg.betas,
        fused=device.startswith("cuda") or None,
    )
    if resume:
        state = torch.load(latest / "trainer.pt", map_location=device, weights_only=True)
        # This invocation's settings win over the saved groups' (a phase may change them).
        wanted = [
            {k: g[k] for k in ("lr_scale", "weight_decay", "betas")} for g in opt.param_groups
        ]
        try:
            opt.load_state_dict(state["optimizer"])
        except ValueError:  # another set of trainable parameters (--freeze changed between phases)
            if rank == 0:
                log("optimizer state does not fit the trainable parameters; fresh AdamW moments")
        for g, w in zip(opt.param_groups, wanted):
            g.update(w)
        step = state["step"]
        if rank == 0:
            log(f"resumed from {latest} at step {step}")
            if changed:
                log(
                    ("new phase: " if new_phase else "changed: ")
                    + ", ".join(
                        f"{_flag(k)} {_show(a)} -> {_show(b)}" for k, (a, b) in changed.items()
                    )
                )
    invocation = {
        "step": step,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": git_commit(),
        "run": {k: getattr(cfg, k) for k in RUN_CONTROL},
        "world_size": world,
    }
    if resume:
        invocation |= {"changed": changed, "new_phase": new_phase}
        history = list(prev.get("invocations", []))
    else:
        invocation["model"] = cfg.model
        history = []
        if start is not None:
            src = _read_meta(start)
            invocation["started_from"] = {
                "step": src.get("step"),
                "git_commit": src.get("git_commit"),
                "tokenizer_sha256": src.get("tokenizer_sha256"),
            }
    history.append(invocation)
    run_meta = {"world_size": world, "invocations": history}
    blank = tok.encode(" ")
    step_fn = LossModule(model, cfg.char_loss, blank[0] if len(blank) == 1 else tok.pad_id)
    if world > 1:  # unrouted experts and CLIP's unused patch conv get no gradient some steps
        step_fn = torch.nn.parallel.DistributedDataParallel(step_fn, find_unused_parameters=True)
    # bfloat16 autocast on GPUs with native bf16; float32 on CPU and on older GPUs (T4, V100)
    bf16 = device.startswith("cuda") and default_dtype(device) == torch.bfloat16
    autocast = torch.autocast("cuda", torch.bfloat16) if bf16 else None
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.jsonl"
    if rank == 0 and resume:
        # Steps after the last checkpoint were logged before the interruption and are logged
        # again below: records after this marker supersede them.
        _append_jsonl(log_path, {"event": "resume", "step": step, "changed": changed})
    eval_set = _eval_set(dataclasses.asdict(cfg), dataclasses.asdict(cfg.data))
    best = _read_best(out, eval_set)
    if best is None and (out / "best" / "meta.json").is_file() and rank == 0:
        log(
            "the evaluation pages changed (seed, recipe, --eval-batches/--eval-batch-size): "
            "best/ restarts"
        )
    run_meta["eval_set"] = eval_set
    # Throughput: training time only (data, forward, backward, step), not eval or checkpoints.
    peak = None
    if device.startswith("cuda"):
        peak = bf16_peak_flops(torch.cuda.get_device_name(torch.device(device)))
    flops_per_sample = None
    t_start = time.time()
    busy, samples_since = 0.0, 0

    batches = StepBatches(
        cfg.data,
        tok,
        model.config,
        start_step=step,
        rank=rank,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
    )
    stream = batch_stream(batches, workers=cfg.workers)
    while step < cfg.steps and (cfg.stop_at is None or step < cfg.stop_at):
        t0 = time.time()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg) * g.get("lr_scale", 1.0)
        batch = next(stream)
        if cfg.input_noise > 0:
            noise_seed = sample_seed(cfg.seed, "input-noise", step, rank, 0) % 2**63
            batch = corrupt_inputs(batch, cfg.input_noise, noise_seed)
        batch = batch_to(batch, device)

        def fwd_bwd(batch=batch):
            with autocast if autocast is not None else _null():
                loss, text_loss, char = step_fn(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            return loss, text_loss, char

        if device.startswith("cuda") and flops_per_sample is None:
            # The invocation's first step, counted: the FLOPs of one sample, forward and backward.
            (loss, text_loss, char), flops = count_flops(fwd_bwd)
            flops_per_sample = flops / cfg.batch_size
        else:
            loss, text_loss, char = fwd_bwd()
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        step += 1
        samples_since += cfg.batch_size * world
        loss_v = float(all_reduce_mean(loss.detach().float(), world))
        busy += time.time() - t0

        if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
            rate = samples_since / max(busy, 1e-9)
            share = None
            if peak is not None and flops_per_sample is not None:
                share = round(flops_per_sample * rate / (peak * world), 5)
            rec = {
                "step": step,
                "loss": round(loss_v, 5),
                **({"text_loss": round(float(text_loss.detach()), 5)} if char is not None else {}),
                **({"char_loss": round(float(char.detach()), 5)} if char is not None else {}),
                "lr": lr_at(step - 1, cfg),
                "grad_norm": round(float(gnorm), 4),
                "samples_per_s": round(rate, 3),
                "bf16_peak_share": share,
                **({"flops_per_sample": flops_per_sample} if flops_per_sample else {}),
                "elapsed_s": round(time.time() - t_start, 1),
            }
            _append_jsonl(log_path, rec)
            log(json.dumps(rec))
            busy, samples_since = 0.0, 0

        out_of_time = cfg.max_minutes is not None and time.time() - t_start > 60 * cfg.max_minutes
        out_of_time = out_of_time or (cfg.stop_at is not None and step >= cfg.stop_at)
        if step % cfg.eval_every == 0 or step == cfg.steps or out_of_time:
            ev, ev_shuffled = evaluate(model, tok, cfg, device, autocast)
            if rank == 0:
                rec = {"step": step, "eval_loss": round(ev, 5)}
                rec["eval_loss_shuffled_images"] = round(ev_shuffled, 5)
                _append_jsonl(log_path, rec)
                log(
                    f"step {step}: eval loss {ev:.4f} ({ev_shuffled:.4f} with the batch's images "
                    "rotated: the gap is what reading is worth)"
                )
                if best is None or ev < best:
                    best = ev
                    save_training_state(
                        out / "best", model, tok, opt, step, cfg, {"eval_loss": ev, **run_meta}
                    )
        if rank == 0 and (step % cfg.save_every == 0 or step == cfg.steps or out_of_time):
            save_training_state(
                latest, model, tok, opt, step, cfg, {"train_loss": loss_v, **run_meta}
            )
        if world > 1:
            torch.distributed.barrier()
        if out_of_time:
            if rank == 0:
                log(f"stopping at step {step} (--stop-at / --max-minutes); rerun to resume")
            break
    if world > 1:
        torch.distributed.destroy_process_group()
    return latest


def rotate_images(images: list) -> list:
    """Each image replaced by the next one with the same token count (so prompts still fit);
    an image alone in its token count stays."""
    out = list(images)
    groups: dict[int, list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(im.num_tokens, []).append(i)
    for idx in groups.values():
        for a, b in zip(idx, idx[1:] + idx[:1]):
            out[a] = images[b]
    return out


@torch.no_grad()
def evaluate(model, tok, cfg: TrainConfig, device, autocast) -> tuple[float, float]:
    """Mean loss on a fixed set of held-out batches (``cfg.eval_batches`` of
    ``cfg.eval_batch_size`` pages, the same at every evaluation and for any --batch-size), and the same with each sample
    given another sample's image (:func:`rotate_images`).

    Equal losses mean the decoder ignores the image: the encoder has collapsed or the decoder has
    not learned to read yet.
    """
    was_training = model.training
    model.eval()
    losses, rotated = [], []
    for i in range(cfg.eval_batches):
        batch = make_batch(
            cfg.data,
            tok,
            model.config,
            step=i,
            rank=0,
            batch_size=cfg.eval_batch_size,
            seed=cfg.seed + 1_000_003,
            split="heldout",
            device=device,
        )
        with autocast if autocast is not None else _null():
            losses.append(float(loss_on(model, batch)))
            batch.images = rotate_images(batch.images)
            rotated.append(float(loss_on(model, batch)))
    model.train(was_training)
    return sum(losses) / len(losses), sum(rotated) / len(rotated)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _append_jsonl(path: Path, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def _read_best(out: Path, eval_set: dict | None = None) -> float | None:
    """best/'s eval loss, or None when there is none or its evaluation pages were other ones."""
    meta = _read_meta(out / "best")
    if not meta:
        return None
    saved = meta.get("eval_set")
    if saved is None and "train" in meta:  # written before eval_set was recorded
        saved = _eval_set(meta["train"], meta.get("data_recipe") or {})
        saved["data"] = _plain(DataRecipe.from_meta(meta.get("data_recipe") or {}))
        saved["data"].pop("glyph_targets", None)
    if eval_set is not None and saved is not None and _plain(saved) != _plain(eval_set):
        return None
    return meta.get("eval_loss")


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------

HELP = {
    "model": "variant (tiny, mini-cpu, mini, deepseek-ocr) or a checkpoint folder to start from",
    "out": "run folder: latest/, best/, log.jsonl; rerunning resumes it",
    "tokenizer": "tokenizer.json (default: the start folder's, else a byte tokenizer)",
    "steps": "length of the lr schedule and of the run",
    "batch_size": "samples per step and process",
    "lr": "peak learning rate (AdamW)",
    "min_lr_ratio": "the cosine ends at lr * this",
    "warmup": "linear warmup steps",
    "schedule_start": "step where warmup + cosine start (a warm restart; starts a new phase)",
    "freeze": "comma list of parts kept fixed: sam, clip, decoder",
    "vision_lr_scale": "learning-rate multiplier of SAM, CLIP and the projector",
    "char_loss": "weight of the per-vision-token character loss (0: off)",
    "input_noise": "share of decoder input text tokens replaced at random (0: off)",
    "seed": "seed of the weights and of the data stream",
    "eval_batches": "held-out batches per evaluation",
    "eval_batch_size": "pages per held-out batch (not tied to --batch-size)",
    "max_minutes": "stop with a checkpoint after this much wall time",
    "stop_at": "stop with a checkpoint at this step (a phase's end)",
    "device": "cpu or cuda (default: cuda if available)",
    "workers": "data-loader processes (0: build batches inline)",
    "new_phase": "resume --out under changed seed, batch size, recipe or lr schedule",
    "data_corpus": "corpus folder with train/heldout .jsonl[.gz] (default: a built-in toy set)",
    "data_langs": "comma list of corpus languages (default: all)",
    "data_modes": "comma list of resolution modes (tiny, small, base, ...)",
    "data_min_chars": "shortest passage drawn, in characters",
    "data_max_chars": "longest passage drawn, in characters",
    "data_font_sizes": "comma list of font sizes in px",
    "data_fonts": "comma list of font families: sans, serif, mono",
    "data_max_target_tokens": "longer targets are cut and trained without EOS",
    "data_pdf_share": "share of training pages that are real PDF pages (scripts/build_pdf_pages.py)",
    "data_pdf_index": "PDF page index (default: <corpus>/pdf_pages.jsonl)",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, through main's ConfigError handling (exit status 2)
        raise ConfigError(message)


def parse_bool(text: str) -> bool:
    t = str(text).strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (true/false, 1/0, yes/no)")


parse_bool.__name__ = "boolean"  # argparse names the type in its message


def _arg_type(f: dataclasses.Field, default):
    """The argparse type of a dataclass field, from its default or its annotation."""
    if isinstance(default, bool):
        return parse_bool
    if default is not None:
        return type(default)
    ann = str(f.type)
    return int if "int" in ann else float if "float" in ann else str


def parse_args(argv: list[str] | None) -> TrainConfig:
    """argv -> TrainConfig; a bad value raises ConfigError (one line)."""
    p = _Parser(
        prog="python -m dsocr.train.loop",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("data", "freeze", "betas"):
            continue
        flag = _flag(f.name)
        default = getattr(defaults, f.name)
        if f.name == "new_phase":
            p.add_argument(flag, action="store_true", help=HELP[f.name])
            continue
        p.add_argument(flag, type=_arg_type(f, default), default=default, help=HELP.get(f.name))
    p.add_argument("--freeze", default="", help=HELP["freeze"])
    for f in dataclasses.fields(DataRecipe):
        default = getattr(defaults.data, f.name)
        flag, help_ = "--data-" + f.name.replace("_", "-"), HELP.get("data_" + f.name)
        if isinstance(default, tuple):
            p.add_argument(flag, default=",".join(map(str, default)), help=help_)
        else:
            p.add_argument(flag, type=_arg_type(f, default), default=default, help=help_)
    a = vars(p.parse_args(argv))
    data_kwargs = {}
    for f in dataclasses.fields(DataRecipe):
        v = a.pop("data_" + f.name)
        default = getattr(defaults.data, f.name)
        if isinstance(default, tuple):
            conv = type(default[0]) if default else str
            try:
                v = tuple(conv(x.strip()) for x in str(v).split(",") if x.strip())
            except ValueError:
                raise ConfigError(
                    f"--data-{f.name.replace('_', '-')} {v}: expected a comma list of "
                    f"{conv.__name__}"
                ) from None
        data_kwargs[f.name] = v
    freeze = tuple(x.strip() for x in a.pop("freeze").split(",") if x.strip())
    return TrainConfig(**a, freeze=freeze, data=DataRecipe(**data_kwargs))


def main(argv: list[str] | None = None) -> int:
    try:
        train(parse_args(argv))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
