"""SAM-ViT-B image encoder with windowed attention, neck, and the 16x convolutional compressor.

The first half of DeepEncoder (DeepSeek-OCR paper §3.2; spec §2.1). Mirrors the layout of
segment-anything's ``image_encoder.py`` (ViTDet-style windowed blocks with decomposed relative
positions) and the official ``deepencoder/sam_vary_sdpa.py``, written from the spec.

Gotchas:
- Patch tokens stay NHWC through the blocks; the neck and compressor are NCHW convs.
- The absolute position table is a 64x64 grid (for 1024 px). Other sizes resize it with bicubic,
  antialias=True, in fp32 (square inputs only, as in the official code).
- Windowed blocks zero-pad the grid to a multiple of the window and do not mask the padding
  (standard ViTDet behaviour, and what the weights were trained with).
- Relative positions use the *unscaled* q and are added to the scaled q.k^T; a table whose length
  differs from 2*max(q, k)-1 is resized with *linear* interpolation in fp32.
- ``net_2``/``net_3`` are two stride-2 3x3 convs with no norm or activation: 16x fewer tokens.

Legend: B batch, H/W grid height/width, C channels, nh heads, hs head size, ws window size.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsocr.configs import SamConfig


def resize_abs_pos(pos: torch.Tensor, size: int) -> torch.Tensor:
    """(1, G, G, C) position grid -> (1, size, size, C), bicubic + antialias in fp32."""
    if pos.shape[1] == size:
        return pos
    x = pos.float().permute(0, 3, 1, 2)  # (1, C, G, G)
    x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x.permute(0, 2, 3, 1).to(pos.dtype)  # (1, size, size, C)


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative-position rows for every (query, key) offset along one axis.

    rel_pos: (L, hs), resized linearly to 2*max(q, k)-1 rows if needed. Returns (q_size, k_size, hs).
    """
    max_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_dist:
        r = rel_pos.float().t().unsqueeze(0)  # (1, hs, L)
        r = F.interpolate(r, size=max_dist, mode="linear")
        rel_pos = r.squeeze(0).t().to(rel_pos.dtype)  # (max_dist, hs)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    rel = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[rel.long()]


def rel_pos_bias(q: torch.Tensor, rel_pos_h, rel_pos_w, q_hw, k_hw, scratch=None) -> torch.Tensor:
    """Decomposed relative-position bias (MViTv2 / SAM).

    q: (B, qh*qw, hs), unscaled. Returns (B, qh*qw, kh*kw) to add to the scaled attention logits.
    Gotcha: einsum returns permuted views; the two small terms are made contiguous before the
    broadcast add so the big result is contiguous and the final reshape is free (otherwise a
    strided copy of the whole bias, 805 MB per global layer at 1024 px, a sixth of SAM's CPU time).
    ``scratch`` (a dict, without autograd only): the result is written into a buffer kept there
    per shape and returned, so layers of one forward reuse it instead of faulting in fresh pages.
    """
    (qh, qw), (kh, kw) = q_hw, k_hw
    Rh = get_rel_pos(qh, kh, rel_pos_h)  # (qh, kh, hs)
    Rw = get_rel_pos(qw, kw, rel_pos_w)  # (qw, kw, hs)
    B, _, hs = q.shape
    r_q = q.reshape(B, qh, qw, hs)
    bias_h = torch.einsum("bhwc,hkc->bhwk", r_q, Rh).contiguous()  # (B, qh, qw, kh)
    bias_w = torch.einsum("bhwc,wkc->bhwk", r_q, Rw).contiguous()  # (B, qh, qw, kw)
    h, w = bias_h[:, :, :, :, None], bias_w[:, :, :, None, :]
    if scratch is None or torch.is_grad_enabled():
        bias = h + w  # (B, qh, qw, kh, kw), contiguous
    else:
        key = (B, qh, qw, kh, kw, h.dtype, h.device)
        if key not in scratch:
            scratch[key] = torch.empty(key[:5], dtype=h.dtype, device=h.device)
        bias = torch.add(h, w, out=scratch[key])
    return bias.reshape(B, qh * qw, kh * kw)


def window_partition(x: torch.Tensor, ws: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * nW, ws, ws, C) windows, zero-padding H and W up to multiples of ws."""
    B, H, W, C = x.shape
    pad_h, pad_w = (ws - H % ws) % ws, (ws - W % ws) % ws
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(B, Hp // ws, ws, Wp // ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, C), (Hp, Wp)


def window_unpartition(windows: torch.Tensor, ws: int, pad_hw, hw) -> torch.Tensor:
    """(B * nW, ws, ws, C) -> (B, H, W, C), dropping the padding."""
    Hp, Wp = pad_hw
    H, W = hw
    B = windows.shape[0] // (Hp * Wp // ws // ws)
    x = windows.view(B, Hp // ws, Wp // ws, ws, ws, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, -1)
    return x[:, :H, :W, :].contiguous()


class Attention(nn.Module):
    """Multi-head attention over a (H, W) grid with decomposed relative positions."""

    def __init__(self, dim: int, num_heads: int, rel_pos_size: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)  # [q | k | v], each (nh, hs)
        self.proj = nn.Linear(dim, dim)
        hs = dim // num_heads
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, hs))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, hs))
        self.use_sdpa = True  # False: the manual softmax path, kept for equivalence tests

    def forward(self, x: torch.Tensor, scratch: dict | None = None) -> torch.Tensor:
        B, H, W, C = x.shape
        nh = self.num_heads
        qkv = self.qkv(x).reshape(B, H * W, 3, nh, C // nh).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, B * nh, H * W, C // nh).unbind(0)  # each (B*nh, H*W, hs)
        bias = rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (H, W), (H, W), scratch)
        if self.use_sdpa:
            o = F.scaled_dot_product_attention(
                q.view(B, nh, H * W, -1),
                k.view(B, nh, H * W, -1),
                v.view(B, nh, H * W, -1),
                attn_mask=bias.view(B, nh, H * W, H * W),
            )  # (B, nh, HW, hs)
        else:
            att = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1) + bias
            o = (att.softmax(dim=-1) @ v).view(B, nh, H * W, -1)
        o = o.view(B, nh, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, C)
        return self.proj(o)


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.lin2(F.gelu(self.lin1(x)))  # exact (erf) GELU


class Block(nn.Module):
    """Pre-norm transformer block; windowed when ``window_size > 0``, else global."""

    def __init__(self, cfg: SamConfig, window_size: int):
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.attn = Attention(cfg.width, cfg.heads, window_size if window_size else cfg.pos_grid)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = MLPBlock(cfg.width, int(cfg.width * cfg.mlp_ratio))

    def forward(self, x: torch.Tensor, scratch: dict | None = None) -> torch.Tensor:
        """``scratch``: the forward's buffers for the attention bias (see ``rel_pos_bias``)."""
        shortcut = x
        x = self.norm1(x)  # (B, H, W, C)
        if self.window_size:
            H, W = x.shape[1:3]
            x, pad_hw = window_partition(x, self.window_size)  # (B*nW, ws, ws, C)
            x = self.attn(x, scratch)
            x = window_unpartition(x, self.window_size, pad_hw, (H, W))
        else:
            x = self.attn(x, scratch)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: SamConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW map."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ImageEncoderViT(nn.Module):
    """Pixels (B, 3, S, S) in [-1, 1] -> compressed feature map (B, out_width, S/64, S/64)."""

    def __init__(self, cfg: SamConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.pos_grid, cfg.pos_grid, cfg.width))
        self.blocks = nn.ModuleList(
            Block(cfg, 0 if i in cfg.global_attn_indexes else cfg.window_size)
            for i in range(cfg.depth)
        )
        c = cfg.out_chans
        self.neck = nn.Sequential(
            nn.Conv2d(cfg.width, c, 1, bias=False),
            LayerNorm2d(c, cfg.ln_eps),
            nn.Conv2d(c, c, 3, padding=1, bias=False),
            LayerNorm2d(c, cfg.ln_eps),
        )
        c2, c3 = cfg.downsample_channels
        self.net_2 = nn.Conv2d(c, c2, 3, stride=2, padding=1, bias=False)
        self.net_3 = nn.Conv2d(c2, c3, 3, stride=2, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, H, W, C)
        assert x.shape[1] == x.shape[2], (
            f"SAM expects square inputs, got grid {tuple(x.shape[1:3])}"
        )
        x = x + resize_abs_pos(self.pos_embed, x.shape[1])
        scratch: dict = {}  # attention-bias buffers shared by the blocks of this forward
        for blk in self.blocks:
            x = blk(x, scratch)
        x = self.neck(x.permute(0, 3, 1, 2))  # (B, out_chans, H, W)
        return self.net_3(self.net_2(x))  # (B, out_width, H/4, W/4)
