"""Model configs and resolution modes, as data.

Every dataclass default is the released DeepSeek-OCR checkpoint (spec §1-§4, §8). Named variants live
in one plain table, ``CONFIGS``: ``deepseek-ocr`` (official), ``mini`` (the embedded default model,
same structure scaled down) and ``tiny`` (random-weight tests). Overrides go through
``dataclasses.replace``; there are no ``force_*`` knobs.

Resolution modes are data too (``MODES``), never module constants: spec §2.6 / §3.

Gotchas kept from the checkpoint:
- ``view_seperator`` is misspelled in the official key names; we keep it.
- The official config.json nests ``vision_config``/``projector_config``/``language_config`` and also
  duplicates the language fields at top level; :func:`config_to_json` writes that shape and
  :func:`config_from_json` reads it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------------------------------
# Model configs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamConfig:
    """SAM-ViT-B with windowed attention, neck and the 16x conv compressor (``net_2``/``net_3``)."""

    img_size: int = 1024  # nominal size: the abs pos-embed grid is img_size/patch_size (64x64)
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    out_chans: int = 256  # neck width
    downsample_channels: tuple[int, ...] = (512, 1024)  # net_2, net_3 (each stride 2)
    ln_eps: float = 1e-6

    @property
    def pos_grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def out_width(self) -> int:
        return self.downsample_channels[-1]

    @property
    def pixels_per_token(self) -> int:
        """Input pixels per output token along one axis: patch 16 x two stride-2 convs = 64."""
        return self.patch_size * 2 ** len(self.downsample_channels)


@dataclass(frozen=True)
class ClipConfig:
    """CLIP-L/14 that takes SAM's output map as its patch tokens (its own patch conv is unused)."""

    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    image_size: int = 224  # nominal: the position table has (224/14)^2 + 1 = 257 rows
    patch_size: int = 14
    ln_eps: float = 1e-5

    @property
    def pos_grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class LanguageConfig:
    """DeepSeek-V2 decoder on the checkpoint's path: MHA (use_mla=false), dense layer 0, then MoE."""

    vocab_size: int = 129280
    hidden_size: int = 1280
    num_hidden_layers: int = 12
    num_attention_heads: int = 10
    num_key_value_heads: int = 10  # MHA: equal to heads
    intermediate_size: int = 6848  # dense layers (layer 0)
    moe_intermediate_size: int = 896  # one routed expert
    n_routed_experts: int = 64
    n_shared_experts: int = 2  # fused into one MLP of width 2 * 896
    num_experts_per_tok: int = 6
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    norm_topk_prob: bool = False  # not renormalised (spec §4, default)
    routed_scaling_factor: float = 1.0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    bos_token_id: int = 0
    eos_token_id: int = 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0


@dataclass(frozen=True)
class DeepseekOCRConfig:
    """The whole model: DeepEncoder (SAM + CLIP), linear projector, decoder, and special token ids."""

    sam: SamConfig = field(default_factory=SamConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    image_token_id: int = 128815  # `<image>` placeholder, hard-coded in the official infer()
    pad_token_id: int = 2
    name: str = "deepseek-ocr"

    def __post_init__(self):
        assert self.sam.out_width == self.clip.width, (
            f"CLIP consumes SAM's output map as patch tokens: sam.out_width={self.sam.out_width} "
            f"must equal clip.width={self.clip.width}"
        )
        assert self.language.hidden_size % self.language.num_attention_heads == 0

    @property
    def projector_input_dim(self) -> int:
        """CLIP features then SAM features, concatenated: 1024 + 1024 = 2048 for the official model."""
        return self.clip.width + self.sam.out_width

    @property
    def n_embed(self) -> int:
        return self.language.hidden_size

    @staticmethod
    def from_name(name: str) -> DeepseekOCRConfig:
        if name not in CONFIGS:
            raise KeyError(f"unknown config {name!r}; known: {sorted(CONFIGS)}")
        return CONFIGS[name]


def _variant(name: str, sam: dict, clip: dict, language: dict, **top) -> DeepseekOCRConfig:
    return DeepseekOCRConfig(
        sam=SamConfig(**sam),
        clip=ClipConfig(**clip),
        language=LanguageConfig(**language),
        name=name,
        **top,
    )


CONFIGS: dict[str, DeepseekOCRConfig] = {
    "deepseek-ocr": DeepseekOCRConfig(),
    # The embedded default model (trained by us). Same structure; <= 30M parameters; patch 16 plus two
    # stride-2 convs keep 64 px per token, so Tiny mode (512 px) still gives 8x8 = 64 tokens.
    "mini": _variant(
        "mini",
        sam=dict(
            width=192,
            depth=4,
            heads=3,
            window_size=14,
            global_attn_indexes=(1, 3),
            out_chans=128,
            downsample_channels=(256, 384),
        ),
        clip=dict(width=384, layers=2, heads=6, mlp_dim=1280),
        language=dict(
            vocab_size=8192,
            hidden_size=384,
            num_hidden_layers=6,
            num_attention_heads=6,
            num_key_value_heads=6,
            intermediate_size=768,
            moe_intermediate_size=192,
            n_routed_experts=8,
            n_shared_experts=2,
            num_experts_per_tok=2,
            max_position_embeddings=4096,
        ),
        image_token_id=3,  # dsocr tokenizers put the special tokens first (ids 0..14)
    ),
    # The CPU-trainable stand-in for ``mini`` (8.0M parameters), sized so that a 2-core CPU
    # sees tens of thousands of pages in a couple of hours. It ships as dsocr-mini until a GPU run
    # trains ``mini`` itself; its tokenizer is an English byte BPE of 384 (same special-token
    # layout; docs/training.md §4 phase 3).
    "mini-cpu": _variant(
        "mini-cpu",
        sam=dict(
            width=96,
            depth=3,
            heads=3,
            window_size=8,  # divides the 32/40-patch grids of Tiny/Small: no padded windows
            global_attn_indexes=(2,),
            out_chans=96,
            downsample_channels=(192, 256),
        ),
        clip=dict(width=256, layers=2, heads=4, mlp_dim=768),
        language=dict(
            vocab_size=384,
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=768,
            moe_intermediate_size=256,
            n_routed_experts=4,
            n_shared_experts=1,
            num_experts_per_tok=2,
            max_position_embeddings=4096,
        ),
        image_token_id=3,
    ),
    # Random-weight tests: builds and runs a forward in well under a second on CPU.
    "tiny": _variant(
        "tiny",
        sam=dict(
            width=32,
            depth=2,
            heads=2,
            window_size=4,
            global_attn_indexes=(1,),
            out_chans=16,
            downsample_channels=(24, 32),
            img_size=256,
        ),
        clip=dict(width=32, layers=2, heads=2, mlp_dim=64),
        language=dict(
            vocab_size=320,
            hidden_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=96,
            moe_intermediate_size=32,
            n_routed_experts=4,
            n_shared_experts=1,
            num_experts_per_tok=2,
            max_position_embeddings=2048,
        ),
        image_token_id=3,
    ),
}


# --------------------------------------------------------------------------------------------------
# Resolution modes (spec §2.6, §3)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    """One resolution mode. ``base_size`` is the global view; ``image_size`` the tile (crop mode).

    Native modes (``crop_mode=False``) encode one view of ``base_size``. ``crop_mode=True`` adds a
    dynamic grid of ``image_size`` tiles (between ``min_crops`` and ``max_crops`` tiles) when the image
    is larger than ``crop_threshold`` on either side.
    """

    name: str
    base_size: int
    image_size: int
    crop_mode: bool = False
    min_crops: int = 2
    max_crops: int = 9  # HF infer() default; the official vLLM config uses 6 on small GPUs
    crop_threshold: int = 640  # hard-coded in every official code path
    paper_tokens: str = ""  # how the paper names the budget (grid tokens only), for reports


MODES: dict[str, Mode] = {
    "tiny": Mode("tiny", 512, 512, paper_tokens="64"),
    "small": Mode("small", 640, 640, paper_tokens="100"),
    "base": Mode("base", 1024, 1024, paper_tokens="256"),
    "large": Mode("large", 1280, 1280, paper_tokens="400"),
    "gundam": Mode("gundam", 1024, 640, crop_mode=True, paper_tokens="n*100+256"),
    "gundam-m": Mode("gundam-m", 1280, 1024, crop_mode=True, paper_tokens="n*256+400"),
}


def get_mode(mode: str | Mode) -> Mode:
    if isinstance(mode, Mode):
        return mode
    key = mode.lower().replace("_", "-")
    if key not in MODES:
        raise KeyError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    return MODES[key]


# --------------------------------------------------------------------------------------------------
# config.json in the official layout
# --------------------------------------------------------------------------------------------------

_LANGUAGE_JSON_EXTRA = dict(
    kv_lora_rank=None,
    q_lora_rank=None,
    qk_nope_head_dim=0,
    qk_rope_head_dim=0,
    v_head_dim=0,
    use_mla=False,
    topk_method="greedy",
    n_group=1,
    topk_group=1,
    hidden_act="silu",
    attention_bias=False,
    lm_head=True,
    rm_head=False,
    torch_dtype="bfloat16",
)


def config_to_json(cfg: DeepseekOCRConfig) -> dict[str, Any]:
    """The official config.json shape (nested sections + language fields repeated at top level)."""
    lang = asdict(cfg.language) | _LANGUAGE_JSON_EXTRA
    sam, clip = cfg.sam, cfg.clip
    return {
        "architectures": ["DeepseekOCRForCausalLM"],
        "model_type": "deepseek_vl_v2",
        "tile_tag": "2D",
        "global_view_pos": "head",
        "candidate_resolutions": [[1024, 1024]],
        "torch_dtype": "bfloat16",
        "projector_config": {
            "input_dim": cfg.projector_input_dim,
            "n_embed": cfg.n_embed,
            "projector_type": "linear",
            "model_type": "mlp_projector",
        },
        "vision_config": {
            "image_size": 1024,
            "model_name": "deeplip_b_l",
            "model_type": "vision",
            "width": {
                "clip-l-14-224": {
                    "heads": clip.heads,
                    "image_size": clip.image_size,
                    "layers": clip.layers,
                    "patch_size": clip.patch_size,
                    "width": clip.width,
                    "mlp_dim": clip.mlp_dim,
                    "ln_eps": clip.ln_eps,
                },
                "sam_vit_b": {
                    "downsample_channels": list(sam.downsample_channels),
                    "global_attn_indexes": list(sam.global_attn_indexes),
                    "heads": sam.heads,
                    "layers": sam.depth,
                    "width": sam.width,
                    "img_size": sam.img_size,
                    "patch_size": sam.patch_size,
                    "window_size": sam.window_size,
                    "mlp_ratio": sam.mlp_ratio,
                    "out_chans": sam.out_chans,
                },
            },
        },
        "language_config": {"architectures": ["DeepseekV2ForCausalLM"], **lang},
        **lang,
        "image_token_id": cfg.image_token_id,
        "pad_token_id": cfg.pad_token_id,
        "dsocr_variant": cfg.name,
    }


def _pick(cls, d: dict, **renames) -> dict:
    """Keep the keys of ``d`` that are fields of ``cls`` (after ``renames``: field=json_key)."""
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for name in names:
        key = renames.get(name, name)
        if key in d:
            v = d[key]
            out[name] = tuple(v) if isinstance(v, list) else v
    return out


def config_from_json(d: dict[str, Any]) -> DeepseekOCRConfig:
    """Read an official (or dsocr-written) config.json. Missing keys take the official defaults.

    The official file omits the SAM/CLIP sizes we treat as fixed (patch, window, neck width...), and
    some language defaults (rope_theta, rms_norm_eps); the dataclass defaults fill them in.
    """
    width = d.get("vision_config", {}).get("width", {})
    sam = _pick(SamConfig, width.get("sam_vit_b", {}), depth="layers")
    clip = _pick(ClipConfig, width.get("clip-l-14-224", {}))
    lang_src = {**d, **d.get("language_config", {})}
    lang = _pick(LanguageConfig, lang_src)
    top = {}
    for k in ("image_token_id", "pad_token_id"):
        if k in d:
            top[k] = d[k]
    return DeepseekOCRConfig(
        sam=SamConfig(**sam),
        clip=ClipConfig(**clip),
        language=LanguageConfig(**lang),
        name=d.get("dsocr_variant", "deepseek-ocr"),
        **top,
    )


def load_config(folder: str | Path) -> DeepseekOCRConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (not a checkpoint folder)")
    try:
        return config_from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: unreadable config.json: {e}") from None
