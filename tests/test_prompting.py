"""Prompt rows: golden parity with upstream, the mode rules, input validation and batching properties."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from conftest import shared_path
from hypothesis import given, settings
from hypothesis import strategies as st

from prompting import (
    infer_mode,
    PromptTemplate,
    PromptTokenIds,
    audio_rows,
    build_continuation_rows,
    build_prompt_template,
    build_voice_clone_rows,
    left_pad_batch,
    resolve_nq,
    text_rows,
    validate_mode,
)

IDS = PromptTokenIds()
USER_PREFIX = (4, 600, 289, 10356, 13, 10356, 10425, 1860, 4546, 12907, 10363, 13325, 11492)
ASSISTANT_PREFIX = (10356, 14, 5, 4, 8165, 430)


@pytest.fixture(scope="module")
def encode():
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(shared_path("data", "tokenizer.model")))
    return lambda text: processor.encode(text)


@pytest.fixture(scope="module")
def template(encode) -> PromptTemplate:
    return build_prompt_template(encode, IDS)


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(shared_path("golden", "tts_tiny", "golden.npz")) as data:
        return {name: data[name] for name in data.files}


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return json.loads(shared_path("golden", "tts_tiny", "golden_meta.json").read_text(encoding="utf-8"))["texts"]


@pytest.fixture(scope="module")
def golden_rows(template, encode, golden, texts) -> dict[str, torch.Tensor]:
    codes = golden["prompt_audio_codes"]
    return {
        "vc0": build_voice_clone_rows(template, IDS, encode(texts[0]), codes),
        "vc1": build_voice_clone_rows(template, IDS, encode(texts[1]), codes),
        "cont": build_continuation_rows(template, IDS, encode(texts[1])),
        "contp": build_continuation_rows(template, IDS, encode("Hello" + " world."), codes[:10]),
    }


def test_template_matches_spec(template: PromptTemplate, golden) -> None:
    assert template.user_prefix == USER_PREFIX
    assert template.assistant_prefix == ASSISTANT_PREFIX
    assert template.none_text == (505, 587)
    assert len(template.after_reference) == 56
    start = len(USER_PREFIX) + 1 + golden["prompt_audio_codes"].shape[0] + 1  # ... audio_start, frames, audio_end
    assert tuple(golden["vc0_input_ids"][0, start : start + 56, 0].tolist()) == template.after_reference


@pytest.mark.parametrize("name", ["vc0", "vc1", "cont", "contp"])
def test_rows_equal_golden(golden_rows, golden, name: str) -> None:
    expected = torch.from_numpy(golden[f"{name}_input_ids"][0])
    assert golden_rows[name].dtype == torch.long
    assert torch.equal(golden_rows[name], expected)
    assert bool(golden[f"{name}_attention_mask"].all())


def test_batch_equals_golden(golden_rows, golden) -> None:
    batch, mask = left_pad_batch([golden_rows["vc0"], golden_rows["vc1"]], IDS)
    assert batch.dtype == torch.long and mask.dtype == torch.bool
    assert torch.equal(batch, torch.from_numpy(golden["batch_input_ids"]))
    assert torch.equal(mask, torch.from_numpy(golden["batch_attention_mask"]))


def test_code_inputs_may_be_numpy_list_or_tensor(golden) -> None:
    codes = golden["prompt_audio_codes"][:3]
    expected = audio_rows(codes, 8, IDS)
    assert torch.equal(audio_rows(codes.tolist(), 8, IDS), expected)
    assert torch.equal(audio_rows(torch.from_numpy(codes).int(), 8, IDS), expected)
    assert torch.equal(expected[:, 1:], torch.from_numpy(codes))
    assert expected[:, 0].tolist() == [8, 8, 8]


def test_text_rows_layout() -> None:
    rows = text_rows([5, 6, 7], IDS)
    assert rows.shape == (3, 17)
    assert rows[:, 0].tolist() == [5, 6, 7]
    assert bool((rows[:, 1:] == 1024).all())
    assert text_rows([], IDS).shape == (0, 17)
    with pytest.raises(ValueError, match="token_ids contains -1"):
        text_rows([1, -1], IDS)
    with pytest.raises(ValueError, match="token_ids must be a sequence of integer token ids"):
        text_rows([1, 2.5], IDS)
    assert torch.equal(text_rows(torch.tensor([5, 6]), IDS), text_rows(np.array([5, 6]), IDS))


def test_from_config_reads_config_attributes() -> None:
    config = json.loads(shared_path("golden", "tts_tiny", "config.json").read_text(encoding="utf-8"))
    assert PromptTokenIds.from_config(config) == IDS
    assert PromptTokenIds.from_config(types.SimpleNamespace(**config)) == IDS
    small = dict(config, n_vq=4, audio_codebook_sizes=[8, 8, 8, 8], audio_pad_token_id=8, pad_token_id=0)
    ids = PromptTokenIds.from_config(small)
    assert (ids.n_vq, ids.audio_codebook_sizes, ids.audio_pad, ids.pad) == (4, (8, 8, 8, 8), 8, 0)
    del config["audio_end_token_id"]
    with pytest.raises(ValueError, match="audio_end_token_id"):
        PromptTokenIds.from_config(config)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_vq": 0, "audio_codebook_sizes": ()}, "n_vq=0"),
        ({"n_vq": 2, "audio_codebook_sizes": (4,)}, "audio_codebook_sizes has 1 entries but n_vq=2"),
        ({"n_vq": 2, "audio_codebook_sizes": (4, 0), "audio_pad": 4}, "must all be positive"),
        ({"n_vq": 1, "audio_codebook_sizes": (2048,)}, "audio_pad=1024 lies inside a codebook"),
    ],
)
def test_prompt_token_ids_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PromptTokenIds(**kwargs)


@pytest.mark.parametrize(
    "shape", [(5,), (2, 15), (2, 17), (1, 2, 16)], ids=["rank1", "narrow", "wide", "rank3"]
)
def test_audio_rows_rejects_wrong_shape(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"codes has shape .* expected \[frames, 16\]"):
        audio_rows(torch.zeros(shape, dtype=torch.long), 8, IDS)


@pytest.mark.parametrize(("value", "channel"), [(1025, 5), (-1, 0), (2048, 15)])
def test_audio_rows_rejects_out_of_range_codes(value: int, channel: int) -> None:
    codes = torch.zeros((4, 16), dtype=torch.long)
    codes[2, channel] = value
    message = rf"codes\[2, {channel}\] = {value} is out of range for channel {channel}: allowed codes are 0\.\.1023"
    with pytest.raises(ValueError, match=message):
        audio_rows(codes, 8, IDS)


def test_audio_rows_range_follows_each_codebook_size() -> None:
    ids = PromptTokenIds(n_vq=2, audio_codebook_sizes=(4, 8), audio_pad=8)
    assert audio_rows([[3, 7], [8, 8]], 9, ids).tolist() == [[9, 3, 7], [9, 8, 8]]
    with pytest.raises(ValueError, match=r"channel 0: allowed codes are 0\.\.3 or 8"):
        audio_rows([[4, 0]], 9, ids)


def test_audio_rows_rejects_non_integer_codes() -> None:
    with pytest.raises(ValueError, match="must be integers"):
        audio_rows(np.zeros((2, 16), dtype=np.float32), 8, IDS)
    with pytest.raises(ValueError, match="could not be read"):
        audio_rows([[1, 2], [3]], 8, IDS)


@pytest.mark.parametrize("nq", [0, 17, -1, True, 2.0, "8"])
def test_nq_outside_range_is_rejected(nq) -> None:
    codes = torch.zeros((2, 16), dtype=torch.long)
    with pytest.raises(ValueError, match=r"nq=.* must be an integer within 1\.\.16"):
        audio_rows(codes, 8, IDS, nq=nq)
    template = PromptTemplate((4,), (5,), (6,), (7,))
    with pytest.raises(ValueError, match="nq="):
        build_continuation_rows(template, IDS, [1], None, nq=nq)
    assert resolve_nq(None, IDS.n_vq) == 16


@pytest.mark.parametrize(
    ("mode", "audio", "text", "message"),
    [
        ("voice_clone", False, False, "needs prompt audio"),
        ("voice_clone", True, True, "takes no prompt text"),
        ("voice_clone", False, True, "needs prompt audio"),
        ("continuation", True, False, "prompt audio was given without prompt text"),
        ("continuation", False, True, "prompt text was given without prompt audio"),
        ("clone", True, False, "mode='clone' is not supported: choose one of voice_clone, continuation"),
    ],
)
def test_mode_rule_violations(mode: str, audio: bool, text: bool, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_mode(mode, has_prompt_audio=audio, has_prompt_text=text)


@pytest.mark.parametrize(
    ("mode", "audio", "text"),
    [("voice_clone", True, False), ("continuation", False, False), ("continuation", True, True)],
)
def test_valid_modes(mode: str, audio: bool, text: bool) -> None:
    """A valid combination passes the rules, and it is the mode a call without `mode=` infers from its prompt."""
    validate_mode(mode, has_prompt_audio=audio, has_prompt_text=text)
    assert infer_mode(None, has_prompt_audio=audio, has_prompt_text=text) == mode
    assert infer_mode(mode, has_prompt_audio=audio, has_prompt_text=text) == mode


def test_builders_reject_empty_text_and_empty_prompt() -> None:
    template = PromptTemplate((4,), (5,), (6,), (7,))
    codes = torch.zeros((2, 16), dtype=torch.long)
    with pytest.raises(ValueError, match="text_ids is empty"):
        build_voice_clone_rows(template, IDS, [], codes)
    with pytest.raises(ValueError, match="text_ids is empty"):
        build_continuation_rows(template, IDS, [])
    with pytest.raises(ValueError, match="text_ids must be a sequence of integer"):
        build_continuation_rows(template, IDS, ["a"])
    with pytest.raises(ValueError, match="prompt_codes has 0 frames"):
        build_voice_clone_rows(template, IDS, [1], torch.zeros((0, 16), dtype=torch.long))
    with pytest.raises(ValueError, match="prompt_codes has 0 frames"):
        build_continuation_rows(template, IDS, [1], [])


def test_layouts_with_a_toy_template() -> None:
    template = PromptTemplate(user_prefix=(4, 100), after_reference=(101,), assistant_prefix=(102, 5), none_text=(103,))
    codes = torch.arange(32).reshape(2, 16)
    clone = build_voice_clone_rows(template, IDS, [50, 51], codes, nq=3)
    assert clone[:, 0].tolist() == [4, 100, 6, 8, 8, 7, 101, 50, 51, 102, 5, 6]
    assert clone[3, 1:4].tolist() == [0, 1, 2] and bool((clone[3:5, 4:] == 1024).all())
    continuation = build_continuation_rows(template, IDS, [50], codes)
    assert continuation[:, 0].tolist() == [4, 100, 103, 101, 50, 102, 5, 6, 9, 9]
    assert torch.equal(continuation[-2:, 1:], codes)
    assert build_continuation_rows(template, IDS, [50]).shape == (8, 17)


def test_left_pad_batch_rejects_bad_items() -> None:
    with pytest.raises(ValueError, match="rows is empty"):
        left_pad_batch([], IDS)
    with pytest.raises(ValueError, match=r"rows\[1\] is \(3, 16\)"):
        left_pad_batch([text_rows([1], IDS), torch.zeros((3, 16), dtype=torch.long)], IDS)
    with pytest.raises(ValueError, match=r"rows\[0\] is \(0, 17\)"):
        left_pad_batch([text_rows([], IDS)], IDS)
    with pytest.raises(ValueError, match="rows must hold integer ids"):
        left_pad_batch([torch.zeros((2, 17))], IDS)


@st.composite
def row_batches(draw) -> list[torch.Tensor]:
    lengths = draw(st.lists(st.integers(1, 12), min_size=1, max_size=5))
    rows = []
    for length in lengths:
        token_ids = draw(st.lists(st.integers(0, 16383), min_size=length, max_size=length))
        rows.append(text_rows(token_ids, IDS))
        if draw(st.booleans()):
            codes = draw(st.lists(st.lists(st.integers(0, 1024), min_size=16, max_size=16), min_size=1, max_size=3))
            rows[-1] = torch.cat([rows[-1], audio_rows(codes, 9, IDS)])
    return rows


@settings(max_examples=50, deadline=None)
@given(row_batches())
def test_left_pad_batch_invariants(rows: list[torch.Tensor]) -> None:
    batch, mask = left_pad_batch(rows, IDS)
    longest = max(item.shape[0] for item in rows)
    assert batch.shape == (len(rows), longest, 17) and mask.shape == (len(rows), longest)
    for index, item in enumerate(rows):
        pad = longest - item.shape[0]
        assert torch.equal(batch[index, pad:], item)  # the item, right-aligned and unchanged
        assert bool((batch[index, :pad, 0] == IDS.pad).all()) and bool((batch[index, :pad, 1:] == 1024).all())
        assert mask[index].tolist() == [False] * pad + [True] * item.shape[0]
    assert bool(mask[:, -1].all())


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 1024), min_size=16, max_size=16), min_size=0, max_size=6),
    st.integers(1, 16),
    st.sampled_from([8, 9]),
)
def test_audio_rows_nq_masking(codes: list[list[int]], nq: int, slot: int) -> None:
    rows = audio_rows(codes, slot, IDS, nq=nq)
    assert rows.shape == (len(codes), 17)
    if codes:
        expected = torch.tensor(codes)
        assert bool((rows[:, 0] == slot).all())
        assert torch.equal(rows[:, 1 : 1 + nq], expected[:, :nq])
        assert bool((rows[:, 1 + nq :] == 1024).all())


def test_builder_code_errors_name_prompt_codes() -> None:
    template = PromptTemplate((4,), (5,), (6,), (7,))
    codes = torch.zeros((3, 16), dtype=torch.long)
    codes[1, 4] = 5000
    with pytest.raises(ValueError, match=r"prompt_codes: codes\[1, 4\] = 5000 is out of range for channel 4"):
        build_voice_clone_rows(template, IDS, [1], codes)
    with pytest.raises(ValueError, match=r"prompt_codes: codes has shape \(3, 8\)"):
        build_continuation_rows(template, IDS, [1], codes[:, :8])
