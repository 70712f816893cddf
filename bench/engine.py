"""Decoder throughput: dsocr's engine vs the transformers DeepSeek-V2 decoder, same weights.

Builds the DeepSeek-OCR decoder (config ``deepseek-ocr``; the vision tower is swapped for the tiny
one and never run: text-only prompts) with seeded random weights, copies those weights into
``transformers``' ``DeepseekV2ForCausalLM`` and times, per batch size:

- prefill tokens/s (B prompts of ``--prompt-len`` tokens, one forward),
- decode tokens/s (``--new-tokens`` greedy tokens per row, EOS ignored),
- peak extra memory of the run (KV cache + activations; CUDA: allocator peak, CPU: RSS peak
  sampled every 2 ms, over the RSS at the start of the run),

and checks that both produce identical greedy tokens.

transformers' DeepseekV2 has no plain-MHA path: its attention is always MLA (``kv_a_proj_with_mqa``
+ ``kv_a_layernorm`` + ``kv_b_proj``, interleaved RoPE on a separate rope head), which cannot
express the checkpoint's ``use_mla=false`` attention. The official remote code builds that path
from ``LlamaAttention`` (its ``ATTENTION_CLASSES["mha_eager"]``), so we do the same: each layer's
``self_attn`` becomes transformers' ``LlamaAttention`` (sdpa) and ``model.rotary_emb`` becomes
``LlamaRotaryEmbedding`` (rotate-half RoPE, theta 1e4, all 128 dims). Everything else (router,
experts, shared experts, dense layer 0, norms, lm_head, DynamicCache) is transformers'
DeepseekV2 code. Its experts are timed with each ``--hf-experts`` implementation
(``grouped_mm`` is the transformers default; ``eager`` loops over experts).

Weights are shared, not copied: the routed experts are stacked once into transformers' layout
((E, 2I, C) gate+up and (E, C, I) down) and dsocr's per-expert Linear weights are rebound to views
of those stacks, so one process holds one copy of the decoder.

``--moe grouped`` also times a proposal for ``language/decoder.py`` (not in the model yet): the
MoE forward on the stacked weights with ``torch.nn.functional.grouped_mm`` for small token
counts (decode) and the existing per-expert loop otherwise. It is applied to this script's model
instance only.

Usage (the official size needs ~13 GB of fp32 weights; scale down on small machines):

    python -m bench.engine                                      # official decoder, B = 1, 8, 32
    python -m bench.engine --layers 4 --batch-sizes 1,8,32 --new-tokens 16 --prompt-len 64
    python -m bench.engine --layers 2 --experts 8 --hidden 256 --vocab 4096 --new-tokens 8  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsocr.configs import CONFIGS
from dsocr.engine.generate import Engine, GenerationParams, Request, default_dtype
from dsocr.language import fewrow
from dsocr.model import build_model

# --------------------------------------------------------------------------------------------------
# Model construction
# --------------------------------------------------------------------------------------------------


def bench_config(layers: int, experts: int, hidden: int, vocab: int, top_k: int):
    """The official config with the decoder scaled; head size stays 128, widths scale with C."""
    base = CONFIGS["deepseek-ocr"]
    lang = base.language
    scale = hidden / lang.hidden_size
    lang = replace(
        lang,
        num_hidden_layers=layers,
        n_routed_experts=experts,
        hidden_size=hidden,
        num_attention_heads=max(1, hidden // 128),
        num_key_value_heads=max(1, hidden // 128),
        intermediate_size=int(round(lang.intermediate_size * scale / 64)) * 64 or 64,
        moe_intermediate_size=int(round(lang.moe_intermediate_size * scale / 64)) * 64 or 64,
        vocab_size=vocab,
        num_experts_per_tok=min(top_k, experts),
    )
    tiny = CONFIGS["tiny"]  # vision tower: never run here, keep it small
    return replace(base, language=lang, sam=tiny.sam, clip=tiny.clip, name="bench")


def stack_experts(model) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Per layer: (w13 (E, 2I, C), w2 (E, C, I)) stacks; rebinds the experts' weights to views."""
    stacks = []
    for layer in model.model.layers:
        moe = layer.mlp
        if not hasattr(moe, "experts"):
            stacks.append(None)
            continue
        I = moe.experts[0].gate_proj.weight.shape[0]
        w13 = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in moe.experts])
        w2 = torch.stack([e.down_proj.weight for e in moe.experts])
        for i, e in enumerate(moe.experts):
            e.gate_proj.weight = nn.Parameter(w13[i, :I], requires_grad=False)
            e.up_proj.weight = nn.Parameter(w13[i, I:], requires_grad=False)
            e.down_proj.weight = nn.Parameter(w2[i], requires_grad=False)
        stacks.append((w13, w2))
    return stacks


def build_hf(model, stacks):
    """transformers' DeepseekV2ForCausalLM (MHA via LlamaAttention) holding ``model``'s tensors."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    lang = model.config.language
    cfg = DeepseekV2Config(
        vocab_size=lang.vocab_size,
        hidden_size=lang.hidden_size,
        intermediate_size=lang.intermediate_size,
        moe_intermediate_size=lang.moe_intermediate_size,
        num_hidden_layers=lang.num_hidden_layers,
        num_attention_heads=lang.num_attention_heads,
        num_key_value_heads=lang.num_key_value_heads,
        n_routed_experts=lang.n_routed_experts,
        n_shared_experts=lang.n_shared_experts,
        num_experts_per_tok=lang.num_experts_per_tok,
        first_k_dense_replace=lang.first_k_dense_replace,
        norm_topk_prob=lang.norm_topk_prob,
        routed_scaling_factor=lang.routed_scaling_factor,
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        rms_norm_eps=lang.rms_norm_eps,
        max_position_embeddings=lang.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": lang.rope_theta},
        # MLA sizes only shape the attention modules that are replaced below; qk_rope_head_dim
        # also sets config.head_dim, which LlamaAttention / LlamaRotaryEmbedding read (128).
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_nope_head_dim=0,
        qk_rope_head_dim=lang.head_dim,
        v_head_dim=lang.head_dim,
        attention_bias=False,
        tie_word_embeddings=False,
        bos_token_id=lang.bos_token_id,
        eos_token_id=lang.eos_token_id,
        pad_token_id=None,
    )
    with torch.device("meta"):
        hf = DeepseekV2ForCausalLM(cfg)
        for i, layer in enumerate(hf.model.layers):
            layer.self_attn = LlamaAttention(cfg, i)
    hf.model.rotary_emb = LlamaRotaryEmbedding(cfg).to(model.device)

    sd = {
        "model.embed_tokens.weight": model.model.embed_tokens.weight,
        "model.norm.weight": model.model.norm.weight,
        "lm_head.weight": model.lm_head.weight,
    }
    for i, (ours, st) in enumerate(zip(model.model.layers, stacks)):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = ours.input_layernorm.weight
        sd[p + "post_attention_layernorm.weight"] = ours.post_attention_layernorm.weight
        for n in ("q", "k", "v", "o"):
            sd[p + f"self_attn.{n}_proj.weight"] = getattr(ours.self_attn, f"{n}_proj").weight
        mlp = ours.mlp
        if st is None:
            for n in ("gate", "up", "down"):
                sd[p + f"mlp.{n}_proj.weight"] = getattr(mlp, f"{n}_proj").weight
        else:
            sd[p + "mlp.gate.weight"] = mlp.gate.weight
            sd[p + "mlp.experts.gate_up_proj"], sd[p + "mlp.experts.down_proj"] = st
            for n in ("gate", "up", "down"):
                sd[p + f"mlp.shared_experts.{n}_proj.weight"] = getattr(
                    mlp.shared_experts, f"{n}_proj"
                ).weight
    sd = {k: v.detach() for k, v in sd.items()}
    hf.load_state_dict(sd, strict=True, assign=True)
    meta = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    assert not meta, f"transformers model still has meta tensors: {meta[:5]}"
    hf.set_attn_implementation("sdpa")
    return hf.eval()


# --------------------------------------------------------------------------------------------------
# The grouped-MoE proposal (bench-local; see the module docstring)
# --------------------------------------------------------------------------------------------------


def grouped_moe_forward(moe, w13, w2, max_grouped_tokens: int = 64):
    """A forward for one ``decoder.MoE`` on stacked weights: grouped_mm when few tokens."""
    w13_t, w2_t = w13.transpose(1, 2), w2.transpose(1, 2)  # (E, C, 2I), (E, I, C) views
    E = w13.shape[0]
    loop_forward = moe.forward

    def forward(x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, C)
        if x2.shape[0] > max_grouped_tokens:
            return loop_forward(x)
        w, idx = moe.gate(x2)  # (N, A)
        A = idx.shape[1]
        order = idx.flatten().argsort(stable=True)
        offs = torch.bincount(idx.flatten(), minlength=E).cumsum(0).to(torch.int32)
        tokens = x2[order // A]  # (N*A, C) grouped by expert
        g, u = F.grouped_mm(tokens, w13_t, offs=offs).chunk(2, dim=-1)
        out = F.grouped_mm((F.silu(g) * u).contiguous(), w2_t, offs=offs).float()
        routed = torch.empty_like(out)
        routed[order] = out
        y = (routed.view(-1, A, shape[-1]) * w[..., None]).sum(dim=1).to(x.dtype)
        return (y + moe.shared_experts(x2)).view(shape)

    return forward


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def _fix_glibc_mmap_threshold() -> None:
    """Make glibc mmap every allocation >= 128 KiB (and unmap it on free), so process RSS follows
    live tensors instead of keeping freed heap memory; a no-op off glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (fixed: disables the dynamic threshold)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak extra memory inside the block: CUDA allocator peak, or sampled process RSS on CPU
    (every 2 ms, so very short-lived peaks can be missed)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            _fix_glibc_mmap_threshold()
            self.base = self._rss()
            self.max = self.base
            self.stop = threading.Event()

            def sample():
                while not self.stop.wait(0.002):
                    self.max = max(self.max, self._rss())

            self.thread = threading.Thread(target=sample, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.max, self._rss()) - self.base


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_dsocr(model, prompts, new_tokens):
    """Greedy through the engine; returns (tokens, prefill_s, decode_s, peak_bytes)."""
    engine = Engine(
        model,
        max_batch_size=len(prompts),
        dtype=model.dtype,
        max_seq_len=len(prompts[0]) + new_tokens,
    )
    params = GenerationParams(max_new_tokens=new_tokens, ignore_eos=True, detect_loops=False)
    with PeakMemory(model.device) as mem:
        results = engine.generate([Request(p, params) for p in prompts])
        sync(model.device)
    s = engine.stats
    return [r.token_ids for r in results], s.prefill_s, s.decode_s, mem.peak


@torch.no_grad()
def run_hf(hf, prompts, new_tokens):
    """Greedy with transformers' forward + DynamicCache (a bare loop: no generate() overhead)."""
    device = hf.lm_head.weight.device
    ids = torch.tensor(prompts, device=device)  # equal lengths: no padding needed
    with PeakMemory(device) as mem:
        sync(device)
        t0 = time.perf_counter()
        out = hf(input_ids=ids, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1)
        toks = [tok.tolist()]
        t1 = time.perf_counter()
        cache = out.past_key_values
        for _ in range(new_tokens - 1):
            out = hf(input_ids=tok[:, None], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            tok = out.logits[:, -1].argmax(-1)
            toks.append(tok.tolist())
        t2 = time.perf_counter()
        del out, cache
    tokens = [list(r) for r in zip(*toks)]
    return tokens, t1 - t0, t2 - t1, mem.peak


def first_mismatch(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            for j, (p, q) in enumerate(zip(x, y)):
                if p != q:
                    return f"row {i} token {j}"
    return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=1280)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=129280)
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="best of N, implementations interleaved")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: per device)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--hf-experts",
        default="grouped_mm,eager",
        help="transformers experts implementations to time ('' skips transformers)",
    )
    ap.add_argument(
        "--moe",
        default="loop,grouped",
        help="dsocr MoE variants: loop (decoder.py as is), grouped (the proposal)",
    )
    ap.add_argument("--json", default=None, help="write all numbers here")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(device)
    cfg = bench_config(args.layers, args.experts, args.hidden, args.vocab, args.top_k)
    lang = cfg.language
    t0 = time.perf_counter()
    model = build_model(cfg, seed=0).to(device=device, dtype=dtype).eval()
    stacks = stack_experts(model)
    n_dec = sum(
        p.numel()
        for n, p in model.named_parameters()
        if not n.startswith(("model.sam_model", "model.vision_model", "model.projector"))
    )
    hf_impls = [s for s in args.hf_experts.split(",") if s]
    hf = build_hf(model, stacks) if hf_impls else None
    loop_forwards = {
        i: layer.mlp.forward
        for i, (layer, st) in enumerate(zip(model.model.layers, stacks))
        if st is not None
    }
    grouped_forwards = {
        i: grouped_moe_forward(model.model.layers[i].mlp, *stacks[i]) for i in loop_forwards
    }

    def set_moe(variant):
        for i, f in (grouped_forwards if variant == "grouped" else loop_forwards).items():
            model.model.layers[i].mlp.forward = f

    setup = dict(
        date=time.strftime("%Y-%m-%d %H:%M"),
        cpu=cpu_name(),
        cores=os.cpu_count(),
        threads=torch.get_num_threads(),
        device=str(device),
        gpu=torch.cuda.get_device_name() if device.type == "cuda" else None,
        torch=torch.__version__,
        dtype=str(dtype).replace("torch.", ""),
        layers=lang.num_hidden_layers,
        hidden=lang.hidden_size,
        heads=lang.num_attention_heads,
        experts=lang.n_routed_experts,
        top_k=lang.num_experts_per_tok,
        moe_intermediate=lang.moe_intermediate_size,
        dense_intermediate=lang.intermediate_size,
        vocab=lang.vocab_size,
        decoder_params=n_dec,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        build_s=round(time.perf_counter() - t0, 1),
        fewrow=fewrow.status() if device.type == "cpu" else None,  # the CPU decode kernel
    )
    if hf is not None:
        import transformers

        setup["transformers"] = transformers.__version__
    print(json.dumps(setup), flush=True)

    variants = [("dsocr", m) for m in args.moe.split(",") if m] + [("hf", e) for e in hf_impls]
    rows = []
    g = torch.Generator().manual_seed(1)
    for B in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = torch.randint(3, lang.vocab_size, (B, args.prompt_len), generator=g)
        prompts[prompts == cfg.image_token_id] = 3  # text-only: no <image> placeholders
        prompts = prompts.tolist()
        best: dict = {}
        for _ in range(args.repeats):  # interleaved, so load from other processes hits all alike
            for impl, variant in variants:
                if impl == "dsocr":
                    set_moe(variant)
                    out = run_dsocr(model, prompts, args.new_tokens)
                else:
                    hf.set_experts_implementation(variant)
                    out = run_hf(hf, prompts, args.new_tokens)
                key = (impl, variant)
                if key not in best:
                    best[key] = dict(tokens=out[0], prefill_s=out[1], decode_s=out[2], mem=out[3])
                else:
                    b = best[key]
                    assert b["tokens"] == out[0], f"{key}: tokens changed between repeats"
                    b["prefill_s"] = min(b["prefill_s"], out[1])
                    b["decode_s"] = min(b["decode_s"], out[2])
                    b["mem"] = max(b["mem"], out[3])
        set_moe("loop")
        ref = best[variants[0]]["tokens"]
        for (impl, variant), b in best.items():
            row = dict(
                impl=impl,
                variant=variant,
                batch=B,
                prefill_tok_s=B * args.prompt_len / b["prefill_s"],
                decode_tok_s=B * (args.new_tokens - 1) / b["decode_s"],
                peak_extra_mb=b["mem"] / 2**20,
                same_tokens_as_first=b["tokens"] == ref,
                first_mismatch=first_mismatch(b["tokens"], ref),
            )
            rows.append(row)
            print(
                json.dumps(
                    {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}
                ),
                flush=True,
            )
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(setup=setup, rows=rows), f, indent=1)


def print_table(rows):
    print(
        "\n| impl | MoE / experts | batch | prefill tok/s | decode tok/s | peak extra MB "
        "| same greedy tokens |"
    )
    print("|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['impl']} | {r['variant']} | {r['batch']} | {r['prefill_tok_s']:.1f} "
            f"| {r['decode_tok_s']:.2f} | {r['peak_extra_mb']:.0f} "
            f"| {'yes' if r['same_tokens_as_first'] else 'no: ' + r['first_mismatch']} |"
        )
    base = {(r["batch"]): r for r in rows if r["impl"] == "dsocr" and r["variant"] == "loop"}
    hf = {}
    for r in rows:
        if r["impl"] == "hf":
            b = hf.get(r["batch"])
            if b is None or r["decode_tok_s"] > b["decode_tok_s"]:
                hf[r["batch"]] = r
    if hf and base:
        print("\ndecode throughput ratio dsocr / best transformers:")
        for B in sorted(hf):
            for r in rows:
                if r["impl"] == "dsocr" and r["batch"] == B:
                    print(
                        f"  batch {B} ({r['variant']}): "
                        f"{r['decode_tok_s'] / hf[B]['decode_tok_s']:.2f}x "
                        f"(vs hf {hf[B]['variant']})"
                    )


if __name__ == "__main__":
    main()
