"""Checkpoint folders in the official layout: save/load round trips and strict loading errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsocr.configs import CONFIGS, config_from_json, config_to_json
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


def test_load_to_bfloat16(saved):
    model = load_checkpoint(saved, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
