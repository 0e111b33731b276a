"""inference() / inference_stream() end to end on tiny assets: shapes, equivalences, faults and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile
import torch

import pipeline
from pipeline_assets import TinyAssets

GREEDY = {"do_sample": False}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return TinyAssets(tmp_path_factory.mktemp("tokenizer"))


def _run(assets, text="Hello world.", **kwargs):
    kwargs.setdefault("prompt_audio", assets.prompt_audio)
    kwargs.setdefault("max_new_frames", 6)
    return assets.model.inference(text, **assets.resources(), **GREEDY, **kwargs)


def _stream(assets, text="Hello world.", **kwargs):
    kwargs.setdefault("prompt_audio", assets.prompt_audio)
    kwargs.setdefault("max_new_frames", 6)
    return list(assets.model.inference_stream(text, **assets.resources(), **GREEDY, **kwargs))


def test_voice_clone_writes_48k_stereo_of_the_generated_length(assets, tmp_path):
    out = tmp_path / "out.wav"
    result = _run(assets, output_audio_path=out)
    assert [codes.shape for codes in result["audio_token_ids"]] == [(6, 16)]  # a list, one tensor per chunk
    assert result["waveform"].shape == (2, 6 * 3840)
    data, rate = soundfile.read(str(out), always_2d=True)
    assert rate == 48000 and data.shape == (6 * 3840, 2)
    assert result["audio_path"] == str(out)
    assert result["reference_audio_token_ids"].shape == (6, 16)  # 0.5 s prompt -> 6 valid frames
    assert result["voice_clone_text_chunks"] == ["Hello world."]
    assert torch.isfinite(result["waveform"]).all() and result["waveform"].abs().max() > 0


def test_long_text_is_chunked_with_pauses_and_batched_like_single(assets):
    text = "One two three four five six. Seven eight nine ten eleven twelve. Thirteen fourteen."
    batched = _run(assets, text, voice_clone_max_text_tokens=30, voice_clone_chunk_batch_size=3, max_new_frames=4)
    single = _run(assets, text, voice_clone_max_text_tokens=30, voice_clone_chunk_batch_size=1, max_new_frames=4)
    chunks = batched["voice_clone_text_chunks"]
    assert len(chunks) >= 2 and " ".join(chunks) == text
    assert batched["voice_clone_chunk_batch_size"] == min(3, len(chunks)) and single["voice_clone_chunk_batch_size"] == 1
    pauses = sum(round(pipeline.pause_seconds_after(c) * 48000) for c in chunks[:-1])
    assert batched["waveform"].shape[-1] == 4 * 3840 * len(chunks) + pauses
    for a, b in zip(batched["audio_token_ids"], single["audio_token_ids"]):
        assert torch.equal(a, b)
    assert torch.allclose(batched["waveform"], single["waveform"], atol=1e-5)


def test_stream_concatenation_equals_the_non_streaming_waveform(assets):
    text = "One two three four five six. Seven eight nine ten eleven twelve."
    whole = _run(assets, text, voice_clone_max_text_tokens=30, max_new_frames=7)
    events = _stream(assets, text, voice_clone_max_text_tokens=30, max_new_frames=7)
    assert events[-1]["type"] == "result"
    kinds = [e["type"] for e in events[:-1]]
    assert set(kinds) == {"audio", "pause"} and kinds.count("pause") == len(whole["voice_clone_text_chunks"]) - 1
    streamed = torch.cat([e["waveform"] for e in events[:-1]], dim=-1)
    assert streamed.shape == whole["waveform"].shape
    assert torch.allclose(streamed, whole["waveform"], atol=1e-5)
    assert torch.equal(events[-1]["waveform"], streamed)
    assert events[-1]["first_audio_latency_s"] is not None


def test_continuation_with_prompt_drops_the_prompt_audio_and_streams_the_same(assets):
    kwargs = dict(mode="continuation", prompt_text="Hello", max_new_frames=5)
    whole = _run(assets, " world.", **kwargs)
    assert whole["waveform"].shape == (2, 5 * 3840)
    events = _stream(assets, " world.", **kwargs)
    streamed = torch.cat([e["waveform"] for e in events[:-1]], dim=-1)
    assert torch.allclose(streamed, whole["waveform"], atol=1e-5)


def test_plain_continuation_without_prompt(assets):
    result = assets.model.inference("Hello.", mode="continuation", max_new_frames=3, **assets.resources(), **GREEDY)
    assert result["waveform"].shape == (2, 3 * 3840) and result["reference_audio_token_ids"] is None


def test_abandoned_stream_releases_the_codec_session(assets):
    stream = assets.model.inference_stream("Hello world.", prompt_audio=assets.prompt_audio, max_new_frames=6,
                                           **assets.resources(), **GREEDY)
    first = next(stream)
    assert first["type"] == "audio"
    stream.close()  # the consumer stops early
    assert _run(assets)["waveform"].shape == (2, 6 * 3840)  # a decode session would make this raise


@pytest.mark.parametrize(("fits", "expected_calls", "used"), [(3, [6, 3, 3], 3), (1, [6, 3, 1, 1, 1, 1, 1, 1], 1)])
def test_out_of_memory_halves_the_chunk_batch_and_reports_the_size_used(assets, monkeypatch, fits, expected_calls,
                                                                        used):
    calls = []
    real = assets.model.generate

    def flaky(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        if kwargs["input_ids"].shape[0] > fits:
            raise torch.OutOfMemoryError("simulated: NPU out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(assets.model, "generate", flaky)
    text = "One two. Three four. Five six. Seven eight. Nine ten. Eleven twelve."
    result = _run(assets, text, voice_clone_max_text_tokens=9, voice_clone_chunk_batch_size=8, max_new_frames=2)
    assert len(result["voice_clone_text_chunks"]) == 6
    assert calls == expected_calls  # 6 -> 3 (-> 1): halved at each out-of-memory error, never grown again
    assert result["voice_clone_chunk_batch_size"] == used  # the batch size actually used, not the first one tried
    assert len(result["audio_token_ids"]) == 6


def test_out_of_memory_at_batch_one_is_a_clear_error(assets, monkeypatch):
    def always_oom(*args, **kwargs):
        raise torch.OutOfMemoryError("simulated: CUDA out of memory")

    monkeypatch.setattr(assets.model, "generate", always_oom)
    with pytest.raises(RuntimeError, match="out of device memory while generating a single text chunk"):
        _run(assets)


def test_non_finite_logits_retry_in_float32_with_the_fallback_backend(assets, monkeypatch):
    seen = []
    real = assets.model.generate

    def unstable_once(*args, **kwargs):
        seen.append((next(assets.model.parameters()).dtype, assets.model.get_attention_implementation()))
        if len(seen) == 1:
            raise RuntimeError("Non-finite audio logits at step 0 (simulated)")
        return real(*args, **kwargs)

    before = assets.model.get_attention_implementation()
    monkeypatch.setattr(assets.model, "generate", unstable_once)
    result = _run(assets)
    assert len(seen) == 2 and seen[1][0] == torch.float32 and seen[1][1] == ("eager", "eager")  # CPU fallback
    assert assets.model.get_attention_implementation() == before
    assert result["waveform"].shape == (2, 6 * 3840)


def test_non_finite_twice_names_both_attempts(assets, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("Non-finite text logits at step 3 (simulated)")

    monkeypatch.setattr(assets.model, "generate", broken)
    with pytest.raises(RuntimeError, match="again in float32 with the 'eager' attention backend"):
        _run(assets)


@pytest.mark.parametrize(
    "text, kwargs, message",
    [
        ("", {}, "text"),
        ("   \n\t ", {}, "text"),
        ("\x00\x01", {}, "text"),
        ("Hi.", {"mode": "continuation", "prompt_text": "Hello", "prompt_audio": None}, "prompt"),
        ("Hi.", {"mode": "voice_clone", "prompt_audio": None}, "prompt"),
        ("Hi.", {"max_new_frames": 0}, "max_new_frames"),
        ("Hi.", {"max_new_frames": -3}, "max_new_frames"),
        ("Hi.", {"audio_top_p": 1.5}, "top_p"),
        ("Hi.", {"prompt_audio": torch.zeros(2, 48000)}, "silent"),
        ("Hi.", {"prompt_audio": torch.full((2, 48000), float("nan"))}, "NaN"),
        ("Hi.", {"prompt_audio": torch.ones(2, 10) * 0.1}, "too short"),
        ("Hi.", {"prompt_audio": torch.ones(3, 48000) * 0.1}, "channels"),
    ],
)
def test_bad_input_is_a_value_error(assets, text, kwargs, message, tmp_path):
    out = tmp_path / "out.wav"
    with pytest.raises(ValueError, match=message):
        _run(assets, text, output_audio_path=out, **kwargs)
    assert not out.exists()


def test_prompt_audio_file_and_tensor_give_the_same_codes(assets, tmp_path):
    path = tmp_path / "prompt.wav"
    soundfile.write(str(path), assets.prompt_audio.numpy().T, 48000, subtype="FLOAT")
    from_file = _run(assets, prompt_audio=None, prompt_audio_path=str(path))
    from_tensor = _run(assets)
    assert torch.equal(from_file["reference_audio_token_ids"], from_tensor["reference_audio_token_ids"])
    assert np.allclose(from_file["waveform"], from_tensor["waveform"], atol=1e-6)


def test_long_prompt_tensor_is_cut_like_a_file(assets, caplog):
    long = assets.prompt_audio.repeat(1, 80)  # 40 s
    result = _run(assets, prompt_audio=long)
    assert "using its first 30.0 s" in caplog.text
    assert result["reference_audio_token_ids"].shape[0] == 30 * 48000 // 3840


def test_codec_from_a_directory_by_upstream_keyword_and_device_argument(assets, tmp_path):
    codec_dir = tmp_path / "codec"
    assets.codec.save_pretrained(str(codec_dir))
    result = assets.model.inference(
        "Hello world.", prompt_audio=assets.prompt_audio, text_tokenizer=assets.tokenizer,
        audio_tokenizer_pretrained_name_or_path=str(codec_dir), device="cpu", max_new_frames=3, **GREEDY,
    )
    reference = _run(assets, max_new_frames=3)
    assert torch.equal(result["audio_token_ids"][0], reference["audio_token_ids"][0])
    assert torch.allclose(result["waveform"], reference["waveform"], atol=1e-6)


# ------------------------------------------------------------------------------------------------ stream windows


class _RecordingCodec:
    """Stands in for the codec: records each streaming call's frame count and returns 3840 samples per frame."""

    def __init__(self):
        self.windows, self.resets = [], 0

    def parameters(self):
        yield torch.zeros(1)

    def batch_decode(self, codes_list, num_quantizers=None, streaming=False, **kwargs):
        frames = codes_list[0].shape[-1]
        self.windows.append(frames)
        audio = torch.zeros(1, 2, 3840 * frames)
        return type("Out", (), {"audio": audio, "audio_lengths": torch.tensor([3840 * frames])})()

    def _reset_batch_decode_streaming_state(self):
        self.resets += 1


def test_stream_windows_follow_the_lead_over_the_wall_clock(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(pipeline.time, "perf_counter", lambda: clock[0])
    codec = _RecordingCodec()
    decoder = pipeline.StreamDecoder(codec, nq=16)
    frame = torch.zeros(1, 16, dtype=torch.long)

    def push_until_decoded():
        pushed = 1
        while decoder.push(frame) is None:
            pushed += 1
        return pushed

    assert push_until_decoded() == 1  # first audio as soon as possible
    # 0.08 s of audio emitted at t=100: 0.08 s ahead -> one frame at a time
    assert push_until_decoded() == 1
    clock[0] += 0.01  # 0.16 - 0.01 = 0.15 s ahead
    assert push_until_decoded() == 1
    decoder.emitted_seconds = 0.4  # pretend more audio went out: 0.39 s ahead
    assert push_until_decoded() == 2
    decoder.emitted_seconds = 0.9
    assert push_until_decoded() == 4
    decoder.emitted_seconds = 5.0
    assert push_until_decoded() == pipeline.STREAM_MAX_WINDOW
    clock[0] += 10.0  # generation fell behind real time: playback waits, decode in larger windows
    assert push_until_decoded() == pipeline.STREAM_BEHIND_WINDOW
    assert codec.windows == [1, 1, 1, 2, 4, pipeline.STREAM_MAX_WINDOW, pipeline.STREAM_BEHIND_WINDOW]
    decoder.push(frame)
    assert decoder.flush().shape == (2, 3840) and decoder.flush() is None  # a partial window at the end
    decoder.close()
    assert codec.resets == 1
