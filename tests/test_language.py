"""Decoder parts against plain references: MoE routing, RoPE, RMSNorm, masks."""

import torch

from dsocr.configs import LanguageConfig
from dsocr.language import decoder as D


def _cfg(**kw):
    base = dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=48,
        moe_intermediate_size=16,
        n_routed_experts=5,
        n_shared_experts=2,
        num_experts_per_tok=3,
    )
    return LanguageConfig(**(base | kw))


def _randomize(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


def _moe_per_token(moe: D.MoE, x):
    """The definition: softmax over experts, top-k, no renorm; sum w_k * expert_k(x) + shared(x)."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        scores = (moe.gate.weight @ x[n]).softmax(-1)
        w, idx = scores.topk(moe.gate.top_k)
        for wk, e in zip(w, idx):
            out[n] += wk * moe.experts[int(e)](x[n])
        out[n] += moe.shared_experts(x[n])
    return out


def test_moe_grouped_by_expert_matches_per_token_reference():
    moe = _randomize(D.MoE(_cfg()))
    x = torch.randn(23, 32)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), _moe_per_token(moe, x), rtol=1e-4, atol=1e-5)
        # Batched (B, T, C) input gives the same per-token result.
        torch.testing.assert_close(moe(x.view(1, 23, 32))[0], moe(x), rtol=1e-5, atol=1e-6)
    assert moe.shared_experts.gate_proj.weight.shape == (2 * 16, 32)  # shared experts fused


def test_router_weights_are_not_renormalised():
    gate = _randomize(D.MoEGate(_cfg()))
    w, idx = gate(torch.randn(10, 32))
    assert w.dtype == torch.float32 and idx.shape == (10, 3)
    assert (w.sum(-1) < 1).all()  # top-3 of 5 softmax probabilities, not rescaled to 1
    gate.norm_topk_prob = True
    w2, _ = gate(torch.randn(10, 32))
    torch.testing.assert_close(w2.sum(-1), torch.ones(10))


def test_rope_is_rotate_half_with_theta_1e4():
    pos = torch.tensor([[0, 1, 5]])
    cos, sin = D.rope_cos_sin(pos, 8, 10000.0, torch.float32)
    assert cos.shape == (1, 1, 3, 8)
    inv = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)
    torch.testing.assert_close(cos[0, 0, 2], torch.cat([(5 * inv).cos()] * 2))
    x = torch.randn(1, 1, 3, 8)
    y = D.apply_rope(x, cos, sin)
    # Rotating pairs (i, i + hs/2) preserves their norm.
    n_x = x[..., :4] ** 2 + x[..., 4:] ** 2
    torch.testing.assert_close(y[..., :4] ** 2 + y[..., 4:] ** 2, n_x)
    torch.testing.assert_close(y[0, 0, 0], x[0, 0, 0])  # position 0 is the identity


def test_rmsnorm_in_fp32():
    norm = D.RMSNorm(8, 1e-6).bfloat16()
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    ref = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    torch.testing.assert_close(norm(x), ref)


def test_attention_mask_with_and_without_cache():
    pos = torch.tensor([[0, 1, 2], [0, 1, 2]])
    m = D.attention_mask(pos, None)
    assert m[0, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    m2 = D.attention_mask(torch.tensor([[4], [1]]), 6)
    assert m2[:, 0, 0].tolist() == [[True] * 5 + [False], [True, True, False, False, False, False]]


def test_dense_first_layer_then_moe():
    model = D.DeepseekV2Model(_cfg(num_hidden_layers=3))
    assert isinstance(model.layers[0].mlp, D.MLP)
    assert all(isinstance(layer.mlp, D.MoE) for layer in model.layers[1:])
