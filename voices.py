"""The speech server's voices: reference recordings encoded once at startup, and a request's own ``ref_audio``."""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .audio_io import (MAX_PROMPT_SECONDS, MIN_PROMPT_SECONDS, TARGET_CHANNELS, TARGET_SAMPLE_RATE,
                       load_prompt_audio, prepare_prompt_waveform, read_audio_file)
from .pipeline import SAMPLES_PER_FRAME, encode_prompt_audio

DEFAULT_VOICE = "default"
VOICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class Voice:
    """A reference voice encoded once at startup: prompt codes, and its transcript when one was given."""

    name: str
    codes: torch.Tensor  # (T_ref, n_vq) int64, CPU
    prompt_text: str | None = None

    def describe(self) -> dict:
        return {"name": self.name, "mode": "continuation" if self.prompt_text else "voice_clone",
                "seconds": round(self.codes.shape[0] * SAMPLES_PER_FRAME / TARGET_SAMPLE_RATE, 2),
                "transcript": self.prompt_text is not None}


def load_voices(directory: str | os.PathLike, codec: Any) -> dict[str, Voice]:
    """Encode every ``NAME.wav`` in ``directory`` (with ``NAME.txt`` as its transcript when present).

    Raises:
        ValueError: not a directory, no .wav files, a bad name, an empty transcript, or unusable audio.
    """
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"--voices '{root}' is not a directory")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() == ".wav")
    if not files:
        raise ValueError(f"--voices '{root}' holds no .wav files (expected NAME.wav, optionally NAME.txt)")
    voices: dict[str, Voice] = {}
    for path in files:
        name = path.stem
        if not VOICE_NAME.match(name) or name == DEFAULT_VOICE:
            raise ValueError(f"voice file '{path}': the name '{name}' must match {VOICE_NAME.pattern} and not be "
                             f"'{DEFAULT_VOICE}'")
        voices[name] = Voice(name, encode_voice(load_prompt_audio(path), codec), read_transcript(path))
    return voices


def read_transcript(wav_path: Path) -> str | None:
    path = wav_path.with_suffix(".txt")
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as exc:
        raise ValueError(f"voice transcript '{path}' is not UTF-8 text: {exc}") from exc
    if not text:
        raise ValueError(f"voice transcript '{path}' is empty; delete it to clone the voice without a transcript")
    return text


def encode_voice(waveform: torch.Tensor, codec: Any) -> torch.Tensor:
    with torch.inference_mode():
        return encode_prompt_audio(codec, waveform).cpu()


def describe_voices(voices: dict[str, Voice]) -> list[dict]:
    default = {"name": DEFAULT_VOICE, "mode": "continuation", "seconds": 0.0, "transcript": False}
    return [default, *(voice.describe() for voice in voices.values())]


def resolve_voice(name: str | None, voices: dict[str, Voice]) -> Voice | None:
    """The named voice; None for the default voice.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if name is None or name == DEFAULT_VOICE:
        return None
    if name not in voices:
        known = ", ".join([DEFAULT_VOICE, *sorted(voices)])
        raise ValueError(f"unknown voice '{name}'; known voices: {known}")
    return voices[name]


def decode_ref_audio(value: str) -> torch.Tensor:
    """``ref_audio`` (base64, or a data URL, of a WAV/FLAC/OGG/MP3 file) as a ``[2, N]`` 48 kHz tensor.

    Only the first MAX_PROMPT_SECONDS are decoded, and the sample rate must lie in audio_io's range, so the work a
    request causes is bounded by what is used, whatever its header claims.

    Raises:
        ValueError: naming what is wrong (encoding, unreadable audio, and the prompt-file checks).
    """
    payload = value
    if value.startswith("data:"):
        header, _, payload = value.partition(",")
        if not header.endswith(";base64"):
            raise ValueError("ref_audio data URL must be base64-encoded (data:audio/wav;base64,...)")
    try:
        raw = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"ref_audio is not valid base64: {str(exc).strip() or type(exc).__name__}") from exc
    if not raw:
        raise ValueError("ref_audio is empty")
    # a frame more than is used, so a longer recording is cut (with its warning) rather than read whole
    seconds = MAX_PROMPT_SECONDS + MIN_PROMPT_SECONDS
    samples, rate = read_audio_file(io.BytesIO(raw), "ref_audio", max_seconds=seconds, max_channels=TARGET_CHANNELS)
    return prepare_prompt_waveform(samples, rate, source="ref_audio")
