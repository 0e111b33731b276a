"""The SentencePiece tokenizer: released ids, AutoTokenizer loading (transformers 4.x and 5.x), round trips, demo."""

from __future__ import annotations

import copy
import json
import pathlib
import pickle
import shutil
import unicodedata

import pytest
from conftest import ROOT, shared_path
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from tokenization_moss_tts_nano import (
    CONTROL_PIECES,
    USER_DEFINED_PIECES,
    MossTTSNanoSentencePieceTokenizer,
    build_demo_tokenizer,
    tokenizer_metadata,
)

METADATA_FILES = ("tokenizer_config.json", "special_tokens_map.json")
RELEASED_PIECES = list(CONTROL_PIECES) + list(USER_DEFINED_PIECES)


def _remote_code_dir(directory: pathlib.Path, model: pathlib.Path | None) -> pathlib.Path:
    """A tokenizer directory: tokenizer.model + the repository's json metadata + the tokenizer's .py files."""
    directory.mkdir(parents=True, exist_ok=True)
    if model is not None:
        shutil.copyfile(model, directory / "tokenizer.model")
    for name in (*METADATA_FILES, "tokenization_moss_tts_nano.py", "atomic_files.py"):
        shutil.copyfile(ROOT / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def released_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    model = shared_path("data", "tokenizer.model")
    return _remote_code_dir(tmp_path_factory.mktemp("released"), model)


@pytest.fixture(scope="module")
def auto_tokenizer(released_dir: pathlib.Path):
    return AutoTokenizer.from_pretrained(str(released_dir), trust_remote_code=True)


@pytest.fixture(scope="module")
def demo_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> MossTTSNanoSentencePieceTokenizer:
    return build_demo_tokenizer(tmp_path_factory.mktemp("demo"))


def test_repository_metadata_matches_generated_metadata() -> None:
    for name, generated in zip(METADATA_FILES, tokenizer_metadata()):
        assert json.loads((ROOT / name).read_text(encoding="utf-8")) == generated


@pytest.mark.parametrize("name", METADATA_FILES)
def test_repository_metadata_matches_released_metadata(name: str) -> None:
    released = json.loads(shared_path("spec", name).read_text(encoding="utf-8"))
    assert json.loads((ROOT / name).read_text(encoding="utf-8")) == released


def test_auto_tokenizer_loads_remote_class(auto_tokenizer) -> None:
    assert type(auto_tokenizer).__name__ == "MossTTSNanoSentencePieceTokenizer"
    assert auto_tokenizer.vocab_size == 16384
    assert len(auto_tokenizer) == 16384


def test_released_ids(auto_tokenizer) -> None:
    assert auto_tokenizer.encode("Hello world.", add_special_tokens=False) == [7026, 1177, 10380]
    assert auto_tokenizer.encode("None", add_special_tokens=False) == [505, 587]
    assert auto_tokenizer.encode("\n", add_special_tokens=False) == []
    assert auto_tokenizer.encode("", add_special_tokens=False) == []
    assert auto_tokenizer.encode("user\n", add_special_tokens=False) == [600, 289]
    assert auto_tokenizer.encode("<user_inst>\n- Reference(s):\n", add_special_tokens=False) == [
        10356, 13, 10356, 10425, 1860, 4546, 12907, 10363, 13325, 11492,
    ]  # fmt: skip
    assert auto_tokenizer.encode("\n</user_inst>", add_special_tokens=False) == [10356, 14]
    assert auto_tokenizer.encode("assistant\n", add_special_tokens=False) == [8165, 430]


def test_special_tokens_and_pieces(auto_tokenizer) -> None:
    assert (auto_tokenizer.unk_token_id, auto_tokenizer.bos_token_id) == (0, 1)
    assert (auto_tokenizer.eos_token_id, auto_tokenizer.pad_token_id) == (2, 3)
    assert auto_tokenizer.convert_ids_to_tokens(list(range(15))) == RELEASED_PIECES
    assert auto_tokenizer.convert_tokens_to_ids(RELEASED_PIECES) == list(range(15))


@pytest.mark.parametrize("text", ["Hello world.", "今天天气真好，我们一起去公园散步吧。", "a"])
def test_encode_adds_no_special_tokens(auto_tokenizer, text: str) -> None:
    plain = auto_tokenizer.encode(text, add_special_tokens=False)
    assert auto_tokenizer.encode(text) == plain
    assert auto_tokenizer(text)["input_ids"] == plain


@pytest.mark.parametrize("text", ["Hello world.", "今天天气真好，我们一起去公园散步吧。", "Grüße, 😀 ǅ!", "x<|im_end|>y"])
def test_decode_inverts_encode_up_to_nfkc(auto_tokenizer, text: str) -> None:
    ids = auto_tokenizer.encode(text, add_special_tokens=False)
    assert auto_tokenizer.decode(ids) == unicodedata.normalize("NFKC", text)


def test_decode_keeps_or_skips_control_tokens(auto_tokenizer) -> None:
    ids = [1, 7026, 1177, 10380, 2]
    assert auto_tokenizer.decode(ids, skip_special_tokens=True) == "Hello world."
    assert auto_tokenizer.decode(ids).startswith("<s>")


def test_save_pretrained_round_trip(auto_tokenizer, tmp_path: pathlib.Path) -> None:
    auto_tokenizer.save_pretrained(str(tmp_path))
    assert (tmp_path / "tokenizer.model").read_bytes() == shared_path("data", "tokenizer.model").read_bytes()
    saved_config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert saved_config["tokenizer_class"] == "MossTTSNanoSentencePieceTokenizer"
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path), trust_remote_code=True)
    for text in ("Hello world.", "None", "今天天气真好。"):
        assert reloaded.encode(text, add_special_tokens=False) == auto_tokenizer.encode(text, add_special_tokens=False)
    assert reloaded.pad_token_id == 3


def test_pickle_and_deepcopy(auto_tokenizer) -> None:
    for clone in (pickle.loads(pickle.dumps(auto_tokenizer)), copy.deepcopy(auto_tokenizer)):
        assert clone.encode("Hello world.", add_special_tokens=False) == [7026, 1177, 10380]


def test_missing_model_file_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    directory = _remote_code_dir(tmp_path / "no_model", None)
    with pytest.raises(ValueError, match=r"needs the SentencePiece model 'tokenizer.model' in .*no_model"):
        AutoTokenizer.from_pretrained(str(directory), trust_remote_code=True)
    with pytest.raises(ValueError, match="vocab_file=None"):
        MossTTSNanoSentencePieceTokenizer()
    with pytest.raises(ValueError, match="is not a file"):
        MossTTSNanoSentencePieceTokenizer(vocab_file=str(tmp_path / "missing.model"))


def test_corrupt_model_file_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    directory = _remote_code_dir(tmp_path / "corrupt", None)
    bad = directory / "tokenizer.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(RuntimeError, match="could not read the SentencePiece model"):
        MossTTSNanoSentencePieceTokenizer(vocab_file=str(bad))
    with pytest.raises(RuntimeError, match="could not read the SentencePiece model"):
        AutoTokenizer.from_pretrained(str(directory), trust_remote_code=True)


def test_demo_tokenizer_has_released_special_pieces(demo_tokenizer) -> None:
    released = [demo_tokenizer.sp_model.id_to_piece(index) for index in range(15)]
    assert released == RELEASED_PIECES
    assert demo_tokenizer.sp_model.id_to_piece(15) == "<0x00>"  # byte fallback pieces follow, as released
    assert (demo_tokenizer.pad_token_id, demo_tokenizer.eos_token_id) == (3, 2)
    assert 512 <= demo_tokenizer.vocab_size <= 16384
    assert demo_tokenizer.encode("\n", add_special_tokens=False) == []
    assert demo_tokenizer.encode("<|im_start|>", add_special_tokens=False)[-1] == 4


def test_demo_tokenizer_matches_released_special_pieces(demo_tokenizer) -> None:
    import sentencepiece as spm

    released = spm.SentencePieceProcessor(model_file=str(shared_path("data", "tokenizer.model")))
    for index in range(15 + 256):
        assert demo_tokenizer.sp_model.id_to_piece(index) == released.id_to_piece(index)
        assert demo_tokenizer.sp_model.is_control(index) == released.is_control(index)
        assert demo_tokenizer.sp_model.is_byte(index) == released.is_byte(index)


def test_demo_tokenizer_is_deterministic_and_auto_loadable(tmp_path: pathlib.Path) -> None:
    first = build_demo_tokenizer(tmp_path / "a")
    build_demo_tokenizer(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.model").read_bytes() == (tmp_path / "b" / "tokenizer.model").read_bytes()
    config, special_map = tokenizer_metadata()
    assert json.loads((tmp_path / "a" / "tokenizer_config.json").read_text(encoding="utf-8")) == config
    assert json.loads((tmp_path / "a" / "special_tokens_map.json").read_text(encoding="utf-8")) == special_map
    for name in ("tokenization_moss_tts_nano.py", "atomic_files.py"):
        shutil.copyfile(ROOT / name, tmp_path / "a" / name)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "a"), trust_remote_code=True)
    text = "Hello world. 你好，世界！"
    assert loaded.encode(text, add_special_tokens=False) == first.encode(text, add_special_tokens=False)


def test_demo_tokenizer_rejects_bad_vocab_size(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="vocab_size=100"):
        build_demo_tokenizer(tmp_path, vocab_size=100)


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=40))
def test_demo_tokenizer_encodes_any_text_without_unk(demo_tokenizer, text: str) -> None:
    assume(not any(piece in text for piece in CONTROL_PIECES))  # literal special tokens map to their ids
    ids = demo_tokenizer.encode(text, add_special_tokens=False)
    assert all(0 < token < demo_tokenizer.vocab_size for token in ids)
    assert demo_tokenizer.decode(ids) == demo_tokenizer.sp_model.decode(ids)
