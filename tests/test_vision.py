"""SAM and CLIP parts against plain reference implementations (tiny sizes)."""

import torch
import torch.nn.functional as F

from dsocr.configs import SamConfig
from dsocr.vision import sam as S
from dsocr.vision.clip import resize_pos_table


def _naive_rel_bias(q, Rh, Rw, H, W):
    """bias[qh,qw,kh,kw] = <q, Rh[qh-kh+H-1]> + <q, Rw[qw-kw+W-1]> by explicit loops."""
    B = q.shape[0]
    qg = q.view(B, H, W, -1)
    bias = torch.zeros(B, H, W, H, W)
    for qh in range(H):
        for qw in range(W):
            for kh in range(H):
                for kw in range(W):
                    bias[:, qh, qw, kh, kw] = (qg[:, qh, qw] * Rh[qh - kh + H - 1]).sum(-1) + (
                        qg[:, qh, qw] * Rw[qw - kw + W - 1]
                    ).sum(-1)
    return bias.view(B, H * W, H * W)


def _naive_attention(attn: S.Attention, x):
    """Per-head loops, explicit rel-pos bias, plain softmax."""
    B, H, W, C = x.shape
    nh, hs = attn.num_heads, C // attn.num_heads
    qkv = attn.qkv(x).view(B, H * W, 3, nh, hs)
    out = torch.zeros(B, H * W, nh, hs)
    for h in range(nh):
        q, k, v = qkv[:, :, 0, h], qkv[:, :, 1, h], qkv[:, :, 2, h]  # (B, HW, hs)
        bias = _naive_rel_bias(q, attn.rel_pos_h, attn.rel_pos_w, H, W)
        a = (q @ k.transpose(1, 2)) / hs**0.5 + bias
        out[:, :, h] = a.softmax(-1) @ v
    return attn.proj(out.view(B, H, W, C))


def _naive_windowed_block(blk: S.Block, x):
    """Pad to whole windows with zeros, attend inside each window separately, crop."""
    ws = blk.window_size
    B, H, W, C = x.shape
    y = blk.norm1(x)
    Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
    y = F.pad(y, (0, 0, 0, Wp - W, 0, Hp - H))
    out = torch.zeros_like(y)
    for i in range(0, Hp, ws):
        for j in range(0, Wp, ws):
            out[:, i : i + ws, j : j + ws] = _naive_attention(
                blk.attn, y[:, i : i + ws, j : j + ws]
            )
    x = x + out[:, :H, :W]
    return x + blk.mlp(blk.norm2(x))


def _random_(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


def test_windowed_block_matches_naive_reference():
    cfg = SamConfig(width=16, heads=2, window_size=3, depth=1, global_attn_indexes=())
    blk = _random_(S.Block(cfg, window_size=3))
    x = torch.randn(2, 7, 7, 16)  # 7 is not a multiple of 3: exercises the unmasked zero padding
    with torch.no_grad():
        torch.testing.assert_close(blk(x), _naive_windowed_block(blk, x), rtol=1e-4, atol=1e-5)


def test_global_block_rel_pos_interpolated_matches_naive():
    cfg = SamConfig(width=16, heads=2, depth=1, img_size=64, patch_size=16)  # table for a 4x4 grid
    blk = _random_(S.Block(cfg, window_size=0), seed=1)
    x = torch.randn(1, 6, 6, 16)  # a 6x6 grid needs 11 rows: the 7-row table is resized
    assert blk.attn.rel_pos_h.shape[0] == 7
    Rh = S.get_rel_pos(6, 6, blk.attn.rel_pos_h)
    with torch.no_grad():
        # The resized table, laid out per (q, k), must equal linear interpolation of the rows.
        lin = F.interpolate(blk.attn.rel_pos_h.t()[None], size=11, mode="linear")[0].t()
        torch.testing.assert_close(Rh[5, 0], lin[10])
        torch.testing.assert_close(Rh[0, 5], lin[0])
        attn = blk.attn
        ref = x + _naive_attention_resized(attn, blk.norm1(x))
        ref = ref + blk.mlp(blk.norm2(ref))
        torch.testing.assert_close(blk(x), ref, rtol=1e-4, atol=1e-5)


def _naive_attention_resized(attn, x):
    B, H, W, C = x.shape
    lin_h = F.interpolate(attn.rel_pos_h.t()[None], size=2 * H - 1, mode="linear")[0].t()
    lin_w = F.interpolate(attn.rel_pos_w.t()[None], size=2 * W - 1, mode="linear")[0].t()
    saved = attn.rel_pos_h, attn.rel_pos_w
    attn.rel_pos_h, attn.rel_pos_w = torch.nn.Parameter(lin_h), torch.nn.Parameter(lin_w)
    try:
        return _naive_attention(attn, x)
    finally:
        attn.rel_pos_h, attn.rel_pos_w = saved


def test_window_partition_round_trip():
    x = torch.randn(2, 9, 11, 5)
    w, pad = S.window_partition(x, 4)
    assert w.shape == (2 * 3 * 3, 4, 4, 5) and pad == (12, 12)
    torch.testing.assert_close(S.window_unpartition(w, 4, pad, (9, 11)), x)


def test_sam_output_grid_is_sixteen_times_smaller():
    cfg = SamConfig(
        width=16,
        heads=2,
        depth=2,
        window_size=4,
        global_attn_indexes=(1,),
        out_chans=8,
        downsample_channels=(12, 16),
        img_size=256,
    )
    enc = _random_(S.ImageEncoderViT(cfg))
    with torch.no_grad():
        y = enc(torch.randn(1, 3, 192, 192))
    assert y.shape == (1, 16, 3, 3)  # 192 px / 64 px per token


def test_abs_pos_and_clip_table_resize_are_bicubic_antialiased():
    pos = torch.randn(1, 8, 8, 4)
    out = S.resize_abs_pos(pos, 5)
    ref = F.interpolate(pos.permute(0, 3, 1, 2), size=(5, 5), mode="bicubic", antialias=True)
    torch.testing.assert_close(out, ref.permute(0, 2, 3, 1))
    assert S.resize_abs_pos(pos, 8) is pos
    table = torch.randn(1 + 16, 4)
    resized = resize_pos_table(table, 9)
    assert resized.shape == (10, 4)
    torch.testing.assert_close(resized[0], table[0])  # CLS row kept as is
    grid = F.interpolate(
        table[1:].view(1, 4, 4, 4).permute(0, 3, 1, 2), size=(3, 3), mode="bicubic", antialias=True
    )
    torch.testing.assert_close(resized[1:], grid.permute(0, 2, 3, 1).reshape(9, 4))


def test_rel_pos_bias_matches_its_definition():
    """bias[b, (i, j), (k, l)] = q[b, (i, j)] . Rh[i, k] + q[b, (i, j)] . Rw[j, l]."""
    from dsocr.vision.sam import get_rel_pos, rel_pos_bias

    g = torch.Generator().manual_seed(0)
    qh, qw, hs = 3, 4, 5
    q = torch.randn(2, qh * qw, hs, generator=g)
    rel_h, rel_w = (
        torch.randn(2 * qh - 1, hs, generator=g),
        torch.randn(2 * qw - 1, hs, generator=g),
    )
    bias = rel_pos_bias(q, rel_h, rel_w, (qh, qw), (qh, qw))
    assert bias.shape == (2, qh * qw, qh * qw)
    Rh, Rw = get_rel_pos(qh, qh, rel_h), get_rel_pos(qw, qw, rel_w)
    qq = q.view(2, qh, qw, hs)
    for b, i, j, k, l in [(0, 0, 0, 0, 0), (1, 2, 3, 1, 0), (0, 1, 2, 2, 3)]:
        want = qq[b, i, j] @ Rh[i, k] + qq[b, i, j] @ Rw[j, l]
        assert torch.allclose(bias[b, i * qw + j, k * qw + l], want, atol=1e-5)


def test_rel_pos_bias_scratch_reuses_one_buffer_per_shape(tiny_model):
    """Without autograd, the bias goes into a buffer kept per shape (layers of one SAM forward
    reuse it) and has the same values; the encoder's output is unchanged."""
    from dsocr.vision.sam import rel_pos_bias

    g = torch.Generator().manual_seed(1)
    rel_h, rel_w = torch.randn(5, 4, generator=g), torch.randn(7, 4, generator=g)
    q1, q2 = torch.randn(2, 2, 12, 4, generator=g).unbind(0)
    scratch = {}
    with torch.no_grad():
        a = rel_pos_bias(q1, rel_h, rel_w, (3, 4), (3, 4), scratch)
        first = a.clone()
        b = rel_pos_bias(q2, rel_h, rel_w, (3, 4), (3, 4), scratch)
    assert len(scratch) == 1 and a.data_ptr() == b.data_ptr()
    assert torch.equal(first, rel_pos_bias(q1, rel_h, rel_w, (3, 4), (3, 4)))
    assert torch.equal(b, rel_pos_bias(q2, rel_h, rel_w, (3, 4), (3, 4)))
    sam = tiny_model.model.sam_model
    px = torch.randn(2, 3, 128, 128, generator=g)
    with torch.no_grad():
        fast = sam(px)
    ref = sam(px).detach()  # autograd on: no scratch
    assert torch.allclose(fast, ref, atol=1e-5)
