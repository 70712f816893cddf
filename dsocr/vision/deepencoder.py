"""DeepEncoder fusion and the visual token layout: SAM -> CLIP -> concat(CLIP, SAM) -> projector.

Paper §3.2; spec §2.3-§2.5. Mirrors the split of vLLM's ``deepseek_ocr.py``
(``_encode_global_features`` / ``_encode_local_features``) as two free functions over the modules
that ``model.py`` owns under their checkpoint names.

Gotchas:
- The fused feature puts CLIP first (CLS dropped), then SAM: 1024 + 1024 = 2048 channels.
- Layout per image: [stitched local tiles, one ``image_newline`` per row of the *stitched* grid]
  [global view, one newline per row] [``view_seperator``]. Local tiles come first even though the
  config says ``global_view_pos: "head"`` (the official code ignores that field).
- Token count must equal ``preprocess.count_image_tokens``; ``layout_image_tokens`` asserts it.

Legend: N views, t tokens per side of a view, C decoder width, R/K tile rows/cols.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class MlpProjector(nn.Module):
    """projector_type "linear": one Linear(2048, 1280) under the key ``projector.layers``."""

    def __init__(self, input_dim: int, n_embed: int):
        super().__init__()
        self.layers = nn.Linear(input_dim, n_embed)

    def forward(self, x):
        return self.layers(x)


def encode_views(sam_model, vision_model, projector, pixels: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) views in [-1, 1] -> (N, t, t, C) projected tokens, t = S / 64."""
    sam = sam_model(pixels)  # (N, 1024, t, t)
    clip = vision_model(sam)  # (N, 1 + t*t, 1024)
    feats = torch.cat([clip[:, 1:], sam.flatten(2).transpose(1, 2)], dim=-1)  # (N, t*t, 2048)
    out = projector(feats)  # (N, t*t, C)
    t = sam.shape[-1]
    return out.view(out.shape[0], t, t, -1)


def add_row_newlines(grid: torch.Tensor, image_newline: torch.Tensor) -> torch.Tensor:
    """(h, w, C) -> (h * (w + 1), C): one newline token appended at the end of every row."""
    h, w, C = grid.shape
    nl = image_newline.to(grid.dtype).view(1, 1, C).expand(h, 1, C)
    return torch.cat([grid, nl], dim=1).reshape(h * (w + 1), C)


def layout_image_tokens(
    global_view: torch.Tensor,
    tiles: torch.Tensor | None,
    grid: tuple[int, int],
    image_newline: torch.Tensor,
    view_seperator: torch.Tensor,
) -> torch.Tensor:
    """Arrange one image's view tokens into the sequence the decoder was trained on.

    global_view: (g, g, C); tiles: (R*K, t, t, C) row-major or None; grid: (cols K, rows R).
    Returns (num_tokens, C).
    """
    K, R = grid
    parts = []
    if tiles is not None and tiles.shape[0] > 0:
        assert tiles.shape[0] == K * R, f"{tiles.shape[0]} tiles for a {K}x{R} grid"
        n, t, _, C = tiles.shape
        stitched = tiles.view(R, K, t, t, C).permute(0, 2, 1, 3, 4).reshape(R * t, K * t, C)
        parts.append(add_row_newlines(stitched, image_newline))  # (R*t * (K*t + 1), C)
    parts.append(add_row_newlines(global_view, image_newline))  # (g * (g + 1), C)
    parts.append(view_seperator.to(global_view.dtype).view(1, -1))
    return torch.cat(parts, dim=0)
