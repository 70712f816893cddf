"""Checkpoint folders in the official layout: save/load round trips and strict loading errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsocr.configs import CONFIGS, config_from_json, config_to_json, load_config
from dsocr.weights import CheckpointError, load_checkpoint, save_checkpoint


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_save_then_load_is_identical(tiny_model, tmp_path):
    save_checkpoint(tiny_model, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    loaded = load_checkpoint(tmp_path / "ckpt")
    _same(tiny_model, loaded)
    ids = torch.tensor([[0, 40, 41, 42]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), tiny_model(ids), rtol=0, atol=0)
    assert loaded.config == tiny_model.config


def test_sharded_checkpoint_round_trip(tiny_model, tmp_path):
    folder = save_checkpoint(tiny_model, tmp_path / "sharded", max_shard_bytes=200_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (folder / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(tiny_model.state_dict())
    _same(tiny_model, load_checkpoint(folder))
    # Re-saving unsharded removes the stale shards and index.
    save_checkpoint(tiny_model, folder)
    assert sorted(p.name for p in folder.glob("model*")) == ["model.safetensors"]


def test_config_json_has_the_official_shape():
    d = config_to_json(CONFIGS["deepseek-ocr"])
    assert d["architectures"] == ["DeepseekOCRForCausalLM"]
    assert d["projector_config"]["input_dim"] == 2048 and d["projector_config"]["n_embed"] == 1280
    assert d["vision_config"]["width"]["sam_vit_b"]["global_attn_indexes"] == [2, 5, 8, 11]
    assert d["language_config"]["n_routed_experts"] == 64 and d["n_routed_experts"] == 64
    for name in ("deepseek-ocr", "mini", "tiny"):
        assert config_from_json(config_to_json(CONFIGS[name])) == CONFIGS[name]


def test_official_style_config_without_dsocr_keys_reads_as_official():
    d = config_to_json(CONFIGS["deepseek-ocr"])
    for k in ("dsocr_variant", "image_token_id", "pad_token_id"):
        d.pop(k)
    for k in ("img_size", "patch_size", "window_size", "mlp_ratio", "out_chans"):
        d["vision_config"]["width"]["sam_vit_b"].pop(k)
    assert config_from_json(d) == CONFIGS["deepseek-ocr"]


@pytest.fixture()
def saved(tiny_model, tmp_path):
    return save_checkpoint(tiny_model, tmp_path / "ckpt")


def _edit(folder, fn):
    path = folder / "model.safetensors"
    sd = load_file(path)
    fn(sd)
    save_file(sd, path, metadata={"format": "pt"})


def test_renamed_tensor_fails_naming_it(saved):
    key = "model.layers.1.mlp.experts.0.up_proj.weight"
    _edit(saved, lambda sd: sd.__setitem__(key.replace("up_proj", "upp_proj"), sd.pop(key)))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(saved)
    assert "missing tensor(s): " + key in str(e.value)
    assert "unexpected tensor(s): model.layers.1.mlp.experts.0.upp_proj.weight" in str(e.value)
    assert str(saved) in str(e.value)


def test_removed_tensor_fails_naming_it(saved):
    _edit(saved, lambda sd: sd.pop("model.view_seperator"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): model.view_seperator"):
        load_checkpoint(saved)


def test_misshaped_tensor_fails_naming_it(saved):
    _edit(saved, lambda sd: sd.__setitem__("model.norm.weight", torch.ones(7)))
    with pytest.raises(CheckpointError, match=r"model.norm.weight: checkpoint \(7,\) vs model"):
        load_checkpoint(saved)


def test_clip_patch_embedding_may_be_absent(saved, tiny_model):
    _edit(saved, lambda sd: sd.pop("model.vision_model.embeddings.patch_embedding.weight"))
    loaded = load_checkpoint(saved)
    ids = torch.tensor([[0, 40, 41]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), tiny_model(ids))


def test_wrong_folders_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config_to_json(CONFIGS["tiny"])))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder or variant"):
        load_checkpoint(tmp_path / "nope")


def test_a_truncated_safetensors_file_is_named_and_called_truncated(saved, sharded):
    single = saved / "model.safetensors"
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    for path, keep in ((single, 20), (single, None), (shard, None)):
        data = path.read_bytes()
        path.write_bytes(data[: keep or len(data) - 1])
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path.parent)
        msg = str(e.value)
        assert msg.startswith(f"{path}: truncated: ") and "\n" not in msg, msg
    single.write_bytes(b"")
    with pytest.raises(CheckpointError, match="too short to be a safetensors file"):
        load_checkpoint(saved)


def test_load_to_bfloat16(saved):
    model = load_checkpoint(saved, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


# --------------------------------------------------------------------------- config.json checks


def _official_config_json():
    """The released checkpoint's config.json as the spec (§4, §8) lists it: nested sections with
    the language fields repeated at the top level, HF keys we ignore (auto_map...), and none of
    dsocr's own keys (no image_token_id, no dsocr_variant, no rope_theta / rms_norm_eps)."""
    lang = {
        "vocab_size": 129280,
        "hidden_size": 1280,
        "intermediate_size": 6848,
        "moe_intermediate_size": 896,
        "num_hidden_layers": 12,
        "num_attention_heads": 10,
        "num_key_value_heads": 10,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "num_experts_per_tok": 6,
        "first_k_dense_replace": 1,
        "max_position_embeddings": 8192,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "kv_lora_rank": None,
        "q_lora_rank": None,
        "qk_nope_head_dim": 0,
        "qk_rope_head_dim": 0,
        "v_head_dim": 0,
        "use_mla": False,
        "topk_method": "greedy",
        "n_group": 1,
        "topk_group": 1,
        "lm_head": True,
        "rm_head": False,
        "torch_dtype": "bfloat16",
    }
    return {
        "architectures": ["DeepseekOCRForCausalLM"],
        "auto_map": {
            "AutoConfig": "modeling_deepseekocr.DeepseekOCRConfig",
            "AutoModel": "modeling_deepseekocr.DeepseekOCRForCausalLM",
        },
        "model_type": "deepseek_vl_v2",
        "tile_tag": "2D",
        "global_view_pos": "head",
        "candidate_resolutions": [[1024, 1024]],
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.3",
        "projector_config": {
            "input_dim": 2048,
            "n_embed": 1280,
            "projector_type": "linear",
            "model_type": "mlp_projector",
        },
        "vision_config": {
            "image_size": 1024,
            "mlp_ratio": 3.7362,
            "model_name": "deeplip_b_l",
            "model_type": "vision",
            "width": {
                "clip-l-14-224": {
                    "heads": 16,
                    "image_size": 224,
                    "layers": 24,
                    "patch_size": 14,
                    "width": 1024,
                },
                "sam_vit_b": {
                    "downsample_channels": [512, 1024],
                    "global_attn_indexes": [2, 5, 8, 11],
                    "heads": 12,
                    "layers": 12,
                    "width": 768,
                },
            },
        },
        "language_config": {
            "architectures": ["DeepseekV2ForCausalLM"],
            "auto_map": {"AutoConfig": "configuration_deepseekv2.DeepseekV2Config"},
            **lang,
        },
        **lang,
    }


def test_the_official_config_json_is_accepted_as_the_official_model():
    assert config_from_json(_official_config_json()) == CONFIGS["deepseek-ocr"]


def test_every_variant_save_checkpoint_writes_is_accepted():
    for name, cfg in CONFIGS.items():
        assert config_from_json(config_to_json(cfg)) == cfg, name


def test_the_bundled_model_config_is_accepted():
    from dsocr.api import ASSETS

    folder = ASSETS / "dsocr-mini"
    if not (folder / "config.json").is_file():
        pytest.skip("dsocr-mini weights are not bundled")
    assert load_config(folder).name == "mini-cpu"


def _both(key, value):
    """Set a language field in both copies (top level and language_config), as a file would."""

    def edit(d):
        d[key] = value
        d["language_config"][key] = value

    return edit


def _sam(key, value):
    return lambda d: d["vision_config"]["width"]["sam_vit_b"].__setitem__(key, value)


BAD_CONFIGS = {
    # name: (edit of the tiny config.json dict, or the whole file's text; what the error names)
    "list": ("[1, 2]", "top level: must be a JSON object, got a list"),
    "null": ("null", "top level: must be a JSON object, got null"),
    "empty-object": ("{}", "model_type: missing"),
    "vision-str": (lambda d: d.__setitem__("vision_config", "x"), "vision_config: must be a"),
    "lang-list": (lambda d: d.__setitem__("language_config", [1]), "language_config: must be a"),
    "llama": (lambda d: d.__setitem__("model_type", "llama"), "model_type: 'llama' is not"),
    "arch": (
        lambda d: d.__setitem__("architectures", ["LlamaForCausalLM"]),
        "architectures: ['LlamaForCausalLM'] is not",
    ),
    "lang-arch": (
        lambda d: d["language_config"].__setitem__("architectures", ["X"]),
        "language_config.architectures",
    ),
    "mla": (_both("use_mla", True), "use_mla"),
    # Settings of code paths the decoder does not have: refused, not ignored.
    "sigmoid": (_both("scoring_func", "sigmoid"), 'scoring_func: "sigmoid" is not supported'),
    "noaux": (_both("topk_method", "noaux_tc"), 'topk_method: "noaux_tc" is not supported'),
    "groups": (_both("n_group", 8), "n_group: 8 is not supported"),
    "rope-scaling": (
        _both("rope_scaling", {"type": "yarn", "factor": 4}),
        "rope_scaling: {",
    ),
    "gelu": (_both("hidden_act", "gelu"), 'hidden_act: "gelu" is not supported'),
    "missing-hidden": (
        lambda d: (d.pop("hidden_size"), d["language_config"].pop("hidden_size")),
        "hidden_size: missing",
    ),
    "missing-sam-layers": (
        lambda d: d["vision_config"]["width"]["sam_vit_b"].pop("layers"),
        "vision_config.width.sam_vit_b.layers: missing",
    ),
    "heads0": (_both("num_attention_heads", 0), "num_attention_heads: must be > 0, got 0"),
    "heads3": (_both("num_attention_heads", 3), "num_attention_heads: 3 does not divide"),
    "kv-heads": (_both("num_key_value_heads", 2), "num_key_value_heads: 2 != num_attention"),
    "vocab-str": (_both("vocab_size", "320"), "vocab_size: must be an integer, got '320'"),
    "hidden-str": (_both("hidden_size", "big"), "hidden_size: must be an integer, got 'big'"),
    "layers-float": (_both("num_hidden_layers", 3.0), "num_hidden_layers: must be an integer"),
    "layers-neg": (_both("num_hidden_layers", -1), "num_hidden_layers: must be > 0, got -1"),
    "bool-int": (_both("n_routed_experts", True), "n_routed_experts: must be an integer"),
    "topk": (_both("num_experts_per_tok", 9), "num_experts_per_tok: 9 > n_routed_experts 4"),
    "maxpos0": (_both("max_position_embeddings", 0), "max_position_embeddings: must be > 0"),
    "eps-nan": ('"rms_norm_eps": NaN', "rms_norm_eps: must be a finite number"),
    "eos": (_both("eos_token_id", 99999), "eos_token_id: 99999 is outside the vocabulary"),
    "image-id": (lambda d: d.__setitem__("image_token_id", -1), "image_token_id: -1 is outside"),
    "sam-heads": (_sam("heads", 5), "vision_config.width.sam_vit_b.heads: 5 does not divide"),
    "sam-global": (_sam("global_attn_indexes", [7]), "global_attn_indexes: [7] not among"),
    "sam-list": (_sam("downsample_channels", "24,32"), "downsample_channels: must be a list"),
    "clip-width": (
        _sam("downsample_channels", [24, 48]),
        "clip-l-14-224.width: 32 != SAM's output width 48",
    ),
    "projector": (
        lambda d: d["projector_config"].__setitem__("n_embed", 7),
        "projector_config.n_embed: 7 != 64",
    ),
    "variant-int": (lambda d: d.__setitem__("dsocr_variant", 3), "dsocr_variant: must be a string"),
}


def _write_config(folder, edit):
    d = config_to_json(CONFIGS["tiny"])
    if isinstance(edit, str) and edit.startswith('"'):  # one raw '"key": value' (e.g. NaN)
        key = edit.split('"')[1]
        d.pop(key), d["language_config"].pop(key)
        text = json.dumps(d)[:-1] + ", " + edit + "}"
    elif isinstance(edit, str):  # the whole file
        text = edit
    else:
        edit(d)
        text = json.dumps(d)
    (folder / "config.json").write_text(text)


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_a_bad_config_json_is_a_one_line_error_naming_the_file_and_key(saved, case):
    edit, why = BAD_CONFIGS[case]
    _write_config(saved, edit)
    with pytest.raises(CheckpointError) as e:
        load_config(saved)
    msg = str(e.value)
    assert msg.startswith(f"{saved / 'config.json'}: ") and why in msg, msg
    assert "\n" not in msg


def test_cli_info_reports_a_bad_config_in_one_line_and_rc_2(saved, capsys):
    from dsocr.cli import main

    _write_config(saved, _both("num_experts_per_tok", 9))
    assert main(["info", "--model", str(saved)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"dsocr: error: {saved / 'config.json'}: num_experts_per_tok: 9 > n_routed_experts 4"
    ]


def test_config_json_that_is_not_utf8_json_or_a_file(saved):
    (saved / "config.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(CheckpointError, match="unreadable config.json"):
        load_config(saved)
    (saved / "config.json").unlink()
    (saved / "config.json").mkdir()
    with pytest.raises(CheckpointError, match=r"config.json: is a folder, not a file"):
        load_checkpoint(saved)


def test_a_file_given_as_the_folder_says_so(tmp_path):
    f = tmp_path / "model.bin"
    f.write_text("x")
    with pytest.raises(CheckpointError, match=r"model.bin: is a file, not a checkpoint folder"):
        load_checkpoint(f)


def test_a_folder_named_model_safetensors_says_so(saved):
    (saved / "model.safetensors").unlink()
    (saved / "model.safetensors").mkdir()
    with pytest.raises(CheckpointError, match=r"model.safetensors: is a folder, not a safetensors"):
        load_checkpoint(saved)


# --------------------------------------------------------------------------- index and tensors


@pytest.fixture()
def sharded(tiny_model, tmp_path):
    return save_checkpoint(tiny_model, tmp_path / "sharded", max_shard_bytes=200_000)


@pytest.mark.parametrize(
    "index,why",
    [
        ('{"weight_map": [1]}', '"weight_map" must be a non-empty object'),
        ("[]", 'no "weight_map" object'),
        ('{"weight_map": {}}', '"weight_map" must be a non-empty object'),
        ('{"weight_map": {"a": 3}}', "weight_map['a'] is not a file name: 3"),
        ('{"weight_map": {"a": "../good/model.safetensors"}}', "points outside the checkpoint"),
        ('{"weight_map": {"a": "/etc/passwd"}}', "points outside the checkpoint"),
        ('{"weight_map": {"a": ".."}}', "points outside the checkpoint"),
    ],
)
def test_a_bad_index_is_a_one_line_error(sharded, index, why):
    path = sharded / "model.safetensors.index.json"
    path.write_text(index)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(sharded)
    assert str(e.value).startswith(f"{path}: ") and why in str(e.value), str(e.value)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool])
def test_a_non_float_tensor_is_refused_by_name(saved, dtype):
    key = "lm_head.weight"
    _edit(saved, lambda sd: sd.__setitem__(key, torch.zeros(sd[key].shape, dtype=dtype)))
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(CheckpointError, match=rf"non-float tensor\(s\): {key}: {name}"):
        load_checkpoint(saved)
