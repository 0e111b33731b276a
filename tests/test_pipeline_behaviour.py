"""What the pipeline says it did: mode inference, upstream's single-chunk text, truncation reports, batch sizes,
result types, continuation chunking, the streaming float32 retry and seeded sampling (issue 11)."""

from __future__ import annotations

import pytest
import torch

import pipeline
from pipeline_assets import TinyAssets

GREEDY = {"do_sample": False}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return TinyAssets(tmp_path_factory.mktemp("tokenizer"))


def _run(assets, text="Hello world.", **kwargs):
    kwargs.setdefault("max_new_frames", 4)
    return assets.model.inference(text, **assets.resources(), **{**GREEDY, **kwargs})


def _stream(assets, text="Hello world.", **kwargs):
    kwargs.setdefault("max_new_frames", 4)
    return list(assets.model.inference_stream(text, **assets.resources(), **{**GREEDY, **kwargs}))


# ------------------------------------------------------------------------------------------------ mode inference


def test_inference_without_a_prompt_infers_plain_continuation(assets):
    result = _run(assets, "Hi.", max_new_frames=3)
    assert result["reference_audio_token_ids"] is None and result["voice_clone_text_chunks"] is None
    assert result["waveform"].shape == (2, 3 * 3840)
    events = _stream(assets, "Hi.", max_new_frames=3)
    assert events[-1]["type"] == "result" and events[-1]["reference_audio_token_ids"] is None


def test_inference_with_prompt_audio_infers_voice_clone_and_explicit_mode_wins(assets):
    result = _run(assets, "Hi.", prompt_audio=assets.prompt_audio, max_new_frames=2)
    assert result["voice_clone_text_chunks"] == ["Hi."]
    with pytest.raises(ValueError, match="mode='voice_clone' needs prompt audio"):
        _run(assets, "Hi.", mode="voice_clone")


# ------------------------------------------------------------------------------------------------ upstream's text

# Lower-case start, no final punctuation, fewer than 5 words, CJK without a final mark: upstream speaks these as
# they are (one chunk), so the rows must not see the normalised text ("Hello world.", "今天天气真好。").
UNNORMALISED_TEXTS = ["hello world", "good morning to you", "hi", "今天天气真好", "ok then, see you"]


@pytest.fixture(scope="module", params=["demo", "released"])
def tokenizer(request, assets):
    if request.param == "demo":
        return assets.tokenizer
    from conftest import shared_path
    from tokenization_moss_tts_nano import MossTTSNanoSentencePieceTokenizer

    return MossTTSNanoSentencePieceTokenizer(vocab_file=str(shared_path("data", "tokenizer.model")))


def _no_frames(input_ids):
    from generation import GenerationOutput

    batch = input_ids.shape[0]
    return GenerationOutput(
        audio_token_ids=torch.zeros(batch, 0, 16, dtype=torch.long), prompt_input_ids=input_ids,
        prompt_attention_mask=torch.ones(input_ids.shape[:2], dtype=torch.bool),
        finished_mask=torch.ones(batch, dtype=torch.bool), num_frames=torch.zeros(batch, dtype=torch.long),
    )


@pytest.mark.parametrize("text", UNNORMALISED_TEXTS)
def test_single_chunk_rows_are_upstreams_rows_of_the_original_text(assets, tokenizer, monkeypatch, text):
    fed = []

    def generate(input_ids, attention_mask=None, **kwargs):
        fed.append(input_ids)
        return _no_frames(input_ids)

    def generate_stream(input_ids, attention_mask=None, **kwargs):
        fed.append(input_ids)
        yield {"type": "final", "generation": _no_frames(input_ids)}

    monkeypatch.setattr(assets.model, "generate", generate)
    monkeypatch.setattr(assets.model, "generate_stream", generate_stream)
    common = dict(text_tokenizer=tokenizer, audio_tokenizer=assets.codec, prompt_audio=assets.prompt_audio,
                  voice_clone_max_text_tokens=75)
    result = assets.model.inference(text, **common)
    events = list(assets.model.inference_stream(text, **common))
    expected, _ = assets.model.build_inference_input_ids(
        tokenizer, text, mode="voice_clone", prompt_audio_codes=result["reference_audio_token_ids"])
    assert len(fed) == 2 and all(torch.equal(rows, expected) for rows in fed)
    assert result["voice_clone_text_chunks"] == [text] and events[-1]["voice_clone_text_chunks"] == [text]
