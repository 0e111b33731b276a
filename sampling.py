"""Sampling of one logits vector per row (docs/model.md, Generation) and the frozen settings of a generation call.

Order: repetition penalty (also when greedy), then greedy argmax, or temperature -> top-k -> top-p -> softmax ->
one draw. Top-p works on the top-k values when top-k is active (no full sort), and the draw uses the exponential
race (argmax of p / Exp(1)), which needs no cumulative sums and no host synchronisation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch

from .value_bounds import SAMPLING_BOUNDS, sampling_problem


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} must be an integer")


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
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample={self.do_sample!r} must be True or False")
        for name in SAMPLING_BOUNDS:  # the one table of ranges, which the flags and the server read too
            problem = sampling_problem(name, getattr(self, name), self.do_sample)
            if problem:
                raise ValueError(problem)
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


def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor,
                             penalty: Union[float, torch.Tensor]) -> torch.Tensor:
    """Penalise the ids a row has seen: score < 0 -> score * penalty, else score / penalty.

    Args:
        scores: (B, V) logits.
        seen: (B, V) bool, True for ids to penalise.
        penalty: > 0, one for every row or a (B, 1) tensor of per-row values; 1.0 leaves a row unchanged.

    Returns:
        (B, V) penalised logits.
    """
    if not isinstance(penalty, torch.Tensor) and penalty == 1.0:
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
    generator: Union[torch.Generator, Sequence[Optional[torch.Generator]], None] = None,
) -> torch.Tensor:
    """Pick one id per row: argmax (first index on ties) when greedy, else a draw after temperature/top-k/top-p.

    Args:
        scores: (B, V) logits (repetition penalty already applied).
        do_sample: sample instead of argmax.
        temperature, top_k, top_p: sampling settings (validated by `SamplingParams`).
        generator: a torch.Generator for every row's draw, or one per row (each row then draws exactly what it
            would draw alone), or None (the default generator).

    Returns:
        (B,) int64 ids.
    """
    if not do_sample:
        return scores.argmax(dim=-1)
    scores = filter_top_k_top_p(scores.float() / temperature, top_k, top_p)
    probs = torch.softmax(scores, dim=-1)
    if generator is None or isinstance(generator, torch.Generator):
        race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    else:
        race = torch.cat([torch.empty_like(probs[:1]).exponential_(1.0, generator=g) for g in generator])
    # Why the floor: an accelerator's float32 draw is -log(u) with u in (0, 1], so u = 1.0 gives exactly 0 (about
    # once in 2**24 draws); p / 0 would make a zero-probability token NaN (0 / 0) and win argmax. Dividing by the
    # smallest normal float instead keeps zero-probability tokens at 0 and every other p / race finite.
    race.clamp_min_(torch.finfo(race.dtype).tiny)
    return (probs / race).argmax(dim=-1)


class RowSampler:
    """Sampling of a batch of rows where each row has its own settings and random generator (one per request).

    Rows with equal settings are filtered together (top-k, top-p and softmax work row by row, so a row's result does
    not depend on its neighbours); each draws from its own generator, exactly what it would draw alone. Rows use
    only their own `nq` codebooks: a row skips (draws nothing for) the channels at or above its `nq`.

    Args:
        params: one `SamplingParams` per row.
        generators: one generator per row, a generator for every row, or None.
        n_vq: the model's number of codebooks (resolves `nq=None`).
    """

    def __init__(self, params: Sequence[SamplingParams],
                 generators: Union[torch.Generator, Sequence[Optional[torch.Generator]], None], n_vq: int) -> None:
        self.batch, self.n_vq = len(params), n_vq
        shared = generators is None or isinstance(generators, torch.Generator)
        self._groups: list[tuple[SamplingParams, Optional[list[int]], Any]] = []
        params = [dataclasses.replace(item, max_new_frames=1, min_new_frames=0) for item in params]  # group keys
        by_params: dict[SamplingParams, list[int]] = {}
        for row, item in enumerate(params):
            by_params.setdefault(item, []).append(row)
        for item, rows in by_params.items():
            gens = generators if shared else [generators[row] for row in rows]
            self._groups.append((item, None if len(rows) == self.batch else rows, gens))
        self._nq = {item: item.resolve_nq(n_vq) for item in by_params}
        self.nq = max(self._nq.values())
        self.row_nq = [self._nq[item] for item in params]
        penalties = [item.audio_repetition_penalty for item in params]
        self.tracks_repetition = any(p != 1.0 for p in penalties)
        self._penalties = penalties[0] if len(set(penalties)) == 1 else torch.tensor(penalties)[:, None]

    @property
    def groups(self) -> list:
        """(settings, rows or None for every row, generator(s)) per group of rows with equal settings."""
        return self._groups

    @classmethod
    def uniform(cls, params: SamplingParams, batch: int, generator: Optional[torch.Generator],
                n_vq: int) -> "RowSampler":
        """Every row with `params`, drawing from one `generator` (plain batched generation)."""
        return cls([params] * batch, generator, n_vq)

    def penalty(self, device: torch.device) -> Union[float, torch.Tensor]:
        """The repetition penalty: one float, or (B, 1) per-row values."""
        if isinstance(self._penalties, torch.Tensor):
            self._penalties = self._penalties.to(device)
        return self._penalties

    def uses(self, channel: int) -> Optional[list[bool]]:
        """Which rows generate codebook `channel`, or None when all of them do."""
        if all(n > channel for n in self.row_nq):
            return None
        return [n > channel for n in self.row_nq]

    def text(self, scores: torch.Tensor) -> torch.Tensor:
        """(B,) continue/audio_end choices from (B, 2) candidate logits (text settings)."""
        return self._select(scores, "text", None)

    def audio(self, scores: torch.Tensor, channel: int) -> torch.Tensor:
        """(B,) codes of codebook `channel` (audio settings); rows that skip the channel get 0."""
        return self._select(scores, "audio", channel)

    def _select(self, scores: torch.Tensor, kind: str, channel: Optional[int]) -> torch.Tensor:
        out = None
        for params, rows, gens in self._groups:
            if channel is not None and self._nq[params] <= channel:
                continue
            settings = dict(do_sample=params.do_sample, temperature=getattr(params, f"{kind}_temperature"),
                            top_k=getattr(params, f"{kind}_top_k"), top_p=getattr(params, f"{kind}_top_p"),
                            generator=gens)
            if rows is None:
                return select_tokens(scores, **settings)
            if out is None:
                out = torch.zeros(self.batch, dtype=torch.long, device=scores.device)
            index = torch.tensor(rows, device=scores.device)
            out[index] = select_tokens(scores.index_select(0, index), **settings)
        return out if out is not None else torch.zeros(self.batch, dtype=torch.long, device=scores.device)
