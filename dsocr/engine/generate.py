"""The inference engine: continuous batching over a preallocated KV cache, on token ids.

After gpt-fast's ``prefill`` / ``decode_one_token`` split and nanochat's engine (ids only, the
tokenizer is used just to detokenise and match stop strings). The model stays a pure function of
tensors (``model(input_ids, positions, kv_cache, image_embeds, logits_at)``); all state lives here.

How a request flows:
1. ``add_request`` queues it. Images given as ``ImageInputs`` are encoded once, at admission, with
   ``model.encode_images`` (batched over the newcomers); precomputed ``image_embeds`` skip that, so
   one encoding can serve many prompts.
2. Admission: while slots are free, waiting requests are right-padded into one prefill and written
   into the free cache rows. Pad tokens take positions past their row's real tokens, so the
   model's position mask (``language.decoder.attention_mask``) keeps them out of every real
   token's attention, and later tokens overwrite their slots. The running requests are untouched.
3. Decode: every active slot advances one token per step, each at its own position.
4. A request leaves on EOS, a stop id/string, ``max_new_tokens`` or a detected repetition loop.
   Its slot is refilled by the last active slot (``KVCache.move_row``) so that the active slots
   are always rows 0..n-1 and each forward sees a contiguous, dense batch.

Every request carries its own ``torch.Generator``, n-gram window and loop detector, so its tokens
do not depend on what else is in the batch (greedy: up to float reassociation across batch sizes).

Legend: B active slots, T prompt tokens (padded), V vocab, C hidden.
"""

from __future__ import annotations

import itertools
import math
import numbers
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dsocr.engine.detokenize import IncrementalDetokenizer
from dsocr.engine.kv_cache import KVCache
from dsocr.engine.sampling import (
    OFFICIAL_NGRAM_WHITELIST,
    LoopDetector,
    apply_no_repeat_ngram,
    ngram_whitelist_for,
    sample,
)
from dsocr.language import fewrow
from dsocr.language.decoder import decode_threads
from dsocr.weights import default_dtype  # float32 on CPU, bfloat16 on GPUs with native bf16

# "abort": the request was aborted (``Engine.abort`` / ``reset``) while ``Engine.generate`` ran it.
FINISH_REASONS = ("eos", "length", "stop", "loop", "abort")


# --------------------------------------------------------------------------------------------------
# Requests and results
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationParams:
    """Per-request decoding settings. Defaults: greedy, official EOS, no n-gram ban, loop guard on.

    The official vLLM runs use ``ngram_size=30, ngram_window=90`` (single image), ``20/50`` (PDF),
    ``40/90`` (OmniDocBench), whitelist ``<td>``, ``</td>`` (spec §6). ``ngram_whitelist=None``
    whitelists nothing; the default (the official ids) means ``<td>``, ``</td>`` of the engine's
    tokenizer (``sampling.ngram_whitelist_for(tok)``), so it is right for dsocr-mini's too.

    Checked on construction (ValueError naming the field): ``max_new_tokens >= 1``, a finite
    ``temperature >= 0``, ``top_p`` in (0, 1], ``seed`` None or in [-2**63, 2**64) (torch's
    range), ``ngram_size`` None or >= 2, ``ngram_window >= 1``, loop settings in range. ``stop``
    may be one string (wrapped into a tuple); empty stop strings are refused (they would match at
    once). Sequences become tuples.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh nondeterministic seed (only used when sampling)
    ignore_eos: bool = False  # benchmarks: always run max_new_tokens
    stop_token_ids: tuple[int, ...] = ()
    # Stop strings (need a tokenizer); text is cut before them. Streaming holds back the last
    # len(longest stop) - 1 characters, so no streamed text is later cut off.
    stop: tuple[str, ...] = ()
    include_stop_str: bool = False
    ngram_size: int | None = None  # no-repeat n-gram over generated ids; None: off
    ngram_window: int = 100  # upstream vLLM default when omitted
    ngram_whitelist: frozenset[int] | None = OFFICIAL_NGRAM_WHITELIST
    detect_loops: bool = True
    loop_max_period: int = 128  # longest repeating block looked for, in tokens
    loop_min_repeats: int = 10  # repeats of the block at the tail
    loop_min_tokens: int = 200  # and at least this many tokens of repetition

    def __post_init__(self):
        def integer(name, lo, allow_none=False):  # numpy / torch integers become ints
            v = getattr(self, name)
            if allow_none and v is None:
                return
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
            object.__setattr__(self, name, int(v))

        def number(name):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")

        integer("max_new_tokens", 1)
        number("temperature")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        number("top_p")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        seed = self.seed
        if seed is not None and (
            not isinstance(seed, numbers.Integral)
            or isinstance(seed, bool)
            or not -(2**63) <= seed < 2**64
        ):
            raise ValueError(f"seed must be an integer in [-2**63, 2**64) or None, got {seed!r}")
        if seed is not None:
            object.__setattr__(self, "seed", int(seed))
        integer("ngram_size", 2, allow_none=True)
        integer("ngram_window", 1)
        integer("loop_max_period", 1)
        integer("loop_min_repeats", 2)
        integer("loop_min_tokens", 0)
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if any(not isinstance(x, str) or not x for x in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
        object.__setattr__(self, "stop", stop)
        ids = (
            (self.stop_token_ids,)
            if isinstance(self.stop_token_ids, numbers.Integral)
            else tuple(self.stop_token_ids)
        )
        if any(not isinstance(i, numbers.Integral) or isinstance(i, bool) or i < 0 for i in ids):
            raise ValueError(f"stop_token_ids must be token ids (ints >= 0), got {ids!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in ids))
        if self.ngram_whitelist is not None:
            object.__setattr__(self, "ngram_whitelist", frozenset(self.ngram_whitelist))


@dataclass
class Request:
    """One prompt. ``image_embeds``: (N, C) rows for the N ``<image>`` ids of the prompt, in order
    (or a list of per-image tensors); ``images``: preprocessed images to encode at admission."""

    prompt_ids: Sequence[int]
    params: GenerationParams = field(default_factory=GenerationParams)
    image_embeds: torch.Tensor | Sequence[torch.Tensor] | None = None
    images: Sequence[Any] | None = None  # vision.preprocess.ImageInputs
    request_id: Hashable | None = None


@dataclass
class Result:
    """A finished request. ``token_ids`` are all generated ids (EOS / stop id included when it
    ended the request); ``text`` decodes them without that final EOS / stop id, cut at a stop
    string. Times are seconds: queue (add -> admission), prefill (its batch's vision + forward),
    ttft (add -> first token), decode (first -> last token), total (add -> finish)."""

    request_id: Hashable
    token_ids: list[int]
    text: str | None
    finish_reason: str
    num_prompt_tokens: int
    num_generated_tokens: int
    queue_s: float
    prefill_s: float
    ttft_s: float
    decode_s: float
    total_s: float
    loop_period: int | None = None

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.num_generated_tokens - 1) / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class StreamEvent:
    """New ids of one request this step, the text they completed, and the result when it ends.

    Joining ``text`` over a request's events gives exactly ``result.text``."""

    request_id: Hashable
    token_ids: list[int]
    text: str
    result: Result | None = None


@dataclass
class EngineStats:
    prefill_tokens: int = 0  # real prompt tokens (no padding)
    prefill_s: float = 0.0  # model forward time of prefills (vision excluded)
    vision_s: float = 0.0
    decode_tokens: int = 0  # tokens produced by decode steps (first tokens come from prefill)
    decode_s: float = 0.0
    decode_steps: int = 0
    max_active: int = 0


class _Sequence:
    """Engine-side state of one admitted request (slot, position, generated ids, stopping)."""

    def __init__(self, req: Request, request_id, t_add: float, tokenizer, device, loop_exempt):
        # Not the Request itself: its images are only needed until the prefill, after which
        # ``_prefill`` drops them (a long decode must not pin a batch of page tensors).
        self.request_id, self.params, self.t_add = request_id, req.params, t_add
        self.prompt_ids = req.prompt_ids
        self.num_prompt_tokens = len(req.prompt_ids)
        self.images = req.images
        self.image_embeds = req.image_embeds  # filled at admission when only images are given
        params = req.params
        self.generated: list[int] = []
        self.slot = -1
        self.pos = 0  # tokens whose K/V are in the cache (the next input goes at this position)
        self.max_new = params.max_new_tokens
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator(device=device)
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)
        self.detok = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
        self.emitted = 0  # characters of detok.text already streamed
        self.hold = max((len(s) for s in params.stop), default=1) - 1  # chars a stop may still need
        self.final_len: int | None = None  # text length when a stop string cut it
        self.loops = (
            LoopDetector(
                params.loop_max_period, params.loop_min_repeats, params.loop_min_tokens, loop_exempt
            )
            if params.detect_loops
            else None
        )
        self.finish_reason: str | None = None
        self.t_admit = self.t_first = self.t_end = 0.0
        self.prefill_s = 0.0


# --------------------------------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------------------------------


class Engine:
    """Continuous-batching generation for a ``DeepseekOCRForCausalLM``-like model.

    ``max_batch_size`` slots decode together; more requests wait and join as slots free up.
    ``max_seq_len`` fixes the cache length per slot (default: grown on demand up to the model's
    ``max_position_embeddings``). ``dtype=None`` picks float32 on CPU and bfloat16 on CUDA and casts
    the model if needed. ``compile_decode`` wraps only the one-token decode forward in
    ``torch.compile`` (the prefill stays eager). ``max_prefill_tokens`` bounds one prefill batch
    (padded tokens), except that one request is always admitted. ``decode_threads`` (default on
    CPU: torch's thread count) runs prefill and decode forwards in
    ``language.decoder.decode_threads``: CPU kernels picked for few-row products (``fewrow``, built
    with the host's compiler on the first fp32 CPU engine), and the big ones (MoE experts, few-row
    products of the other weights) split over that many threads.
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        max_batch_size: int = 8,
        max_seq_len: int | None = None,
        dtype: torch.dtype | None = None,
        compile_decode: bool = False,
        compile_options: dict | None = None,
        max_prefill_tokens: int = 8192,
        eos_id: int | None = None,
        decode_threads: int | None = None,
    ):
        dtype = dtype or default_dtype(model.device)
        if model.dtype != dtype:
            model.to(dtype)
        self.model = model.eval()
        self.tokenizer = tokenizer
        cfg = model.config
        self.max_batch_size = max_batch_size
        self.max_positions = cfg.language.max_position_embeddings
        self.fixed_seq_len = max_seq_len
        self.max_prefill_tokens = max_prefill_tokens
        if eos_id is None:
            eos_id = tokenizer.eos_id if tokenizer is not None else cfg.language.eos_token_id
        self.eos_id = eos_id
        # Any id but the image placeholder works as padding (pads are masked out).
        self.pad_id = cfg.pad_token_id if cfg.pad_token_id != cfg.image_token_id else 0
        assert self.pad_id != cfg.image_token_id
        if decode_threads is None:
            decode_threads = torch.get_num_threads() if model.device.type == "cpu" else 1
        self.decode_threads = decode_threads
        if model.device.type == "cpu" and dtype == torch.float32:
            fewrow.load()  # build the few-row kernel now, not inside the first decode step
        # Empty table rows repeat exactly: blocks of only these never count as a loop.
        tags = ("<td>", "</td>", "<tr>", "</tr>")
        ids = [tokenizer.token_to_id(t) for t in tags] if tokenizer is not None else []
        self.loop_exempt = frozenset(i for i in ids if i is not None)
        # The default n-gram whitelist is the official tokenizer's <td>, </td>; with another
        # tokenizer (dsocr-mini's) it means that tokenizer's own ids.
        self.default_whitelist = (
            ngram_whitelist_for(tokenizer) if tokenizer is not None else OFFICIAL_NGRAM_WHITELIST
        )
        self.cache: KVCache | None = None
        self.waiting: deque[_Sequence] = deque()
        self.active: list[_Sequence] = []  # active[i] lives in cache row i
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._live: set[Hashable] = set()  # ids of the waiting and active requests
        self._aborted: dict[Hashable, Result] | None = None  # collected while generate() runs
        self._decode = self._decode_forward
        if compile_decode:
            options = compile_options if compile_options is not None else {"dynamic": True}
            self._decode = torch.compile(self._decode_forward, **options)

    # ---------------------------------------------------------------- public API
    @torch.no_grad()
    def encode_images(self, images: Sequence[Any]) -> list[torch.Tensor]:
        """Preprocessed images -> one (N_i, C) embedding per image; reusable across requests."""
        return self.model.encode_images(list(images))

    def add_request(self, request: Request | Sequence[int]) -> Hashable:
        """Queue a request (or bare prompt ids with default params); returns its id.

        Raises ValueError for a request that cannot run: an empty prompt, ids outside the
        vocabulary, a prompt that leaves no position to generate into, both ``images`` and
        ``image_embeds``, ``<image>`` placeholders that do not match the image rows (embedding
        rows, or ``num_tokens`` of ``images``), stop strings without a tokenizer, or a
        ``request_id`` already waiting or running in this engine (ids given by the engine skip the
        ones in use).
        """
        if not isinstance(request, Request):
            request = Request(list(request))
        params = request.params
        if not isinstance(params, GenerationParams):
            raise ValueError(f"params must be GenerationParams, got {type(params).__name__}")
        n = len(request.prompt_ids)
        if n == 0:
            raise ValueError("empty prompt: give at least one token id (BOS)")
        vocab = self.model.config.language.vocab_size
        lo, hi = min(request.prompt_ids), max(request.prompt_ids)
        if lo < 0 or hi >= vocab:
            raise ValueError(f"prompt ids must be in [0, {vocab}), got {lo if lo < 0 else hi}")
        if request.images is not None and request.image_embeds is not None:
            raise ValueError("give a request images or image_embeds, not both")
        self._check_image_rows(request)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need an engine with a tokenizer")
        limit = min(self.max_positions, self.fixed_seq_len or self.max_positions)
        if n >= limit:
            raise ValueError(f"prompt of {n} tokens does not fit {limit} positions")
        rid = request.request_id
        if rid is None:
            rid = next(self._ids)
            while rid in self._live:
                rid = next(self._ids)
        elif rid in self._live:
            raise ValueError(f"request_id {rid!r} is already waiting or running in this engine")
        seq = _Sequence(
            request, rid, time.perf_counter(), self.tokenizer, self.model.device, self.loop_exempt
        )
        # The last token is never fed back, so n + max_new - 1 positions are used.
        seq.max_new = min(params.max_new_tokens, limit - n + 1)
        seq.ngram_whitelist = (
            self.default_whitelist
            if params.ngram_whitelist == OFFICIAL_NGRAM_WHITELIST
            else params.ngram_whitelist
        )
        self.waiting.append(seq)
        self._live.add(rid)
        return rid

    def _check_image_rows(self, request: Request) -> None:
        """Placeholders must match the image rows: a mismatch would fail (or, under ``python -O``,
        scatter wrongly) inside a batched prefill, taking the batch's other requests with it."""
        image_id = self.model.config.image_token_id
        slots = sum(1 for i in request.prompt_ids if i == image_id)
        e = request.image_embeds
        if e is not None:
            rows = sum(int(t.shape[0]) for t in ([e] if isinstance(e, torch.Tensor) else e))
        elif request.images:
            counts = [getattr(im, "num_tokens", None) for im in request.images]
            if any(not isinstance(c, int) for c in counts):
                return  # not ImageInputs (a stand-in): the model checks at prefill
            rows = sum(counts)
        else:
            rows = 0
        if slots != rows:
            raise ValueError(
                f"prompt has {slots} <image> placeholders (id {image_id}) but its images give "
                f"{rows} embedding rows"
            )

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.active)

    def abort(self, request_id: Hashable) -> bool:
        """Drop one request, waiting or running; its slot is freed now. Returns whether it was
        found. ``step`` / ``stream`` produce no event or result for it afterwards; inside
        ``generate`` (say from ``on_event``) it comes back as a ``Result`` with
        ``finish_reason="abort"`` and the ids generated so far."""
        for s in self.waiting:
            if s.request_id == request_id:
                self.waiting.remove(s)
                self._dropped(s)
                return True
        for s in self.active:
            if s.request_id == request_id:
                self._retire(s)
                self._dropped(s)
                return True
        return False

    def reset(self) -> None:
        """Drop every waiting and running request (e.g. after an interrupted run); inside
        ``generate`` they come back as aborted, as with :meth:`abort`."""
        dropped = [*self.waiting, *self.active]
        self.waiting.clear()
        for s in self.active:
            s.slot = -1
        self.active.clear()
        self._live.clear()
        for s in dropped:
            self._dropped(s)

    @torch.no_grad()
    def step(self) -> list[StreamEvent]:
        """Admit waiting requests into free slots (one prefill), then decode every active slot by
        one token. Returns this step's events; finished requests carry their ``Result``."""
        events: list[StreamEvent] = []
        if self.waiting and len(self.active) < self.max_batch_size:
            self._admit(events)
        if self.active:
            self._decode_step(events)
        return events

    def stream(self, requests: Iterable[Request | Sequence[int]] = ()) -> Iterator[StreamEvent]:
        """Queue ``requests`` and run until nothing is left, yielding events as they happen."""
        for r in requests:
            self.add_request(r)
        while self.has_unfinished():
            yield from self.step()

    def generate(
        self,
        requests: Iterable[Request | Sequence[int]],
        on_event: Callable[[StreamEvent], None] | None = None,
    ) -> list[Result]:
        """Run ``requests`` to completion; one result per request, in request order.
        ``on_event`` sees every event (the streaming callback).

        A request aborted meanwhile (``abort`` from ``on_event``, or ``reset``) gets a ``Result``
        with ``finish_reason="abort"``: the ids generated before the abort, their text, no final
        event. Requests must have distinct ids (ValueError); if one is refused, none is queued.
        If the run raises (or is interrupted), its unfinished requests are dropped from the engine.
        """
        ids: list[Hashable] = []
        try:
            for r in requests:
                ids.append(self.add_request(r))
        except BaseException:
            for rid in ids:
                self.abort(rid)
            raise
        results: dict[Hashable, Result] = {}
        outer, self._aborted = self._aborted, {}
        try:
            for ev in self.stream():
                if on_event is not None:
                    on_event(ev)
                if ev.result is not None:
                    results[ev.request_id] = ev.result
            aborted = self._aborted
        except BaseException:  # e.g. Ctrl-C: this call's requests must not linger in the engine
            for rid in ids:
                if rid not in results:
                    self.abort(rid)
            raise
        finally:
            self._aborted = outer
        return [results[i] if i in results else aborted[i] for i in ids]

    # ---------------------------------------------------------------- prefill
    def _take_newcomers(self) -> list[_Sequence]:
        free = self.max_batch_size - len(self.active)
        batch: list[_Sequence] = []
        longest = 0
        while self.waiting and len(batch) < free:
            n = self.waiting[0].num_prompt_tokens
            padded = max(longest, n) * (len(batch) + 1)
            if batch and padded > self.max_prefill_tokens:
                break
            longest = max(longest, n)
            batch.append(self.waiting.popleft())
        return batch

    def _ensure_cache(self, needed: int) -> None:
        """Make every slot hold at least ``needed`` positions."""
        if self.cache is not None and self.cache.max_len >= needed:
            return
        if self.fixed_seq_len is not None:
            size = self.fixed_seq_len
        else:
            size = min(self.max_positions, -(-needed // 256) * 256)  # round up to 256
        if self.cache is None:
            self.cache = KVCache.for_model(self.model, self.max_batch_size, size)
        else:
            self.cache = self.cache.grown(size)

    def _image_embeds(self, batch: list[_Sequence]) -> torch.Tensor | None:
        """Concatenated image rows of the batch, in row order; encodes raw images once."""
        to_encode = [im for s in batch if s.image_embeds is None for im in (s.images or [])]
        if to_encode:
            t0 = time.perf_counter()
            encoded = iter(self.model.encode_images(to_encode))
            for s in batch:
                if s.image_embeds is None and s.images:
                    s.image_embeds = [next(encoded) for _ in s.images]
            self.stats.vision_s += time.perf_counter() - t0
        parts = []
        for s in batch:
            e = s.image_embeds
            if e is None:
                continue
            parts.extend([e] if isinstance(e, torch.Tensor) else list(e))
        if not parts:
            return None
        return torch.cat([p.to(self.model.device) for p in parts])

    def _admit(self, events: list[StreamEvent]) -> None:
        batch = self._take_newcomers()
        try:
            self._prefill(batch, events)
        except BaseException:  # e.g. out of memory: the batch is dropped, the engine stays usable
            for s in batch:
                if s.slot >= 0:
                    self._retire(s)
                self._live.discard(s.request_id)
            raise

    def _prefill(self, batch: list[_Sequence], events: list[StreamEvent]) -> None:
        t0 = time.perf_counter()
        device = self.model.device
        lens = [s.num_prompt_tokens for s in batch]
        T = max(lens)
        self._ensure_cache(max(n + s.max_new - 1 for n, s in zip(lens, batch)))
        img = self._image_embeds(batch)
        t1 = time.perf_counter()
        ids = torch.full((len(batch), T), self.pad_id, dtype=torch.long)
        for i, s in enumerate(batch):
            ids[i, : lens[i]] = torch.as_tensor(list(s.prompt_ids), dtype=torch.long)
        ids = ids.to(device)
        # Pads sit at positions lens[i].. past their row's real tokens (see the module docstring).
        positions = torch.arange(T, device=device).expand(len(batch), T)
        start = len(self.active)
        rows = self.cache.rows(start, start + len(batch))
        last = torch.tensor(lens, device=device) - 1
        with decode_threads(self.decode_threads):
            logits = self.model(ids, positions, rows, img, logits_at=last)  # (b, V)
        for i, s in enumerate(batch):
            s.slot, s.pos, s.t_admit = start + i, lens[i], t0
            # Their K/V are in the cache now: the prompt's images and embeddings are not needed.
            s.prompt_ids = s.images = s.image_embeds = None
            self.active.append(s)
        tokens = self._select(logits, batch)
        t2 = time.perf_counter()
        self.stats.prefill_tokens += sum(lens)
        self.stats.prefill_s += t2 - t1
        self.stats.max_active = max(self.stats.max_active, len(self.active))
        for s in batch:
            s.prefill_s, s.t_first = t2 - t0, t2
        self._advance(batch, tokens, events, t2)

    # ---------------------------------------------------------------- decode
    def _decode_forward(self, ids, positions, rows) -> torch.Tensor:
        """ids, positions (B, 1) -> logits (B, V); the one-token step that ``compile`` wraps."""
        logits_at = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
        return self.model(ids, positions, rows, None, logits_at=logits_at)

    def _decode_step(self, events: list[StreamEvent]) -> None:
        t0 = time.perf_counter()
        seqs = list(self.active)
        device = self.model.device
        ids = torch.tensor([[s.generated[-1]] for s in seqs], device=device)  # (B, 1)
        positions = torch.tensor([[s.pos] for s in seqs], device=device)  # (B, 1)
        with decode_threads(self.decode_threads):
            logits = self._decode(ids, positions, self.cache.rows(0, len(seqs)))  # (B, V)
        tokens = self._select(logits, seqs)
        for s in seqs:  # only now: a step that raises leaves every row as it was
            s.pos += 1
        t1 = time.perf_counter()
        self.stats.decode_s += t1 - t0
        self.stats.decode_tokens += len(seqs)
        self.stats.decode_steps += 1
        self._advance(seqs, tokens, events, t1)

    # ---------------------------------------------------------------- token choice and stopping
    def _select(self, logits: torch.Tensor, seqs: list[_Sequence]) -> list[int]:
        """Apply each row's n-gram ban, then greedy or its own seeded sampler. logits (B, V).

        ``<image>`` is never generated: it is an input-only placeholder, and a generated one
        would be read back as a slot for image embeddings that do not exist.
        """
        logits[:, self.model.config.image_token_id] = float("-inf")
        for i, s in enumerate(seqs):
            p = s.params
            if p.ngram_size:
                apply_no_repeat_ngram(
                    logits[i], s.generated, p.ngram_size, p.ngram_window, s.ngram_whitelist
                )
        tokens = logits.argmax(dim=-1).tolist()
        for i, s in enumerate(seqs):
            if s.generator is not None:
                tokens[i] = int(
                    sample(logits[i], s.params.temperature, s.params.top_p, s.generator)
                )
        return tokens

    def _advance(self, seqs, tokens, events, now: float) -> None:
        """Append one token per sequence, stream its text, finish and retire sequences."""
        finished = []
        for s, tok in zip(seqs, tokens):
            events.append(self._append(s, tok, now))
            if s.finish_reason is not None:
                finished.append(s)
        for s in sorted(finished, key=lambda s: s.slot, reverse=True):
            self._retire(s)

    def _append(self, s: _Sequence, tok: int, now: float) -> StreamEvent:
        p = s.params
        s.generated.append(tok)
        reason = None
        is_end_id = (tok == self.eos_id and not p.ignore_eos) or tok in p.stop_token_ids
        if is_end_id:
            reason = "eos" if tok == self.eos_id and not p.ignore_eos else "stop"
        elif s.detok is not None:
            before = len(s.detok.text)
            s.detok.push(tok)
            if p.stop and self._find_stop(s, before):
                reason = "stop"
        if reason is None and s.loops is not None and s.loops.push(tok):
            reason = "loop"
        if reason is None and len(s.generated) >= s.max_new:
            reason = "length"

        text = ""
        if s.detok is not None:
            if reason is not None and s.final_len is None:
                s.detok.flush()
                s.final_len = len(s.detok.text)
            end = s.final_len if reason is not None else len(s.detok.text) - s.hold
            if end > s.emitted:
                text = s.detok.text[s.emitted : end]
                s.emitted = end
        result = None
        if reason is not None:
            s.finish_reason, s.t_end = reason, now
            result = self._result(s)
        return StreamEvent(s.request_id, [tok], text, result)

    def _find_stop(self, s: _Sequence, before: int) -> bool:
        """Look for a stop string ending in the text added since ``before`` chars."""
        text = s.detok.text
        lo = max(0, before - s.hold)
        hits = [(text.find(stop, lo), stop) for stop in s.params.stop]
        hits = [(i, stop) for i, stop in hits if i >= 0]
        if not hits:
            return False
        i, stop = min(hits)
        s.final_len = i + (len(stop) if s.params.include_stop_str else 0)
        return True

    def _result(self, s: _Sequence) -> Result:
        text = None
        if s.detok is not None:
            text = s.detok.text[: s.final_len]
        return Result(
            request_id=s.request_id,
            token_ids=list(s.generated),
            text=text,
            finish_reason=s.finish_reason,
            num_prompt_tokens=s.num_prompt_tokens,
            num_generated_tokens=len(s.generated),
            queue_s=s.t_admit - s.t_add,
            prefill_s=s.prefill_s,
            ttft_s=s.t_first - s.t_add,
            decode_s=s.t_end - s.t_first,
            total_s=s.t_end - s.t_add,
            loop_period=s.loops.period if s.loops is not None else None,
        )

    def _retire(self, s: _Sequence) -> None:
        """Free ``s``'s slot; the last active slot moves into it so active rows stay 0..n-1."""
        last = self.active[-1]
        if last is not s:
            self.cache.move_row(last.slot, s.slot, last.pos)
            self.active[s.slot] = last
            last.slot = s.slot
        self.active.pop()
        s.slot = -1
        self._live.discard(s.request_id)

    def _dropped(self, s: _Sequence) -> None:
        """Bookkeeping for an aborted request: its id is free again, and a ``generate`` call in
        progress gets an "abort" result for it."""
        self._live.discard(s.request_id)
        if self._aborted is None:
            return
        now = time.perf_counter()
        if s.finish_reason is None:
            s.finish_reason, s.t_end = "abort", now
        if not s.t_admit:  # never admitted: no prefill, no first token
            s.t_admit = s.t_first = now
        if s.detok is not None and s.final_len is None:
            s.detok.flush()
            s.final_len = len(s.detok.text)
        self._aborted[s.request_id] = self._result(s)


# --------------------------------------------------------------------------------------------------
# The simple greedy API (kept for dsocr.api and tests)
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_greedy(
    model,
    prompts: list[list[int]],
    image_embeds: list[torch.Tensor | None] | None = None,
    max_new_tokens: int = 256,
    eos_id: int | None = None,
    pad_id: int = 0,
    use_cache: bool = True,
) -> list[list[int]]:
    """Greedy continuation of each prompt; returns the new token ids (EOS included if produced).

    ``image_embeds[i]`` holds the (N_i, C) embeddings for the ``<image>`` slots of prompt i.
    ``eos_id=None`` never stops early. A thin wrapper over :class:`Engine` (all prompts in one
    batch, no loop detection); ``use_cache=False`` instead recomputes the full sequence every step
    (a reference for tests). ``pad_id`` only matters for the uncached path.
    """
    image_embeds = image_embeds or [None] * len(prompts)
    if not use_cache:
        return _generate_greedy_uncached(
            model, prompts, image_embeds, max_new_tokens, eos_id, pad_id
        )
    params = GenerationParams(
        max_new_tokens=max_new_tokens, ignore_eos=eos_id is None, detect_loops=False
    )
    engine = Engine(
        model,
        max_batch_size=len(prompts),
        dtype=model.dtype,
        eos_id=eos_id if eos_id is not None else -1,
    )
    reqs = [Request(list(p), params, image_embeds=e) for p, e in zip(prompts, image_embeds)]
    return [r.token_ids for r in engine.generate(reqs)]


def _generate_greedy_uncached(model, prompts, image_embeds, max_new_tokens, eos_id, pad_id):
    """The reference loop: full forward over prompt + generated ids at every step."""
    embeds = [e for e in image_embeds if e is not None]
    img = torch.cat(embeds) if embeds else None
    seqs = [list(p) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new_tokens):
        nxt = _full_forward_last(model, seqs, img, pad_id).argmax(dim=-1).tolist()
        for i, t in enumerate(nxt):
            if not done[i]:
                out[i].append(t)
                done[i] = eos_id is not None and t == eos_id
            seqs[i].append(t)
        if all(done):
            break
    return out


def _full_forward_last(model, seqs, img, pad_id):
    """Logits at the last real token of each row, from an uncached forward over everything."""
    B, T = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((B, T), pad_id, dtype=torch.long, device=model.device)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    last = torch.tensor([len(s) - 1 for s in seqs], device=model.device)
    return model(ids, None, None, img, logits_at=last)
