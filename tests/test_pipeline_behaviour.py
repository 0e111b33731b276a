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
