"""One synthesis call's inputs, validated once: the request behind ``inference`` / ``inference_stream`` and an engine's
``submit`` (`SynthesisRequest`), and upstream's method defaults for its generation settings.

Validation runs before any audio is read or encoded: text, mode rules, sampling settings (``SamplingParams``' own
checks), chunking and batching limits, seed / generator.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

from . import devices
from .audio_io import TARGET_SAMPLE_RATE
from .prompting import infer_mode, validate_mode
from .sampling import SamplingParams
from .text_chunking import normalize_text


# Upstream's method defaults (drop-in compatibility), taken from SamplingParams; the scripts pass the official CLI
# values instead.
METHOD_DEFAULTS: dict[str, Any] = {
    **{f.name: f.default for f in fields(SamplingParams) if f.name != "nq"},
    "use_kv_cache": True,
}
SAMPLING_KEYS = tuple(k for k in METHOD_DEFAULTS if k != "max_new_frames")


@dataclass
class SynthesisRequest:
    """One call's inputs, validated once."""

    text: str
    mode: str | None = None  # None: inferred from the prompt (prompting.infer_mode)
    prompt_text: str | None = None
    prompt_audio_path: str | None = None
    prompt_audio: torch.Tensor | None = None
    prompt_audio_sample_rate: int = TARGET_SAMPLE_RATE
    prompt_audio_codes: torch.Tensor | None = None
    nq: int | None = None
    max_new_frames: int = METHOD_DEFAULTS["max_new_frames"]
    generation: dict[str, Any] = field(default_factory=dict)
    voice_clone_max_text_tokens: int = 50
    voice_clone_max_memory_per_sample_gb: float = 1.0
    voice_clone_chunk_batch_size: int | None = None
    voice_clone_codec_batch_size: int | None = None
    downmix: bool = False
    seed: int | None = None
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise ValueError(f"text must be a string, got {type(self.text).__name__}")
        normalize_text(self.text)  # validation only: raises on empty / whitespace / control-only text
        has_audio = any(getattr(self, name) is not None
                        for name in ("prompt_audio_path", "prompt_audio", "prompt_audio_codes"))
        self.mode = infer_mode(self.mode, has_prompt_audio=has_audio, has_prompt_text=bool(self.prompt_text))
        validate_mode(self.mode, has_prompt_audio=has_audio, has_prompt_text=bool(self.prompt_text))
        # the generator's own validation, run before any audio is read or encoded
        sampling = {k: v for k, v in self.generation.items() if k != "use_kv_cache"}
        SamplingParams(max_new_frames=self.max_new_frames, nq=self.nq, **sampling)
        if self.voice_clone_max_text_tokens < 1:
            raise ValueError(
                f"voice_clone_max_text_tokens must be >= 1, got {self.voice_clone_max_text_tokens!r}"
            )
        if self.voice_clone_max_memory_per_sample_gb <= 0:
            raise ValueError(
                "voice_clone_max_memory_per_sample_gb must be > 0, "
                f"got {self.voice_clone_max_memory_per_sample_gb!r}"
            )
        for name in ("voice_clone_chunk_batch_size", "voice_clone_codec_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value!r}")
        self._check_randomness()

    def _check_randomness(self) -> None:
        if self.seed is not None:
            devices.check_seed(self.seed)
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(self.generator).__name__}")
        if self.seed is not None and self.generator is not None:
            raise ValueError("pass seed= or generator=, not both (a seed makes the call's own generator)")

    def call_generator(self, device: torch.device) -> torch.Generator | None:
        """The call's own random generator on ``device``: the caller's, one seeded with ``seed``, or (sampling
        without either) one seeded from the OS. None for greedy calls, which draw nothing.

        Raises:
            ValueError: a caller's generator on another device type than the model.
        """
        if self.generator is not None:
            if self.generator.device.type != device.type:
                raise ValueError(f"generator is on {self.generator.device}, the model on {device}; create it with "
                                 f"torch.Generator(device='{device}')")
            return self.generator
        if self.seed is None and not self.generation.get("do_sample"):
            return None
        return devices.new_generator(device, self.seed)


def build_request(text: str, **kwargs: Any) -> SynthesisRequest:
    """Split keyword arguments into request fields and generation settings (unknown names raise TypeError)."""
    generation = {k: kwargs.pop(k, METHOD_DEFAULTS[k]) for k in SAMPLING_KEYS}
    kwargs.setdefault("max_new_frames", METHOD_DEFAULTS["max_new_frames"])
    return SynthesisRequest(text=text, generation=generation, **kwargs)
