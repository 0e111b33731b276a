"""Audio files in and out: prompt audio reading, resampling, channel layout and atomic writes.

Reading uses soundfile (libsndfile). Resampling uses torchaudio when it is installed (the resampler upstream
uses, so prompt codes match upstream) and scipy's polyphase resampler otherwise. Writes are atomic: a temporary
file in the target directory is renamed over the destination only once it is complete.

Prompt audio may come from anyone (the server's ``ref_audio``), so the work it causes is bounded by what is used:
the sample rate must lie in [MIN_SAMPLE_RATE, MAX_SAMPLE_RATE], at most ``max_seconds`` of frames are read (the
rest is never decoded), channels are mixed block by block, and a rate ratio whose exact polyphase filter would be
long is replaced by the nearest ratio with small terms (``MAX_RESAMPLE_TERMS``).
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import re
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic_files import write_atomic

logger = logging.getLogger(__name__)

TARGET_SAMPLE_RATE = 48000
TARGET_CHANNELS = 2
MAX_PROMPT_SECONDS = 30.0  # longer prompts are cut to this with a warning (the model was trained on short references)
MIN_PROMPT_SECONDS = 0.08  # one codec frame (3840 samples at 48 kHz): shorter audio yields no prompt codes
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8_000, 384_000  # prompt audio outside this range is refused
MAX_RESAMPLE_TERMS = 4096  # bounds the resampler's filter (its length grows with the reduced ratio's terms)
READ_BLOCK_FRAMES = 65536  # frames decoded at once while reading (and mixing) prompt audio
SILENCE_PEAK = 1e-4  # about -80 dBFS: below this a prompt carries no voice to clone
WRITABLE_EXTENSIONS = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG"}


def _soundfile():
    try:
        return importlib.import_module("soundfile")
    except ImportError as exc:  # pragma: no cover - soundfile is a hard requirement
        raise RuntimeError("soundfile is required for audio I/O: pip install soundfile") from exc


def read_audio(path: str | os.PathLike, max_seconds: float | None = None, max_channels: int | None = None,
               downmix: bool = False) -> tuple[np.ndarray, int]:
    """Read an audio file as float32 samples, decoding only what is used.

    Args:
        path: any format libsndfile reads (WAV, FLAC, OGG/Vorbis, MP3 with libsndfile >= 1.1).
        max_seconds: read at most this many seconds from the start (None: the whole file).
        max_channels: a file with more channels is refused before decoding, or with ``downmix`` mixed to mono
            block by block while it is read (None: any number of channels).
        downmix: see ``max_channels``.

    Returns:
        ``(samples [channels, frames] float32, sample_rate)``.

    Raises:
        ValueError: the file is missing, unreadable, not audio, holds no samples, or its sample rate is outside
            [MIN_SAMPLE_RATE, MAX_SAMPLE_RATE].
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"prompt audio file not found: '{path}'")
    if path.is_dir():
        raise ValueError(f"prompt audio path is a directory, expected an audio file: '{path}'")
    return read_audio_file(str(path), f"prompt audio '{path}'", max_seconds, max_channels, downmix)


def read_audio_file(file: Any, source: str, max_seconds: float | None = None, max_channels: int | None = None,
                    downmix: bool = False) -> tuple[np.ndarray, int]:
    """``read_audio`` for a path or a binary file object; ``source`` names it in messages."""
    soundfile = _soundfile()
    try:
        with soundfile.SoundFile(file) as handle:
            rate, channels = int(handle.samplerate), int(handle.channels)
            check_sample_rate(rate, source)
            limit = -1 if max_seconds is None else int(math.ceil(max_seconds * rate))
            mix = max_channels is not None and channels > max_channels
            if mix and not downmix:
                raise ValueError(too_many_channels(source, channels, max_channels))
            if mix:  # mixed block by block: never more than two channels' worth of samples held
                blocks = [_block(block, mix) for block in
                          handle.blocks(READ_BLOCK_FRAMES, frames=limit, dtype="float32", always_2d=True)]
            else:
                blocks = [handle.read(frames=limit, dtype="float32", always_2d=True).T]
    except ValueError:
        raise
    except Exception as exc:  # libsndfile reports unreadable or truncated files as several exception types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reason = re.sub(r"^Error opening <[^>]*>: ", "", reason)  # an in-memory file's repr says nothing
        raise ValueError(f"cannot read {source}: {reason} (supported: WAV, FLAC, OGG, MP3 via libsndfile)") from exc
    if not blocks or sum(block.shape[1] for block in blocks) == 0:
        raise ValueError(f"{source} contains no samples")
    return np.ascontiguousarray(blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=1)), rate


def _block(block: np.ndarray, mix: bool) -> np.ndarray:
    """One block read by soundfile ``[frames, channels]`` as ``[channels, frames]``, mixed to mono when asked."""
    return block.mean(axis=1, keepdims=True, dtype=np.float32).T.copy() if mix else block.T.copy()


def check_sample_rate(rate: int, source: str = "prompt audio") -> None:
    """Refuse a sample rate outside [MIN_SAMPLE_RATE, MAX_SAMPLE_RATE] (a header can claim any rate)."""
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise ValueError(f"{source} has sample rate {rate} Hz; supported: {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz")


def resample_ratio(orig_sr: int, target_sr: int) -> Fraction:
    """``target_sr / orig_sr``, or the nearest ratio whose terms keep the polyphase filter short (an exact ratio of
    two odd rates can need a filter of millions of taps; the nearest one is off by
    under 0.2%, a few cents of pitch, for any rate in range)."""
    ratio = Fraction(target_sr, orig_sr)
    if max(ratio.numerator, ratio.denominator) <= MAX_RESAMPLE_TERMS:
        return ratio
    # numerator ~ ratio x denominator: bound the denominator so that both terms stay within MAX_RESAMPLE_TERMS
    return ratio.limit_denominator(max(1, int(MAX_RESAMPLE_TERMS / max(1.0, float(ratio)))))


def resample(samples: np.ndarray, orig_sr: int, target_sr: int = TARGET_SAMPLE_RATE) -> np.ndarray:
    """Resample ``[channels, frames]`` float32 audio to ``target_sr``."""
    if orig_sr <= 0:
        raise ValueError(f"sample rate must be positive, got {orig_sr}")
    if orig_sr == target_sr:
        return samples.astype(np.float32, copy=False)
    ratio = resample_ratio(orig_sr, target_sr)
    try:
        functional = importlib.import_module("torchaudio.functional")
    except Exception:  # torchaudio is optional (no wheel for every torch build)
        functional = None
    if functional is not None:
        # torchaudio reduces the rates by their gcd itself: the reduced ratio gives the same filter
        out = functional.resample(torch.from_numpy(np.ascontiguousarray(samples)), ratio.denominator,
                                  ratio.numerator)
        return out.numpy().astype(np.float32, copy=False)
    from scipy.signal import resample_poly

    return resample_poly(samples, ratio.numerator, ratio.denominator, axis=-1).astype(np.float32)


def too_many_channels(source: str, have: int, channels: int) -> str:
    return (f"{source} has {have} channels; the codec takes at most {channels}. "
            "Pass downmix=True (--downmix) to average them, or provide a mono/stereo file")


def to_channels(samples: np.ndarray, channels: int = TARGET_CHANNELS, downmix: bool = False) -> np.ndarray:
    """Lay audio out as ``channels`` channels: mono is duplicated; more channels need ``downmix=True``."""
    have = samples.shape[0]
    if have == channels:
        return samples
    if have > channels and not downmix:
        raise ValueError(too_many_channels("prompt audio", have, channels))
    mono = samples.mean(axis=0, keepdims=True) if have > 1 else samples
    return np.repeat(mono, channels, axis=0)


def load_prompt_audio(
    path: str | os.PathLike,
    *,
    sample_rate: int = TARGET_SAMPLE_RATE,
    channels: int = TARGET_CHANNELS,
    downmix: bool = False,
    max_seconds: float = MAX_PROMPT_SECONDS,
) -> torch.Tensor:
    """Read a reference recording and prepare it for the codec.

    Args:
        path: the audio file.
        sample_rate: the codec's rate (48 kHz).
        channels: the codec's channel count (2); mono is duplicated.
        downmix: average files with more channels instead of raising.
        max_seconds: longer audio is cut to this length, with a warning.

    Returns:
        ``[channels, frames]`` float32 tensor at ``sample_rate``.

    Raises:
        ValueError: missing or unreadable file, empty, too short, silent or non-finite audio, too many channels.
    """
    # only the first max_seconds are decoded; more channels than the codec takes are mixed while reading
    samples, orig_sr = read_audio(path, max_seconds=max_seconds + MIN_PROMPT_SECONDS, max_channels=channels,
                                  downmix=downmix)
    return prepare_prompt_waveform(
        samples, orig_sr, sample_rate=sample_rate, channels=channels, downmix=downmix, max_seconds=max_seconds,
        source=f"prompt audio '{path}'",
    )


def prepare_prompt_waveform(
    samples: np.ndarray,
    orig_sr: int,
    *,
    sample_rate: int = TARGET_SAMPLE_RATE,
    channels: int = TARGET_CHANNELS,
    downmix: bool = False,
    max_seconds: float = MAX_PROMPT_SECONDS,
    source: str = "prompt audio",
) -> torch.Tensor:
    """Check, lay out, cut and resample ``[channels, frames]`` samples (see ``load_prompt_audio``)."""
    if samples.ndim != 2 or samples.shape[-1] == 0:
        raise ValueError(f"{source} must be [channels, samples] with samples > 0, got shape {tuple(samples.shape)}")
    if not np.isfinite(samples).all():
        raise ValueError(f"{source} contains NaN or Inf samples")
    check_sample_rate(orig_sr, source)
    samples = to_channels(samples, channels, downmix)
    limit = int(math.ceil(max_seconds * orig_sr))
    if samples.shape[1] > limit:
        logger.warning("%s is longer than %.1f s; using its first %.1f s", source, max_seconds, max_seconds)
        samples = samples[:, :limit]
    samples = resample(samples, orig_sr, sample_rate)
    check_prompt_waveform(samples, sample_rate, source=source)
    return torch.from_numpy(np.ascontiguousarray(samples))


def check_prompt_waveform(samples: np.ndarray | torch.Tensor, sample_rate: int, source: str = "prompt audio") -> None:
    """Reject audio too short to give one codec frame, silent audio, or non-finite samples."""
    samples = samples.detach().cpu().numpy() if isinstance(samples, torch.Tensor) else samples
    seconds = samples.shape[-1] / sample_rate
    if seconds < MIN_PROMPT_SECONDS:
        raise ValueError(
            f"{source} is too short: {samples.shape[-1]} samples ({seconds * 1000:.1f} ms) at {sample_rate} Hz; "
            f"at least {MIN_PROMPT_SECONDS * 1000:.0f} ms (one codec frame) is needed, a few seconds is typical"
        )
    if not np.isfinite(samples).all():
        raise ValueError(f"{source} contains NaN or Inf samples")
    peak = float(np.abs(samples).max())
    if peak < SILENCE_PEAK:
        raise ValueError(f"{source} is silent (peak amplitude {peak:.2e}); provide a recording of the voice to clone")


def write_audio_atomic(path: str | os.PathLike, waveform: torch.Tensor | np.ndarray, sample_rate: int) -> Path:
    """Write ``[channels, frames]`` (or ``[frames]``) audio; the file appears only once complete.

    Missing parent directories are created. The format follows the extension (.wav, .flac, .ogg); WAV is
    16-bit PCM.

    Raises:
        ValueError: unsupported extension or non-finite samples.
        RuntimeError: the directory cannot be created or written.
    """
    path = Path(path)
    fmt = WRITABLE_EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"output path '{path}' has extension '{path.suffix}'; supported: {', '.join(sorted(WRITABLE_EXTENSIONS))}"
        )
    data = waveform.detach().float().cpu().numpy() if isinstance(waveform, torch.Tensor) else np.asarray(waveform)
    if not np.isfinite(data).all():
        raise ValueError("refusing to write audio with NaN or Inf samples")
    frames = data.T if data.ndim == 2 else data  # soundfile wants [frames, channels]
    subtype = "PCM_16" if fmt == "WAV" else None
    return write_atomic(
        path, lambda temporary: _soundfile().write(temporary, np.clip(frames, -1.0, 1.0), sample_rate, format=fmt,
                                                   subtype=subtype)
    )
