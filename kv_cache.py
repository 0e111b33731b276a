"""KV caches of the GPT-2 style decoders: `KVCache` (one batch, grows on demand) for `generate` and the local
decoder, and `SlotKVCache` (preallocated slots, packed views of several requests' rows) for the model runner."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .attention import AttentionFunction, AttentionMask

# ---------------------------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Preallocated keys (already rotated) and values per layer, (B, heads, capacity, head_dim), filled to `length`.

    `key_valid` (B, capacity) records which cached rows are real; `None` means "no padding anywhere" (the local
    decoder). `valid_count` (B,) counts real rows per batch item (the next position).
    """

    def __init__(self, num_layers: int, batch: int, heads: int, head_dim: int, capacity: int, *,
                 dtype: torch.dtype, device: torch.device, track_padding: bool = True) -> None:
        shape = (batch, heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.key_valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device) if track_padding else None
        self.valid_count = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def reset(self) -> None:
        self.length = 0
        self.valid_count.zero_()

    def reserve(self, extra: int) -> None:
        """Make room for `extra` more rows (grows by copying; generation preallocates and never grows)."""
        needed = self.length + extra
        if needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity)
        self.keys = [_grow(t, capacity, dim=2) for t in self.keys]
        self.values = [_grow(t, capacity, dim=2) for t in self.values]
        if self.key_valid is not None:
            self.key_valid = _grow(self.key_valid, capacity, dim=1)

    def extend_mask(self, new_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Record the padding mask (B, T) of the next T rows (call before running the layers on them).

        Returns:
            (key_valid of every row so far (B, length + T), positions of the new rows (B, T)).
        """
        self.reserve(new_valid.shape[1])
        end = self.length + new_valid.shape[1]
        self.key_valid[:, self.length : end] = new_valid
        positions = (self.valid_count[:, None] + new_valid.long().cumsum(-1) - 1).masked_fill(~new_valid, 0)
        self.valid_count += new_valid.sum(-1)
        return self.key_valid[:, :end], positions

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new rows of `layer` after the cached ones; return views of all rows so far."""
        end = self.length + key.shape[2]
        self.keys[layer][:, :, self.length : end] = key
        self.values[layer][:, :, self.length : end] = value
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions (B, T) from a padding mask (B, T): cumsum(mask) - 1, and 0 where the mask is False."""
    return (mask.long().cumsum(-1) - 1).masked_fill(~mask, 0)


def _grow(tensor: torch.Tensor, capacity: int, dim: int) -> torch.Tensor:
    shape = list(tensor.shape)
    shape[dim] = capacity
    grown = tensor.new_zeros(shape)
    grown.narrow(dim, 0, tensor.shape[dim]).copy_(tensor)
    return grown


@dataclass(frozen=True)
class Segment:
    """New rows of one slot in a packed forward: `length` rows at positions `start`.. of slot `slot`."""

    slot: int
    start: int
    length: int


def write_rows(keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
               key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Write one decode step's (B, heads, 1, D) key and value of one layer into slot buffers (slots, heads, capacity,
    D) at row b's slot `slots[b]` and position `positions[b]`, in place; returns the buffers."""
    keys[slots, :, positions] = key[:, :, 0]
    values[slots, :, positions] = value[:, :, 0]
    return keys, values


class SlotKVCache:
    """Keys (already rotated) and values of `slots` independent sequences, (slots, heads, capacity, head_dim) per layer.

    Each slot holds one sequence from position 0 and has its own length (`lengths`), so sequences join, grow and
    leave independently (the continuous-batching engine). A forward pass runs on packed rows: the new rows of several
    slots concatenated into one (1, N, H) sequence, described by `Segment`s (`packed`).
    """

    def __init__(self, num_layers: int, slots: int, heads: int, head_dim: int, capacity: int, *,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (slots, heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = [0] * slots

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def reserve(self, capacity: int) -> None:
        """Make every slot hold at least `capacity` rows (grows by copying; call between forward passes)."""
        if capacity > self.capacity:
            self.keys = [_grow(t, capacity, dim=2) for t in self.keys]
            self.values = [_grow(t, capacity, dim=2) for t in self.values]

    def release(self, slot: int) -> None:
        """Forget the sequence of `slot` (its rows are overwritten by the next one)."""
        self.lengths[slot] = 0

    def packed(self, segments: Sequence[Segment]) -> "PackedRows":
        """The cache view of one packed forward over `segments` (their rows in that order)."""
        for seg in segments:
            if seg.start != self.lengths[seg.slot] or seg.start + seg.length > self.capacity:
                raise ValueError(f"{seg} does not continue slot {seg.slot} (length {self.lengths[seg.slot]}) "
                                 f"within capacity {self.capacity}")
        return PackedRows(self, segments)


class PackedRows:
    """One packed forward's view of a `SlotKVCache`: `update` writes every segment's new keys/values into its slot,
    `attention` wraps a backend so that each segment attends to its own slot only, and `commit` advances the lengths.

    Why one backend call per segment: each call has the shapes of that sequence run alone (its queries, its keys, no
    padding mask), so a row's attention arithmetic never depends on what else is packed beside it.
    """

    def __init__(self, cache: SlotKVCache, segments: Sequence[Segment]) -> None:
        self.cache, self.segments = cache, list(segments)
        device = cache.keys[0].device
        self.slot_index = torch.tensor([s.slot for s in self.segments for _ in range(s.length)], device=device)
        self.positions = torch.cat([torch.arange(s.start, s.start + s.length) for s in self.segments]).to(device)
        bounds = [0]
        for seg in self.segments:
            bounds.append(bounds[-1] + seg.length)
        self.bounds = list(zip(bounds, bounds[1:]))
        self.length = 0  # GPT2Decoder.forward advances it; `commit` is what counts

    @property
    def last_rows(self) -> list[int]:
        """Index of each segment's last row in the packed sequence."""
        return [end - 1 for _, end in self.bounds]

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the packed rows' keys/values (1, heads, N, head_dim) into their slots; return the layer's buffers."""
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        keys[self.slot_index, :, self.positions] = key[0].transpose(0, 1)  # (N, heads, head_dim)
        values[self.slot_index, :, self.positions] = value[0].transpose(0, 1)
        return keys, values

    def attention(self, attend: AttentionFunction) -> AttentionFunction:
        """`attend` applied per segment: its queries against its slot's rows 0..start + length (causal)."""

        def packed_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: AttentionMask,
                             scale: float) -> torch.Tensor:
            outputs = []
            for seg, (first, last) in zip(self.segments, self.bounds):
                end = seg.start + seg.length
                k = keys[seg.slot : seg.slot + 1, :, :end]  # (1, heads, end, head_dim)
                v = values[seg.slot : seg.slot + 1, :, :end]
                outputs.append(attend(q[:, :, first:last], k, v, _UNPADDED, scale))  # (1, length, heads * head_dim)
            return torch.cat(outputs, dim=1)

        return packed_attention

    def commit(self) -> None:
        """Record the written rows (after the forward pass)."""
        for seg in self.segments:
            self.cache.lengths[seg.slot] = seg.start + seg.length


_UNPADDED = AttentionMask()

