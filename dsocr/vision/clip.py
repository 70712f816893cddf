"""CLIP-L/14 vision transformer that consumes SAM's compressed feature map as its patch tokens.

The second half of DeepEncoder (paper §3.2; spec §2.2), after the official ``deepencoder/clip_sdpa.py``
and vLLM's ``deepencoder.py``, written from the spec.

Gotchas:
- ``embeddings.patch_embedding`` exists in the checkpoint but is never used: the SAM output map
  (B, 1024, h, w) is flattened into (B, h*w, 1024) patch tokens. We keep the parameter so loading
  stays strict and checkpoints round-trip.
- The CLS token is prepended and kept through the blocks; callers drop it (``out[:, 1:]``).
- The 16x16 position grid (plus the CLS row) is resized bicubic with antialias in fp32 when the
  token grid differs (a 1024 px view is 16x16 and needs none).
- ``pre_layrnorm`` (typo kept for the checkpoint) runs after the position embedding; there is
  no post-layernorm. Activation is quick_gelu, x * sigmoid(1.702 x).

Legend: B batch, T tokens (h*w + 1), C width, nh heads, hs head size.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsocr.configs import ClipConfig


def resize_pos_table(table: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(1 + G*G, C) table -> (1 + num_patches, C): the CLS row kept, the grid resized bicubic+AA."""
    grid = int(math.isqrt(table.shape[0] - 1))
    size = int(math.isqrt(num_patches))
    assert size * size == num_patches, f"CLIP needs a square token grid, got {num_patches} tokens"
    if size == grid:
        return table
    cls_row, g = table[:1], table[1:]
    g = g.float().reshape(1, grid, grid, -1).permute(0, 3, 1, 2)  # (1, C, G, G)
    g = F.interpolate(g, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    g = g.permute(0, 2, 3, 1).reshape(size * size, -1).to(table.dtype)  # (size*size, C)
    return torch.cat([cls_row, g], dim=0)


class Embeddings(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.width))
        # Unused by DeepSeek-OCR (SAM features are the patch tokens); kept for strict loading.
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.pos_grid**2 + 1, cfg.width)

    def forward(self, patch_embeds: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) SAM map -> (B, 1 + h*w, C) tokens with positions."""
        B = patch_embeds.shape[0]
        x = patch_embeds.flatten(2).transpose(1, 2)  # (B, h*w, C)
        cls = self.class_embedding.to(x.dtype).expand(B, 1, -1)
        x = torch.cat([cls, x], dim=1)  # (B, T, C)
        return x + resize_pos_table(self.position_embedding.weight, x.shape[1] - 1).to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.num_heads = cfg.heads
        self.qkv_proj = nn.Linear(cfg.width, 3 * cfg.width)  # [q | k | v], each (nh, hs)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv_proj(x).view(B, T, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hs)
        return self.out_proj(o.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.self_attn = SelfAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class VisionTransformer(nn.Module):
    """SAM map (B, C, h, w) -> (B, 1 + h*w, C) CLIP tokens, CLS first."""

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.transformer = Transformer(cfg)

    def forward(self, sam_features: torch.Tensor) -> torch.Tensor:
        x = self.pre_layrnorm(self.embeddings(sam_features))
        return self.transformer(x)
