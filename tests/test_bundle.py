"""scripts/bundle_model.py: the embedded model's bundle, and its measured default mode."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from dsocr.language.tokenizer import Tokenizer, byte_tokenizer
from dsocr.train.data import DataRecipe
from dsocr.weights import load_checkpoint, save_checkpoint

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import bundle_model  # noqa: E402


def _checkpoint(tmp_path, tiny_model, modes):
    recipe = DataRecipe(
        modes=modes, min_chars=4, max_chars=10, font_sizes=(40,), fonts=("sans",), page_size=128
    )
    meta = {"step": 7, "data_recipe": dataclasses.asdict(recipe)}
    src = tmp_path / "ckpt"
    save_checkpoint(tiny_model, src, tokenizer=Tokenizer(byte_tokenizer()), meta=meta)
    return src


def test_recipe_round_trips_through_meta_json():
    recipe = DataRecipe(modes=("tiny", "small"), font_sizes=(16, 32), scan_prob=0.1)
    saved = json.loads(json.dumps(dataclasses.asdict(recipe)))  # tuples become lists
    assert DataRecipe.from_meta(saved) == recipe
    assert DataRecipe.from_meta({"modes": ["base"], "not_a_field": 1}).modes == ("base",)


def test_pick_mode_lowest_mean_then_cheaper():
    assert bundle_model.pick_mode({"tiny": 0.5, "small": 0.3}) == "small"
    assert bundle_model.pick_mode({"small": 0.4, "tiny": 0.4, "base": 0.4}) == "tiny"


def test_bundle_measures_the_default_mode(tmp_path, tiny_model):
    src = _checkpoint(tmp_path, tiny_model, ("tiny", "small"))
    out = tmp_path / "bundle"
    args = [str(src), "--out", str(out), "--dtype", "float32", "--measure-pages", "2"]
    assert bundle_model.main([*args, "--device", "cpu"]) == 0
    defaults = json.loads((out / "meta.json").read_text())["defaults"]
    measured = defaults["measured"]
    # Every trained page size is read in every trained mode, and the default is the table's best.
    assert set(measured["cer"]) == {"tiny", "small"}
    assert all(set(row) == {"tiny", "small"} for row in measured["cer"].values())
    assert defaults["mode"] == bundle_model.pick_mode(measured["mean"])
    assert defaults["task"] == "free"
    # The bundle itself reloads strictly, with the same weights.
    reloaded = load_checkpoint(out, device="cpu")
    for k, v in tiny_model.state_dict().items():
        assert reloaded.state_dict()[k].equal(v), k


def test_bundle_default_mode_named_or_single(tmp_path, tiny_model):
    src = _checkpoint(tmp_path, tiny_model, ("tiny", "small"))
    out = tmp_path / "named"
    bundle_model.main([str(src), "--out", str(out), "--default-mode", "Small"])
    defaults = json.loads((out / "meta.json").read_text())["defaults"]
    assert defaults == {"mode": "small", "task": "free"}  # no measurement when told
    single = _checkpoint(tmp_path / "one", tiny_model, ("tiny",))
    bundle_model.main([str(single), "--out", str(tmp_path / "single")])
    assert json.loads((tmp_path / "single" / "meta.json").read_text())["defaults"]["mode"] == "tiny"


def test_bundle_refuses_to_measure_without_its_corpus(tmp_path, tiny_model):
    src = _checkpoint(tmp_path, tiny_model, ("tiny", "small"))
    meta = json.loads((src / "meta.json").read_text())
    meta["data_recipe"]["corpus"] = str(tmp_path / "gone")
    (src / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match="corpus is missing"):
        bundle_model.main([str(src), "--out", str(tmp_path / "b")])
    assert not (tmp_path / "b").exists()


def test_bundle_refuses_an_out_folder_it_did_not_write(tmp_path, tiny_model):
    src = _checkpoint(tmp_path, tiny_model, ("tiny",))
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "notes.txt").write_text("precious")
    with pytest.raises(SystemExit, match="not a bundle"):
        bundle_model.main([str(src), "--out", str(victim)])
    assert (victim / "notes.txt").read_text() == "precious" and (victim / "sub").is_dir()
    # An earlier bundle is replaced, leaving nothing beside it.
    out = tmp_path / "bundles" / "mini"
    assert bundle_model.main([str(src), "--out", str(out)]) == 0
    assert bundle_model.main([str(src), "--out", str(out), "--dtype", "float32"]) == 0
    assert json.loads((out / "meta.json").read_text())["bundled_dtype"] == "float32"
    assert [p.name for p in out.parent.iterdir()] == ["mini"]


def test_failed_swap_puts_the_old_bundle_back(tmp_path, monkeypatch):
    out, new = tmp_path / "bundle", tmp_path / "new"
    out.mkdir()
    (out / "meta.json").write_text("old")
    new.mkdir()
    rename = Path.rename

    def failing(self, target):
        if self == new:
            raise OSError("disk gone")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError):
        bundle_model.replace_folder(new, out)
    assert (out / "meta.json").read_text() == "old"
