"""The training loop: resumable, seeded, single-process or DDP under ``torchrun``.

After nanochat's base_train (one config dataclass, a thin ``main(argv)``) and the DeepSeek-OCR
recipe (paper §3.5): AdamW with linear warmup then cosine decay, gradient clipping, bfloat16
autocast on GPU (float32 on CPU, which has no bf16 units here), and optional freezing of SAM and the
16x compressor (the paper's stage 2 treats them as a frozen "vision tokenizer").

Checkpoints use the official folder layout (``dsocr.weights.save_checkpoint``) plus ``meta.json``
(config, tokenizer hash, data recipe, step, git commit) and ``trainer.pt`` (optimizer state), written
to a temporary folder and renamed, so an interrupted run never leaves a half-written checkpoint.

Determinism: the batch for step s is a pure function of (seed, s, rank) (see ``train/data.py``), so a
run stopped at any checkpoint and resumed reaches the same weights as an uninterrupted run.

Usage::

    python -m dsocr.train.loop --model tiny --steps 20 --out runs/smoke          # CPU smoke test
    torchrun --nproc_per_node 8 -m dsocr.train.loop --model mini --steps 20000 --batch-size 64 \\
        --corpus data/corpus --out runs/mini --max-minutes 8                      # resumable chunks
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

from dsocr.configs import CONFIGS
from dsocr.language.tokenizer import Tokenizer
from dsocr.model import DeepseekOCRForCausalLM
from dsocr.train.data import (
    Batch,
    DataRecipe,
    StepBatches,
    batch_stream,
    batch_to,
    make_batch,
    sample_seed,
)
from dsocr.weights import load_checkpoint, save_checkpoint


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
    save_every: int = 200
    max_minutes: float | None = None  # stop with a checkpoint after this much wall time
    stop_at: int | None = None  # stop with a checkpoint at this step (a phase's end; the lr
    # schedule still runs over ``steps``)
    device: str | None = None
    workers: int = 0  # data-loader processes building batches ahead of the model (0: inline)
    data: DataRecipe = field(default_factory=DataRecipe)


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


def save_training_state(
    folder: Path, model, tok: Tokenizer, opt, step: int, cfg: TrainConfig, extra: dict
) -> None:
    """Write a full checkpoint to ``folder`` atomically (temp folder, then rename)."""
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
    torch.save({"optimizer": opt.state_dict(), "step": step}, tmp / "trainer.pt")
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def _load_tokenizer(cfg: TrainConfig, start: Path | None) -> Tokenizer:
    from dsocr.language.tokenizer import byte_tokenizer

    if cfg.tokenizer:
        return Tokenizer.from_file(cfg.tokenizer)
    if start is not None and (start / "tokenizer.json").is_file():
        return Tokenizer.from_folder(start)
    return Tokenizer(byte_tokenizer(vocab_size=CONFIGS[cfg.model].language.vocab_size))


# --------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------


def train(cfg: TrainConfig, log=print) -> Path:
    """Train until ``cfg.steps`` (or ``max_minutes``); returns the ``latest`` checkpoint folder."""
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.char_loss and not cfg.data.glyph_targets:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, glyph_targets=True))
    rank, world = dist_setup(device)
    if device.startswith("cuda") and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    out = Path(cfg.out)
    latest = out / "latest"
    resume = (latest / "trainer.pt").is_file()
    start = latest if resume else (Path(cfg.model) if Path(cfg.model).exists() else None)
    tok = _load_tokenizer(cfg, start)
    torch.manual_seed(cfg.seed)
    if start is not None:
        model = load_checkpoint(start, device=device, dtype=torch.float32)
    else:
        model = load_checkpoint(CONFIGS[cfg.model], device=device, dtype=torch.float32)
    assert tok.image_id == model.config.image_token_id, (
        f"tokenizer <image> id {tok.image_id} != model image_token_id {model.config.image_token_id}"
    )
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
    step = 0
    if resume:
        state = torch.load(latest / "trainer.pt", map_location=device, weights_only=True)
        scales = [g["lr_scale"] for g in opt.param_groups]
        try:
            opt.load_state_dict(state["optimizer"])
        except ValueError:  # another set of trainable parameters (--freeze changed between phases)
            if rank == 0:
                log("optimizer state does not fit the trainable parameters; fresh AdamW moments")
        for g, scale in zip(opt.param_groups, scales):  # this run's --vision-lr-scale wins
            g["lr_scale"] = scale
        step = state["step"]
        if rank == 0:
            log(f"resumed from {latest} at step {step}")
    blank = tok.encode(" ")
    step_fn = LossModule(model, cfg.char_loss, blank[0] if len(blank) == 1 else tok.pad_id)
    if world > 1:  # unrouted experts and CLIP's unused patch conv get no gradient some steps
        step_fn = torch.nn.parallel.DistributedDataParallel(step_fn, find_unused_parameters=True)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.startswith("cuda") else None
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.jsonl"
    t_start = time.time()
    t_last, samples_since = time.time(), 0
    best = _read_best(out)

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
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg) * g.get("lr_scale", 1.0)
        batch = next(stream)
        if cfg.input_noise > 0:
            noise_seed = sample_seed(cfg.seed, "input-noise", step, rank, 0) % 2**63
            batch = corrupt_inputs(batch, cfg.input_noise, noise_seed)
        batch = batch_to(batch, device)
        with autocast if autocast is not None else _null():
            loss, text_loss, char = step_fn(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        step += 1
        samples_since += cfg.batch_size * world
        loss_v = float(all_reduce_mean(loss.detach().float(), world))

        if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
            dt = time.time() - t_last
            rec = {
                "step": step,
                "loss": round(loss_v, 5),
                **({"text_loss": round(float(text_loss.detach()), 5)} if char is not None else {}),
                **({"char_loss": round(float(char.detach()), 5)} if char is not None else {}),
                "lr": lr_at(step - 1, cfg),
                "grad_norm": round(float(gnorm), 4),
                "samples_per_s": round(samples_since / dt, 3),
                "elapsed_s": round(time.time() - t_start, 1),
            }
            _append_jsonl(log_path, rec)
            log(json.dumps(rec))
            t_last, samples_since = time.time(), 0

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
                    save_training_state(out / "best", model, tok, opt, step, cfg, {"eval_loss": ev})
        if rank == 0 and (step % cfg.save_every == 0 or step == cfg.steps or out_of_time):
            save_training_state(latest, model, tok, opt, step, cfg, {"train_loss": loss_v})
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
    """Mean loss on a fixed set of held-out batches (the same batches at every evaluation), and
    the same with each sample given another sample's image (:func:`rotate_images`).

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
            batch_size=cfg.batch_size,
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


def _read_best(out: Path) -> float | None:
    meta = out / "best" / "meta.json"
    if meta.is_file():
        return json.loads(meta.read_text()).get("eval_loss")
    return None


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def _arg_type(f: dataclasses.Field, default):
    """The argparse type of a dataclass field, from its default or its annotation."""
    if default is not None:
        return type(default)
    ann = str(f.type)
    return int if "int" in ann else float if "float" in ann else str


def parse_args(argv: list[str] | None) -> TrainConfig:
    p = argparse.ArgumentParser(
        prog="python -m dsocr.train.loop",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("data", "freeze", "betas"):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        p.add_argument(flag, type=_arg_type(f, default), default=default)
    p.add_argument("--freeze", default="", help="comma list: sam, clip, decoder")
    for f in dataclasses.fields(DataRecipe):
        default = getattr(defaults.data, f.name)
        if isinstance(default, tuple):
            p.add_argument(
                "--data-" + f.name.replace("_", "-"), default=",".join(map(str, default))
            )
        else:
            p.add_argument(
                "--data-" + f.name.replace("_", "-"), type=_arg_type(f, default), default=default
            )
    a = vars(p.parse_args(argv))
    data_kwargs = {}
    for f in dataclasses.fields(DataRecipe):
        v = a.pop("data_" + f.name)
        default = getattr(defaults.data, f.name)
        if isinstance(default, tuple):
            conv = type(default[0]) if default else str
            v = tuple(conv(x) for x in str(v).split(",") if x)
        data_kwargs[f.name] = v
    freeze = tuple(x for x in a.pop("freeze").split(",") if x)
    return TrainConfig(**a, freeze=freeze, data=DataRecipe(**data_kwargs))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
