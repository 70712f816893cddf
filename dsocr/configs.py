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
  :func:`config_from_json` reads it (the nested copy wins), checking identity, required keys,
  types and ranges, with a one-line ``CheckpointError`` naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
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
        if self.sam.out_width != self.clip.width:
            raise ValueError(
                f"CLIP consumes SAM's output map as patch tokens: sam.out_width="
                f"{self.sam.out_width} must equal clip.width={self.clip.width}"
            )
        lang = self.language
        if lang.num_attention_heads <= 0 or lang.hidden_size % lang.num_attention_heads:
            raise ValueError(
                f"num_attention_heads={lang.num_attention_heads} must divide "
                f"hidden_size={lang.hidden_size}"
            )

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

    def __post_init__(self):
        for key in ("base_size", "image_size", "min_crops", "max_crops", "crop_threshold"):
            value = getattr(self, key)
            if type(value) is not int or value < 1:
                raise ValueError(
                    f"mode {self.name!r}: {key} must be a positive integer, got {value!r}"
                )
        if self.min_crops > self.max_crops:
            raise ValueError(
                f"mode {self.name!r}: min_crops {self.min_crops} is above max_crops {self.max_crops}"
            )


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


class CheckpointError(ValueError):
    """A checkpoint folder that does not match the model: one line naming the file (or folder)
    and the reason. Defined here because ``config.json`` is read here; ``dsocr.weights``
    re-exports it."""


# What the official checkpoint and dsocr's own ``save_checkpoint`` write (spec §8).
MODEL_TYPES = ("deepseek_vl_v2",)
ARCHITECTURES = ("DeepseekOCRForCausalLM",)
LANGUAGE_ARCHITECTURES = ("DeepseekV2ForCausalLM",)
SAM_KEY, CLIP_KEY = "sam_vit_b", "clip-l-14-224"
# Keys every official-layout config.json holds (the official file and save_checkpoint's both do);
# a missing one would otherwise silently take the official default and surface later as thousands
# of mis-shaped tensors. rope_theta, rms_norm_eps, norm_topk_prob, moe_layer_freq... are absent
# from the official file and keep their defaults.
REQUIRED_LANGUAGE = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "moe_intermediate_size",
    "n_routed_experts",
    "num_experts_per_tok",
    "max_position_embeddings",
)
REQUIRED_SAM = ("downsample_channels", "global_attn_indexes", "heads", "layers", "width")
REQUIRED_CLIP = ("heads", "image_size", "layers", "patch_size", "width")


class _Bad(Exception):
    """A config.json problem: ``key`` (dotted JSON path) and what is wrong with it."""

    def __init__(self, key: str, why: str):
        super().__init__(f"{key}: {why}")


def _json_type(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(v), "null" if v is None else type(v).__name__
    )


def _section(d: dict, key: str, where: str = "") -> dict:
    v = d.get(key, {})
    if not isinstance(v, dict):
        raise _Bad(where + key, f"must be a JSON object, got {_json_type(v)}")
    return v


def _typed(cls, d: dict, prefix: str, **renames) -> dict:
    """The fields of ``cls`` found in ``d`` (after ``renames``: field=json_key), type-checked
    against the field's annotation: int (not bool, not 3.0), float (int or float, finite), bool,
    tuple[int, ...] (a JSON list of ints)."""
    out = {}
    for f in dataclasses.fields(cls):
        key = renames.get(f.name, f.name)
        if key not in d:
            continue
        v, t, name = d[key], f.type, prefix + key
        if t == "int":
            if type(v) is not int:
                raise _Bad(name, f"must be an integer, got {v!r}")
        elif t == "float":
            if type(v) not in (int, float) or not math.isfinite(v):
                raise _Bad(name, f"must be a finite number, got {v!r}")
            v = float(v)
        elif t == "bool":
            if type(v) is not bool:
                raise _Bad(name, f"must be true or false, got {v!r}")
        elif t == "tuple[int, ...]":
            if not isinstance(v, list) or any(type(x) is not int for x in v):
                raise _Bad(name, f"must be a list of integers, got {v!r}")
            v = tuple(v)
        elif t == "str":
            if not isinstance(v, str):
                raise _Bad(name, f"must be a string, got {v!r}")
        out[f.name] = v
    return out


def _check_identity(d: dict) -> None:
    lang = _section(d, "language_config")
    if "model_type" not in d:
        raise _Bad("model_type", f"missing (a DeepSeek-OCR config.json has {MODEL_TYPES[0]!r})")
    if d["model_type"] not in MODEL_TYPES:
        raise _Bad("model_type", f"{d['model_type']!r} is not DeepSeek-OCR ({MODEL_TYPES[0]!r})")
    arch = d.get("architectures")
    if arch is None:
        raise _Bad("architectures", f"missing (DeepSeek-OCR: {list(ARCHITECTURES)})")
    if not isinstance(arch, list) or not arch or any(a not in ARCHITECTURES for a in arch):
        raise _Bad("architectures", f"{arch!r} is not DeepSeek-OCR ({list(ARCHITECTURES)})")
    if "architectures" in lang and lang["architectures"] != list(LANGUAGE_ARCHITECTURES):
        raise _Bad(
            "language_config.architectures",
            f"{lang['architectures']!r} is not the DeepSeek-V2 decoder "
            f"({list(LANGUAGE_ARCHITECTURES)})",
        )
    if lang.get("use_mla", d.get("use_mla", False)) not in (False, None):
        raise _Bad("use_mla", "multi-head latent attention is not DeepSeek-OCR's decoder (false)")


# Decoder settings that select code paths we do not implement: key -> the values that mean the
# checkpoint's path (an absent key means it too). Any other value is refused, not ignored.
DECODER_PATH = {
    "scoring_func": ("softmax",),
    "topk_method": ("greedy",),
    "n_group": (1, None),
    "topk_group": (1, None),
    "hidden_act": ("silu",),
    "rope_scaling": (None,),
    "attention_bias": (False,),
}


def _check_decoder_path(lang: dict) -> None:
    """Refuse a decoder setting the model would otherwise ignore (and so compute wrongly)."""
    for k, allowed in DECODER_PATH.items():
        if k in lang and not any(type(lang[k]) is type(a) and lang[k] == a for a in allowed):
            ok = " or ".join(json.dumps(a) for a in allowed)
            raise _Bad(k, f"{json.dumps(lang[k])} is not supported (DeepSeek-OCR's decoder: {ok})")


def _check_values(S: SamConfig, C: ClipConfig, L: LanguageConfig, top: dict) -> None:
    """Ranges and relations the model needs, named by their config.json keys."""
    image_token_id = top.get("image_token_id", DeepseekOCRConfig.image_token_id)
    pad_token_id = top.get("pad_token_id", DeepseekOCRConfig.pad_token_id)
    sam = f"vision_config.width.{SAM_KEY}."
    clip = f"vision_config.width.{CLIP_KEY}."

    def positive(name, v):
        if v <= 0:
            raise _Bad(name, f"must be > 0, got {v}")

    for k in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "moe_intermediate_size",
        "n_routed_experts",
        "num_experts_per_tok",
        "moe_layer_freq",
        "max_position_embeddings",
        "rms_norm_eps",
        "rope_theta",
        "routed_scaling_factor",
    ):
        positive(k, getattr(L, k))
    for k in ("n_shared_experts", "first_k_dense_replace"):
        if getattr(L, k) < 0:
            raise _Bad(k, f"must be >= 0, got {getattr(L, k)}")
    if L.hidden_size % L.num_attention_heads:
        raise _Bad(
            "num_attention_heads",
            f"{L.num_attention_heads} does not divide hidden_size {L.hidden_size}",
        )
    if L.head_dim % 2:
        raise _Bad("num_attention_heads", f"head size {L.head_dim} must be even (RoPE)")
    if L.num_key_value_heads != L.num_attention_heads:
        raise _Bad(
            "num_key_value_heads",
            f"{L.num_key_value_heads} != num_attention_heads {L.num_attention_heads} "
            "(the decoder is plain multi-head attention)",
        )
    if L.num_experts_per_tok > L.n_routed_experts:
        raise _Bad(
            "num_experts_per_tok",
            f"{L.num_experts_per_tok} > n_routed_experts {L.n_routed_experts}",
        )
    for k, v in (
        ("bos_token_id", L.bos_token_id),
        ("eos_token_id", L.eos_token_id),
        ("image_token_id", image_token_id),
        ("pad_token_id", pad_token_id),
    ):
        if not 0 <= v < L.vocab_size:
            raise _Bad(k, f"{v} is outside the vocabulary (vocab_size {L.vocab_size})")
    for k, v in (
        ("img_size", S.img_size),
        ("patch_size", S.patch_size),
        ("width", S.width),
        ("layers", S.depth),
        ("heads", S.heads),
        ("window_size", S.window_size),
        ("out_chans", S.out_chans),
        ("mlp_ratio", S.mlp_ratio),
    ):
        positive(sam + k, v)
    if S.width % S.heads:
        raise _Bad(sam + "heads", f"{S.heads} does not divide width {S.width}")
    if not S.downsample_channels or min(S.downsample_channels) <= 0:
        raise _Bad(
            sam + "downsample_channels", f"must be positive, got {list(S.downsample_channels)}"
        )
    bad = [i for i in S.global_attn_indexes if not 0 <= i < S.depth]
    if bad:
        raise _Bad(sam + "global_attn_indexes", f"{bad} not among the {S.depth} layers")
    for k in ("width", "layers", "heads", "mlp_dim", "image_size", "patch_size", "ln_eps"):
        positive(clip + k, getattr(C, k))
    if C.width % C.heads:
        raise _Bad(clip + "heads", f"{C.heads} does not divide width {C.width}")
    if S.out_width != C.width:
        raise _Bad(
            clip + "width",
            f"{C.width} != SAM's output width {S.out_width} (sam downsample_channels[-1]): "
            "CLIP takes SAM's map as its patch tokens",
        )


def _check_projector(d: dict, cfg: DeepseekOCRConfig) -> None:
    proj = _section(d, "projector_config")
    for k, want in (("input_dim", cfg.projector_input_dim), ("n_embed", cfg.n_embed)):
        if k in proj and proj[k] != want:
            raise _Bad(f"projector_config.{k}", f"{proj[k]!r} != {want} (from the other sections)")


def config_from_json(d: Any, where: str = "config.json") -> DeepseekOCRConfig:
    """Read an official (or dsocr-written) config.json, checked: a CheckpointError names
    ``where`` and the offending key.

    Checked: the top level is an object; ``model_type`` / ``architectures`` are DeepSeek-OCR's;
    the keys every official-layout file holds are present (``REQUIRED_*``); every value we read
    has its type (integers are integers, not 3.0 or "320") and range (positive sizes, heads that
    divide the width, top-k <= experts, ids inside the vocabulary...); a decoder setting of a path
    we do not implement (``DECODER_PATH``: sigmoid routing, rope_scaling...) is refused. Other
    keys we do not use are ignored. The official file omits the SAM/CLIP sizes we treat as fixed
    (patch, window, neck width...), and some language defaults (rope_theta, rms_norm_eps); the
    dataclass defaults fill those in.
    """
    try:
        if not isinstance(d, dict):
            raise _Bad("top level", f"must be a JSON object, got {_json_type(d)}")
        _check_identity(d)
        vision = _section(d, "vision_config")
        width = _section(vision, "width", "vision_config.")
        sam_src = _section(width, SAM_KEY, "vision_config.width.")
        clip_src = _section(width, CLIP_KEY, "vision_config.width.")
        lang_nested = _section(d, "language_config")
        # The official file repeats the language fields at the top level; the nested copy wins.
        lang_src = {**d, **lang_nested}
        _check_decoder_path(lang_src)
        for keys, src, prefix in (
            (REQUIRED_LANGUAGE, lang_src, ""),
            (REQUIRED_SAM, sam_src, f"vision_config.width.{SAM_KEY}."),
            (REQUIRED_CLIP, clip_src, f"vision_config.width.{CLIP_KEY}."),
        ):
            for k in keys:
                if k not in src:
                    raise _Bad(prefix + k, "missing")
        sam = SamConfig(
            **_typed(SamConfig, sam_src, f"vision_config.width.{SAM_KEY}.", depth="layers")
        )
        clip = ClipConfig(**_typed(ClipConfig, clip_src, f"vision_config.width.{CLIP_KEY}."))
        lang = LanguageConfig(**_typed(LanguageConfig, lang_src, ""))
        top = _typed(DeepseekOCRConfig, d, "", name="dsocr_variant")
        top = {k: v for k, v in top.items() if k in ("image_token_id", "pad_token_id", "name")}
        _check_values(sam, clip, lang, top)
        cfg = DeepseekOCRConfig(
            sam=sam, clip=clip, language=lang, **{"name": "deepseek-ocr", **top}
        )
        _check_projector(d, cfg)
    except _Bad as e:
        raise CheckpointError(f"{where}: {e}") from None
    return cfg


def load_config(folder: str | Path) -> DeepseekOCRConfig:
    """The checked config of a checkpoint folder. A missing folder or config.json is a
    FileNotFoundError; anything else wrong (not a folder, unreadable, not JSON, bad values) a
    CheckpointError; both one line naming the path."""
    folder = Path(folder)
    path = folder / "config.json"
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(
            f"{folder}: is a file, not a checkpoint folder (config.json + *.safetensors)"
        )
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (not a checkpoint folder)")
    data = read_json(path, lambda e: f"unreadable config.json: {e}")
    return config_from_json(data, str(path))


def read_json(path: Path, unreadable):
    """``path`` parsed as JSON (read as bytes: JSON's own encodings). CheckpointError naming it
    when it cannot be read, or ``unreadable(error)`` as the reason when it is not JSON."""
    try:
        return json.loads(path.read_bytes())
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: {unreadable(e)}") from None
