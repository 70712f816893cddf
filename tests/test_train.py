"""Training: loss falls and greedy decoding reproduces a toy set; resume == uninterrupted; DDP."""

import dataclasses
import gzip
import hashlib
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TEST_BASE, small_recipe
from PIL import Image

from dsocr.configs import CONFIGS, Mode
from dsocr.language.tokenizer import Tokenizer, byte_tokenizer
from dsocr.model import build_model
from dsocr.train.data import load_corpus, make_batch, recipe_docs
from dsocr.train.loop import TrainConfig, corrupt_inputs, lr_at, train
from dsocr.weights import load_checkpoint, read_state_dict, save_checkpoint

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import build_corpus  # noqa: E402
import resize_vocab  # noqa: E402
import train_tokenizer  # noqa: E402

TOY_MODE = "test-tiny"


def _cfg(tmp_path, **kw):
    base = dict(
        model="tiny",
        out=str(tmp_path / "run"),
        steps=6,
        batch_size=2,
        lr=3e-3,
        warmup=2,
        log_every=1,
        eval_every=3,
        eval_batches=1,
        eval_batch_size=2,
        save_every=3,
        data=small_recipe(),
    )
    return TrainConfig(**(base | kw))


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(lr=1.0, warmup=10, steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)


def test_lr_schedule_warm_restart():
    cfg = TrainConfig(lr=1.0, warmup=10, steps=210, min_lr_ratio=0.1, schedule_start=100)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(109, cfg) == pytest.approx(1.0)
    assert lr_at(160, cfg) == pytest.approx(0.55)
    assert lr_at(210, cfg) == pytest.approx(0.1)


def test_batches_are_a_pure_function_of_step(tiny_cfg):
    from dsocr.language.tokenizer import Tokenizer, byte_tokenizer

    tok = Tokenizer(byte_tokenizer())
    a = make_batch(small_recipe(), tok, tiny_cfg, step=3, rank=0, batch_size=2, seed=1)
    b = make_batch(small_recipe(), tok, tiny_cfg, step=3, rank=0, batch_size=2, seed=1)
    c = make_batch(small_recipe(), tok, tiny_cfg, step=4, rank=0, batch_size=2, seed=1)
    assert torch.equal(a.input_ids, b.input_ids) and a.targets == b.targets
    assert a.targets != c.targets
    # Labels train exactly the target text plus EOS.
    lab = a.labels[0][a.labels[0] != -100].tolist()
    assert lab[-1] == tok.eos_id and tok.decode(lab[:-1]) == a.targets[0]


def test_input_noise_corrupts_only_target_inputs(tiny_cfg):
    tok = Tokenizer(byte_tokenizer())
    batch = make_batch(
        small_recipe(min_chars=60, max_chars=80),
        tok,
        tiny_cfg,
        step=0,
        rank=0,
        batch_size=4,
        seed=2,
    )
    assert corrupt_inputs(batch, 0.0, seed=5) is batch
    noisy = corrupt_inputs(batch, 0.3, seed=5)
    again = corrupt_inputs(batch, 0.3, seed=5)
    assert torch.equal(noisy.input_ids, again.input_ids)  # a resumed run sees the same noise
    assert torch.equal(noisy.labels, batch.labels)
    target = batch.labels != -100
    changed = noisy.input_ids != batch.input_ids
    assert not (changed & ~target).any()  # prompt, image and padding ids are never touched
    share = changed.sum().item() / target.sum().item()
    assert 0.1 < share < 0.35  # about 0.3, less the draws that picked the same id
    # Replacements come from the batch's own target ids.
    assert set(noisy.input_ids[changed].tolist()) <= set(batch.input_ids[target].tolist())


def test_heldout_never_intersects_training(tmp_path):
    groups = [f"handbook/ch{i}" for i in range(400)]
    held = {g for g in groups if build_corpus.is_heldout(g)}
    assert 0 < len(held) < len(groups)
    # Every language version of a held-out chapter is held out: membership is by group.
    rows = [
        {"doc": f"handbook/{lang}/{g.split('/')[1]}", "group": g}
        for g in groups
        for lang in ("en-US", "de-DE", "ja-JP")
    ]
    train = {r["doc"] for r in rows if not build_corpus.is_heldout(r["group"])}
    heldout = {r["doc"] for r in rows if build_corpus.is_heldout(r["group"])}
    assert not train & heldout
    assert {d.split("/")[2] for d in heldout} == {g.split("/")[1] for g in held}
    # The built-in toy corpus keeps its splits apart too (different strings per split order).
    assert load_corpus(None, "train")[0]["text"] != load_corpus(None, "heldout")[0]["text"]


def test_recipe_language_filter(tmp_path):
    rows = [
        {"doc": f"d{i}", "lang": lang, "text": f"text {lang} {i}"} for i, lang in enumerate("aab")
    ]
    for split in ("train", "heldout"):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    assert [r["doc"] for r in recipe_docs(str(tmp_path), "train", ("a",))] == ["d0", "d1"]
    assert len(recipe_docs(str(tmp_path), "train", ())) == 3
    with pytest.raises(ValueError, match="no documents in languages zz"):
        recipe_docs(str(tmp_path), "heldout", ("zz",))
    batch = make_batch(
        small_recipe(corpus=str(tmp_path), langs=("b",)),
        Tokenizer(byte_tokenizer()),
        CONFIGS["tiny"],
        step=0,
        rank=0,
        batch_size=2,
        seed=0,
    )
    assert all(t.startswith("text b") for t in batch.targets)


def test_scrambled_pages_keep_the_words_and_lose_the_order():
    import random

    from dsocr.train.data import make_sample, recipe_docs

    docs = recipe_docs(None, "train")
    kw = dict(min_chars=200, max_chars=200, font_sizes=(12,), page_size=512)
    plain = make_sample(small_recipe(**kw), random.Random(5), docs)
    mixed = make_sample(small_recipe(**kw, scramble_prob=1.0), random.Random(5), docs)
    assert sorted(plain.target.split()) == sorted(mixed.target.split())
    assert plain.target.split() != mixed.target.split()


def test_vision_learning_rate_scale(tmp_path):
    from dsocr.train.loop import vision_parameters

    cfg = _cfg(
        tmp_path, steps=1, batch_size=1, warmup=1, vision_lr_scale=0.25, save_every=1, eval_every=1
    )
    train(cfg, log=lambda *_: None)
    state = torch.load(tmp_path / "run/latest/trainer.pt", weights_only=True)["optimizer"]
    scales = sorted({g["lr_scale"] for g in state["param_groups"]})
    assert scales == [0.25, 1.0]
    lrs = {g["lr_scale"]: g["lr"] for g in state["param_groups"]}
    assert lrs[0.25] == pytest.approx(0.25 * lrs[1.0])
    from dsocr.configs import CONFIGS as C
    from dsocr.model import build_model

    n_vision = len(vision_parameters(build_model(C["tiny"])))
    n_groups = sum(len(g["params"]) for g in state["param_groups"] if g["lr_scale"] == 0.25)
    assert n_groups == n_vision - 1  # all but CLIP's unused patch conv (frozen)
    # Resuming with another scale (a new phase) uses the new scale, not the saved one.
    train(dataclasses.replace(cfg, steps=2, vision_lr_scale=0.5), log=lambda *_: None)
    state = torch.load(tmp_path / "run/latest/trainer.pt", weights_only=True)["optimizer"]
    assert sorted({g["lr_scale"] for g in state["param_groups"]}) == [0.5, 1.0]


def test_rotate_images_keeps_token_counts():
    from types import SimpleNamespace as NS

    from dsocr.train.loop import rotate_images

    ims = [NS(num_tokens=n, k=i) for i, n in enumerate([73, 111, 73, 73, 5])]
    out = rotate_images(ims)
    assert [o.num_tokens for o in out] == [73, 111, 73, 73, 5]
    assert [o.k for o in out] == [2, 1, 3, 0, 4]


def test_stop_at_ends_a_phase_and_the_next_phase_resumes(tmp_path):
    cfg = _cfg(tmp_path, batch_size=1, warmup=1, stop_at=2, save_every=100, eval_every=100)
    train(cfg, log=lambda *_: None)
    meta = json.loads((tmp_path / "run/latest/meta.json").read_text())
    assert meta["step"] == 2
    train(cfg, log=lambda *_: None)  # already at its stop: nothing more
    assert json.loads((tmp_path / "run/latest/meta.json").read_text())["step"] == 2
    train(dataclasses.replace(cfg, stop_at=3), log=lambda *_: None)
    assert json.loads((tmp_path / "run/latest/meta.json").read_text())["step"] == 3


def test_built_corpus_splits_are_disjoint(tmp_path):
    """build_corpus.build end to end on generated HTML chapters in three languages: every
    language version of a chapter lands in the same split, and the files match the manifest."""
    docs = []
    for i in range(60):
        for lang in ("en", "de", "ja"):
            page = tmp_path / "src" / f"ch{i}.{lang}.html"
            page.parent.mkdir(exist_ok=True)
            body = f"<h1>Chapter {i}</h1><p>{lang} text of chapter {i}. " + "word " * 120 + "</p>"
            page.write_text(f"<html><body>{body}<script>skip()</script></body></html>")
            docs.append((f"reference/{lang}/ch{i}", f"reference/ch{i}", lang, "test", page))
    manifest = build_corpus.build(tmp_path / "corpus", docs=docs)
    rows = {}
    for split in ("train", "heldout"):
        lines = (tmp_path / "corpus" / f"{split}.jsonl").read_bytes()
        assert gzip.decompress((tmp_path / "corpus" / f"{split}.jsonl.gz").read_bytes()) == lines
        assert manifest["files"][f"{split}.jsonl"] == hashlib.sha256(lines).hexdigest()
        rows[split] = [json.loads(x) for x in lines.splitlines()]
        assert len(rows[split]) == manifest["documents"][split]
    train = {r["group"] for r in rows["train"]}
    held = {r["group"] for r in rows["heldout"]}
    assert held and train and not train & held and len(train | held) == 60
    assert held == {d[1] for d in docs if build_corpus.is_heldout(d[1])}
    assert len(rows["train"]) + len(rows["heldout"]) == 180
    assert all("skip()" not in r["text"] and "Chapter" in r["text"] for s in rows for r in rows[s])


@pytest.mark.parametrize("noise", [0.0, 0.2])
def test_resume_reaches_the_same_weights(tmp_path, noise):
    full = train(_cfg(tmp_path / "a", input_noise=noise), log=lambda *_: None)
    # Interrupted: stop at a checkpoint (step 3), then rerun the same command to finish.
    cfg_b = _cfg(tmp_path / "b", input_noise=noise)
    train(TrainConfig(**{**cfg_b.__dict__, "steps": 6, "max_minutes": 0.0}), log=lambda *_: None)
    meta = json.loads((tmp_path / "b" / "run" / "latest" / "meta.json").read_text())
    assert meta["step"] == 1  # stopped early, checkpoint written
    resumed = train(cfg_b, log=lambda *_: None)
    a, b = read_state_dict(full), read_state_dict(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    log = [json.loads(x) for x in open(tmp_path / "b" / "run" / "log.jsonl")]
    assert any("eval_loss" in r for r in log)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),  # a fixed port collides with another run of the suite
        "-m",
        "dsocr.train.loop",
        "--model",
        "tiny",
        "--out",
        str(out),
        "--steps",
        "3",
        "--batch-size",
        "1",
        "--warmup",
        "1",
        "--eval-every",
        "3",
        "--eval-batches",
        "1",
        "--save-every",
        "3",
        "--log-every",
        "1",
        "--data-modes",
        "tiny",
        "--data-page-size",
        "128",
        "--data-min-chars",
        "8",
        "--data-max-chars",
        "24",
        "--data-font-sizes",
        "40",
        "--data-scan-prob",
        "0",
        "--device",
        "cpu",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    meta = json.loads((out / "latest" / "meta.json").read_text())
    assert meta["step"] == 3
    logged = [json.loads(x) for x in open(out / "log.jsonl") if "samples_per_s" in x]
    assert logged and logged[-1]["samples_per_s"] > 0


def test_worker_stream_equals_inline_batches(tiny_cfg):
    from dsocr.language.tokenizer import Tokenizer, byte_tokenizer
    from dsocr.train.data import StepBatches, batch_stream

    tok = Tokenizer(byte_tokenizer())
    batches = StepBatches(small_recipe(), tok, tiny_cfg, start_step=5, rank=0, batch_size=2, seed=3)
    inline = batch_stream(batches)
    pooled = batch_stream(batches, workers=2)
    for _ in range(4):
        a, b = next(inline), next(pooled)
        assert a.targets == b.targets and torch.equal(a.input_ids, b.input_ids)
        torch.testing.assert_close(a.images[0].global_view, b.images[0].global_view)


def test_tiny_model_learns_to_read_two_rendered_strings(tmp_path):
    """The loss falls, and greedy decoding then tells the two pages apart by their pixels."""
    from dsocr.api import load_model
    from dsocr.engine.generate import generate_greedy

    corpus = tmp_path / "toy"
    corpus.mkdir()
    rows = "".join(json.dumps({"doc": str(i), "text": t}) + "\n" for i, t in enumerate(TOY))
    for split in ("train", "heldout"):
        (corpus / f"{split}.jsonl").write_text(rows)
    recipe = small_recipe(
        corpus=str(corpus), min_chars=50, max_chars=60, font_sizes=(36,), modes=(TEST_BASE,)
    )  # 128 px views: 7 image tokens, cheap to train
    cfg = _cfg(
        tmp_path,
        steps=800,
        batch_size=8,
        lr=2e-3,
        warmup=20,
        log_every=20,
        eval_every=800,
        save_every=800,
        data=recipe,
    )
    train(cfg, log=lambda *_: None)
    losses = [json.loads(x)["loss"] for x in open(tmp_path / "run" / "log.jsonl") if '"loss"' in x]
    assert max(losses[-3:]) < losses[0] / 20, losses
    ocr = load_model(tmp_path / "run" / "latest", device="cpu")
    batch = make_batch(
        recipe, ocr.tokenizer, ocr.model.config, step=10_000, rank=0, batch_size=4, seed=7
    )
    assert set(batch.targets) == set(TOY)  # both strings, drawn in unseen random layouts
    prompts = [
        ids[: int((lab != -100).nonzero()[0])].tolist()
        for ids, lab in zip(batch.input_ids, batch.labels)
    ]
    with torch.no_grad():
        embeds = ocr.model.encode_images(batch.images)
        out = generate_greedy(
            ocr.model, prompts, embeds, max_new_tokens=12, eos_id=ocr.tokenizer.eos_id
        )
    decoded = [ocr.tokenizer.decode([t for t in o if t != ocr.tokenizer.eos_id]) for o in out]
    assert decoded == batch.targets


TOY = ["il il", "WMW MWM"]  # different ink, so a tiny encoder separates them quickly


def test_resize_vocab_keeps_every_other_weight(tmp_path):
    src = load_checkpoint("tiny")
    save_checkpoint(src, tmp_path / "src")
    tok = Tokenizer(byte_tokenizer("the cat sat on the mat " * 20, vocab_size=290))
    tok_path = tok.save(tmp_path / "tok")
    out = tmp_path / "out"
    assert (
        resize_vocab.main([str(tmp_path / "src"), "--tokenizer", str(tok_path), "--out", str(out)])
        == 0
    )
    new = load_checkpoint(out)
    assert new.config.language.vocab_size == len(tok) != src.config.language.vocab_size
    assert Tokenizer.from_folder(out).sha256 == tok.sha256
    old_sd, new_sd = src.state_dict(), new.state_dict()
    for k, v in new_sd.items():
        if k in resize_vocab.RESIZED:
            assert v.shape[0] == len(tok)
        else:
            assert torch.equal(v, old_sd[k]), k


def test_cell_targets_name_the_characters_of_each_cell():
    from dsocr.train.data import Sample, cell_targets
    from dsocr.vision.preprocess import preprocess_image

    cfg = CONFIGS["tiny"]
    tok = Tokenizer(byte_tokenizer(vocab_size=cfg.language.vocab_size))
    ppt = cfg.sam.pixels_per_token
    image = Image.new("RGB", (4 * ppt, 4 * ppt), "white")  # a 4 x 4 token grid (no resize)
    glyphs = [("a", 10, 10), ("b", 20, 12), ("a", ppt + 5, 3 * ppt + 1), ("é", 5, 5)]
    sample = Sample(image, "", "ab a", "x", glyphs)
    inputs = preprocess_image(image, Mode("x", 4 * ppt, 4 * ppt))
    t = cell_targets(sample, tok, inputs, ppt)
    (a,), (b,) = tok.encode("a"), tok.encode("b")
    assert t.shape == (16, len(tok))
    assert t[0, a] == t[0, b] == 1 and t[0].sum() == 2  # "é" is two byte tokens: skipped
    assert t[3 * 4 + 1, a] == 1 and t.sum() == 3


def test_character_loss_trains_and_is_logged(tmp_path):
    from dsocr.train.loop import LossModule, char_loss

    cfg = _cfg(tmp_path, steps=8, char_loss=0.5, eval_every=100, save_every=100)
    train(cfg, log=lambda *_: None)
    log = [json.loads(x) for x in open(tmp_path / "run" / "log.jsonl") if '"char_loss"' in x]
    assert len(log) == 8
    first, last = log[0], log[-1]
    assert last["char_loss"] < first["char_loss"]
    assert first["loss"] == pytest.approx(first["text_loss"] + 0.5 * first["char_loss"], rel=1e-4)
    # Off by default: no glyph targets, and the total is the text loss.
    model = build_model(CONFIGS["tiny"])
    tok = Tokenizer(byte_tokenizer(vocab_size=CONFIGS["tiny"].language.vocab_size))
    batch = make_batch(small_recipe(), tok, model.config, step=0, rank=0, batch_size=2, seed=0)
    assert batch.cell_targets is None
    total, text, char = LossModule(model)(batch)
    assert char is None and torch.equal(total, text)
    batch = make_batch(
        small_recipe(glyph_targets=True), tok, model.config, step=0, rank=0, batch_size=2, seed=0
    )
    embeds = model.encode_images(batch.images)
    t = math.isqrt(batch.cell_targets.shape[1])
    assert embeds[0].shape[0] == t * (t + 1) + 1  # rows + newlines + separator
    assert torch.isfinite(char_loss(model, embeds, batch.cell_targets, tok.encode(" ")[0]))


def test_loss_under_bf16_autocast_matches_fp32(tiny_cfg):
    """The GPU trains under bf16 autocast (never run here): the same losses, emulated with CPU
    autocast, must run, backpropagate into the encoder and stay close to float32."""
    from dsocr.train.loop import LossModule

    model = build_model(tiny_cfg)
    tok = Tokenizer(byte_tokenizer(vocab_size=tiny_cfg.language.vocab_size))
    recipe = small_recipe(glyph_targets=True)
    batch = make_batch(recipe, tok, model.config, step=0, rank=0, batch_size=2, seed=0)
    step = LossModule(model, char_weight=1.0, blank_id=tok.encode(" ")[0])
    with torch.no_grad():
        ref = [float(x) for x in step(batch)]
    with torch.autocast("cpu", torch.bfloat16):
        total, text, char = step(batch)
    total.backward()
    for got, want in zip((total, text, char), ref):
        assert torch.isfinite(got) and abs(float(got.detach()) - want) < 0.05 * want
    sam_grads = [p.grad for p in model.model.sam_model.parameters() if p.grad is not None]
    assert sam_grads and all(torch.isfinite(g).all() for g in sam_grads)


# --------------------------------------------------------------------------------------------------
# audit fixes (2026-12-04): resume compatibility, checkpoint recovery, argument errors, logging
# --------------------------------------------------------------------------------------------------


def _quiet(*_):
    pass


def _phase_cfg(tmp_path, **kw):
    return _cfg(tmp_path, batch_size=1, warmup=1, save_every=100, eval_every=100, **kw)


def _meta(tmp_path, name="latest"):
    return json.loads((tmp_path / "run" / name / "meta.json").read_text())


def test_resume_refuses_changes_that_make_another_run(tmp_path, capsys):
    from dsocr.train.loop import ConfigError, main

    cfg = _phase_cfg(tmp_path, stop_at=2)
    train(cfg, log=_quiet)
    changed = dataclasses.replace(
        cfg, lr=0.5, seed=7, batch_size=2, data=dataclasses.replace(cfg.data, font_sizes=(20,))
    )
    with pytest.raises(ConfigError) as e:
        train(changed, log=_quiet)
    msg = str(e.value)
    assert "\n" not in msg and "--new-phase" in msg and "new --out" in msg
    for part in (
        "--lr 0.003 -> 0.5",
        "--seed 0 -> 7",
        "--batch-size 1 -> 2",
        "--data-font-sizes 40 -> 20",
    ):
        assert part in msg, msg
    with pytest.raises(ConfigError, match="--model tiny -> mini-cpu"):
        train(dataclasses.replace(cfg, model="mini-cpu"), log=_quiet)
    other = Tokenizer(byte_tokenizer("the cat sat on the mat " * 20, vocab_size=290))
    tok_path = other.save(tmp_path / "tok")
    with pytest.raises(ConfigError, match="tokenizer sha256"):
        train(dataclasses.replace(cfg, tokenizer=str(tok_path)), log=_quiet)
    assert _meta(tmp_path)["step"] == 2  # nothing was trained or written by the refusals
    # The command line says it in one line, exit status 2.
    argv = ["--model", "tiny", "--out", str(tmp_path / "run"), "--steps", "6", "--batch-size", "1"]
    argv += ["--lr", "0.5", "--data-modes", "tiny", "--data-page-size", "128", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--lr 0.003 -> 0.5" in err


def test_resume_allows_run_control_and_records_every_invocation(tmp_path):
    cfg = _phase_cfg(tmp_path, stop_at=2)
    train(cfg, log=_quiet)
    # Run control and phase switches may change; the new weight decay is really used.
    logs = []
    more = dataclasses.replace(cfg, stop_at=3, max_minutes=50.0, log_every=2, weight_decay=0.2)
    train(more, log=logs.append)
    assert any("resumed from" in str(x) and "at step 2" in str(x) for x in logs)
    meta = _meta(tmp_path)
    assert meta["step"] == 3 and meta["train"]["weight_decay"] == 0.2
    inv = meta["invocations"]
    assert [i["step"] for i in inv] == [0, 2]
    assert inv[0]["run"]["stop_at"] == 2 and inv[1]["run"]["stop_at"] == 3
    assert inv[1]["changed"] == {"weight_decay": [0.05, 0.2]} and not inv[1]["new_phase"]
    state = torch.load(tmp_path / "run/latest/trainer.pt", weights_only=True)["optimizer"]
    assert {g["weight_decay"] for g in state["param_groups"]} == {0.2, 0.0}
    # A new phase in place: --new-phase lets the recipe change, and says so in meta and the log.
    phase = dataclasses.replace(
        more, stop_at=4, new_phase=True, data=dataclasses.replace(cfg.data, font_sizes=(36,))
    )
    train(phase, log=_quiet)
    meta = _meta(tmp_path)
    assert meta["step"] == 4 and meta["data_recipe"]["font_sizes"] == [36]
    assert meta["invocations"][-1]["new_phase"] is True
    assert meta["invocations"][-1]["changed"] == {"data_font_sizes": [[40], [36]]}
    # So does a warm restart (a new --schedule-start), the documented later phase.
    restart = dataclasses.replace(phase, stop_at=5, new_phase=False, schedule_start=4, lr=1e-3)
    train(restart, log=_quiet)
    assert _meta(tmp_path)["invocations"][-1]["new_phase"] is True
    log = [json.loads(x) for x in open(tmp_path / "run" / "log.jsonl")]
    resumes = [r for r in log if r.get("event") == "resume"]
    assert [r["step"] for r in resumes] == [2, 3, 4]


def test_phase_from_a_checkpoint_into_a_new_out(tmp_path):
    """The documented phase workflow: --model <checkpoint folder> into a new --out, with another
    recipe, seed and schedule; its history says where it started."""
    train(_phase_cfg(tmp_path / "a", stop_at=2), log=_quiet)
    src = tmp_path / "a" / "run" / "latest"
    cfg = _phase_cfg(tmp_path / "b", model=str(src), seed=3, lr=1e-3, stop_at=1)
    train(
        dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, font_sizes=(36,))), log=_quiet
    )
    inv = _meta(tmp_path / "b")["invocations"]
    assert len(inv) == 1 and inv[0]["model"] == str(src) and inv[0]["started_from"]["step"] == 2


def test_interrupted_checkpoint_swap_is_recovered(tmp_path):
    import shutil

    cfg = _phase_cfg(tmp_path, stop_at=2)
    train(cfg, log=_quiet)
    run = tmp_path / "run"
    # Killed after latest -> latest.old, with a complete latest.tmp: the rerun finishes the swap.
    shutil.copytree(run / "latest", run / "latest.tmp")
    (run / "latest").rename(run / "latest.old")
    logs = []
    train(dataclasses.replace(cfg, stop_at=3), log=logs.append)
    assert any("at step 2" in str(x) for x in logs), logs
    assert not (run / "latest.old").exists() and not (run / "latest.tmp").exists()
    # Killed with an incomplete latest.tmp and latest renamed away: latest.old comes back.
    (run / "latest").rename(run / "latest.old")
    (run / "latest.tmp").mkdir()
    (run / "latest.tmp" / "config.json").write_text("{}")
    logs = []
    train(dataclasses.replace(cfg, stop_at=4), log=logs.append)
    assert any("at step 3" in str(x) for x in logs), logs
    assert _meta(tmp_path)["step"] == 4 and not (run / "latest.tmp").exists()


def test_recover_checkpoint_prefers_the_newest_complete_folder(tmp_path):
    from dsocr.train.loop import recover_checkpoint

    def ckpt(path, step):
        path.mkdir()
        for name in ("config.json", "trainer.pt"):
            (path / name).write_text("x")
        (path / "meta.json").write_text(json.dumps({"step": step}))

    best = tmp_path / "best"
    ckpt(best, 1)
    assert recover_checkpoint(best) is None  # nothing interrupted
    ckpt(tmp_path / "best.tmp", 2)  # complete but not yet swapped in: the newer one wins
    assert recover_checkpoint(best)
    assert json.loads((best / "meta.json").read_text())["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_over_long_targets_are_cut_without_eos(tiny_cfg):
    tok = Tokenizer(byte_tokenizer())
    recipe = small_recipe(min_chars=4, max_chars=24)
    full = make_batch(recipe, tok, tiny_cfg, step=0, rank=0, batch_size=6, seed=1)
    cut = make_batch(
        dataclasses.replace(recipe, max_target_tokens=8),
        tok,
        tiny_cfg,
        step=0,
        rank=0,
        batch_size=6,
        seed=1,
    )
    assert cut.targets == full.targets  # the same pages: only long targets' labels change
    lengths = [len(tok.encode(t)) for t in cut.targets]
    assert min(lengths) <= 8 < max(lengths)
    for i, n in enumerate(lengths):
        lab = cut.labels[i][cut.labels[i] != -100].tolist()
        want = tok.encode(cut.targets[i])
        if n > 8:  # cut: the kept prefix is trained, and no EOS, since the page goes on
            assert lab == want[:8] and cut.truncated[i]
        else:  # fits: unchanged, EOS and all
            assert lab == want + [tok.eos_id] and not cut.truncated[i]
            assert torch.equal(cut.labels[i], full.labels[i][: cut.labels.shape[1]])


@pytest.fixture()
def toy_corpus(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rows = "".join(
        json.dumps({"doc": str(i), "lang": "en", "text": t}) + "\n" for i, t in enumerate(TOY)
    )
    for split in ("train", "heldout"):
        (corpus / f"{split}.jsonl").write_text(rows)
    return corpus


def _bad_argv_cases(tmp_path, corpus):
    only_train = tmp_path / "only-train"
    only_train.mkdir()
    (only_train / "train.jsonl").write_text((corpus / "train.jsonl").read_text())
    big = Tokenizer(byte_tokenizer(" ".join(f"w{i}x{i * 7}" for i in range(3000)), vocab_size=400))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (tmp_path / "afile").write_text("x")
    return {
        "corpus missing": ["--data-corpus", str(tmp_path / "nope")],
        "no held-out split": ["--data-corpus", str(only_train)],
        "tokenizer missing": ["--tokenizer", str(tmp_path / "nope.json")],
        "tokenizer too big": ["--tokenizer", str(big.save(tmp_path / "big"))],
        "batch size 0": ["--batch-size", "0"],
        "negative lr": ["--lr", "-1"],
        "out is a file": ["--out", str(tmp_path / "afile")],
        "unknown freeze": ["--freeze", "sam,bogus"],
        "unknown model": ["--model", "mnii"],
        "broken model": ["--model", str(broken)],
        "eval every 0": ["--eval-every", "0"],
        "log every 0": ["--log-every", "0"],
        "min over max": ["--data-min-chars", "50", "--data-max-chars", "10"],
        "unknown mode": ["--data-modes", "bogus"],
        "unknown font": ["--data-fonts", "comic"],
        "unknown language": ["--data-corpus", str(corpus), "--data-langs", "zz"],
        "zero steps": ["--steps", "0"],
        "too many workers": ["--workers", "4096"],
        "bad int list": ["--data-font-sizes", "20,x"],
        "bad bool": ["--data-glyph-targets", "maybe"],
        "unknown flag": ["--bogus", "1"],
        "bad number": ["--lr", "fast"],
    }


BAD_ARGV = [
    "corpus missing", "no held-out split", "tokenizer missing", "tokenizer too big",
    "batch size 0", "negative lr", "out is a file", "unknown freeze", "unknown model",
    "broken model", "eval every 0", "log every 0", "min over max", "unknown mode", "unknown font",
    "unknown language", "zero steps", "too many workers", "bad int list", "bad bool",
    "unknown flag", "bad number",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_ARGV)
def test_bad_arguments_are_one_line_errors_before_anything_is_made(
    tmp_path, toy_corpus, capsys, monkeypatch, case
):
    import dsocr.train.loop as loop

    built = []
    monkeypatch.setattr(loop, "load_checkpoint", lambda *a, **k: built.append(a) or 1 / 0)
    out = tmp_path / "run"
    base = ["--model", "tiny", "--out", str(out), "--steps", "2", "--device", "cpu"]
    assert loop.main(base + _bad_argv_cases(tmp_path, toy_corpus)[case]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not out.exists() and not built


def test_boolean_options_parse_their_value():
    from dsocr.train.loop import parse_args

    assert parse_args(["--data-glyph-targets", "False"]).data.glyph_targets is False
    assert parse_args(["--data-glyph-targets", "0"]).data.glyph_targets is False
    assert parse_args(["--data-glyph-targets", "true"]).data.glyph_targets is True
    assert parse_args([]).data.glyph_targets is False and parse_args([]).new_phase is False
    assert parse_args(["--new-phase"]).new_phase is True


def test_help_names_the_real_flags(capsys):
    from dsocr.train.loop import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    assert "--data-corpus data/corpus" in text and " --corpus " not in text
    assert "peak learning rate" in text and "--new-phase" in text


def test_throughput_excludes_eval_and_bf16_share_is_null_on_cpu(tmp_path, monkeypatch):
    import time

    import dsocr.train.loop as loop

    def slow_eval(*a, **k):
        time.sleep(1.5)
        return 1.0, 1.0

    monkeypatch.setattr(loop, "evaluate", slow_eval)
    train(_cfg(tmp_path, steps=3, eval_every=1, save_every=100), log=_quiet)
    recs = [json.loads(x) for x in open(tmp_path / "run" / "log.jsonl") if "samples_per_s" in x]
    assert len(recs) == 3
    assert min(r["samples_per_s"] for r in recs[1:]) > 2.0, recs  # 2 samples per step
    assert all(r["bf16_peak_share"] is None for r in recs)  # CPU: no bf16 peak to compare with


def test_bf16_peak_table_and_flop_count():
    from dsocr.train.loop import bf16_peak_flops, count_flops

    assert bf16_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert bf16_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert bf16_peak_flops("NVIDIA H200") == 989e12
    assert bf16_peak_flops("NVIDIA L40S") == 362e12 and bf16_peak_flops("NVIDIA L4") == 121e12
    assert bf16_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert bf16_peak_flops("NVIDIA GeForce GTX 1080") is None  # unknown: no share, no guess
    a, b = torch.randn(8, 16, requires_grad=True), torch.randn(16, 4)
    out, flops = count_flops(lambda: (a @ b).sum().backward())
    assert flops == 2 * (2 * 8 * 16 * 4)  # the forward matmul, and the backward one for a.grad


def test_eval_pages_do_not_depend_on_batch_size(tiny_model, tiny_cfg):
    from dsocr.train.loop import evaluate

    tok = Tokenizer(byte_tokenizer(vocab_size=tiny_cfg.language.vocab_size))

    def ev(batch_size):
        cfg = TrainConfig(
            batch_size=batch_size, eval_batches=1, eval_batch_size=3, data=small_recipe()
        )
        return evaluate(tiny_model, tok, cfg, "cpu", None)

    assert ev(2) == ev(5)


def test_best_restarts_when_the_eval_pages_change(tmp_path):
    from dsocr.train.loop import _read_best

    (tmp_path / "best").mkdir()
    saved = {"seed": 0, "eval_batches": 1, "eval_batch_size": 2, "data": {"font_sizes": [40]}}
    (tmp_path / "best" / "meta.json").write_text(json.dumps({"eval_loss": 0.5, "eval_set": saved}))
    assert _read_best(tmp_path, saved) == 0.5
    assert _read_best(tmp_path, saved | {"seed": 1}) is None
    assert _read_best(tmp_path, saved | {"eval_batch_size": 16}) is None


def test_build_corpus_keeps_an_existing_corpus_when_it_finds_nothing(tmp_path, monkeypatch, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    files = {n: f"old {n}\n".encode() for n in ("train.jsonl", "heldout.jsonl", "manifest.json")}
    for n, data in files.items():
        (corpus / n).write_bytes(data)
    with pytest.raises(build_corpus.NoDocuments):
        build_corpus.build(corpus, docs=[])
    monkeypatch.setattr(build_corpus, "sources", lambda *a, **k: iter(()))
    assert build_corpus.main(["--out", str(corpus)]) == 1
    assert "no documents found" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in corpus.iterdir()} == files  # untouched, no temp files
    assert build_corpus.main(["--out", str(tmp_path / "new")]) == 1
    assert not (tmp_path / "new").exists()


def test_train_tokenizer_reports_a_missing_corpus_in_one_line(tmp_path, capsys):
    assert (
        train_tokenizer.main(["--corpus", str(tmp_path / "nope"), "--out", str(tmp_path / "t")])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and not (tmp_path / "t").exists()
