"""Incremental detokenisation for streaming: text deltas whose concatenation is the final text.

A token can end in the middle of a multi-byte UTF-8 character (byte-level BPE splits CJK and emoji
across tokens); decoding it alone gives U+FFFD. After vLLM's ``detokenize_incrementally`` and HF's
``TextStreamer``: decode a short window ``ids[prefix:]``, compare with the window's already-emitted
part ``ids[prefix:read]``, and emit the difference only when it does not end in U+FFFD. The window
restarts at a boundary where the text decoded cleanly, so for byte-level decoders
``decode(ids) == "".join(deltas)``, and decoders that drop a leading space (Metaspace) still see one
token of left context. ``flush`` emits whatever is held back when the sequence ends.
"""

from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Feed ids one at a time with ``push``; ``text`` is the concatenation of all deltas so far."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start (one clean boundary back, for left context)
        self.read = 0  # ids before this are already in ``text``
        self.text = ""

    def _delta(self, final: bool) -> str:
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix : self.read])
        new_text = decode(self.ids[self.prefix :])
        if len(new_text) <= len(prefix_text) or not new_text.startswith(prefix_text):
            if not final:
                return ""
        elif new_text.endswith(REPLACEMENT_CHAR) and not final:
            return ""  # an incomplete character: wait for the next token
        delta = new_text[len(prefix_text) :]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += delta
        return delta

    def push(self, token_id: int) -> str:
        """Add one id; returns the newly decodable text ('' while a character is incomplete)."""
        self.ids.append(int(token_id))
        return self._delta(final=False)

    def flush(self) -> str:
        """The held-back tail (possibly ending in U+FFFD), at the end of the sequence."""
        if self.read == len(self.ids):
            return ""
        return self._delta(final=True)
