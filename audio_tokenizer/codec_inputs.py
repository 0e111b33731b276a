"""Validation and batching of codec inputs (waveforms, code matrices, quantizer counts, chunk plans)."""

from __future__ import annotations

from typing import Sequence

import torch


def as_tensor(value, name: str) -> torch.Tensor:
    """Accept a tensor or an array-like; raise ValueError naming ``name`` otherwise."""
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{name} must be a tensor or array, got {type(value).__name__}") from error


def check_waveform(wav, index: int, channels: int) -> torch.Tensor:
    """Return item ``index`` of a waveform list as ``(channels, T)`` (mono also accepts ``(T,)``).

    Raises:
        ValueError: wrong rank or channel count, no samples, a non-float dtype, or NaN/Inf samples.
    """
    name = f"wav_list[{index}]"
    wav = as_tensor(wav, name)
    if not (wav.is_floating_point()):
        raise ValueError(f"{name} has dtype {wav.dtype}; waveforms must be floating point in [-1, 1]")
    if wav.dim() == 1 and channels == 1:
        wav = wav[None]
    if wav.dim() != 2 or wav.shape[0] != channels:
        expected = "(channels, T)" + (" or (T,)" if channels == 1 else "")
        raise ValueError(f"{name} has shape {tuple(wav.shape)}; expected {expected} with channels={channels}")
    if wav.shape[1] == 0:
        raise ValueError(f"{name} is empty (0 samples); pass at least one sample per channel")
    if not bool(torch.isfinite(wav).all()):
        raise ValueError(f"{name} contains NaN or Inf samples")
    return wav


def check_num_quantizers(num_quantizers, available: int, name: str = "num_quantizers") -> int:
    """Resolve ``num_quantizers`` (None -> ``available``); ValueError outside ``1..available``."""
    if num_quantizers is None:
        return available
    if isinstance(num_quantizers, torch.Tensor) and num_quantizers.numel() == 1:
        num_quantizers = int(num_quantizers)
    if isinstance(num_quantizers, bool) or not isinstance(num_quantizers, int) or not 1 <= num_quantizers <= available:
        raise ValueError(f"{name}={num_quantizers!r} must be an integer in 1..{available}")
    return num_quantizers


def check_codes(codes, name: str, codebook_size: int, max_quantizers: int) -> torch.Tensor:
    """Validate one ``(nq, N)`` code matrix: integer dtype, 1..max_quantizers rows, values in ``[0, size)``.

    Raises:
        ValueError: naming ``name`` and the offending property.
    """
    codes = as_tensor(codes, name)
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"{name} has dtype {codes.dtype}; codes must be integers")
    if codes.dim() != 2:
        raise ValueError(f"{name} has shape {tuple(codes.shape)}; expected (num_quantizers, frames)")
    if not 1 <= codes.shape[0] <= max_quantizers:
        raise ValueError(f"{name} has {codes.shape[0]} quantizer rows; expected 1..{max_quantizers}")
    if codes.numel():
        low, high = torch.stack((codes.min(), codes.max())).tolist()  # one host sync
        if low < 0 or high >= codebook_size:
            raise ValueError(f"{name} holds codes in [{low}, {high}]; valid codes are in [0, {codebook_size})")
    return codes.long()


def resolve_code_rows(codes_list: Sequence, num_quantizers, codebook_size: int, max_quantizers: int,
                      name: str = "codes_list") -> tuple[list[torch.Tensor], int]:
    """Validate a list of ``(nq_i, N_i)`` codes and cut every item to the quantizers used.

    Returns:
        (items as int64 ``(nq, N_i)``, nq).

    Raises:
        ValueError: empty list, bad items, unequal ``nq_i`` without ``num_quantizers``, or too few rows.
    """
    if isinstance(codes_list, torch.Tensor) or not isinstance(codes_list, (list, tuple)) or not codes_list:
        raise ValueError(f"{name} must be a non-empty list of (num_quantizers, frames) code tensors")
    items = [check_codes(c, f"{name}[{i}]", codebook_size, max_quantizers) for i, c in enumerate(codes_list)]
    counts = [item.shape[0] for item in items]
    if num_quantizers is None:
        if len(set(counts)) != 1:
            raise ValueError(f"{name} items have different quantizer counts {counts}; pass num_quantizers")
        return items, counts[0]
    nq = check_num_quantizers(num_quantizers, max_quantizers)
    if min(counts) < nq:
        raise ValueError(f"num_quantizers={nq} but {name} items have {counts} quantizer rows")
    return [item[:nq] for item in items], nq


def pad_right(items: Sequence[torch.Tensor], length: int | None = None) -> torch.Tensor:
    """Stack ``(..., T_i)`` tensors along a new dim 0, zero-padding the last dim to ``length`` (default max)."""
    length = max(item.shape[-1] for item in items) if length is None else length
    out = items[0].new_zeros((len(items),) + tuple(items[0].shape[:-1]) + (length,))
    for index, item in enumerate(items):
        out[index, ..., : item.shape[-1]] = item
    return out


def chunk_size(chunk_duration, sampling_rate: int, frame_samples: int) -> int:
    """Samples per chunk for ``chunk_duration`` seconds; ValueError unless a positive multiple of a frame."""
    if isinstance(chunk_duration, bool) or not isinstance(chunk_duration, (int, float)):
        raise ValueError(f"chunk_duration={chunk_duration!r} must be a number of seconds or None")
    samples = round(chunk_duration * sampling_rate)
    if samples <= 0 or samples % frame_samples:
        raise ValueError(
            f"chunk_duration={chunk_duration!r} gives {samples} samples; it must be a positive multiple of "
            f"{frame_samples} samples ({frame_samples / sampling_rate} s)"
        )
    return samples


def plan_chunk_steps(lengths: Sequence[int], chunk: int, align: int) -> list[tuple[int, tuple[bool, ...]]]:
    """Steps ``(size, active rows)`` covering every row (upstream's chunk schedule).

    A full chunk for the rows that have one; otherwise the shortest remainder rounded down to ``align`` for the rows
    that have that much; otherwise the shortest tail for the rows whose remainder equals it.
    """
    remaining, steps = list(lengths), []
    while any(r > 0 for r in remaining):
        if any(r >= chunk for r in remaining):
            size, active = chunk, tuple(r >= chunk for r in remaining)
        else:
            shortest = min(r for r in remaining if r > 0)
            size = shortest // align * align
            if size > 0:
                active = tuple(r >= size for r in remaining)
            else:
                size, active = shortest, tuple(r == shortest for r in remaining)
        steps.append((size, active))
        remaining = [r - size if a else r for r, a in zip(remaining, active)]
    return steps
