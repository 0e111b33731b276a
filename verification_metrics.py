"""What verification measures and what it allows: tolerances per model dtype and the comparison metrics.

The metrics compare a run on a device with the CPU float32 reference in float64 on the host (cosine, max abs
difference, SNR of a waveform, agreement of greedy codes and their first divergent frame). The tolerances say,
per model dtype, what a run must meet, and why (`Tolerance.rationale`, written into every report).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .devices import DTYPE_ALIASES

DTYPE_NAMES = {"auto": None, **DTYPE_ALIASES}  # the dtype names devices.resolve_dtype accepts

# ---------------------------------------------------------------------------------------------------- tolerances


@dataclass(frozen=True)
class Tolerance:
    """What a (device, dtype) run must meet against the CPU float32 reference.

    Attributes:
        dtype: the model dtype these limits are for.
        min_cosine: teacher-forced text and audio logits and the global hidden states.
        max_abs_rel: max |logits - reference| / max(1, max |reference logits|).
        min_argmax_agreement: fraction of teacher-forced audio argmaxes equal to the reference greedy codes.
        min_divergence_fraction: greedy codes: first divergent frame / frames (identical codes always pass).
        codec_max_abs_rel: max |waveform - reference| / peak |reference| (CODEC_SPEC §7 checks 11 and 12).
        codec_min_snr_db: signal-to-noise ratio of the decoded waveform against the reference.
        rationale: why these limits.
    """

    dtype: str
    min_cosine: float
    max_abs_rel: float
    min_argmax_agreement: float
    min_divergence_fraction: float
    codec_max_abs_rel: float
    codec_min_snr_db: float
    rationale: str


TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(
        "float32", 0.99999, 1e-3, 0.99, 0.5, 1e-4, 60.0,
        "fp32 on an accelerator only reorders reductions and fuses kernels: ~1e-6 relative per op, ~1e-5 after "
        "12 + 1 layers, while a wrong kernel (mask, RoPE, TF32/HF32 left on) shows > 1e-3. Greedy codes flip only "
        "at rare exact near-ties: identical, or diverging in the second half of the run. Codec: CODEC_SPEC §7 "
        "check 11 (<= 1e-4 * peak, i.e. > 70 dB SNR for speech-like audio; 60 dB leaves margin)."),
    "float16": Tolerance(
        "float16", 0.999, 5e-2, 0.9, 0.0, 5e-2, 15.0,
        "fp16 rounds every matmul and LayerNorm input to an 11-bit significand (unit roundoff 4.9e-4), ~1e-3 "
        "relative after 12 layers. Greedy decoding feeds its choices back, so one flipped near-tie changes every "
        "later frame: the divergence is reported, not gated; the teacher-forced logits and their argmax agreement "
        "bound the per-step error instead. Codec: CODEC_SPEC §7 check 12 (finite, <= 5e-2 * peak; ~15 dB SNR)."),
    "bfloat16": Tolerance(
        "bfloat16", 0.995, 1e-1, 0.8, 0.0, 5e-2, 15.0,
        "bf16 has an 8-bit significand (unit roundoff 3.9e-3), 8x coarser than fp16: looser logit limits; greedy "
        "divergence reported, not gated (as for fp16). Codec: CODEC_SPEC §7 check 12. Observed with the released-"
        "size demo on CPU: cosine 0.99999, argmax agreement 0.98, codec 37 dB."),
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def tolerance_for(dtype: str | torch.dtype) -> Tolerance:
    """The tolerances of a model dtype.

    Args:
        dtype: a torch dtype or a name ("float32"/"fp32", "float16"/"fp16", "bfloat16"/"bf16").

    Returns:
        The `Tolerance` for that dtype.

    Raises:
        ValueError: for any other dtype.
    """
    resolved = DTYPE_NAMES.get(dtype.strip().lower()) if isinstance(dtype, str) else dtype
    name = dtype_name(resolved) if isinstance(resolved, torch.dtype) else None
    if name not in TOLERANCES:
        raise ValueError(f"dtype={dtype!r} has no tolerances; allowed: {', '.join(TOLERANCES)} (or fp32/fp16/bf16)")
    return TOLERANCES[name]


# ---------------------------------------------------------------------------------------------------- metrics


def _flat64(tensor: Any) -> torch.Tensor:
    # Why copy first, then widen: `.to("cpu", torch.float64)` converts on the source device before the copy, and an
    # NPU has no float64 kernels for most ops (and would hold a 4x larger temporary).
    return torch.as_tensor(tensor).detach().cpu().to(torch.float64).flatten()


def _same_shape(reference: torch.Tensor, other: torch.Tensor, what: str) -> None:
    if tuple(reference.shape) != tuple(other.shape):
        raise ValueError(f"{what}: shapes differ, reference {tuple(reference.shape)} vs {tuple(other.shape)}")


def all_finite(*tensors: torch.Tensor) -> bool:
    """True when every element of every tensor is finite (empty tensors count as finite)."""
    return all(bool(torch.isfinite(torch.as_tensor(t)).all()) for t in tensors)


def _finite_pair(reference: torch.Tensor, other: torch.Tensor, what: str) -> Optional[tuple]:
    """Both flattened to float64 (shapes checked), or None when either holds a non-finite value."""
    _same_shape(reference, other, what)
    a, b = _flat64(reference), _flat64(other)
    return (a, b) if all_finite(a) and all_finite(b) else None


def cosine_similarity(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Cosine of the flattened tensors in float64: nan if either is non-finite, 1.0 if both are zero.

    Raises:
        ValueError: when the shapes differ.
    """
    pair = _finite_pair(reference, other, "cosine_similarity")
    if pair is None:
        return math.nan
    a, b = pair
    if torch.equal(a, b):
        return 1.0  # exactly, not 1 - 1e-16
    norm_a, norm_b = float(a.norm()), float(b.norm())
    if norm_a == 0.0 or norm_b == 0.0:
        return 1.0 if norm_a == norm_b else 0.0
    return max(-1.0, min(1.0, float(a @ b) / (norm_a * norm_b)))


def max_abs_difference(reference: torch.Tensor, other: torch.Tensor) -> float:
    """max |reference - other| in float64 (0.0 for empty tensors, nan when anything is non-finite).

    Raises:
        ValueError: when the shapes differ.
    """
    _same_shape(reference, other, "max_abs_difference")
    diff = (_flat64(reference) - _flat64(other)).abs()
    if diff.numel() == 0:
        return 0.0
    return float(diff.max()) if all_finite(diff) else math.nan


def snr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    """10 log10(sum reference^2 / sum (reference - other)^2): inf when identical, nan when non-finite.

    Raises:
        ValueError: when the shapes differ.
    """
    pair = _finite_pair(reference, other, "snr_db")
    if pair is None:
        return math.nan
    a, b = pair
    noise = float((a - b).pow(2).sum())
    if noise == 0.0:
        return math.inf
    signal = float(a.pow(2).sum())
    return 10.0 * math.log10(signal / noise) if signal > 0.0 else -math.inf


def first_divergent_frame(reference_codes: torch.Tensor, codes: torch.Tensor) -> Optional[int]:
    """Index of the first frame (row of a (frames, channels) code matrix) that differs; None when identical.

    When one sequence is a prefix of the other, the first frame past the shorter one is the divergence.

    Raises:
        ValueError: when the inputs are not 2-D or their channel counts differ.
    """
    if reference_codes.dim() != 2 or codes.dim() != 2 or reference_codes.shape[1] != codes.shape[1]:
        raise ValueError(f"codes must be (frames, channels) with equal channels, got "
                         f"{tuple(reference_codes.shape)} and {tuple(codes.shape)}")
    common = min(reference_codes.shape[0], codes.shape[0])
    differs = (reference_codes[:common].cpu() != codes[:common].cpu()).any(dim=1)
    if bool(differs.any()):
        return int(differs.nonzero()[0])
    return None if reference_codes.shape[0] == codes.shape[0] else common


def code_agreement(reference_codes: torch.Tensor, codes: torch.Tensor) -> float:
    """Fraction of equal codes over the longer of the two (frames, channels) matrices (missing frames disagree)."""
    if first_divergent_frame(reference_codes, codes) is None:
        return 1.0
    common = min(reference_codes.shape[0], codes.shape[0])
    equal = int((reference_codes[:common].cpu() == codes[:common].cpu()).sum())
    total = max(reference_codes.shape[0], codes.shape[0]) * reference_codes.shape[1]
    return equal / total
