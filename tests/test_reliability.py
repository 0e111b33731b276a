"""Fuzzing of text -> chunks -> prompt rows, and text far beyond any chunk budget through the whole pipeline."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pipeline
from pipeline_assets import TinyAssets
from prompting import PromptTokenIds, build_prompt_template, build_voice_clone_rows
from text_chunking import normalize_text
from tokenization_moss_tts_nano import build_demo_tokenizer

IDS = PromptTokenIds()
PROMPT_CODES = torch.randint(0, 1024, (5, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_demo_tokenizer(tmp_path_factory.mktemp("tok"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=300), budget=st.integers(1, 80))
def test_any_unicode_gives_valid_chunks_and_rows_or_a_value_error(tokenizer, text, budget):
    enc = lambda s: list(tokenizer.encode(s, add_special_tokens=False))  # noqa: E731
    request_text = text
    try:
        normalized = normalize_text(request_text)
    except ValueError as exc:
        assert "text" in str(exc)
        return
    chunks = pipeline.split_text_into_chunks(request_text, lambda s: len(enc(s)), budget)
    assert chunks and all(len(enc(c)) <= budget or len(c) == 1 for c in chunks)
    if chunks != [request_text.strip()]:  # one chunk is upstream's original text, several span the normalised one
        assert "".join(chunks).replace(" ", "") == normalized.replace(" ", "")
    template = build_prompt_template(enc, IDS)
    for chunk in chunks:
        rows = build_voice_clone_rows(template, IDS, enc(chunk), PROMPT_CODES)
        assert rows.dtype == torch.long and rows.shape[1] == 17
        text_rows = rows[rows[:, 1] == 1024, 0]
        assert (text_rows >= 0).all() and (text_rows < len(tokenizer)).all()
        assert (rows[rows[:, 0] == IDS.audio_user_slot, 1:] == PROMPT_CODES).all()


def test_text_far_beyond_the_chunk_budget_is_chunked_not_refused(tmp_path):
    assets = TinyAssets(tmp_path)
    sentence = "This sentence is part of a very long document that keeps going and going. "
    text = sentence * 40  # ~3000 characters
    result = assets.model.inference(
        text, prompt_audio=assets.prompt_audio, text_tokenizer=assets.tokenizer, audio_tokenizer=assets.codec,
        voice_clone_max_text_tokens=60, max_new_frames=1, do_sample=False,
    )
    chunks = result["voice_clone_text_chunks"]
    assert len(chunks) >= 20
    assert " ".join(chunks) == normalize_text(text)
    assert all(len(assets.tokenizer.encode(c, add_special_tokens=False)) <= 60 for c in chunks)
    assert len(result["audio_token_ids"]) == len(chunks)
