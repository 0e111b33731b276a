"""Prompt audio from anyone (the server's ref_audio, infer_npu.py --prompt-audio-path): the work a small file causes
is bounded by what is used, whatever its header claims. Peak memory is measured with tracemalloc (NumPy's buffers
are traced)."""

from __future__ import annotations

import base64
import io
import struct
import tracemalloc

import numpy as np
import pytest
import soundfile

import audio_io
import infer_npu
import voices

MIB = 2**20


def crafted_wav(rate: int, seconds_of_data: float = 2.0, channels: int = 1) -> bytes:
    """A 16-bit PCM WAV whose header claims ``rate`` Hz (libsndfile reads what the header says)."""
    frames = int(seconds_of_data * 48000)
    data = (np.sin(np.arange(frames * channels) / 7.0) * 8000).astype("<i2").tobytes()
    block = 2 * channels
    header = struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + len(data), b"WAVE", b"fmt ", 16, 1, channels,
                         rate, (rate * block) & 0xFFFFFFFF, block, 16, b"data", len(data))
    return header + data


def long_flac(seconds: float, rate: int = 48000, channels: int = 2) -> bytes:
    """``seconds`` of near-silence after a short tone: FLAC packs it into a few hundred KB at most."""
    frames = int(seconds * rate)
    samples = np.zeros((frames, channels), dtype=np.int16)
    samples[: rate // 2] = (np.sin(np.arange(rate // 2) / 5.0) * 8000).astype(np.int16)[:, None]
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def peak_mib(function, *args) -> tuple[object, float]:
    tracemalloc.start()
    try:
        result = function(*args)
    except ValueError as exc:
        result = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1] / MIB
        tracemalloc.stop()
    return result, peak


def as_ref_audio(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize("rate", [1_000_001, 4_000_001, 2_147_483_647, 7999, 1])
def test_a_sample_rate_outside_8_to_384_khz_is_refused_before_any_decoding(tmp_path, rate):
    data = crafted_wav(rate)
    error, peak = peak_mib(voices.decode_ref_audio, as_ref_audio(data))
    assert isinstance(error, ValueError) and f"sample rate {rate} Hz; supported: 8000-384000 Hz" in str(error)
    assert peak < 3 * len(data) / MIB + 2  # the base64 text and its bytes, nothing decoded
    path = tmp_path / "claims.wav"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=f"sample rate {rate} Hz"):
        audio_io.load_prompt_audio(path)


def test_infer_npu_refuses_such_a_prompt_file_with_one_line_and_exit_2(tmp_path, capsys):
    path = tmp_path / "claims.wav"
    path.write_bytes(crafted_wav(1_000_001))
    code = infer_npu.main(["--demo", "--text", "Hello.", "--prompt-audio-path", str(path),
                           "--output-path", str(tmp_path / "out.wav")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(err) == 1 and "sample rate 1000001 Hz; supported: 8000-384000 Hz" in err[0]


def test_a_long_file_is_read_only_for_its_first_30_seconds(tmp_path, caplog):
    data = long_flac(600.0)  # 600 s of 48 kHz stereo: 230 MB as float32 if decoded whole
    assert len(data) < 2 * MIB
    waveform, peak = peak_mib(voices.decode_ref_audio, as_ref_audio(data))
    assert waveform.shape == (2, 30 * 48000)
    whole = 600 * 48000 * 2 * 4 / MIB
    assert peak < 3 * 30 * 48000 * 2 * 4 / MIB + 8 < whole / 3  # about two copies of the 30 s used
    path = tmp_path / "long.flac"
    path.write_bytes(data)
    _, file_peak = peak_mib(audio_io.load_prompt_audio, path)
    assert file_peak < 3 * 30 * 48000 * 2 * 4 / MIB + 8
    assert "using its first 30.0 s" in caplog.text


def test_many_channels_are_refused_before_decoding_or_mixed_block_by_block(tmp_path):
    data = crafted_wav(48000, seconds_of_data=0.5, channels=64)
    error, peak = peak_mib(voices.decode_ref_audio, as_ref_audio(data))
    assert isinstance(error, ValueError) and "has 64 channels" in str(error)
    path = tmp_path / "many.wav"
    path.write_bytes(data)
    mixed = audio_io.load_prompt_audio(path, downmix=True)
    assert mixed.shape == (2, 24000)


@pytest.mark.parametrize("rate", [383_999, 200_003, 8_017])
def test_an_odd_sample_rate_resamples_with_a_short_filter(rate):
    ratio = audio_io.resample_ratio(rate, 48000)
    assert max(ratio.numerator, ratio.denominator) <= audio_io.MAX_RESAMPLE_TERMS
    assert abs(float(ratio) - 48000 / rate) / (48000 / rate) < 1e-4
    seconds = 0.5
    t = np.arange(int(seconds * rate)) / rate
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
    out, peak = peak_mib(audio_io.resample, tone, rate)
    assert abs(out.shape[-1] - 24000) <= 2 and peak < 32
    spectrum = np.abs(np.fft.rfft(out[0]))
    assert abs(np.argmax(spectrum) * 48000 / out.shape[-1] - 440) <= 3


def test_common_rates_keep_their_exact_ratio():
    for rate in (8000, 11025, 16000, 22050, 24000, 32000, 44100, 88200, 96000, 176400, 192000, 384000):
        assert audio_io.resample_ratio(rate, 48000) == __import__("fractions").Fraction(48000, rate)
