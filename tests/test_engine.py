"""The engine: sampling, n-gram ban, loop guard, streaming, and batching equivalences.

Two models: the seeded ``tiny`` decoder (real numerics: batch vs single, cached vs uncached,
continuous batching) and ``ScriptModel``, a mock whose logits force a chosen next token. The mock
keeps each row's token history in its own KV-cache slots, so it also checks that the engine lends
the right cache rows (slot moves, prefill into free rows).
"""

import itertools
import subprocess
import sys
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dsocr.engine.detokenize import IncrementalDetokenizer
from dsocr.engine.generate import (
    Engine,
    GenerationParams,
    Request,
    default_dtype,
    generate_greedy,
)
from dsocr.engine.kv_cache import KVCache
from dsocr.engine.sampling import (
    OFFICIAL_NGRAM_WHITELIST,
    LoopDetector,
    apply_no_repeat_ngram,
    ngram_whitelist_for,
    no_repeat_ngram_banned,
    sample,
    top_p_filter,
)
from dsocr.language import decoder, fewrow
from dsocr.language.decoder import MoE, decode_threads
from dsocr.language.tokenizer import Tokenizer, byte_tokenizer

BYTE0 = 15  # byte k is id 15 + k in byte_tokenizer()


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(byte_tokenizer())


def _ids(n, seed, lo=20, hi=250):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, (n,), generator=g).tolist()


def _byte_ids(text: str) -> list[int]:
    return [BYTE0 + b for b in text.encode("utf-8")]


# --------------------------------------------------------------------------- mock model


class ScriptModel(torch.nn.Module):
    """Logits 0 everywhere except 10 at ``rule(history)``; history = the row's ids so far.

    Token ids are stored in the KV cache (layer 0, head 0, dim 0, slot == position), so the
    history of a decode row comes from its cache row, as real attention would see it.
    """

    def __init__(self, cfg, rule):
        super().__init__()
        lang = replace(cfg.language, num_hidden_layers=1)
        self.config = replace(cfg, language=lang)
        self.rule = rule
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device and dtype
        self.encode_calls = 0

    @property
    def device(self):
        return self.anchor.device

    @property
    def dtype(self):
        return self.anchor.dtype

    def forward(self, input_ids, positions=None, kv_cache=None, image_embeds=None, logits_at=None):
        B, T = input_ids.shape
        assert kv_cache is not None and logits_at is not None
        k, _ = kv_cache[0]
        k[torch.arange(B)[:, None], 0, positions, 0] = input_ids.to(k.dtype)
        out = torch.zeros(B, self.config.language.vocab_size)
        for b in range(B):
            last = int(positions[b, logits_at[b]])
            history = [int(x) for x in k[b, 0, : last + 1, 0].tolist()]
            out[b, self.rule(history)] = 10.0
        return out


def script_rule(prompt_len, script, eos=1):
    """Emit ``script`` after a prompt of ``prompt_len`` ids, then EOS."""

    def rule(history):
        n = len(history) - prompt_len
        return script[n] if n < len(script) else eos

    return rule


# --------------------------------------------------------------------------- n-gram processor


def _official_ngram(input_ids, ngram_size, window_size, whitelist):
    """The official processor, transcribed literally (process/ngram_norepeat.py)."""
    if len(input_ids) < ngram_size:
        return set()
    current_prefix = tuple(input_ids[-(ngram_size - 1) :])
    search_start = max(0, len(input_ids) - window_size)
    search_end = len(input_ids) - ngram_size + 1
    banned = set()
    for i in range(search_start, search_end):
        ngram = tuple(input_ids[i : i + ngram_size])
        if ngram[:-1] == current_prefix:
            banned.add(ngram[-1])
    return banned - set(whitelist)


def test_ngram_hand_worked_cases():
    # Too short: nothing.
    assert no_repeat_ngram_banned([1, 2], 3, 100) == set()
    # prefix (1, 2): the 3-gram (1, 2, 3) at start 0 bans 3.
    assert no_repeat_ngram_banned([1, 2, 3, 1, 2], 3, 100) == {3}
    # Several continuations of the same prefix are all banned.
    assert no_repeat_ngram_banned([1, 2, 3, 1, 2, 4, 1, 2], 3, 100) == {3, 4}
    # A run of one token bans that token (the n-gram ending at L-1 counts: start L-n inclusive).
    assert no_repeat_ngram_banned([4, 4], 2, 100) == {4}
    assert no_repeat_ngram_banned([4, 5], 2, 100) == set()


def test_ngram_window_boundary():
    ids = [5, 6, 7, 8, 5, 6]  # L = 6, prefix (5, 6); the matching 3-gram starts at 0
    assert no_repeat_ngram_banned(ids, 3, window=6) == {7}  # start max(0, 6-6) = 0: included
    assert no_repeat_ngram_banned(ids, 3, window=5) == set()  # start 1: excluded
    assert no_repeat_ngram_banned(ids, 3, window=3) == set()  # only start 3 = L - n
    # window smaller than n: the scan range is empty
    assert no_repeat_ngram_banned([4, 4, 4], 3, window=2) == set()
    assert no_repeat_ngram_banned([4, 4, 4], 3, window=3) == {4}


def test_ngram_whitelist_is_per_request():
    td, td_end = sorted(OFFICIAL_NGRAM_WHITELIST)
    ids = [7, td, 7]  # prefix (7,): the bigram (7, <td>) would ban <td>
    assert no_repeat_ngram_banned(ids, 2, 100) == set()  # default: official whitelist
    assert no_repeat_ngram_banned(ids, 2, 100, whitelist=None) == {td}
    assert no_repeat_ngram_banned([td, 7, td], 2, 100) == {7}  # only the listed ids are spared
    assert no_repeat_ngram_banned([9, 10, 9], 2, 100, whitelist={10}) == set()


def test_ngram_matches_official_transcription():
    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        L = int(torch.randint(0, 40, (), generator=g))
        ids = torch.randint(0, 4, (L,), generator=g).tolist()
        n = int(torch.randint(2, 6, (), generator=g))
        window = int(torch.randint(1, 45, (), generator=g))
        wl = {0} if trial % 2 else set()
        assert no_repeat_ngram_banned(ids, n, window, wl) == _official_ngram(ids, n, window, wl)


def test_ngram_sets_exactly_the_banned_logits():
    logits = torch.zeros(20)
    apply_no_repeat_ngram(logits, [1, 2, 3, 1, 2, 4, 1, 2], 3, 100, whitelist=None)
    assert torch.isinf(logits).nonzero().flatten().tolist() == [3, 4]
    assert (logits[[3, 4]] < 0).all() and (logits[[0, 1, 2, 5]] == 0).all()


def test_ngram_whitelist_for_tokenizer(tok):
    assert ngram_whitelist_for(tok) == {tok.token_to_id("<td>"), tok.token_to_id("</td>")}


def test_engine_applies_ngram_ban(tiny_cfg):
    # The script repeats (30, 31); with n=2 the second 30 -> 31 is banned, so the argmax falls
    # back to the lowest id among the 0-logit tokens (id 0).
    model = ScriptModel(tiny_cfg, script_rule(3, [30, 31, 30, 31, 30]))
    engine = Engine(model)
    base = GenerationParams(max_new_tokens=5, detect_loops=False)
    (free,) = engine.generate([Request([0, 50, 51], base)])
    (banned,) = engine.generate([Request([0, 50, 51], replace(base, ngram_size=2))])
    assert free.token_ids == [30, 31, 30, 31, 30]
    assert banned.token_ids[:4] == [30, 31, 30, 0]


def test_default_whitelist_means_the_engines_own_td_ids(tiny_cfg, tok):
    """GenerationParams' default whitelist (the official ids) is <td>, </td> of the engine's
    tokenizer, so dsocr-mini's tokenizer keeps its table cells unbanned."""
    td, end = tok.token_to_id("<td>"), tok.token_to_id("</td>")
    model = ScriptModel(tiny_cfg, script_rule(3, [td, end, td, end, td]))
    params = GenerationParams(max_new_tokens=5, detect_loops=False, ngram_size=2)
    (own,) = Engine(model, tok).generate([Request([0, 50, 51], params)])
    assert own.token_ids == [td, end, td, end, td]  # whitelisted: never banned
    (bare,) = Engine(model).generate([Request([0, 50, 51], params)])
    assert bare.token_ids[:4] == [td, end, td, 0]  # no tokenizer: the official ids only


# --------------------------------------------------------------------------- sampling


def test_sampling_seeded_reproducible_and_seed_dependent():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))

    def draws(seed):
        g = torch.Generator().manual_seed(seed)
        return [sample(logits, 1.0, 1.0, g).tolist() for _ in range(10)]

    assert draws(1) == draws(1)
    assert draws(1) != draws(2)
    # temperature 0 is greedy; a tiny top_p keeps only the argmax
    g = torch.Generator().manual_seed(0)
    assert sample(logits, 0.0, 1.0, g).tolist() == logits.argmax(-1).tolist()
    assert sample(logits, 5.0, 1e-6, g).tolist() == logits.argmax(-1).tolist()


def test_top_p_filter_keeps_the_nucleus():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    kept = torch.isfinite(top_p_filter(logits, 0.8)).tolist()
    assert kept == [True, True, False, False]  # 0.5 < 0.8, 0.5 + 0.3 reaches it
    assert torch.isfinite(top_p_filter(logits, 0.5)).tolist() == [True, False, False, False]
    assert torch.isfinite(top_p_filter(logits, 1.0)).all()


def test_engine_sampling_reproducible_alone_and_batched(tiny_model):
    p = GenerationParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=123, ignore_eos=True)
    prompts = [[0] + _ids(6, 1), [0] + _ids(9, 2), [0] + _ids(4, 3)]
    engine = Engine(tiny_model, max_batch_size=3)
    batched = engine.generate([Request(x, p) for x in prompts])
    alone = [Engine(tiny_model).generate([Request(x, p)])[0] for x in prompts]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    other = engine.generate([Request(prompts[0], replace(p, seed=124))])[0]
    assert other.token_ids != batched[0].token_ids


# --------------------------------------------------------------------------- loop detection


def test_loop_detector_periods():
    det = LoopDetector(max_period=8, min_repeats=4, min_tokens=12)
    hits = [det.push(t) for t in [9, 8] + [1, 2, 3] * 6]
    first = hits.index(True)
    assert det.period == 3
    assert first == 2 + 12 - 1  # 12 tokens of (1, 2, 3) = 4 repeats and 12 tokens
    det = LoopDetector(max_period=8, min_repeats=4, min_tokens=12)
    assert not any(det.push(t) for t in _ids(200, 5, lo=0, hi=50))


def test_engine_flags_forced_loop(tiny_cfg):
    rule = script_rule(2, [60, 61] + [40, 41, 42] * 100)
    model = ScriptModel(tiny_cfg, rule)
    params = GenerationParams(
        max_new_tokens=200, loop_max_period=8, loop_min_repeats=4, loop_min_tokens=12
    )
    (res,) = Engine(model).generate([Request([0, 70], params)])
    assert res.finish_reason == "loop" and res.loop_period == 3
    assert res.token_ids == [60, 61] + [40, 41, 42] * 4
    (off,) = Engine(model).generate([Request([0, 70], replace(params, detect_loops=False))])
    assert off.finish_reason == "length" and off.num_generated_tokens == 200


# --------------------------------------------------------------------------- finish reasons


def test_finish_reasons_eos_length_stop(tiny_cfg, tok):
    model = ScriptModel(tiny_cfg, script_rule(2, _byte_ids("abc STOP def")))
    engine = Engine(model, tok)
    p = GenerationParams(max_new_tokens=50)
    eos, length, stop_id, stop_str, with_stop = engine.generate(
        [
            Request([0, 70], p),
            Request([0, 70], replace(p, max_new_tokens=4)),
            Request([0, 70], replace(p, stop_token_ids=(BYTE0 + ord("S"),))),
            Request([0, 70], replace(p, stop=("STOP", "zzz"))),
            Request([0, 70], replace(p, stop=("STOP",), include_stop_str=True)),
        ]
    )
    assert eos.finish_reason == "eos" and eos.token_ids[-1] == tok.eos_id
    assert eos.text == "abc STOP def" and eos.num_generated_tokens == 13
    assert length.finish_reason == "length" and length.text == "abc " and len(length.token_ids) == 4
    assert stop_id.finish_reason == "stop" and stop_id.text == "abc "
    assert stop_id.token_ids[-1] == BYTE0 + ord("S")
    assert stop_str.finish_reason == "stop" and stop_str.text == "abc "
    assert len(stop_str.token_ids) == len("abc STOP")
    assert with_stop.text == "abc STOP"
    # ignore_eos runs to max_new_tokens
    (res,) = engine.generate([Request([0, 70], replace(p, max_new_tokens=20, ignore_eos=True))])
    assert res.finish_reason == "length" and res.num_generated_tokens == 20


def test_results_carry_counts_and_timings(tiny_model):
    (r,) = Engine(tiny_model).generate(
        [Request([0] + _ids(7, 0), GenerationParams(max_new_tokens=5))]
    )
    assert r.num_prompt_tokens == 8 and r.num_generated_tokens == len(r.token_ids) <= 5
    assert 0 <= r.queue_s <= r.ttft_s <= r.total_s and r.prefill_s > 0 and r.decode_s >= 0
    assert r.request_id == 0 and r.text is None  # no tokenizer: ids only


# --------------------------------------------------------------------------- streaming


def test_streaming_multibyte_deltas(tiny_cfg, tok):
    text = "aé中🙂b ok"
    model = ScriptModel(tiny_cfg, script_rule(2, _byte_ids(text)))
    deltas = []
    (res,) = Engine(model, tok).generate([Request([0, 70])], on_event=lambda e: deltas.append(e))
    assert res.text == text and "".join(e.text for e in deltas) == text
    assert all("\ufffd" not in e.text for e in deltas)
    # the 4 bytes of the emoji arrive as 4 events; only the last one carries text
    emoji_events = [e.text for e in deltas[len("aé中".encode()) : len("aé中🙂".encode())]]
    assert emoji_events == ["", "", "", "🙂"]
    assert deltas[-1].result is res and res.finish_reason == "eos"


def test_streaming_concatenation_equals_text_random_bytes(tiny_model, tok):
    # The random tiny model emits arbitrary byte ids, including invalid UTF-8 sequences.
    engine = Engine(tiny_model, tok, max_batch_size=2)
    reqs = [
        Request([0] + _ids(5 + i, 10 + i), GenerationParams(max_new_tokens=20)) for i in range(3)
    ]
    pieces: dict = {}
    results = engine.generate(
        reqs, on_event=lambda e: pieces.setdefault(e.request_id, []).append(e.text)
    )
    for r in results:
        ids = r.token_ids[:-1] if r.finish_reason == "eos" else r.token_ids
        assert "".join(pieces[r.request_id]) == r.text == tok.decode(ids)


def test_incremental_detokenizer_matches_decode(tok):
    ids = tok.encode("naïve 東京 — 🙂🙃 end") + [BYTE0 + 0xE2, BYTE0 + 0x82, BYTE0 + ord("x")]
    detok = IncrementalDetokenizer(tok)
    out = "".join(detok.push(i) for i in ids) + detok.flush()
    assert out == detok.text == tok.decode(ids)


def test_stream_generator_yields_per_step(tiny_cfg, tok):
    model = ScriptModel(tiny_cfg, script_rule(2, _byte_ids("hi")))
    events = list(Engine(model, tok).stream([Request([0, 70]), Request([0, 71])]))
    assert [e.request_id for e in events] == [0, 1, 0, 1, 0, 1]
    assert [e.text for e in events if e.request_id == 0] == ["h", "i", ""]


# --------------------------------------------------------------------------- batching equivalences


def _image_prompts(cfg, seed=0):
    """Prompts with <image> runs of different lengths and matching random embeddings."""
    g = torch.Generator().manual_seed(seed)
    img = cfg.image_token_id
    prompts, embeds = [], []
    for i, (n_img, n_txt) in enumerate([(6, 5), (0, 9), (11, 3), (3, 14)]):
        prompts.append([0] + [img] * n_img + _ids(n_txt, seed + i))
        embeds.append(torch.randn(n_img, cfg.n_embed, generator=g) if n_img else None)
    return prompts, embeds


def test_batch_equals_single_equals_uncached(tiny_model, tiny_cfg):
    prompts, embeds = _image_prompts(tiny_cfg)
    p = GenerationParams(max_new_tokens=8, ignore_eos=True)
    reqs = [Request(x, p, image_embeds=e) for x, e in zip(prompts, embeds)]
    batched = [r.token_ids for r in Engine(tiny_model, max_batch_size=4).generate(reqs)]
    single = [Engine(tiny_model).generate([r])[0].token_ids for r in reqs]
    uncached = generate_greedy(tiny_model, prompts, embeds, max_new_tokens=8, use_cache=False)
    wrapper = generate_greedy(tiny_model, prompts, embeds, max_new_tokens=8)
    assert batched == single == uncached == wrapper


def test_continuous_batching_matches_alone(tiny_model, tiny_cfg):
    prompts, embeds = _image_prompts(tiny_cfg, seed=3)
    prompts += [[0] + _ids(2, 40), [0] + _ids(17, 41), [0] + _ids(8, 42)]
    embeds += [None, None, None]
    max_new = [3, 12, 5, 9, 1, 7, 4]
    reqs = [
        Request(x, GenerationParams(max_new_tokens=m, ignore_eos=True), image_embeds=e)
        for x, e, m in zip(prompts, embeds, max_new)
    ]
    engine = Engine(tiny_model, max_batch_size=3)
    results = engine.generate(reqs)
    assert engine.stats.max_active == 3 and not engine.has_unfinished()
    for req, res, m in zip(reqs, results, max_new):
        (alone,) = Engine(tiny_model).generate([req])
        assert res.token_ids == alone.token_ids and len(res.token_ids) == m
        assert res.finish_reason == "length"
    assert results[-1].queue_s > 0  # it waited for a free slot


def test_continuous_batching_slots_with_mock(tiny_cfg):
    # Each row's tokens are read back from its cache row, so a wrong slot move or a prefill into
    # a busy row changes the output.
    def rule(history):
        return 20 + (sum(history) * 7 + len(history)) % 200

    model = ScriptModel(tiny_cfg, rule)
    reqs = [
        Request(
            [0] + _ids(3 + 2 * i, i),
            GenerationParams(max_new_tokens=2 + (5 * i) % 9, detect_loops=False),
        )
        for i in range(9)
    ]
    together = Engine(model, max_batch_size=4, max_prefill_tokens=16).generate(reqs)
    for req, res in zip(reqs, together):
        assert res.token_ids == Engine(model).generate([req])[0].token_ids


def test_images_are_encoded_once_at_admission(tiny_model, tiny_cfg):
    prompts, embeds = _image_prompts(tiny_cfg, seed=7)
    calls = []

    def fake_encode(images):  # stands in for the vision tower: image i -> embeds[i]
        calls.append(list(images))
        return [embeds[i] for i in images]

    tiny_model.encode_images = fake_encode
    p = GenerationParams(max_new_tokens=4, ignore_eos=True)
    with_images = [
        Request(x, p, images=[i] if e is not None else None)
        for i, (x, e) in enumerate(zip(prompts, embeds))
    ]
    with_embeds = [Request(x, p, image_embeds=e) for x, e in zip(prompts, embeds)]
    a = Engine(tiny_model, max_batch_size=4).generate(with_images)
    b = Engine(tiny_model, max_batch_size=4).generate(with_embeds)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert calls == [[0, 2, 3]]  # one batched call for the admitted newcomers


def test_cache_grows_for_long_request(tiny_model):
    engine = Engine(tiny_model, max_batch_size=2)
    p = GenerationParams(max_new_tokens=4, ignore_eos=True)
    engine.generate([Request([0] + _ids(5, 0), p)])
    assert engine.cache.max_len == 256
    long = Request([0] + _ids(300, 1), p)
    (res,) = engine.generate([long])
    assert engine.cache.max_len == 512
    assert res.token_ids == Engine(tiny_model).generate([long])[0].token_ids


def test_kv_cache_rows_and_move():
    cache = KVCache(2, 3, 1, 4, 2, torch.float32)
    rows = cache.rows(1, 3)
    rows[0][0][1, 0, 2] = 5.0  # layer 0, k, row 1 of the view = slot 2
    assert cache.k[0, 2, 0, 2].tolist() == [5.0, 5.0]
    cache.move_row(2, 0, 3)
    assert cache.k[0, 0, 0, 2].tolist() == [5.0, 5.0]


def test_default_dtype(monkeypatch):
    """float32 on CPU; on CUDA bfloat16 only where the GPU has native bf16 (capability 8.0+)."""
    assert default_dtype("cpu") == torch.float32
    caps = {0: (9, 0), 1: (7, 5)}  # an H100 and a T4
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(
        torch.cuda, "get_device_capability", lambda d=None: caps[torch.device(d).index or 0]
    )
    assert default_dtype("cuda") == default_dtype("cuda:0") == torch.bfloat16
    assert default_dtype("cuda:1") == torch.float32
    from dsocr import weights

    assert weights.default_dtype is default_dtype  # the engine and loading choose alike


@pytest.mark.slow
def test_compiled_decode_step_matches_eager(tiny_model):
    prompts = [[0] + _ids(6, 1), [0] + _ids(9, 2)]
    p = GenerationParams(max_new_tokens=6, ignore_eos=True)
    eager = Engine(tiny_model, max_batch_size=2).generate([Request(x, p) for x in prompts])
    compiled = Engine(
        tiny_model,
        max_batch_size=2,
        compile_decode=True,
        compile_options={"backend": "eager", "dynamic": True},
    )
    got = compiled.generate([Request(x, p) for x in prompts])
    assert [r.token_ids for r in got] == [r.token_ids for r in eager]


def test_abort_frees_a_running_slot_without_disturbing_the_others(tiny_cfg):
    def rule(history):
        return 20 + (sum(history) * 7 + len(history)) % 200

    model = ScriptModel(tiny_cfg, rule)
    params = GenerationParams(max_new_tokens=6, detect_loops=False)
    reqs = [Request([0] + _ids(3 + i, i), params, request_id=f"r{i}") for i in range(4)]
    engine = Engine(model, max_batch_size=2)
    for r in reqs:
        engine.add_request(r)
    done = {}
    engine.step()  # r0, r1 admitted and running; r2, r3 waiting
    assert engine.abort("r0") and engine.abort("r3") and not engine.abort("nope")
    while engine.has_unfinished():
        for ev in engine.step():
            if ev.result is not None:
                done[ev.request_id] = ev.result.token_ids
    assert set(done) == {"r1", "r2"}  # the aborted ones never finish
    for rid in ("r1", "r2"):
        req = next(r for r in reqs if r.request_id == rid)
        assert done[rid] == Engine(model).generate([req])[0].token_ids
    engine.add_request(reqs[0])
    engine.step()
    engine.reset()
    assert not engine.has_unfinished()


def test_image_placeholder_is_never_generated(tiny_cfg):
    # A model that always prefers <image> must get its second choice instead: a generated <image>
    # fed back would be read as a slot for image embeddings that do not exist.
    img = tiny_cfg.image_token_id
    model = ScriptModel(tiny_cfg, lambda history: img)
    (res,) = Engine(model).generate([Request([0, 40, 41], GenerationParams(max_new_tokens=4))])
    assert img not in res.token_ids and len(res.token_ids) == 4


def _product_thread_names(monkeypatch):
    """A set that collects the name of each thread running a big product of ``decoder.linear``
    (with every matrix counted as big), by ``_product`` or by ``fewrow``; ``names.fewrow`` gets
    (thread name, threads asked of fewrow) for the latter."""
    monkeypatch.setattr(decoder, "POOL_MIN_BYTES", 0)

    class Names(set):
        fewrow: set = set()

    names, product, into = Names(), decoder._product, fewrow.linear_into
    names.fewrow = set()

    def recording(*args):
        names.add(threading.current_thread().name)
        return product(*args)

    def recording_into(*args, threads=1):
        names.add(threading.current_thread().name)
        names.fewrow.add((threading.current_thread().name, threads))
        return into(*args, threads=threads)

    monkeypatch.setattr(decoder, "_product", recording)
    monkeypatch.setattr(fewrow, "linear_into", recording_into)
    return names


@pytest.fixture(params=["fewrow", "torch"])
def decode_kernels(request, monkeypatch):
    """Both sets of decode kernels: the built few-row kernel, and torch's (where it is off)."""
    if request.param == "fewrow":
        assert fewrow.available(), fewrow.status()
    else:
        monkeypatch.setattr(fewrow, "usable", lambda *a: False)
    return request.param


def test_decode_products_match_linear(decode_kernels):
    """The decode kernels (fewrow up to 8 rows; else (W @ x.T).T for 2 rows, oneDNN's linear,
    MKL's GEMV on pool threads): F.linear's values to rounding, for any leading shape, with and
    without bias."""
    if torch.backends.mkldnn.is_available():
        assert decoder._onednn is not None, "torch's oneDNN linear op is gone: decode falls back"
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 32, generator=g), torch.randn(48, generator=g)
    for shape in [(1, 32), (2, 32), (1, 3, 32), (4, 1, 32), (5, 32), (2, 4, 32), (9, 32)]:
        x = torch.randn(*shape, generator=g)
        for bias, pooled in itertools.product((None, b), (False, True)):
            decoder._local.pooled = pooled
            try:
                y = decoder._product(x, w, bias)
            finally:
                decoder._local.pooled = False
            assert y.shape == (*shape[:-1], 48)
            torch.testing.assert_close(y, F.linear(x, w, bias))


def test_decode_threads_match_one_thread(tiny_model, tiny_cfg, monkeypatch, decode_kernels):
    """Big products split over a pool (experts; the rows of attention, MLP and lm_head weights),
    no autograd, inference mode or not: the outputs of one thread and of a plain forward to
    rounding, the same engine tokens, and the pool really runs them; with grad enabled, or
    matrices under the size threshold, the forward is exactly the plain one."""
    ids = torch.tensor([[0, 40, 41, 42, 43, 44, 45, 46]])

    def forwards():  # 8 and 3 tokens: products of many rows, and of 2..4 (experts, lm_head)
        return tiny_model(ids), tiny_model(ids[:, :3])

    with torch.no_grad():
        plain = forwards()
        with decode_threads(3):  # the tiny config's matrices are far below POOL_MIN_BYTES
            small = forwards()
    assert all(torch.equal(a, b) for a, b in zip(small, plain))
    names = _product_thread_names(monkeypatch)
    with torch.no_grad(), decode_threads(1):
        one = forwards()
    assert names == {threading.current_thread().name}
    me = threading.current_thread().name
    assert names.fewrow <= {(me, 1)}
    names.fewrow.clear()
    for mode in (torch.no_grad, torch.inference_mode):
        with mode(), decode_threads(3):
            three = forwards()
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(three, one))
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(three, plain))
    assert names - {me}, "the pool never ran a product"
    if decode_kernels == "fewrow":  # experts on the pool, one thread each; the rest on 3 threads
        assert (me, 3) in names.fewrow
        assert {t for n, t in names.fewrow if n != me} == {1}
    else:
        assert not names.fewrow
    with decode_threads(3):  # grad on: the plain forward
        assert torch.equal(tiny_model(ids).detach(), plain[0])

    names.clear()
    prompts, embeds = _image_prompts(tiny_cfg)
    p = GenerationParams(max_new_tokens=6, ignore_eos=True)
    reqs = [Request(q, p, image_embeds=e) for q, e in zip(prompts, embeds)]
    one = Engine(tiny_model, max_batch_size=4, decode_threads=1).generate(reqs)
    assert names == {threading.current_thread().name}
    names.fewrow.clear()
    two = Engine(tiny_model, max_batch_size=4, decode_threads=2).generate(reqs)
    assert [r.token_ids for r in two] == [r.token_ids for r in one]
    assert any(n.startswith("dsocr-decode") for n in names)
    assert (me, 2) in names.fewrow if decode_kernels == "fewrow" else not names.fewrow


def test_decode_attention_kernel_matches_sdpa_in_the_engine(tiny_model, tiny_cfg, monkeypatch):
    """Inside decode_threads one-query steps go to fewrow.decode_attention: the same engine
    tokens as with sdpa, for image prompts of different lengths in one continuous batch."""
    assert fewrow.available(), fewrow.status()
    calls, attention = [], fewrow.decode_attention

    def recording(*args):
        calls.append(args[0].shape)
        return attention(*args)

    monkeypatch.setattr(fewrow, "decode_attention", recording)
    prompts, embeds = _image_prompts(tiny_cfg)
    p = GenerationParams(max_new_tokens=6, ignore_eos=True)
    reqs = [Request(q, p, image_embeds=e) for q, e in zip(prompts, embeds)]
    got = Engine(tiny_model, max_batch_size=2, decode_threads=2).generate(reqs)
    assert calls and all(s[2] == 1 for s in calls)
    monkeypatch.setattr(fewrow, "attention_usable", lambda *a: False)
    calls.clear()
    ref = Engine(tiny_model, max_batch_size=2, decode_threads=2).generate(reqs)
    assert not calls and [r.token_ids for r in got] == [r.token_ids for r in ref]


def test_decode_threads_are_per_calling_thread(tiny_model, tiny_cfg, monkeypatch):
    """An engine decoding in another thread (the server's) leaves this thread's forwards plain."""
    entered, release = threading.Event(), threading.Event()

    def other():
        with decode_threads(2):
            entered.set()
            release.wait(10)

    t = threading.Thread(target=other)
    t.start()
    entered.wait(10)
    names = _product_thread_names(monkeypatch)
    moe = next(m for m in tiny_model.modules() if isinstance(m, MoE))
    with torch.no_grad():
        moe(torch.randn(8, tiny_cfg.language.hidden_size))
    release.set()
    t.join()
    assert names == set()  # no decode_threads here: plain nn.Linear calls, not decoder._product


def test_bfloat16_engine_with_real_images(tiny_cfg):
    """The GPU default dtype (bf16), emulated on CPU: real preprocessed pages through the vision
    tower, fp32 pixel tensors into a bf16 model, continuous batching; tokens for every request
    and a first token that is the argmax of a bf16 full forward."""
    from conftest import TEST_BASE
    from PIL import Image

    from dsocr.model import build_model
    from dsocr.vision.preprocess import preprocess_image

    model = build_model(tiny_cfg, seed=0).eval().to(torch.bfloat16)
    inputs = [
        preprocess_image(Image.new("RGB", (128, 96 + 16 * i), "white"), TEST_BASE) for i in range(3)
    ]
    img = tiny_cfg.image_token_id
    prompts = [[0] + [img] * x.num_tokens + _ids(4, i) for i, x in enumerate(inputs)]
    p = GenerationParams(max_new_tokens=5, ignore_eos=True)
    engine = Engine(model, max_batch_size=2, dtype=torch.bfloat16)
    results = engine.generate([Request(q, p, images=[x]) for q, x in zip(prompts, inputs)])
    assert [len(r.token_ids) for r in results] == [5, 5, 5]
    with torch.no_grad():
        embeds = model.encode_images([inputs[0]])[0]
        logits = model(torch.tensor([prompts[0]]), image_embeds=embeds)
    assert embeds.dtype == torch.bfloat16
    assert results[0].token_ids[0] == int(logits[0, -1].float().argmax())


# --------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    "kwargs,why",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1, got 0"),
        (dict(max_new_tokens=-5), "max_new_tokens must be an integer >= 1"),
        (dict(max_new_tokens=2.5), "max_new_tokens must be an integer"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=-0.1), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_p=float("nan")), "top_p must be a finite number"),
        (dict(temperature=float("nan")), "temperature must be a finite number"),
        (dict(temperature=float("inf")), "temperature must be a finite number"),
        (dict(ngram_size=1), "ngram_size must be an integer >= 2, got 1"),
        (dict(ngram_size=3, ngram_window=0), "ngram_window must be an integer >= 1"),
        (dict(loop_min_repeats=1), "loop_min_repeats must be an integer >= 2"),
        (dict(stop=("",)), "stop strings must be non-empty strings"),
        (dict(stop=""), "stop strings must be non-empty strings"),
        (dict(stop=(3,)), "stop strings must be non-empty strings"),
        (dict(stop_token_ids=(-1,)), "stop_token_ids must be token ids"),
        (dict(seed="7"), "seed must be an integer"),
        (dict(seed=2**64), r"seed must be an integer in \[-2\*\*63, 2\*\*64\) or None"),
        (dict(temperature=-0.5), "temperature must be >= 0"),
    ],
)
def test_generation_params_refuse_bad_values_with_value_error(kwargs, why):
    with pytest.raises(ValueError, match=why):
        GenerationParams(**kwargs)


def test_a_stop_string_given_as_a_str_is_one_stop_string(tiny_cfg, tok):
    p = GenerationParams(max_new_tokens=50, stop="World.", stop_token_ids=7)
    assert p.stop == ("World.",) and p.stop_token_ids == (7,)
    model = ScriptModel(tiny_cfg, script_rule(2, _byte_ids("Hello\n\nWorld. More")))
    (res,) = Engine(model, tok).generate([Request([0, 70], replace(p, stop_token_ids=()))])
    assert res.finish_reason == "stop" and res.text == "Hello\n\n"


def test_bad_requests_are_value_errors(tiny_cfg, tok):
    model = ScriptModel(tiny_cfg, lambda history: 40)
    engine = Engine(model, tok, max_batch_size=2)
    p = GenerationParams(max_new_tokens=2)
    limit = tiny_cfg.language.max_position_embeddings
    cases = [
        (Request([], p), "empty prompt"),
        (Request([0] * limit, p), f"prompt of {limit} tokens does not fit {limit} positions"),
        (Request([0, tiny_cfg.language.vocab_size], p), r"prompt ids must be in \[0, 320\)"),
        (Request([0, -1], p), r"prompt ids must be in \[0, 320\)"),
        (Request([0, 40], p, images=[1], image_embeds=torch.zeros(1, 4)), "not both"),
    ]
    for req, why in cases:
        with pytest.raises(ValueError, match=why):
            engine.add_request(req)
    with pytest.raises(ValueError, match="stop strings need an engine with a tokenizer"):
        Engine(model).add_request(Request([0, 40], replace(p, stop=("x",))))
    assert not engine.has_unfinished()


def test_argument_checks_survive_python_O():
    code = (
        "import torch\n"
        "from dsocr.configs import CONFIGS\n"
        "from dsocr.engine import Engine, GenerationParams, Request\n"
        "from dsocr.model import build_model\n"
        "for kw in (dict(max_new_tokens=0), dict(top_p=0.0), dict(ngram_size=1)):\n"
        "    try: GenerationParams(**kw)\n"
        "    except ValueError: pass\n"
        "    else: raise SystemExit(f'accepted {kw}')\n"
        "e = Engine(build_model(CONFIGS['tiny'], seed=0))\n"
        "for ids in ([], [0] * 3001):\n"
        "    try: e.add_request(Request(ids))\n"
        "    except ValueError: pass\n"
        "    else: raise SystemExit(f'accepted a prompt of {len(ids)}')\n"
    )
    r = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_sampling_helpers_refuse_bad_values():
    logits = torch.zeros(5)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        sample(logits, float("inf"), 1.0, g)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        top_p_filter(logits, 0.0)
    with pytest.raises(ValueError, match="ngram_size must be >= 2"):
        no_repeat_ngram_banned([1, 2, 3], 1, 10)
    with pytest.raises(ValueError, match="loop detector needs"):
        LoopDetector(max_period=0)


# --------------------------------------------------------------------------- request ids


def test_colliding_request_ids_are_refused(tiny_cfg):
    model = ScriptModel(tiny_cfg, lambda history: 40)
    p = GenerationParams(max_new_tokens=2)
    engine = Engine(model, max_batch_size=2)
    with pytest.raises(ValueError, match="request_id 0 is already waiting or running"):
        engine.generate([Request([0, 41], p), Request([0, 42], p, request_id=0)])
    assert not engine.has_unfinished()  # a refused batch queues nothing
    with pytest.raises(ValueError, match="request_id 'x' is already"):
        engine.generate([Request([0, 41], p, request_id="x"), Request([0, 42], p, request_id="x")])
    assert not engine.has_unfinished()
    # Ids the engine picks skip the ones in use; a finished id may be used again.
    engine = Engine(model, max_batch_size=2)
    out = engine.generate([Request([0, 41], p, request_id=0), Request([0, 42], p)])
    assert [r.request_id for r in out] == [0, 1]
    out = engine.generate([Request([0, 41], p, request_id=1), Request([0, 42], p)])
    assert [r.request_id for r in out] == [1, 2]


# --------------------------------------------------------------------------- abort inside generate


def _counting_rule(history):
    return 20 + (sum(history) * 7 + len(history)) % 200


def test_abort_from_the_callback_returns_an_abort_result(tiny_cfg, tok):
    model = ScriptModel(tiny_cfg, _counting_rule)
    p = GenerationParams(max_new_tokens=8, detect_loops=False, ignore_eos=True)
    reqs = [Request([0] + _ids(3 + i, i), p, request_id=f"r{i}") for i in range(3)]
    alone = {r.request_id: Engine(model, tok).generate([r])[0] for r in reqs}
    engine = Engine(model, tok, max_batch_size=2)
    seen = {}

    def on_event(ev):
        seen.setdefault(ev.request_id, []).extend(ev.token_ids)
        if ev.request_id == "r0" and len(seen["r0"]) == 3:
            assert engine.abort("r0")  # running
            assert engine.abort("r2")  # still waiting

    out = engine.generate(reqs, on_event=on_event)
    assert [r.request_id for r in out] == ["r0", "r1", "r2"]
    r0, r1, r2 = out
    assert r0.finish_reason == "abort" and r0.token_ids == alone["r0"].token_ids[:3]
    assert r0.text == tok.decode(r0.token_ids) and r0.num_generated_tokens == 3
    assert r2.finish_reason == "abort" and r2.token_ids == [] and r2.text == ""
    assert r1.token_ids == alone["r1"].token_ids and r1.finish_reason == "length"
    assert not engine.has_unfinished()
    # Outside generate an abort still produces nothing, and the engine is reusable.
    assert engine.generate([reqs[0]])[0].token_ids == alone["r0"].token_ids


def test_reset_from_the_callback_aborts_everything(tiny_cfg):
    model = ScriptModel(tiny_cfg, _counting_rule)
    p = GenerationParams(max_new_tokens=8, detect_loops=False, ignore_eos=True)
    (alone,) = Engine(model).generate([Request([0, 41], p)])
    engine = Engine(model, max_batch_size=1)
    out = engine.generate(
        [Request([0, 41], p), Request([0, 42], p)], on_event=lambda ev: engine.reset()
    )
    assert [r.finish_reason for r in out] == ["abort", "abort"]
    n = len(out[0].token_ids)  # what the first step made (prefill token + one decode)
    assert 1 <= n < 8 and out[0].token_ids == alone.token_ids[:n] and out[1].token_ids == []
    assert not engine.has_unfinished()


# --------------------------------------------------------------------------- audit regressions


def test_sampling_edge_temperatures():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    g = torch.Generator().manual_seed(0)
    # A tiny temperature is (near-)greedy, not NaN probabilities inside multinomial.
    for t in (1e-30, 1e-45, 1e-300):
        assert int(sample(logits, t, 1.0, g)) == 0
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        sample(logits, -1.0, 1.0, g)
    # numpy integer seeds are accepted and normalised like the other integer fields
    seed = GenerationParams(seed=np.int64(7), temperature=1.0).seed
    assert seed == 7 and type(seed) is int


def test_loop_detector_ignores_empty_table_rows(tiny_cfg, tok):
    td, td_end, tr, tr_end = (tok.token_to_id(t) for t in ("<td>", "</td>", "<tr>", "</tr>"))
    row = [tr] + [td, td_end] * 10 + [tr_end]  # an empty 10-column row: 22 tokens
    exempt = Engine(ScriptModel(tiny_cfg, lambda h: 40), tok).loop_exempt
    assert exempt == {td, td_end, tr, tr_end}

    def loops(tokens, exempt=exempt):
        det = LoopDetector(exempt=exempt)
        return any([det.push(t) for t in tokens])

    assert not loops(row * 30) and not loops([td, td_end] * 200)
    # a repeated row with content is still a loop, and so is anything without the exemption
    assert loops(([tr] + [td, 40, td_end] * 10 + [tr_end]) * 30)
    assert loops(row * 30, exempt=())


def test_image_placeholder_count_is_checked_at_add(tiny_cfg):
    img = tiny_cfg.image_token_id
    model = ScriptModel(tiny_cfg, lambda history: 40)
    engine = Engine(model, max_batch_size=2)
    p = GenerationParams(max_new_tokens=2)
    good = Request([0, 41, 42], p, request_id="good")
    emb = torch.zeros(3, tiny_cfg.n_embed)
    bad = [
        Request([0, img, img, img, 41], p, image_embeds=emb[:2]),
        Request([0, img, 41], p),
        Request([0, 41], p, image_embeds=[emb]),
    ]
    for req in bad:
        with pytest.raises(ValueError, match="<image> placeholders"):
            engine.generate([good, req])
        assert not engine.has_unfinished()
    # the refused batch left nothing behind: the same id runs again
    assert engine.generate([good])[0].finish_reason == "length"
    ok = Request([0, img, img, img, 41], p, image_embeds=[emb[:1], emb[1:]])
    engine.add_request(ok)
    engine.reset()


def test_a_failed_step_leaves_the_engine_usable(tiny_cfg):
    # NaN logits make the sampler raise after the forward: the failed step must change nothing
    # (no position advanced past a token that was never appended), and a failed prefill must
    # free its batch's rows and ids.
    model = ScriptModel(tiny_cfg, _counting_rule)
    p = GenerationParams(max_new_tokens=6, detect_loops=False, ignore_eos=True)
    p = replace(p, temperature=1.0, seed=3)
    reqs = [Request([0] + _ids(3 + i, i), p, request_id=f"r{i}") for i in range(3)]
    alone = {r.request_id: Engine(model).generate([r])[0].token_ids for r in reqs}
    forward, fail = model.forward, set()
    calls = itertools.count(1)

    def flaky(*args, **kwargs):
        out = forward(*args, **kwargs)
        return out * float("nan") if next(calls) in fail else out

    model.forward = flaky
    engine = Engine(model, max_batch_size=3)
    fail.add(3)  # the second decode step
    engine.add_request(reqs[0])
    engine.step()  # prefill + first decode
    with pytest.raises(RuntimeError):
        engine.step()
    got = []
    while engine.has_unfinished():
        got += [t for ev in engine.step() for t in ev.token_ids]
    assert alone["r0"][2:] == got
    # a failing prefill of r1, r2 leaves the running r0 alone and frees their ids
    fail.clear()
    engine.add_request(reqs[0])
    engine.step()
    fail.add(next(calls) + 1)
    engine.add_request(reqs[1])
    engine.add_request(reqs[2])
    with pytest.raises(RuntimeError):
        engine.step()
    assert [s.request_id for s in engine.active] == ["r0"] and not engine.waiting
    out = engine.generate(reqs[1:])  # r0 finishes alongside
    assert [r.token_ids for r in out] == [alone["r1"], alone["r2"]]
    assert not engine.has_unfinished()
    # a forward that raises (out of memory) frees the ids too
    model.forward = lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("out of memory"))
    engine.add_request(reqs[1])
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.step()
    model.forward = forward
    assert not engine.has_unfinished()
    assert engine.generate([reqs[1]])[0].token_ids == alone["r1"]


def test_an_interrupted_generate_drops_its_requests(tiny_cfg):
    model = ScriptModel(tiny_cfg, _counting_rule)
    p = GenerationParams(max_new_tokens=20, detect_loops=False, ignore_eos=True)
    engine = Engine(model, max_batch_size=2)

    def interrupt(ev):
        raise KeyboardInterrupt

    reqs = [Request([0] + _ids(3 + i, i), p) for i in range(5)]
    with pytest.raises(KeyboardInterrupt):
        engine.generate(reqs, on_event=interrupt)
    assert not engine.has_unfinished()
    (res,) = engine.generate([reqs[0]])
    assert res.num_generated_tokens == 20
