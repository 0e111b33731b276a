"""The verification checks' verdicts: the CPU float32 reference a check compares with, and the judges that turn a
measurement into pass/fail and metrics by the (device, dtype) tolerance (verification_metrics.py)."""

from __future__ import annotations

if not __package__:  # imported by file name from a clone's root: become a package member (see repo_imports.py)
    __import__("repo_imports").adopt(globals())

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .teacher_forcing import TeacherForcedLogits
from .verification_metrics import (
    Tolerance, all_finite, code_agreement, cosine_similarity, first_divergent_frame, max_abs_difference, snr_db,
)


@dataclass
class Reference:
    """The CPU float32 run every other (device, dtype) is compared with (CPU tensors)."""

    input_ids: torch.Tensor  # (1, T, n_vq + 1) prompt rows
    attention_mask: torch.Tensor  # (1, T) bool
    nq: int
    hidden: torch.Tensor  # (1, T, H) global hidden states after ln_f
    hidden_finite: bool  # every layer finite
    codes: torch.Tensor  # (F, n_vq) greedy codes
    logits: TeacherForcedLogits  # teacher-forced on `codes`
    waveform: torch.Tensor  # (2, 3840 F) codec decode of `codes`
    prompt_frames: int


@dataclass
class Outcome:
    """What a check found: pass/fail, the numbers, an optional note, a value for later use (the loaded model)."""

    passed: bool
    metrics: dict[str, Any] = field(default_factory=dict)
    note: Optional[str] = None
    value: Any = None


def judge_hidden(hidden: torch.Tensor, finite: bool, reference: Reference, tol: Tolerance) -> Outcome:
    cosine = cosine_similarity(reference.hidden, hidden)
    metrics = {"finite": finite, "cosine": cosine, "max_abs_diff": max_abs_difference(reference.hidden, hidden)}
    return Outcome(finite and cosine >= tol.min_cosine, metrics)


def judge_logits(logits: TeacherForcedLogits, reference: Reference, tol: Tolerance) -> Outcome:
    finite = all_finite(logits.text, logits.audio)
    metrics: dict[str, Any] = {"finite": finite, "frames": int(logits.text.shape[1]), "step": logits.step}
    passed = finite
    for kind in ("text", "audio"):
        ref, got = getattr(reference.logits, kind), getattr(logits, kind)
        cosine, max_abs = cosine_similarity(ref, got), max_abs_difference(ref, got)
        rel = max_abs / max(1.0, float(ref.abs().max()))  # relative to the logit scale, at least 1
        metrics.update({f"{kind}_cosine": cosine, f"{kind}_max_abs_diff": max_abs, f"{kind}_max_abs_rel": rel})
        passed = passed and cosine >= tol.min_cosine and rel <= tol.max_abs_rel
    expected = reference.codes[None, :, : reference.nq]
    agreement = float((logits.argmax_codes() == expected).double().mean())
    continues = bool((logits.text.argmax(-1) == 0).all())
    metrics.update({"argmax_agreement": agreement, "text_decisions_continue": continues})
    return Outcome(passed and agreement >= tol.min_argmax_agreement, metrics)


def judge_codes(codes: torch.Tensor, reference: Reference, tol: Tolerance) -> Outcome:
    frames = int(reference.codes.shape[0])
    first = first_divergent_frame(reference.codes, codes)
    metrics = {"frames": int(codes.shape[0]), "reference_frames": frames, "first_divergent_frame": first,
               "agreement": code_agreement(reference.codes, codes), "identical": first is None}
    if first is None:
        return Outcome(True, metrics)
    gated = tol.min_divergence_fraction > 0.0
    note = f"greedy codes diverge from frame {first} of {frames}" + (
        f" (allowed from frame {math.ceil(tol.min_divergence_fraction * frames)})" if gated
        else f"; reported, not gated in {tol.dtype} (see tolerances)")
    return Outcome(first / frames >= tol.min_divergence_fraction, metrics, note)


def judge_codec(waveform: torch.Tensor, reference: Reference, tol: Tolerance) -> Outcome:
    finite = all_finite(waveform)
    peak = float(reference.waveform.abs().max()) if reference.waveform.numel() else 0.0
    max_abs = max_abs_difference(reference.waveform, waveform)
    rel = max_abs / peak if peak > 0 else (0.0 if max_abs == 0.0 else math.inf)
    snr = snr_db(reference.waveform, waveform)
    metrics = {"finite": finite, "samples": int(waveform.shape[-1]), "peak": peak, "max_abs_diff": max_abs,
               "max_abs_rel": rel, "snr_db": snr}
    return Outcome(finite and rel <= tol.codec_max_abs_rel and snr >= tol.codec_min_snr_db, metrics)


__all__ = ["Reference", "Outcome", "judge_hidden", "judge_logits", "judge_codes", "judge_codec"]
