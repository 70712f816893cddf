"""The assembled model: official sizes and key table, token layout, equivalences on the tiny config."""

import re

import pytest
import torch
from conftest import TEST_BASE, TEST_GUNDAM, TEST_SMALL
from PIL import Image

from dsocr.configs import CONFIGS
from dsocr.engine.generate import generate_greedy
from dsocr.engine.kv_cache import KVCache
from dsocr.model import build_model
from dsocr.vision.deepencoder import layout_image_tokens
from dsocr.vision.preprocess import count_image_tokens, preprocess_image

# --------------------------------------------------------------------------- official sizes

# Spec §8: every key pattern of the official checkpoint with its shape. "{a-b}" is a range.
OFFICIAL_TABLE = """
lm_head.weight 129280,1280
model.embed_tokens.weight 129280,1280
model.norm.weight 1280
model.layers.{0-11}.input_layernorm.weight 1280
model.layers.{0-11}.post_attention_layernorm.weight 1280
model.layers.{0-11}.self_attn.{q,k,v,o}_proj.weight 1280,1280
model.layers.0.mlp.{gate,up}_proj.weight 6848,1280
model.layers.0.mlp.down_proj.weight 1280,6848
model.layers.{1-11}.mlp.gate.weight 64,1280
model.layers.{1-11}.mlp.experts.{0-63}.{gate,up}_proj.weight 896,1280
model.layers.{1-11}.mlp.experts.{0-63}.down_proj.weight 1280,896
model.layers.{1-11}.mlp.shared_experts.{gate,up}_proj.weight 1792,1280
model.layers.{1-11}.mlp.shared_experts.down_proj.weight 1280,1792
model.projector.layers.weight 1280,2048
model.projector.layers.bias 1280
model.image_newline 1280
model.view_seperator 1280
model.sam_model.patch_embed.proj.weight 768,3,16,16
model.sam_model.patch_embed.proj.bias 768
model.sam_model.pos_embed 1,64,64,768
model.sam_model.blocks.{0-11}.norm{1,2}.{weight,bias} 768
model.sam_model.blocks.{0-11}.attn.qkv.weight 2304,768
model.sam_model.blocks.{0-11}.attn.qkv.bias 2304
model.sam_model.blocks.{0-11}.attn.proj.weight 768,768
model.sam_model.blocks.{0-11}.attn.proj.bias 768
model.sam_model.blocks.{0,1,3,4,6,7,9,10}.attn.rel_pos_{h,w} 27,64
model.sam_model.blocks.{2,5,8,11}.attn.rel_pos_{h,w} 127,64
model.sam_model.blocks.{0-11}.mlp.lin1.weight 3072,768
model.sam_model.blocks.{0-11}.mlp.lin1.bias 3072
model.sam_model.blocks.{0-11}.mlp.lin2.weight 768,3072
model.sam_model.blocks.{0-11}.mlp.lin2.bias 768
model.sam_model.neck.0.weight 256,768,1,1
model.sam_model.neck.{1,3}.{weight,bias} 256
model.sam_model.neck.2.weight 256,256,3,3
model.sam_model.net_2.weight 512,256,3,3
model.sam_model.net_3.weight 1024,512,3,3
model.vision_model.embeddings.class_embedding 1024
model.vision_model.embeddings.patch_embedding.weight 1024,3,14,14
model.vision_model.embeddings.position_embedding.weight 257,1024
model.vision_model.pre_layrnorm.{weight,bias} 1024
model.vision_model.transformer.layers.{0-23}.layer_norm{1,2}.{weight,bias} 1024
model.vision_model.transformer.layers.{0-23}.self_attn.qkv_proj.weight 3072,1024
model.vision_model.transformer.layers.{0-23}.self_attn.qkv_proj.bias 3072
model.vision_model.transformer.layers.{0-23}.self_attn.out_proj.weight 1024,1024
model.vision_model.transformer.layers.{0-23}.self_attn.out_proj.bias 1024
model.vision_model.transformer.layers.{0-23}.mlp.fc1.weight 4096,1024
model.vision_model.transformer.layers.{0-23}.mlp.fc1.bias 4096
model.vision_model.transformer.layers.{0-23}.mlp.fc2.weight 1024,4096
model.vision_model.transformer.layers.{0-23}.mlp.fc2.bias 1024
"""


def _expand(pattern: str) -> list[str]:
    m = re.search(r"\{([^}]*)\}", pattern)
    if not m:
        return [pattern]
    body = m.group(1)
    if re.fullmatch(r"\d+-\d+", body):
        a, b = map(int, body.split("-"))
        options = [str(i) for i in range(a, b + 1)]
    else:
        options = body.split(",")
    return [k for o in options for k in _expand(pattern[: m.start()] + o + pattern[m.end() :])]


def official_keys() -> dict[str, tuple[int, ...]]:
    out = {}
    for line in OFFICIAL_TABLE.strip().splitlines():
        pattern, shape = line.split()
        for k in _expand(pattern):
            out[k] = tuple(int(s) for s in shape.split(","))
    return out


@pytest.fixture(scope="module")
def official_meta():
    return build_model(CONFIGS["deepseek-ocr"], device="meta")


def test_official_parameter_counts(official_meta):
    params = dict(official_meta.named_parameters())
    assert len(params) == 2710
    assert sum(p.numel() for p in params.values()) == 3_336_106_240

    def part(prefix):
        return sum(p.numel() for k, p in params.items() if k.startswith(prefix))

    assert part("model.sam_model.") == 95_569_152
    assert part("model.vision_model.") == 303_177_728
    assert part("model.projector.") == 2_622_720
    assert len(official_meta.state_dict()) == 2710  # no buffers beyond the parameters


def test_official_keys_and_shapes_match_spec_table(official_meta):
    expected = official_keys()
    got = {k: tuple(v.shape) for k, v in official_meta.state_dict().items()}
    assert len(expected) == 2710
    assert set(got) == set(expected), set(got) ^ set(expected)
    bad = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
    assert not bad


def test_mini_variant_budget():
    model = build_model(CONFIGS["mini"], device="meta")
    n = sum(p.numel() for p in model.parameters())
    assert n <= 30_000_000, n
    # Same structure: 16x compressor, so Tiny mode (512 px) still gives an 8x8 grid = 64 tokens.
    assert CONFIGS["mini"].sam.pixels_per_token == 64
    assert count_image_tokens(512, 512, "tiny", pixels_per_token=64) == 8 * 9 + 1


# --------------------------------------------------------------------------- vision + layout


def _image(w, h, seed=0):
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


@pytest.mark.parametrize(
    "size,mode", [((100, 60), TEST_BASE), ((90, 90), TEST_SMALL), ((200, 90), TEST_GUNDAM)]
)
def test_encode_images_token_count(tiny_model, size, mode):
    inputs = preprocess_image(_image(*size), mode)
    with torch.no_grad():
        (seq,) = tiny_model.encode_images([inputs])
    assert seq.shape == (count_image_tokens(*size, mode), tiny_model.config.n_embed)
    assert seq.shape[0] == inputs.num_tokens


def test_encode_images_batched_equals_single(tiny_model):
    ims = [
        preprocess_image(_image(200, 90, 1), TEST_GUNDAM),
        preprocess_image(_image(70, 120, 2), TEST_BASE),
        preprocess_image(_image(150, 150, 3), TEST_GUNDAM),
    ]
    with torch.no_grad():
        together = tiny_model.encode_images(ims)
        alone = [tiny_model.encode_images([im])[0] for im in ims]
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_layout_order_tiles_then_global_then_separator():
    C, t, g = 3, 2, 2
    K, R = 3, 2  # 3 wide, 2 high
    tiles = torch.arange(K * R, dtype=torch.float32).view(-1, 1, 1, 1).expand(K * R, t, t, C)
    glob = torch.full((g, g, C), 100.0)
    nl, sep = torch.full((C,), -1.0), torch.full((C,), -2.0)
    seq = layout_image_tokens(glob, tiles.clone(), (K, R), nl, sep)[:, 0]
    assert seq.shape[0] == (R * t) * (K * t + 1) + g * (g + 1) + 1
    # First stitched row: tiles 0,1,2 of the top tile row, two tokens each, then one newline.
    assert seq[: K * t + 1].tolist() == [0, 0, 1, 1, 2, 2, -1]
    # Third stitched row starts the second tile row.
    row3 = seq[2 * (K * t + 1) : 3 * (K * t + 1)]
    assert row3.tolist() == [3, 3, 4, 4, 5, 5, -1]
    local = (R * t) * (K * t + 1)
    assert seq[local : local + g + 1].tolist() == [100, 100, -1]
    assert seq[-1] == -2


def test_gundam_3x2_example_count():
    assert count_image_tokens(1920, 1280, "gundam") == 893


# --------------------------------------------------------------------------- decoder equivalences


def _ids(n, seed, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(20, vocab, (n,), generator=g)).tolist()


def test_cached_decode_matches_full_forward(tiny_model):
    ids = torch.tensor([_ids(12, 0)])
    with torch.no_grad():
        full = tiny_model(ids)  # (1, 12, V)
        cache = KVCache.for_model(tiny_model, 1, 16)
        pre = tiny_model(ids[:, :7], torch.arange(7)[None], cache)
        steps = [tiny_model(ids[:, i : i + 1], torch.tensor([[i]]), cache) for i in range(7, 12)]
    torch.testing.assert_close(pre, full[:, :7], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 7:], rtol=1e-4, atol=1e-4)


def test_batch_of_two_equals_singles_with_images(tiny_model, tiny_cfg):
    img_id = tiny_cfg.image_token_id
    ims = [
        preprocess_image(_image(100, 60), TEST_BASE),
        preprocess_image(_image(200, 90, 5), TEST_GUNDAM),
    ]
    with torch.no_grad():
        embeds = tiny_model.encode_images(ims)
    prompts = [
        [0] + [img_id] * ims[0].num_tokens + _ids(5, 1),
        [0] + [img_id] * ims[1].num_tokens + _ids(9, 2),
    ]
    with torch.no_grad():
        both = generate_greedy(tiny_model, prompts, embeds, max_new_tokens=6)
        single = [
            generate_greedy(tiny_model, [p], [e], max_new_tokens=6)[0]
            for p, e in zip(prompts, embeds)
        ]
        uncached = generate_greedy(tiny_model, prompts, embeds, max_new_tokens=6, use_cache=False)
    assert both == single
    assert both == uncached
    # Logits too, not only the argmax.
    T = max(len(p) for p in prompts)
    ids = torch.zeros(2, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    with torch.no_grad():
        batched = tiny_model(ids, image_embeds=torch.cat(embeds))
        for i, p in enumerate(prompts):
            alone = tiny_model(torch.tensor([p]), image_embeds=embeds[i])
            torch.testing.assert_close(batched[i, : len(p)], alone[0], rtol=1e-4, atol=1e-4)


def test_sdpa_matches_manual_attention(tiny_model):
    ids = torch.tensor([_ids(10, 3)])
    pixels = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        ref_logits = tiny_model(ids)
        ref_vis = tiny_model.model.sam_model(pixels)
        for m in tiny_model.modules():
            if hasattr(m, "use_sdpa"):
                m.use_sdpa = False
        torch.testing.assert_close(tiny_model(ids), ref_logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(
            tiny_model.model.sam_model(pixels), ref_vis, rtol=1e-4, atol=1e-4
        )


def test_image_placeholder_mismatch_is_an_error(tiny_model, tiny_cfg):
    ids = torch.tensor([[0] + [tiny_cfg.image_token_id] * 3 + [40]])
    with pytest.raises(AssertionError, match="3 <image> placeholders .* 2 image embeddings"):
        tiny_model(ids, image_embeds=torch.zeros(2, tiny_cfg.n_embed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_runs_on_cpu_in_float32_and_bfloat16(tiny_cfg, dtype):
    model = build_model(tiny_cfg, dtype=dtype).eval()
    inputs = preprocess_image(_image(64, 64), TEST_SMALL)
    with torch.no_grad():
        (emb,) = model.encode_images([inputs])
        ids = torch.tensor([[0] + [tiny_cfg.image_token_id] * inputs.num_tokens + [40, 41]])
        logits = model(ids, image_embeds=emb)
    assert emb.dtype == dtype
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
