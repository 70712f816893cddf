"""A preallocated key/value cache, owned by the engine and lent to the model layer by layer.

After gpt-fast's ``KVCache`` and nanochat's engine: one (k, v) buffer pair per layer of shape
(B, nh, S_max, hs). The model writes the keys of a token at slot == its position, so each batch row
can sit at a different position (needed for right-padded prefill and continuous batching).

For continuous batching a row is a *slot* holding one request. ``rows(a, b)`` lends a contiguous
range of slots to the model (a view: writes land in this cache), and ``move_row`` copies one slot's
filled prefix into another, which the engine uses to keep its active slots a prefix 0..n-1.

Legend: L layers, B batch rows (slots), nh heads, S_max slots per row, hs head size.
"""

from __future__ import annotations

import torch


class _LayerBuffers:
    """What the model needs from a cache: ``cache[i]`` -> layer i's (k, v) buffers."""

    k: torch.Tensor  # (L, B, nh, S_max, hs)
    v: torch.Tensor

    def __getitem__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer], self.v[layer]

    def __len__(self) -> int:
        return self.k.shape[0]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]


class KVCache(_LayerBuffers):
    def __init__(self, num_layers, batch_size, num_heads, max_len, head_dim, dtype, device=None):
        shape = (num_layers, batch_size, num_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, nh, S_max, hs)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int) -> KVCache:
        lang = model.config.language
        return cls(
            lang.num_hidden_layers,
            batch_size,
            lang.num_attention_heads,
            max_len,
            lang.head_dim,
            model.dtype,
            model.device,
        )

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def rows(self, start: int, stop: int) -> KVCacheView:
        """Slots ``start..stop-1`` as a cache of batch ``stop - start`` sharing this storage."""
        assert 0 <= start < stop <= self.batch_size, (start, stop, self.batch_size)
        return KVCacheView(self.k[:, start:stop], self.v[:, start:stop])

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy slot ``src``'s first ``length`` positions into slot ``dst`` (all layers)."""
        if src != dst and length > 0:
            self.k[:, dst, :, :length] = self.k[:, src, :, :length]
            self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def grown(self, max_len: int) -> KVCache:
        """A cache with ``max_len`` positions per slot holding this one's contents."""
        if max_len <= self.max_len:
            return self
        L, B, nh, _, hs = self.k.shape
        new = KVCache(L, B, nh, max_len, hs, self.k.dtype, self.k.device)
        new.k[:, :, :, : self.max_len] = self.k
        new.v[:, :, :, : self.max_len] = self.v
        return new


class KVCacheView(_LayerBuffers):
    """A batch-slice of a :class:`KVCache` (``KVCache.rows``); the model indexes it the same way."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v  # (L, b, nh, S_max, hs) views
