"""inference() / inference_stream() end to end on tiny assets: shapes, equivalences, faults and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile
import torch

import codec_output
import model_runner

import text_chunking
from pipeline_assets import TinyAssets, poison_text_logits
from torch_compat import OutOfMemoryError

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
    pauses = sum(round(text_chunking.pause_seconds_after(c) * 48000) for c in chunks[:-1])
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


def test_plain_continuation_without_prompt_continues_the_text_rows_alone(assets):
    """No prompt: the codes are what generate() makes from the text rows alone (no prompt audio row, no voice-clone
    layout), and the waveform is those frames' audio."""
    from prompting import PromptTokenIds, build_continuation_rows, build_prompt_template

    result = assets.model.inference("Hello.", mode="continuation", max_new_frames=3, **assets.resources(), **GREEDY)
    ids = PromptTokenIds.from_config(assets.model.config)
    encode = lambda text: list(assets.tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    rows = build_continuation_rows(build_prompt_template(encode, ids), ids, encode("Hello."))[None]
    expected = assets.model.generate(rows, max_new_frames=3, do_sample=False).audio_token_ids[0]
    assert result["reference_audio_token_ids"] is None and len(result["audio_token_ids"]) == 1
    assert torch.equal(result["audio_token_ids"][0], expected)
    assert result["waveform"].shape == (2, expected.shape[0] * 3840)


def test_abandoned_stream_releases_the_codec_session(assets):
    stream = assets.model.inference_stream("Hello world.", prompt_audio=assets.prompt_audio, max_new_frames=6,
                                           **assets.resources(), **GREEDY)
    first = next(stream)
    assert first["type"] == "audio"
    stream.close()  # the consumer stops early
    assert _run(assets)["waveform"].shape == (2, 6 * 3840)  # a decode session would make this raise


@pytest.mark.parametrize(("fits", "used"), [(3, 3), (1, 1)])
def test_out_of_memory_halves_the_row_budget_and_reports_the_size_used(assets, monkeypatch, fits, used):
    calls = []
    real = model_runner.ModelRunner.step

    def flaky(self, rows):
        calls.append(len(rows))
        if len(rows) > fits:
            raise OutOfMemoryError("simulated: NPU out of memory")
        return real(self, rows)

    text = "One two. Three four. Five six. Seven eight. Nine ten. Eleven twelve."
    kwargs = dict(voice_clone_max_text_tokens=9, voice_clone_chunk_batch_size=8, max_new_frames=2)
    expected = _run(assets, text, **kwargs)
    monkeypatch.setattr(model_runner.ModelRunner, "step", flaky)
    result = _run(assets, text, **kwargs)
    assert len(result["voice_clone_text_chunks"]) == 6
    assert calls[:2] == [6, 3] and max(calls[2:]) <= fits  # 6 -> 3 (-> 1): halved at each error, never grown
    assert result["voice_clone_chunk_batch_size"] == used  # the row budget actually used, not the first one tried
    for a, b in zip(result["audio_token_ids"], expected["audio_token_ids"]):  # nothing lost or drawn twice
        assert torch.equal(a, b)


def test_out_of_memory_at_batch_one_is_a_clear_error(assets, monkeypatch):
    def always_oom(self, rows):
        raise OutOfMemoryError("simulated: CUDA out of memory")

    monkeypatch.setattr(model_runner.ModelRunner, "step", always_oom)
    with pytest.raises(RuntimeError, match="out of device memory while generating a single text chunk"):
        _run(assets)


def test_non_finite_logits_retry_in_float32_with_the_fallback_backend(assets, monkeypatch):
    before = assets.model.get_attention_implementation()
    seen = poison_text_logits(monkeypatch, assets.model, steps={0})
    result = _run(assets)
    assert seen[0][0] is assets.model and seen[1][0] is not assets.model  # a retry model
    assert seen[1][1] == torch.float32 and seen[1][2] == ("eager", "eager")  # CPU fallback
    assert assets.model.get_attention_implementation() == before
    assert result["waveform"].shape == (2, 6 * 3840) and result["float32_fallback"] is True


def test_non_finite_twice_names_both_attempts(assets, monkeypatch):
    model_class = type(assets.model)
    real = model_runner.sample_frame

    def broken(step_model, *args, **kwargs):
        frame = real(step_model, *args, **kwargs)
        frame.text_finite = torch.zeros_like(frame.text_finite)  # the model and its float32 retry model alike
        return frame

    monkeypatch.setattr(model_runner, "sample_frame", broken)
    assert model_class
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
    """Stands in for the codec: records each session step's frame count and returns 3840 samples per frame."""

    def __init__(self):
        self.windows, self.closed = [], 0

    def parameters(self):
        yield torch.zeros(1)

    def create_decode_session(self, max_batch_size):
        codec = self

        class Session:
            active_request_ids: list = []
            closed = False

            def append(self, request_id):
                self.active_request_ids = [*self.active_request_ids, request_id]
                return 0

            def remove(self, request_id):
                self.active_request_ids = [i for i in self.active_request_ids if i != request_id]

            def step(self, request_ids, codes, code_lengths):
                frames = codes.shape[-1]
                codec.windows.append(frames)
                return request_ids, torch.zeros(1, 2, 3840 * frames), torch.tensor([3840 * frames])

            def close(self):
                self.closed = True
                codec.closed += 1

        return Session()


def test_stream_windows_follow_the_frame_count():
    codec = _RecordingCodec()
    streams = codec_output.CodecStreams(codec, slots=1, shared=False)
    streams.open("a")
    frame = torch.zeros(16, dtype=torch.long)
    for _ in range(20):
        if streams.push("a", frame):
            assert streams.flush(["a"], {"a": 16})["a"].shape[-1] == 3840 * codec.windows[-1]
    # the first frame alone (first audio as early as possible), then growing windows: the same whatever the clock
    assert codec.windows == [1, 1, 2, 4, codec_output.STREAM_MAX_WINDOW]
    assert streams.flush(["a"], {"a": 16})["a"].shape == (2, 3840 * 4)  # a partial window at the end
    assert streams.flush(["a"], {"a": 16}) == {}
    streams.close("a")
    streams.close("a")
    assert codec.closed == 1
