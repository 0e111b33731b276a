"""What the codec's public calls return: ``ModelOutput`` dataclasses (attributes, ``out["name"]``, ``out[i]``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput


@dataclass
class MossAudioTokenizerEncoderOutput(ModelOutput):
    """``audio_codes (nq,B,N)`` int64, ``audio_codes_lengths (B,)`` int64, ``encoder_hidden_states (B,768,N)``."""

    audio_codes: torch.Tensor | None = None
    audio_codes_lengths: torch.Tensor | None = None
    encoder_hidden_states: torch.Tensor | None = None


@dataclass
class MossAudioTokenizerDecoderOutput(ModelOutput):
    """``audio (B,channels,T)`` float32 and ``audio_lengths (B,)`` int64 valid samples per channel."""

    audio: torch.Tensor | None = None
    audio_lengths: torch.Tensor | None = None


@dataclass
class MossAudioTokenizerOutput(ModelOutput):
    """Encode-then-decode result of ``forward``."""

    audio: torch.Tensor | None = None
    audio_lengths: torch.Tensor | None = None
    audio_codes: torch.Tensor | None = None
    audio_codes_lengths: torch.Tensor | None = None
