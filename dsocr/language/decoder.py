"""DeepSeek-V2 mixture-of-experts decoder, on the path the DeepSeek-OCR checkpoint uses.

Paper §3.3 (DeepSeek3B-MoE-A570M); spec §4. The checkpoint sets ``use_mla=false``, so every layer's
attention is plain multi-head attention with rotate-half (NeoX) RoPE, like Llama; the MLA code of
DeepSeek-V2 is dead for this model and is not reproduced. Layout after nanoGPT / gpt-fast: norm ->
rope -> attention -> MLP -> MoE -> layer -> model, top to bottom.

Gotchas:
- RMSNorm computes in fp32 and casts back; the router computes its logits in fp32.
- Router: softmax over 64 experts, greedy top-6, *no* renormalisation of the 6 weights (the
  default ``norm_topk_prob=False``), scaled by ``routed_scaling_factor`` (1.0).
- The two shared experts are stored as ONE SwiGLU MLP of width 2 * 896 (``mlp.shared_experts``).
- Expert compute is grouped by expert: tokens are sorted by their assigned expert and each expert
  runs once on its contiguous slice (no per-token loop). Expert outputs are weighted in fp32.
- The KV cache is owned by the caller (``dsocr.engine``): a layer receives its (k, v) buffers and
  writes the new keys at slot == position. Positions must be distinct within a row.
- Big products go through ``linear``: inside ``decode_threads`` (the engine's CPU decode step)
  they use other kernels and threads than a plain forward, and one-query attention steps use
  ``fewrow.decode_attention`` instead of sdpa, so decode logits match it to float rounding, not
  bit for bit.

Legend: B batch, T new tokens, S key slots, C hidden, nh heads, hs head size, E experts,
A active experts per token, N = B*T flattened tokens.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsocr.configs import LanguageConfig
from dsocr.language import fewrow


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype) -> tuple:
    """positions (B, T) -> cos, sin of shape (B, 1, T, hs), computed in fp32."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    )
    freqs = positions.float()[..., None] * inv_freq  # (B, T, hs/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, hs)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Multi-head attention (10 x 128 for the official model), no biases."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        C, nh = cfg.hidden_size, cfg.num_attention_heads
        assert cfg.num_key_value_heads == nh, "the checkpoint's decoder is MHA (kv heads == heads)"
        self.num_heads, self.head_dim = nh, C // nh
        self.q_proj = nn.Linear(C, C, bias=False)
        self.k_proj = nn.Linear(C, C, bias=False)
        self.v_proj = nn.Linear(C, C, bias=False)
        self.o_proj = nn.Linear(C, C, bias=False)
        self.use_sdpa = True  # False: the manual softmax path, kept for equivalence tests

    def forward(self, x, cos, sin, mask, kv=None, positions=None):
        """x (B, T, C); mask (B, 1, T, S) bool, True = attend; kv: this layer's (k, v) buffers
        of shape (B, nh, S_max, hs), written at slots ``positions`` (B, T)."""
        B, T, C = x.shape
        shape = (B, T, self.num_heads, self.head_dim)
        q = linear(x, self.q_proj).view(shape).transpose(1, 2)  # (B, nh, T, hs)
        k = linear(x, self.k_proj).view(shape).transpose(1, 2)
        v = linear(x, self.v_proj).view(shape).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            k_buf, v_buf = kv
            idx = positions[:, None, :, None].expand(B, self.num_heads, T, self.head_dim)
            k_buf.scatter_(2, idx, k.to(k_buf.dtype))
            v_buf.scatter_(2, idx, v.to(v_buf.dtype))
            n = _decode_setting(q)
            if (
                n is not None
                and T == 1
                and self.use_sdpa
                and fewrow.attention_usable(q, k_buf, v_buf)
            ):
                # One query: row b attends to slots 0..positions[b], which is what mask says.
                o = fewrow.decode_attention(q, k_buf, v_buf, positions[:, 0] + 1, max(n, 1))
                return linear(o.transpose(1, 2).reshape(B, T, C), self.o_proj)
            S = mask.shape[-1]
            k, v = k_buf[:, :, :S], v_buf[:, :, :S]  # (B, nh, S, hs)
        if self.use_sdpa:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            att = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
            att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            o = att @ v  # (B, nh, T, hs)
        return linear(o.transpose(1, 2).reshape(B, T, C), self.o_proj)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        h = F.silu(linear(x, self.gate_proj)) * linear(x, self.up_proj)
        return linear(h, self.down_proj)


class MoEGate(nn.Module):
    """Softmax router with greedy top-k; stored as ``mlp.gate.weight`` (E, C), no bias."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scale = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, C) -> (weights (N, A) fp32, expert ids (N, A))."""
        scores = F.linear(x.float(), self.weight.float()).softmax(dim=-1)  # (N, E)
        w, idx = torch.topk(scores, self.top_k, dim=-1)
        if self.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * self.scale, idx


# Per thread: .threads, the decode_threads setting (None: off); .pooled, True on pool threads.
_local = threading.local()
_pools: dict[int, ThreadPoolExecutor] = {}
# Matrices smaller than this keep the plain path: dispatch to a pool thread costs more than
# streaming them (the official 896 x 1280 fp32 experts are 4.6 MB; dsocr-mini's are KBs).
POOL_MIN_BYTES = 1 << 20
# Products of 2 to this many rows are bandwidth-bound: inside decode_threads they split the
# weight's rows over the pool. Others run whole on the calling thread.
SPLIT_MAX_ROWS = 4
_onednn = (
    getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if torch.backends.mkldnn.is_available()
    else None
)


def onednn_linear(x2: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """``F.linear`` of a 2-D contiguous ``x2`` by torch's oneDNN op (needs ``_onednn``)."""
    return _onednn(x2, weight, bias, "none", [], "")


@contextlib.contextmanager
def decode_threads(n: int):
    """Within this block, this thread's CPU forwards without autograd pick the fastest product
    per shape for decode, and split the big ones over ``n`` threads (<= 1: all on this thread).

    At decode each product sees a few rows. MKL's ``F.linear`` runs those as single-threaded GEMVs
    streaming about 12 GB/s of a 32 GB/s machine, and wider few-row products slower still (6 GB/s
    for ``lm_head`` at 8 rows). Where ``fewrow`` is built, every product of 1 to 8 rows runs on
    it: a MoE layer's experts whole on ``n`` Python threads (each every n-th expert, one thread
    per product), the other weights' products split over ``n`` of torch's OpenMP threads.
    Elsewhere oneDNN's linear, and ``(W @ x.T).T`` at 2
    rows, stream several times faster than ``F.linear``, and ``n`` Python threads (torch releases
    the GIL inside kernels) take a MoE layer's experts (each thread every n-th) and the rows of
    2-4 row products (bench/expert_gemv.py, docs/benchmarks/expert_gemv.md). Different kernels
    round differently, so results match those outside the block, and across ``n``, to float
    rounding, not bit for bit. The setting is per calling thread; with grad enabled, and for
    matrices under ``POOL_MIN_BYTES``, everything is as outside the block.
    """
    if n > 1 and n not in _pools:
        _pools[n] = ThreadPoolExecutor(n, thread_name_prefix="dsocr-decode")
    previous = getattr(_local, "threads", None)
    _local.threads = n
    try:
        yield
    finally:
        _local.threads = previous


def _in_pool(inference: bool, fn, *args):
    """``fn(*args)`` as one of a split's parts: no grad, inference mode where the caller had it
    (pool threads' modes start at the defaults), ``decode_threads(1)`` (the block's kernels, no
    re-entry into the pool), and ``.pooled`` set for ``_product``."""
    previous = getattr(_local, "pooled", False)
    _local.pooled = True
    try:
        with torch.inference_mode(inference), torch.no_grad(), decode_threads(1):
            return fn(*args)
    finally:
        _local.pooled = previous


def _decode_setting(x: torch.Tensor) -> int | None:
    """This thread's ``decode_threads`` count for a CPU forward of ``x`` without autograd inside
    the block, else None."""
    n = getattr(_local, "threads", None)
    if n is None or x.device.type != "cpu" or torch.is_grad_enabled():
        return None
    return n


def _decoding(x: torch.Tensor, weight: torch.Tensor) -> int | None:
    """``_decode_setting(x)`` where ``weight`` is a matrix of at least ``POOL_MIN_BYTES``, else
    None."""
    n = _decode_setting(x)
    return n if n is not None and weight.numel() * weight.element_size() >= POOL_MIN_BYTES else None


def _run_split(n: int, fn, parts: list) -> list:
    """``[fn(p) for p in parts]`` with part 0 on this thread and the others on pool threads
    (``len(parts) <= n``)."""
    inference = torch.is_inference_mode_enabled()
    futures = [_pools[n].submit(_in_pool, inference, fn, p) for p in parts[1:]]
    first = _in_pool(inference, fn, parts[0])
    return [first] + [f.result() for f in futures]


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` by the kernel that streams ``weight`` fastest on a CPU for
    x's row count: ``fewrow`` for up to 8 rows where it is built (docs/benchmarks/expert_gemv.md),
    else (W @ x.T).T for 2 rows, oneDNN's linear (where torch has it, in fp32), and MKL's GEMV
    for 1 row on a pool thread."""
    rows = x.numel() // x.shape[-1]
    if fewrow.usable(x, weight, rows):
        return _fewrow_linear(x, weight, bias, 1)
    if rows == 1 and getattr(_local, "pooled", False):
        return F.linear(x, weight, bias)
    x2 = x.reshape(rows, -1).contiguous()
    if rows == 2:
        # x2.T is a column-major view; with a row-major (C, rows) operand this is as slow as
        # F.linear.
        y = (weight @ x2.T).T
        y = y if bias is None else y + bias
    elif _onednn is not None and weight.dtype == torch.float32:
        y = onednn_linear(x2, weight, bias)
    else:
        return F.linear(x, weight, bias)
    return y.reshape(*x.shape[:-1], -1)


def _fewrow_linear(x: torch.Tensor, weight: torch.Tensor, bias, n: int) -> torch.Tensor:
    """``F.linear`` by ``fewrow`` on ``n`` of torch's OpenMP threads (not our Python pool, whose
    dispatch costs more than the product: in an interleaved A/B at official size, 5.5 against
    5.3 tok/s at batch 1 and 16.9 against 15.2 at batch 8, medians of 6)."""
    rows = x.numel() // x.shape[-1]
    x2 = x.reshape(rows, -1).contiguous()
    y = x2.new_empty(rows, weight.shape[0])
    fewrow.linear_into(x2, weight, y, 0, weight.shape[0], threads=n)
    y = y if bias is None else y + bias
    return y.reshape(*x.shape[:-1], -1)


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``layer(x)``; inside ``decode_threads(n)`` by ``_product``'s kernels, with the weight's
    output rows split over the n threads for products ``fewrow`` takes (1 to 8 rows), or else for
    2 to ``SPLIT_MAX_ROWS`` rows (oneDNN runs one-row products as fast whole on its own threads,
    and wider ones measured slower split)."""
    n = _decoding(x, layer.weight)
    if n is None:
        return layer(x)
    rows = x.numel() // x.shape[-1]
    if n >= 2 and fewrow.usable(x, layer.weight, rows):
        return _fewrow_linear(x, layer.weight, layer.bias, n)
    if n < 2 or not 2 <= rows <= SPLIT_MAX_ROWS:
        return _product(x, layer.weight, layer.bias)
    weights = layer.weight.chunk(n)
    biases = [None] * n if layer.bias is None else layer.bias.chunk(n)
    return torch.cat(_run_split(n, lambda wb: _product(x, *wb), list(zip(weights, biases))), -1)


class MoE(nn.Module):
    """Routed experts (grouped by expert) plus the fused shared experts."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.gate = MoEGate(cfg)
        self.experts = nn.ModuleList(
            MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.n_routed_experts)
        )
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, C)
        w, idx = self.gate(x)  # (N, A)
        A = idx.shape[1]
        flat = idx.flatten()  # (N*A,)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        tokens = x[order // A]  # (N*A, C), grouped by expert
        out = torch.empty(tokens.shape[0], shape[-1], dtype=torch.float32, device=x.device)
        spans, start = [], 0
        for e, n in enumerate(counts):
            if n:
                spans.append((e, start, start + n))
                start += n

        def run(part):
            for e, a, b in part:
                out[a:b] = self.experts[e](tokens[a:b]).float()

        w0 = self.experts[0].gate_proj.weight
        k = _decoding(x, w0)
        # Whole experts per pool thread (on fewrow's single-thread kernel, or torch's), except at
        # one row per expert (batch 1) on torch's kernels, which oneDNN runs as fast inline on its
        # own threads. The pool's two Python threads overlap one expert's Python with another's
        # product: experts inline with each product on fewrow's OpenMP threads were slower
        # (official size, batch 8, two 4-run profiles minutes apart: 14.5-19.8 against 19.0-20.9
        # tok/s), and at batch 1 pooled beat inline experts on Python-split products (medians of
        # 8 interleaved runs: 4.5 against 3.5 tok/s).
        pool = max(counts) > 1 or fewrow.usable(x, w0, 1)
        if k is not None and k > 1 and len(spans) > 1 and pool:
            _run_split(k, run, [spans[i::k] for i in range(k)])
        else:
            run(spans)
        routed = torch.empty_like(out)
        routed[order] = out  # back to (N*A, C) in (token, slot) order
        y = (routed.view(-1, A, shape[-1]) * w[..., None]).sum(dim=1).to(x.dtype)  # (N, C)
        return (y + self.shared_experts(x)).view(shape)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LanguageConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe_layer(layer_idx):
            self.mlp = MoE(cfg)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, mask, kv=None, positions=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, positions)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask(positions: torch.Tensor, num_slots: int | None) -> torch.Tensor:
    """Boolean (B, 1, T, S) mask, True where query position >= key position.

    Without a cache (``num_slots=None``) keys are the queries themselves; with a cache, key slot j
    holds position j. Right padding is safe as long as pad tokens carry positions past the row's
    real tokens: no real query attends to them, and later tokens overwrite their slots.
    """
    if num_slots is None:
        key_pos = positions[:, None, None, :]  # (B, 1, 1, T)
    else:
        key_pos = torch.arange(num_slots, device=positions.device)[None, None, None, :]
    return key_pos <= positions[:, None, :, None]


class DeepseekV2Model(nn.Module):
    """Token embeddings, decoder layers and the final norm (keys ``model.embed_tokens`` ...)."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.lang_cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def decode(self, h: torch.Tensor, positions: torch.Tensor, kv_cache=None) -> torch.Tensor:
        """Run the layers on embeddings h (B, T, C) at positions (B, T); returns normed (B, T, C).

        ``kv_cache[i]`` gives layer i's (k, v) buffers, (B, nh, S_max, hs) each.
        """
        cfg = self.lang_cfg
        num_slots = None if kv_cache is None else int(positions.max()) + 1
        mask = attention_mask(positions, num_slots)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, h.dtype)
        for i, layer in enumerate(self.layers):
            kv = None if kv_cache is None else kv_cache[i]
            h = layer(h, cos, sin, mask, kv, positions)
        return self.norm(h)
