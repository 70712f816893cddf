"""DeepSeek-OCR: DeepEncoder + linear projector + DeepSeek-V2 MoE decoder, as one pure module.

Paper §3 (arXiv 2510.18234); spec §1-§2.5, §8. Module attributes carry the checkpoint's own names
(``model.sam_model``, ``model.vision_model``, ``model.projector.layers``, ``model.image_newline``,
``model.view_seperator`` (sic), ``model.embed_tokens``, ``model.layers.N``, ``model.norm``,
``lm_head``) so that loading is strict with no key mapping.

``DeepseekOCRModel`` subclasses the decoder's ``DeepseekV2Model`` (as the official remote code does)
only to keep the checkpoint's flat ``model.*`` namespace; the vision forward path is all here and in
``vision/``.

The model is a pure function of tensors: no tokenizer, sampling or I/O. The caller (``dsocr.engine``)
owns the KV cache, positions, batching and stopping.

Legend: B batch, T tokens, C decoder width, V vocab, N image tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from dsocr.configs import DeepseekOCRConfig, Mode
from dsocr.language.decoder import DeepseekV2Model, linear
from dsocr.vision.clip import VisionTransformer
from dsocr.vision.deepencoder import MlpProjector, encode_views, layout_image_tokens
from dsocr.vision.preprocess import ImageInputs, count_image_tokens
from dsocr.vision.sam import ImageEncoderViT


class DeepseekOCRModel(DeepseekV2Model):
    def __init__(self, cfg: DeepseekOCRConfig):
        super().__init__(cfg.language)
        self.sam_model = ImageEncoderViT(cfg.sam)
        self.vision_model = VisionTransformer(cfg.clip)
        self.projector = MlpProjector(cfg.projector_input_dim, cfg.n_embed)
        self.image_newline = nn.Parameter(torch.randn(cfg.n_embed) / math.sqrt(cfg.n_embed))
        self.view_seperator = nn.Parameter(torch.randn(cfg.n_embed) / math.sqrt(cfg.n_embed))


class DeepseekOCRForCausalLM(nn.Module):
    def __init__(self, cfg: DeepseekOCRConfig):
        super().__init__()
        self.config = cfg
        self.model = DeepseekOCRModel(cfg)
        self.lm_head = nn.Linear(cfg.n_embed, cfg.language.vocab_size, bias=False)  # untied

    # ---------------------------------------------------------------- vision
    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def encode_images(self, images: list[ImageInputs]) -> list[torch.Tensor]:
        """Preprocessed images -> one (num_tokens, C) embedding sequence per image.

        Views of the same size across images are encoded in one batch. Each result has exactly
        ``count_image_tokens(w, h, mode)`` rows (asserted).
        """
        m, ppt = self.model, self.config.sam.pixels_per_token
        views: dict[int, list[torch.Tensor]] = {}  # size -> list of (3, S, S) views
        for im in images:
            views.setdefault(im.global_view.shape[-1], []).append(im.global_view[None])
            if im.has_tiles:
                views.setdefault(im.tiles.shape[-1], []).append(im.tiles)
        encoded = {}
        for size, vs in views.items():
            px = torch.cat(vs).to(device=self.device, dtype=self.dtype)
            encoded[size] = list(
                encode_views(m.sam_model, m.vision_model, m.projector, px).unbind(0)
            )
        out = []
        for im in images:
            g = encoded[im.global_view.shape[-1]].pop(0)
            tiles = None
            if im.has_tiles:
                size = im.tiles.shape[-1]
                tiles = torch.stack([encoded[size].pop(0) for _ in range(im.tiles.shape[0])])
            seq = layout_image_tokens(g, tiles, im.grid, m.image_newline, m.view_seperator)
            expected = count_image_tokens(*im.orig_size, im.mode, pixels_per_token=ppt)
            assert seq.shape[0] == expected, (
                f"image layout gave {seq.shape[0]} tokens, count_image_tokens says {expected} "
                f"(size {im.orig_size}, mode {im.mode.name})"
            )
            out.append(seq)
        return out

    # ---------------------------------------------------------------- text
    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None):
        """Token embeddings with image embeddings scattered into the ``<image>`` positions.

        input_ids (B, T); image_embeds (N, C) in row-major placeholder order. Returns (B, T, C).
        """
        h = self.model.embed_tokens(input_ids)
        is_image = input_ids == self.config.image_token_id
        n_slots = int(is_image.sum())
        n_embeds = 0 if image_embeds is None else image_embeds.shape[0]
        assert n_slots == n_embeds, (
            f"{n_slots} <image> placeholders in input_ids but {n_embeds} image embeddings"
        )
        if n_slots:
            h = h.masked_scatter(is_image[..., None], image_embeds.to(h.dtype))
        return h

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        kv_cache=None,
        image_embeds: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> fp32 logits (B, T, V), or (B, V) at the indices ``logits_at`` (B,).

        positions (B, T) default to 0..T-1. With ``kv_cache`` the new keys are written at slot ==
        position and attention covers slots 0..max(positions).
        """
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        h = self.embed(input_ids, image_embeds)
        h = self.model.decode(h, positions, kv_cache)  # (B, T, C)
        if logits_at is not None:
            h = h[torch.arange(B, device=h.device), logits_at]  # (B, C)
        return linear(h, self.lm_head).float()

    # ---------------------------------------------------------------- init
    @torch.no_grad()
    def init_weights(self, seed: int | None = None, std: float = 0.02):
        """All initialisation rules in one place (used for random-weight tests and training).

        Linear/conv weights and embeddings ~ N(0, std); biases 0; norms 1/0; SAM rel-pos 0;
        ``image_newline``/``view_seperator`` ~ N(0, 1/C) as in the official code.
        """
        gen = torch.Generator().manual_seed(seed) if seed is not None else None

        def normal_(t, s=std):
            t.copy_(torch.randn(t.shape, generator=gen) * s)

        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith(("image_newline", "view_seperator")):
                normal_(p, 1 / math.sqrt(p.shape[0]))
            elif leaf == "bias" or "rel_pos" in leaf:
                p.zero_()
            elif p.ndim == 1:  # LayerNorm / RMSNorm / LayerNorm2d weights, CLIP class embedding
                if "class_embedding" in name:
                    normal_(p)
                else:
                    p.fill_(1.0)
            else:
                normal_(p)
        return self


def build_model(cfg: DeepseekOCRConfig, device=None, dtype=None, seed: int | None = 0):
    """A randomly initialised model (``device='meta'`` gives an empty one to load into)."""
    if str(device) == "meta":
        with torch.device("meta"):
            return DeepseekOCRForCausalLM(cfg)
    model = DeepseekOCRForCausalLM(cfg).init_weights(seed)
    return model.to(device=device, dtype=dtype)


def image_token_count(cfg: DeepseekOCRConfig, width: int, height: int, mode: Mode) -> int:
    return count_image_tokens(width, height, mode, pixels_per_token=cfg.sam.pixels_per_token)
