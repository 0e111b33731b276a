"""audio_formats.py: every response format from the model's 48 kHz stereo audio, fed whole or in pieces."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import audio_formats
from audio_formats import OUTPUT_LAYOUTS, RESPONSE_FORMATS, AudioEncoder, encode_audio

av = pytest.importorskip("av", reason="mp3/opus/aac and speed need PyAV (requirements-serve.txt)")


def tone(seconds: float = 1.0, hz: float = 440.0) -> torch.Tensor:
    t = torch.arange(int(seconds * 48000)) / 48000
    wave = 0.3 * torch.sin(2 * torch.pi * hz * t)
    return torch.stack([wave, wave])  # (2, n)


def fed_in_pieces(waveform: torch.Tensor, response_format: str, layout, speed: float = 1.0,
                  sizes=(3840, 11520, 7680)) -> bytes:
    encoder = AudioEncoder(response_format, layout, speed, stream=RESPONSE_FORMATS[response_format].streamable)
    out, start, i = [], 0, 0
    while start < waveform.shape[-1]:
        size = sizes[i % len(sizes)]
        out.append(encoder.feed(waveform[:, start:start + size]))
        start, i = start + size, i + 1
    return b"".join(out) + encoder.finish()


def decode(data: bytes) -> tuple[np.ndarray, int]:
    """(samples [channels, n], sample rate) of an encoded file, read back by FFmpeg."""
    with av.open(io.BytesIO(data)) as container:
        frames = []
        for frame in container.decode(audio=0):
            array, channels = frame.to_ndarray(), len(frame.layout.channels)
            frames.append(array if frame.format.is_planar else array.reshape(-1, channels).T)  # packed: interleaved
        rate = container.streams.audio[0].codec_context.sample_rate
    return np.concatenate(frames, axis=1), rate


@pytest.mark.parametrize("layout", list(OUTPUT_LAYOUTS))
@pytest.mark.parametrize("response_format", ["mp3", "opus", "aac", "wav", "pcm"])
@pytest.mark.parametrize("speed", [1.0, 0.5, 2.5])
def test_pieces_give_the_bytes_of_the_whole(response_format, layout, speed):
    wave = tone(1.0)
    whole = encode_audio(wave, response_format, OUTPUT_LAYOUTS[layout], speed)
    streamed = fed_in_pieces(wave, response_format, OUTPUT_LAYOUTS[layout], speed)
    if response_format == "wav":  # a streamed WAV has the open-length header
        assert streamed[4:8] == b"\xff\xff\xff\xff" and streamed[44:] == whole[44:]
    else:
        assert streamed == whole


def test_native_pcm_is_the_model_audio_in_16_bit():
    wave = tone(0.5)
    pcm = np.frombuffer(encode_audio(wave, "pcm"), dtype="<i2").reshape(-1, 2)
    assert pcm.shape == (24000, 2)
    assert np.abs(pcm[:, 0] - np.round(wave[0].numpy() * 32767)).max() <= 1


def test_the_openai_layout_is_24_khz_mono():
    pcm = np.frombuffer(encode_audio(tone(1.0), "pcm", OUTPUT_LAYOUTS["24k-mono"]), dtype="<i2")
    assert abs(pcm.shape[0] - 24000) <= 32
    spectrum = np.abs(np.fft.rfft(pcm.astype(np.float64)))
    assert abs(np.argmax(spectrum) * 24000 / pcm.shape[0] - 440) <= 2


@pytest.mark.parametrize("speed", [0.25, 0.5, 2.0, 4.0])
def test_speed_changes_duration_and_keeps_pitch(speed):
    pcm = np.frombuffer(encode_audio(tone(2.0), "pcm", speed=speed), dtype="<i2").reshape(-1, 2)
    assert abs(pcm.shape[0] - 96000 / speed) <= 0.03 * 96000 / speed + 2048
    spectrum = np.abs(np.fft.rfft(pcm[:, 0].astype(np.float64)))
    assert abs(np.argmax(spectrum) * 48000 / pcm.shape[0] - 440) <= 3


@pytest.mark.parametrize("speed", [0.2, 4.5, 0.0])
def test_speed_out_of_range_is_refused(speed):
    with pytest.raises(ValueError, match=r"speed must be in \[0.25, 4.0\]"):
        audio_formats.atempo_factors(speed)


@pytest.mark.parametrize("response_format, container", [("mp3", "mp3"), ("opus", "ogg"), ("aac", "aac"),
                                                         ("flac", "flac"), ("wav", "wav")])
def test_files_decode_to_the_tone(response_format, container):
    data = encode_audio(tone(1.0), response_format)
    samples, rate = decode(data)
    assert rate == 48000
    mono = samples[0].astype(np.float64)
    spectrum = np.abs(np.fft.rfft(mono))
    assert abs(np.argmax(spectrum) * rate / mono.shape[0] - 440) <= 3


def test_flac_cannot_stream():
    with pytest.raises(ValueError, match="cannot be streamed"):
        AudioEncoder("flac", OUTPUT_LAYOUTS["48k-stereo"], stream=True)


def test_pcm_conversion_matches_torch_rounding_and_runs_no_torch_kernel():
    """The request threads' conversion gives torch's bits (clip, NaN as 0, infinities clipped, ties to even) in
    NumPy: a torch kernel there would give that thread an OpenMP team and slow the engine's step (docs/performance.md)."""
    from conftest import TorchKernels

    wave = torch.randn(2, 50_000, generator=torch.Generator().manual_seed(0)) * 1.5
    wave[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.5 / 32767])  # 0.5 LSB: a tie
    wave[1, :2] = torch.tensor([1.5 / 32767, -2.5 / 32767])
    expected = torch.nan_to_num(wave, nan=0.0).clamp(-1, 1).mul(32767.0).round().to(torch.int16).t().contiguous()
    with TorchKernels() as seen:
        got = audio_formats.pcm16(wave)
    assert got == expected.numpy().astype("<i2").tobytes()
    assert [op for op in seen.ops if op not in ("detach", "alias")] == []
