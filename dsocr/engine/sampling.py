"""Next-token selection: greedy, temperature + top-p sampling, the no-repeat-n-gram processor, and
repetition-loop detection. Free functions over tensors and id lists; no model, no tokenizer.

After nanochat's ``sample_next_token(logits, rng, ...)``: randomness always comes from an explicit
``torch.Generator`` (one per request in the engine), so a seeded request samples the same tokens
whether it runs alone or in a batch.

The n-gram processor is the official DeepSeek-OCR one (spec §6, vLLM ``NGramPerReqLogitsProcessor``
/ official ``process/ngram_norepeat.py``). It sees only the *generated* ids, never the prompt, and
only a trailing window of them:

- if len(generated) < n: nothing is banned;
- prefix = the last n-1 generated tokens;
- for every start i in [max(0, L - window), L - n] (inclusive) whose n-gram
  ``generated[i : i + n]`` begins with the prefix, its last token is banned;
- whitelisted ids are never banned (official: ``<td>``, ``</td>`` = 128821, 128822);
- banned logits become -inf.

Official settings (spec §6): single image 30/90, PDF 20/50, OmniDocBench 40/90. Gotcha: the
official code with n = 1 slices ``ids[-0:]`` (the whole list) as the prefix and so bans nothing;
n = 1 is meaningless in practice and we reject n < 2 instead of copying that accident.

Legend: B batch rows, V vocab.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

# `<td>`, `</td>` in the official tokenizer (spec §5/§6). dsocr's own tokenizers number them
# differently: build the set with ``ngram_whitelist_for(tokenizer)``.
OFFICIAL_NGRAM_WHITELIST: frozenset[int] = frozenset({128821, 128822})
# (ngram_size, window) of the official vLLM runners (spec §6).
OFFICIAL_NGRAM_SETTINGS: dict[str, tuple[int, int]] = {
    "image": (30, 90),  # single image, streaming; also the upstream vLLM recipe
    "pdf": (20, 50),
    "eval": (40, 90),  # OmniDocBench batch
}


# --------------------------------------------------------------------------------------------------
# Token choice
# --------------------------------------------------------------------------------------------------


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """logits (B, V) -> ids (B,): the argmax (lowest id on ties, as torch.argmax)."""
    return logits.argmax(dim=-1)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of highest-probability tokens whose mass reaches ``top_p``.

    logits (..., V) -> logits with the rest set to -inf. The most likely token always survives.
    """
    if top_p >= 1.0:
        return logits
    if not top_p > 0.0:  # also NaN
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # mass strictly before each token; a token is kept while that mass is below top_p
    before = probs.cumsum(dim=-1) - probs
    drop_sorted = before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> torch.Tensor:
    """One draw from softmax(logits / temperature) after top-p filtering.

    logits (V,) or (B, V) -> ids () or (B,). ``temperature == 0`` is greedy (no draw, generator
    untouched); a negative one is a ValueError. All rows use the same generator; the engine calls
    this once per request row.
    """
    if not math.isfinite(temperature) or temperature < 0.0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if temperature == 0.0:
        return greedy(logits)
    # Shift the max to 0 and floor the temperature at float32's smallest normal, so that a tiny
    # temperature gives -inf / 0 (near-greedy), never inf - inf = NaN.
    logits = logits.float()
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    scaled = top_p_filter(shifted / max(temperature, torch.finfo(torch.float32).tiny), top_p)
    probs = scaled.softmax(dim=-1)
    squeeze = probs.ndim == 1
    ids = torch.multinomial(probs.view(-1, probs.shape[-1]), 1, generator=generator)  # (B, 1)
    return ids.view(()) if squeeze else ids.view(-1)


# --------------------------------------------------------------------------------------------------
# No-repeat n-gram (official windowed variant)
# --------------------------------------------------------------------------------------------------


def no_repeat_ngram_banned(
    generated: Sequence[int],
    ngram_size: int,
    window: int,
    whitelist: Iterable[int] | None = OFFICIAL_NGRAM_WHITELIST,
) -> set[int]:
    """Token ids the official processor bans after ``generated`` (the generated ids only).

    Scans n-gram starts i in [max(0, L - window), L - n]; see the module docstring.
    """
    if ngram_size < 2:
        raise ValueError(f"ngram_size must be >= 2, got {ngram_size}")
    L, n = len(generated), ngram_size
    if L < n:
        return set()
    prefix = list(generated[L - n + 1 :])
    last = prefix[-1]
    banned = set()
    for i in range(max(0, L - window), L - n + 1):
        # cheap pre-check on the prefix's last token before comparing the whole prefix
        if generated[i + n - 2] == last and list(generated[i : i + n - 1]) == prefix:
            banned.add(int(generated[i + n - 1]))
    if whitelist is not None:
        banned.difference_update(whitelist)
    return banned


def apply_no_repeat_ngram(
    logits: torch.Tensor,
    generated: Sequence[int],
    ngram_size: int,
    window: int,
    whitelist: Iterable[int] | None = OFFICIAL_NGRAM_WHITELIST,
) -> torch.Tensor:
    """Set the banned ids of one row's logits (V,) to -inf, in place; returns ``logits``."""
    banned = no_repeat_ngram_banned(generated, ngram_size, window, whitelist)
    if banned:
        logits[torch.tensor(sorted(banned), device=logits.device)] = float("-inf")
    return logits


def ngram_whitelist_for(tokenizer) -> frozenset[int]:
    """The official whitelist (``<td>``, ``</td>``) in ``tokenizer``'s own ids."""
    ids = (tokenizer.token_to_id(t) for t in ("<td>", "</td>"))
    return frozenset(i for i in ids if i is not None)


# --------------------------------------------------------------------------------------------------
# Repetition-loop detection
# --------------------------------------------------------------------------------------------------


class LoopDetector:
    """Flags a sequence whose tail is one block of k <= ``max_period`` tokens repeated.

    A loop is reported once the tail is periodic for at least ``min_repeats`` full periods *and*
    ``min_tokens`` tokens (the second guard keeps short legitimate runs, e.g. ``----``, from
    counting). A block made only of ``exempt`` ids never counts (the engine passes the table tags
    ``<td>``, ``</td>``, ``<tr>``, ``</tr>``: the rows of an empty table repeat exactly).
    Incremental: ``run[k]`` counts the trailing tokens equal to the token k places earlier, so each
    ``push`` costs O(max_period).
    """

    def __init__(
        self,
        max_period: int = 128,
        min_repeats: int = 10,
        min_tokens: int = 200,
        exempt: Iterable[int] = (),
    ):
        if max_period < 1 or min_repeats < 2:
            raise ValueError(
                f"loop detector needs max_period >= 1 and min_repeats >= 2, got "
                f"{max_period} and {min_repeats}"
            )
        self.max_period, self.min_repeats, self.min_tokens = max_period, min_repeats, min_tokens
        self.tokens: list[int] = []
        self.run = [0] * (max_period + 1)  # run[k]: trailing positions j with t[j] == t[j - k]
        self.period: int | None = None  # the period found, once a loop is detected
        self.exempt = frozenset(exempt)
        self.exempt_run = 0  # trailing exempt tokens: a block of k is all exempt iff >= k

    def push(self, token: int) -> bool:
        """Append one token; True when the tail now forms a loop."""
        t = self.tokens
        t.append(token)
        n = len(t)
        self.exempt_run = self.exempt_run + 1 if token in self.exempt else 0
        found = None
        for k in range(1, min(self.max_period, n - 1) + 1):
            if t[n - 1 - k] == token:
                self.run[k] += 1
                span = self.run[k] + k  # the periodic tail's length
                if (
                    found is None
                    and span >= k * self.min_repeats
                    and span >= self.min_tokens
                    and self.exempt_run < k
                ):
                    found = k
            else:
                self.run[k] = 0
        if found is not None:
            self.period = found
        return found is not None
