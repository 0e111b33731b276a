"""Prompt audio reading, resampling, channel layout and atomic writes (audio_io.py)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile
import torch

import audio_io
from conftest import shared_path


def _write(path, samples: np.ndarray, rate: int) -> str:
    soundfile.write(str(path), samples, rate)
    return str(path)


def _tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    return np.stack([mono] * channels, axis=1) if channels > 1 else mono


def test_real_recording_becomes_48k_stereo():
    path = shared_path("data", "zh_1.wav")
    info = soundfile.info(str(path))
    wav = audio_io.load_prompt_audio(path)
    assert wav.dtype == torch.float32 and wav.shape[0] == 2
    assert abs(wav.shape[1] - round(info.frames * 48000 / info.samplerate)) <= 1
    assert torch.equal(wav[0], wav[1])  # mono duplicated


@pytest.mark.parametrize("rate", [8000, 16000, 44100, 96000])
def test_resampling_keeps_duration_and_pitch(tmp_path, rate):
    wav = audio_io.load_prompt_audio(_write(tmp_path / "a.wav", _tone(0.5, rate), rate))
    assert wav.shape == (2, 24000)
    spectrum = np.abs(np.fft.rfft(wav[0].numpy()))
    assert abs(np.argmax(spectrum) * 48000 / 24000 - 220) <= 2


def test_more_than_two_channels_needs_downmix(tmp_path):
    path = _write(tmp_path / "a.wav", _tone(0.5, 48000, channels=4), 48000)
    with pytest.raises(ValueError, match="4 channels.*downmix"):
        audio_io.load_prompt_audio(path)
    wav = audio_io.load_prompt_audio(path, downmix=True)
    assert wav.shape == (2, 24000)


@pytest.mark.parametrize(
    "samples, rate, message",
    [
        (np.zeros(48000, dtype=np.float32), 48000, "silent"),
        (np.full(1, 0.5, dtype=np.float32), 48000, "too short"),
        (_tone(0.05, 48000), 48000, "too short"),
    ],
)
def test_unusable_audio_is_rejected(tmp_path, samples, rate, message):
    with pytest.raises(ValueError, match=message):
        audio_io.load_prompt_audio(_write(tmp_path / "a.wav", samples, rate))


def test_non_finite_samples_are_rejected(tmp_path):
    samples = _tone(0.5, 48000)
    samples[100] = np.nan
    path = tmp_path / "nan.wav"
    soundfile.write(str(path), samples, 48000, subtype="FLOAT")
    with pytest.raises(ValueError, match="NaN or Inf"):
        audio_io.load_prompt_audio(path)


def test_missing_not_audio_truncated_and_empty_files(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        audio_io.load_prompt_audio(tmp_path / "missing.wav")
    text = tmp_path / "text.wav"
    text.write_text("this is not audio")
    with pytest.raises(ValueError, match="cannot read prompt audio"):
        audio_io.load_prompt_audio(text)
    good = _write(tmp_path / "good.wav", _tone(0.5, 48000), 48000)
    truncated = tmp_path / "truncated.wav"
    truncated.write_bytes(open(good, "rb").read()[:30])
    with pytest.raises(ValueError, match="cannot read prompt audio|no samples"):
        audio_io.load_prompt_audio(truncated)
    empty = _write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 48000)
    with pytest.raises(ValueError, match="no samples"):
        audio_io.load_prompt_audio(empty)


def test_long_prompt_is_cut_with_a_warning(tmp_path, caplog):
    path = _write(tmp_path / "long.wav", _tone(3.0, 16000), 16000)
    wav = audio_io.load_prompt_audio(path, max_seconds=1.0)
    assert wav.shape == (2, 48000)
    assert "using its first 1.0 s" in caplog.text


def test_atomic_write_creates_directories_and_round_trips(tmp_path):
    wave = torch.from_numpy(np.stack([_tone(0.2, 48000)] * 2))
    out = audio_io.write_audio_atomic(tmp_path / "new" / "dir" / "out.wav", wave, 48000)
    data, rate = soundfile.read(str(out), always_2d=True)
    assert rate == 48000 and data.shape == (9600, 2)
    assert np.abs(data.T - wave.numpy()).max() < 1e-4
    assert [p.name for p in out.parent.iterdir()] == ["out.wav"]


def test_atomic_write_leaves_nothing_when_interrupted(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(soundfile, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        audio_io.write_audio_atomic(tmp_path / "out.wav", torch.zeros(2, 100), 48000)
    assert list(tmp_path.iterdir()) == []


def test_write_errors(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RuntimeError, match="cannot write"):
        audio_io.write_audio_atomic(blocker / "out.wav", torch.zeros(2, 10), 48000)
    with pytest.raises(ValueError, match="extension"):
        audio_io.write_audio_atomic(tmp_path / "out.mp4", torch.zeros(2, 10), 48000)
    with pytest.raises(ValueError, match="NaN"):
        audio_io.write_audio_atomic(tmp_path / "out.wav", torch.full((2, 10), float("nan")), 48000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
