"""Sampling of one logits vector per row (TTS_SPEC §6) and the frozen settings of a generation call.

Order: repetition penalty (also when greedy), then greedy argmax, or temperature -> top-k -> top-p -> softmax ->
one draw. Top-p works on the top-k values when top-k is active (no full sort), and the draw uses the exponential
race (argmax of p / Exp(1)), which needs no cumulative sums and no host synchronisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} must be an integer")


def _check_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number")


@dataclass(frozen=True)
class SamplingParams:
    """Every setting of one generation call, validated once at construction.

    Defaults are upstream's method defaults (drop-in compatibility). `top_k <= 0` disables top-k (k is clipped to
    the vocabulary); `top_p == 1` disables top-p. Temperatures matter only when `do_sample`.

    Raises:
        ValueError: naming the field, its value and what is allowed.
    """

    max_new_frames: int = 300
    do_sample: bool = False
    text_temperature: float = 1.5
    text_top_p: float = 1.0
    text_top_k: int = 50
    audio_temperature: float = 1.7
    audio_top_p: float = 0.8
    audio_top_k: int = 25
    audio_repetition_penalty: float = 1.0
    nq: Optional[int] = None
    min_new_frames: int = 0  # not upstream's: frames during which "continue" is forced (0: the model decides)

    def __post_init__(self) -> None:
        _check_int("max_new_frames", self.max_new_frames)
        if self.max_new_frames < 1:
            raise ValueError(f"max_new_frames={self.max_new_frames} must be >= 1")
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample={self.do_sample!r} must be True or False")
        for prefix in ("text", "audio"):
            temperature, top_p = getattr(self, f"{prefix}_temperature"), getattr(self, f"{prefix}_top_p")
            _check_float(f"{prefix}_temperature", temperature)
            if self.do_sample and temperature <= 0:
                raise ValueError(f"{prefix}_temperature={temperature} must be > 0 when do_sample=True")
            _check_float(f"{prefix}_top_p", top_p)
            if not 0 < top_p <= 1:
                raise ValueError(f"{prefix}_top_p={top_p} must be within (0, 1] (1 disables top-p)")
            _check_int(f"{prefix}_top_k", getattr(self, f"{prefix}_top_k"))
        _check_float("audio_repetition_penalty", self.audio_repetition_penalty)
        if self.audio_repetition_penalty <= 0:
            raise ValueError(
                f"audio_repetition_penalty={self.audio_repetition_penalty} must be > 0 (1.0 disables it)"
            )
        _check_int("min_new_frames", self.min_new_frames)
        if not 0 <= self.min_new_frames <= self.max_new_frames:
            raise ValueError(f"min_new_frames={self.min_new_frames} must be within 0..max_new_frames "
                             f"({self.max_new_frames})")
        if self.nq is not None:
            _check_int("nq", self.nq)
            if self.nq < 1:
                raise ValueError(f"nq={self.nq} must be >= 1 (or None for all codebooks)")

    def resolve_nq(self, n_vq: int) -> int:
        """The number of codebooks to generate: `nq`, or all `n_vq` when None (see `resolve_nq`)."""
        return resolve_nq(self.nq, n_vq)


def resolve_nq(nq: Optional[int], n_vq: int) -> int:
    """The number of codebooks in use: `nq`, or all `n_vq` when None.

    Raises:
        ValueError: when nq is not an integer within 1..n_vq.
    """
    if nq is None:
        return n_vq
    if isinstance(nq, bool) or not isinstance(nq, int) or not 1 <= nq <= n_vq:
        raise ValueError(f"nq={nq!r} must be an integer within 1..{n_vq} (n_vq), or None for all codebooks")
    return nq


def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise the ids a row has seen: score < 0 -> score * penalty, else score / penalty.

    Args:
        scores: (B, V) logits.
        seen: (B, V) bool, True for ids to penalise.
        penalty: > 0; 1.0 returns `scores` unchanged.

    Returns:
        (B, V) penalised logits.
    """
    if penalty == 1.0:
        return scores
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def filter_top_k_top_p(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf the logits outside top-k (keep >= the k-th largest) and outside the top-p nucleus.

    Top-p: sort descending, softmax, cumulative sum; drop entries whose cumulative sum exceeds p, always keeping the
    first. When top-k is active only its k values are sorted (everything else is already -inf).

    Args:
        scores: (B, V) logits (already divided by the temperature).
        top_k: k (<= 0 disables; clipped to V).
        top_p: p in (0, 1] (1 disables).

    Returns:
        (B, V) filtered logits.
    """
    vocab = scores.shape[-1]
    k = min(top_k, vocab) if top_k > 0 else vocab
    if k == vocab and top_p >= 1.0:
        return scores
    if k < vocab:
        ranked = torch.topk(scores, k, dim=-1).values  # (B, k), descending
    else:
        ranked = torch.sort(scores, dim=-1, descending=True).values  # (B, V)
    if top_p < 1.0:
        # Only the k ranked values can survive top-k, so the nucleus is taken over them (softmax over the top-k
        # survivors, as after masking); its cutoff is >= the k-th largest, so one mask applies both filters.
        cumulative = torch.softmax(ranked.float(), dim=-1).cumsum(dim=-1)
        kept = (cumulative <= top_p).sum(dim=-1, keepdim=True).clamp_min(1)  # a prefix of the ranking, at least 1
        cutoff = ranked.gather(-1, kept - 1)  # (B, 1) smallest kept value
    else:
        cutoff = ranked[..., -1:]  # (B, 1) the k-th largest
    return scores.masked_fill(scores < cutoff, float("-inf"))


def select_tokens(
    scores: torch.Tensor,
    *,
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Pick one id per row: argmax (first index on ties) when greedy, else a draw after temperature/top-k/top-p.

    Args:
        scores: (B, V) logits (repetition penalty already applied).
        do_sample: sample instead of argmax.
        temperature, top_k, top_p: sampling settings (validated by `SamplingParams`).
        generator: optional torch.Generator for the draw.

    Returns:
        (B,) int64 ids.
    """
    if not do_sample:
        return scores.argmax(dim=-1)
    scores = filter_top_k_top_p(scores.float() / temperature, top_k, top_p)
    probs = torch.softmax(scores, dim=-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=-1)
