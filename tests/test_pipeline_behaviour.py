"""What the pipeline says it did: mode inference, upstream's single-chunk text, truncation reports, batch sizes,
result types, continuation chunking, the streaming float32 retry and seeded sampling (issue 11)."""

from __future__ import annotations

import pytest
import torch

from pipeline_assets import TinyAssets, poison_text_logits

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


def _recording_rows(monkeypatch):
    """Record the prompt rows (1, T, n_vq + 1) of every text chunk the engine core starts."""
    import scheduler

    fed = []
    real = scheduler.Request.start_chunk

    def start_chunk(self):
        rows = real(self)
        fed.append(rows[None].cpu())
        return rows

    monkeypatch.setattr(scheduler.Request, "start_chunk", start_chunk)
    return fed


@pytest.mark.parametrize("text", UNNORMALISED_TEXTS)
def test_single_chunk_rows_are_upstreams_rows_of_the_original_text(assets, tokenizer, monkeypatch, text):
    import model_runner

    def no_frames(self, rows):  # the released tokenizer's ids are beyond the tiny model's vocabulary
        ended = [False] * len(rows)
        return model_runner.StepResult(torch.full((len(rows), 16), 1024), [True] * len(rows), [True] * len(rows), ended)

    fed = _recording_rows(monkeypatch)
    monkeypatch.setattr(model_runner.ModelRunner, "step", no_frames)
    common = dict(text_tokenizer=tokenizer, audio_tokenizer=assets.codec, prompt_audio=assets.prompt_audio,
                  voice_clone_max_text_tokens=75)
    result = assets.model.inference(text, **common)
    events = list(assets.model.inference_stream(text, **common))
    expected, _ = assets.model.build_inference_input_ids(
        tokenizer, text, mode="voice_clone", prompt_audio_codes=result["reference_audio_token_ids"])
    assert len(fed) == 2 and all(torch.equal(rows, expected) for rows in fed)
    assert result["voice_clone_text_chunks"] == [text] and events[-1]["voice_clone_text_chunks"] == [text]


# ------------------------------------------------------------------------------------------------ truncation

LONG_TEXT = "One two three four five six. Seven eight nine ten eleven twelve. Thirteen fourteen."


def test_chunks_that_reach_the_frame_limit_are_reported(assets):
    # The tiny model prefers "continue", so every chunk runs into max_new_frames.
    result = _run(assets, LONG_TEXT, prompt_audio=assets.prompt_audio, voice_clone_max_text_tokens=30)
    count = len(result["voice_clone_text_chunks"])
    assert count >= 2 and result["truncated_chunks"] == list(range(count))
    assert isinstance(result["audio_token_ids"], list) and len(result["audio_token_ids"]) == count
    streamed = _stream(assets, LONG_TEXT, prompt_audio=assets.prompt_audio, voice_clone_max_text_tokens=30)[-1]
    assert streamed["truncated_chunks"] == list(range(count))


def test_chunks_that_end_by_themselves_are_not_reported(tmp_path):
    from pipeline_assets import tiny_tts

    quiet = TinyAssets(tmp_path)
    quiet.model = tiny_tts(push=-40.0)  # prefers audio_end: every chunk ends at once
    result = _run(quiet, LONG_TEXT, prompt_audio=quiet.prompt_audio, voice_clone_max_text_tokens=30)
    assert result["truncated_chunks"] == [] and result["frames"] == 0
    assert _stream(quiet, LONG_TEXT, prompt_audio=quiet.prompt_audio)[-1]["truncated_chunks"] == []


def test_audio_token_ids_hold_each_chunks_codes_for_one_chunk_too(assets):
    """Upstream's list of one tensor per text chunk, also for one chunk: that chunk's codes, the same streamed and
    whole, one frame per 3840 samples of the waveform."""
    whole = _run(assets, prompt_audio=assets.prompt_audio)
    streamed = _stream(assets, prompt_audio=assets.prompt_audio)[-1]
    for result in (whole, streamed, _run(assets, "Hi.")):
        (codes,) = result["audio_token_ids"]
        assert codes.shape[-1] == 16 and result["waveform"].shape[-1] == codes.shape[0] * 3840
    assert torch.equal(streamed["audio_token_ids"][0], whole["audio_token_ids"][0])


# ------------------------------------------------------------------------------------------------ long continuation


def _continuation_rows(assets, text, codes):
    from prompting import PromptTokenIds, build_continuation_rows, build_prompt_template

    ids = PromptTokenIds.from_config(assets.model.config)
    enc = lambda s: list(assets.tokenizer.encode(s, add_special_tokens=False))  # noqa: E731
    return build_continuation_rows(build_prompt_template(enc, ids), ids, enc(text), codes)[None]


def test_long_continuation_is_chunked_each_chunk_continuing_the_previous_audio(assets, monkeypatch):
    fed = _recording_rows(monkeypatch)
    result = _run(assets, LONG_TEXT, mode="continuation", voice_clone_max_text_tokens=30, max_new_frames=3)
    chunks, codes = result["text_chunks"], result["audio_token_ids"]
    assert len(chunks) >= 2 and " ".join(chunks) == LONG_TEXT and len(fed) == len(chunks)
    assert torch.equal(fed[0], _continuation_rows(assets, chunks[0], None))
    for k in range(1, len(chunks)):
        assert torch.equal(fed[k], _continuation_rows(assets, chunks[k - 1] + " " + chunks[k], codes[k - 1]))
    assert result["waveform"].shape == (2, 3 * 3840 * len(chunks))  # one continuous waveform: no pauses
    assert result["truncated_chunks"] == list(range(len(chunks)))
    events = _stream(assets, LONG_TEXT, mode="continuation", voice_clone_max_text_tokens=30, max_new_frames=3)
    assert {e["type"] for e in events[:-1]} == {"audio"}
    streamed = torch.cat([e["waveform"] for e in events[:-1]], dim=-1)
    assert torch.allclose(streamed, result["waveform"], atol=1e-5)


def test_long_continuation_of_a_prompt_starts_from_the_prompt(assets, monkeypatch):
    fed = _recording_rows(monkeypatch)
    result = _run(assets, " " + LONG_TEXT, mode="continuation", prompt_text="Hello", prompt_audio=assets.prompt_audio,
                  voice_clone_max_text_tokens=30, max_new_frames=2)
    chunks = result["text_chunks"]
    assert len(chunks) >= 2
    assert torch.equal(fed[0], _continuation_rows(assets, "Hello " + chunks[0], result["reference_audio_token_ids"]))
    assert torch.equal(fed[1], _continuation_rows(assets, chunks[0] + " " + chunks[1], result["audio_token_ids"][0]))


def test_short_continuation_keeps_the_exact_text(assets, monkeypatch):
    fed = _recording_rows(monkeypatch)
    result = _run(assets, " world", mode="continuation", prompt_text="Hello", prompt_audio=assets.prompt_audio)
    assert result["text_chunks"] == [" world"]
    assert torch.equal(fed[0], _continuation_rows(assets, "Hello world", result["reference_audio_token_ids"]))


# ------------------------------------------------------------------------------------------------ streaming retry


def test_stream_that_fails_before_its_first_audio_is_retried_in_float32(assets, monkeypatch):
    before = assets.model.get_attention_implementation()
    expected = _run(assets, prompt_audio=assets.prompt_audio)
    seen = poison_text_logits(monkeypatch, assets.model, steps={0})
    events = _stream(assets, prompt_audio=assets.prompt_audio)
    assert seen[0] == (assets.model, torch.float32, before)
    # the retry runs a float32 model with the CPU fallback backend; the caller's model is left alone
    assert seen[1][0] is not assets.model and seen[1][1:] == (torch.float32, ("eager", "eager"))
    assert events[-1]["float32_fallback"] is True and assets.model.get_attention_implementation() == before
    assert torch.allclose(events[-1]["waveform"], expected["waveform"], atol=1e-5)


def test_stream_that_fails_after_audio_went_out_is_not_retried(assets, monkeypatch):
    seen = poison_text_logits(monkeypatch, assets.model, steps={3})
    stream = assets.model.inference_stream("Hello world.", prompt_audio=assets.prompt_audio, max_new_frames=6,
                                           **assets.resources(), **GREEDY)
    assert next(stream)["type"] == "audio"
    with pytest.raises(RuntimeError, match="Non-finite"):
        list(stream)
    assert all(model is assets.model for model, *_ in seen)  # no float32 re-run


# ------------------------------------------------------------------------------------------------ min_new_frames


def test_min_new_frames_forces_continue_and_is_validated():
    from pipeline_assets import tiny_tts

    model = tiny_tts(push=-40.0)  # prefers audio_end at once
    rows = torch.full((1, 3, 17), 1024, dtype=torch.long)
    rows[0, :, 0] = torch.tensor([4, 20, 6])
    assert model.generate(rows, max_new_frames=5).num_frames.tolist() == [0]
    out = model.generate(rows, max_new_frames=5, min_new_frames=3)
    assert out.num_frames.tolist() == [3] and out.finished_mask.tolist() == [True]
    with pytest.raises(ValueError, match="min_new_frames=6 must be within 0..max_new_frames"):
        model.generate(rows, max_new_frames=5, min_new_frames=6)


# ------------------------------------------------------------------------------------------------ seeded sampling


def test_sampled_inference_with_a_seed_is_reproducible(assets):
    sampled = dict(do_sample=True, prompt_audio=assets.prompt_audio, max_new_frames=5)
    first = _run(assets, seed=7, **sampled)
    torch.rand(100)  # the global generator moves on between the calls
    second = _run(assets, seed=7, **sampled)
    other = _run(assets, seed=8, **sampled)
    assert torch.equal(first["audio_token_ids"][0], second["audio_token_ids"][0])
    assert torch.equal(first["waveform"], second["waveform"])
    assert not torch.equal(first["audio_token_ids"][0], other["audio_token_ids"][0])  # sampling is really on
    streamed = _stream(assets, seed=7, **sampled)[-1]
    assert torch.equal(streamed["audio_token_ids"][0], first["audio_token_ids"][0])
