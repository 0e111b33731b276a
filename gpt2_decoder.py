"""The GPT-2 style decoder used twice by MOSS-TTS-Nano: RoPE, attention backends, blocks, the stack, a KV cache.

Checkpoint names are kept (`c_attn`, `c_proj`, `ln_1`, `ln_2`, `mlp.fc_in`, `mlp.fc_out`, `wte`, `h`, `ln_f`).
Attention backends share one signature and live in one table (`ATTENTION_FUNCTIONS`); the model resolves a requested
name once per (device, dtype) with `resolve_attention_implementation` and passes the chosen function down.
Every backend takes queries/keys/values as (B, heads, T, head_dim) and returns (B, T_q, heads * head_dim).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import logging
import math
import platform
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

try:
    from .devices import is_flash_attn_usable, npu_fusion_attention_fn
except ImportError:  # not part of a package: imported from the repository root or run as a script
    if __package__:  # inside a package (remote code): a real missing dependency, reported as itself
        raise
    from devices import is_flash_attn_usable, npu_fusion_attention_fn

logger = logging.getLogger(__name__)

ATTENTION_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flash_attention_2", "npu_fusion_attention")
_HALF_DTYPES = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------------
# Attention masks


@dataclass(frozen=True)
class AttentionMask:
    """What every backend needs to know about which keys a query may see.

    `dense` is None for the common unpadded case: causal, aligned so that the last query sees every key (a single
    query sees all keys). Otherwise `dense` is (B, 1, T_q, T_k) bool, True = attend, already causal, with fully
    masked query rows opened up so no backend ever normalises over nothing (their outputs are zeroed later).
    `key_valid` (B, T_k) and `query_valid` (B, T_q) are the padding masks the varlen flash path unpads with.
    """

    dense: Optional[torch.Tensor] = None
    key_valid: Optional[torch.Tensor] = None
    query_valid: Optional[torch.Tensor] = None

    @functools.cached_property
    def varlen(self) -> dict[str, Any]:
        """Unpadding metadata for varlen kernels, computed once per forward (shared by all layers)."""
        q_lens = self.query_valid.sum(-1, dtype=torch.int32)
        k_lens = self.key_valid.sum(-1, dtype=torch.int32)
        return {
            "q_index": self.query_valid.reshape(-1).nonzero().squeeze(-1),
            "k_index": self.key_valid.reshape(-1).nonzero().squeeze(-1),
            "cu_seqlens_q": F.pad(q_lens.cumsum(0, dtype=torch.int32), (1, 0)),
            "cu_seqlens_k": F.pad(k_lens.cumsum(0, dtype=torch.int32), (1, 0)),
            # Upper bounds (the padded lengths) are valid and need no device-to-host copy.
            "max_seqlen_q": self.query_valid.shape[1],
            "max_seqlen_k": self.key_valid.shape[1],
        }


def build_attention_mask(key_valid: Optional[torch.Tensor], num_queries: int) -> AttentionMask:
    """Mask for the last `num_queries` of `key_valid.shape[1]` keys (queries are the newest keys).

    Args:
        key_valid: (B, T_k) bool, False on padding; None when nothing is padded.
        num_queries: T_q <= T_k.

    Returns:
        The mask (all fields None when `key_valid` is None).
    """
    if key_valid is None:
        return AttentionMask()
    num_keys = key_valid.shape[1]
    query_valid = key_valid[:, num_keys - num_queries :]  # (B, T_q)
    causal = _bottom_right_causal(num_queries, num_keys, key_valid.device)  # (T_q, T_k)
    dense = causal[None, None] & key_valid[:, None, None, :]  # (B, 1, T_q, T_k)
    # Why: a padded query would attend to nothing and softmax would give NaN; let it see every key instead.
    dense = dense | ~query_valid[:, None, :, None]
    return AttentionMask(dense=dense, key_valid=key_valid, query_valid=query_valid)


def _bottom_right_causal(num_queries: int, num_keys: int, device: torch.device) -> torch.Tensor:
    rows = torch.arange(num_queries, device=device)[:, None] + (num_keys - num_queries)
    return torch.arange(num_keys, device=device)[None, :] <= rows  # (T_q, T_k)


def _dense_or_causal(mask: AttentionMask, num_queries: int, num_keys: int, device: torch.device):
    """The boolean (.., T_q, T_k) mask a dense backend needs, or None when every key may be seen."""
    if mask.dense is not None:
        return mask.dense
    if num_queries == 1:
        return None
    return _bottom_right_causal(num_queries, num_keys, device)


def _merge_heads(out: torch.Tensor) -> torch.Tensor:
    batch, heads, num_queries, head_dim = out.shape
    return out.transpose(1, 2).reshape(batch, num_queries, heads * head_dim)  # (B, T_q, H * D)


# ---------------------------------------------------------------------------------------------------------------
# Attention backends (one signature)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, scale: float) -> torch.Tensor:
    """Reference attention: explicit scores, float32 softmax."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale  # (B, H, T_q, T_k)
    allowed = _dense_or_causal(mask, q.shape[2], k.shape[2], q.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return _merge_heads(torch.matmul(probs, v))


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, scale: float) -> torch.Tensor:
    """torch scaled_dot_product_attention with a boolean mask (Ascend's SDPA reaches its fused kernel only then)."""
    num_queries, num_keys = q.shape[2], k.shape[2]
    if mask.dense is None and num_queries == num_keys and num_queries > 1:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        allowed = _dense_or_causal(mask, num_queries, num_keys, q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    return _merge_heads(out)


def flash_attention_2(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, scale: float) -> torch.Tensor:
    """flash-attn 2 (CUDA, fp16/bf16): `flash_attn_func`, or `flash_attn_varlen_func` when keys are padded.

    Other dtypes fall back to SDPA. Padded queries get zero output (the model zeroes them anyway).
    """
    module = _flash_attn_module()
    if q.dtype not in _HALF_DTYPES or module is None:
        return sdpa_attention(q, k, v, mask, scale)
    q_, k_, v_ = (t.transpose(1, 2) for t in (q, k, v))  # (B, T, H, D)
    if mask.key_valid is None:
        out = module.flash_attn_func(q_, k_, v_, softmax_scale=scale, causal=True)  # (B, T_q, H, D)
        return out.reshape(q.shape[0], q.shape[2], -1)
    return _flash_varlen(module, q_, k_, v_, mask, scale)


def _flash_varlen(module: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, scale: float):
    batch, num_queries, heads, head_dim = q.shape
    meta = mask.varlen
    out = module.flash_attn_varlen_func(
        q.reshape(-1, heads, head_dim).index_select(0, meta["q_index"]),
        k.reshape(-1, heads, head_dim).index_select(0, meta["k_index"]),
        v.reshape(-1, heads, head_dim).index_select(0, meta["k_index"]),
        cu_seqlens_q=meta["cu_seqlens_q"],
        cu_seqlens_k=meta["cu_seqlens_k"],
        max_seqlen_q=meta["max_seqlen_q"],
        max_seqlen_k=meta["max_seqlen_k"],
        softmax_scale=scale,
        causal=True,
    )  # (total_q, H, D)
    full = out.new_zeros(batch * num_queries, heads, head_dim).index_copy_(0, meta["q_index"], out)
    return full.reshape(batch, num_queries, heads * head_dim)


def npu_fusion_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, scale: float) -> torch.Tensor:
    """Ascend fused kernel `torch_npu.npu_fusion_attention` (BNSD layout, fp16/bf16; others fall back to SDPA).

    Why the inversion: the kernel's `atten_mask` marks positions to DROP (True = masked out), the opposite of SDPA.
    """
    kernel = npu_fusion_attention_fn()
    if q.dtype not in _HALF_DTYPES or kernel is None:
        return sdpa_attention(q, k, v, mask, scale)
    allowed = _dense_or_causal(mask, q.shape[2], k.shape[2], q.device)
    dropped = None if allowed is None else ~allowed.expand(q.shape[0], 1, q.shape[2], k.shape[2])
    # Why contiguous: queries come from a permuted projection and keys/values are views into the KV cache.
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = kernel(
        q, k, v, q.shape[1], input_layout="BNSD", atten_mask=dropped, scale=scale, keep_prob=1.0, sparse_mode=0
    )[0]  # (B, H, T_q, D)
    return _merge_heads(out)


def _flash_attn_module() -> Any:
    try:
        return importlib.import_module("flash_attn")
    except ImportError:
        return None


AttentionFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMask, float], torch.Tensor]
ATTENTION_FUNCTIONS: dict[str, AttentionFunction] = {
    "eager": eager_attention,
    "sdpa": sdpa_attention,
    "flash_attention_2": flash_attention_2,
    "npu_fusion_attention": npu_fusion_attention,
}


def check_attention_name(name: Any, argument: str = "attn_implementation") -> str:
    """Return `name` if it is a known attention implementation.

    Raises:
        ValueError: naming `argument`, the value and the valid names.
    """
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"{argument}={name!r} is not a known attention implementation; valid: {ATTENTION_IMPLEMENTATIONS}")
    return name


def resolve_attention_implementation(requested: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """Map a requested attention implementation to the backend that runs on (device, dtype).

    "auto" -> sdpa everywhere. "flash_attention_2" -> flash-attn where usable (CUDA, fp16/bf16, package present);
    on an NPU the fused kernel (fp16/bf16 with torch_npu) else sdpa; elsewhere sdpa. The NPU kernel requested off an
    NPU (or in float32) -> sdpa. Each kind of downgrade of an explicit request is logged once per process.

    Args:
        requested: one of `ATTENTION_IMPLEMENTATIONS`.
        device: where the model runs.
        dtype: the model's floating dtype.

    Returns:
        A key of `ATTENTION_FUNCTIONS`.

    Raises:
        ValueError: for an unknown name.
    """
    check_attention_name(requested, "requested")
    # A string, so that "npu" can be named on machines where torch does not know that device type.
    device_type = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    if requested in ("eager", "sdpa"):
        return requested
    if requested == "auto":
        return "sdpa"
    if requested == "flash_attention_2" and is_flash_attn_usable(device, dtype):
        return requested
    if device_type == "npu" and dtype in _HALF_DTYPES and npu_fusion_attention_fn() is not None:
        return "npu_fusion_attention"
    key = (requested, device_type, dtype)
    if key not in _DOWNGRADES_LOGGED:
        _DOWNGRADES_LOGGED.add(key)
        logger.warning("attention %r is not available on %s with %s; using 'sdpa' instead",
                       requested, device_type, str(dtype).split(".")[-1])
    return "sdpa"


_DOWNGRADES_LOGGED: set[tuple[str, str, torch.dtype]] = set()


# ---------------------------------------------------------------------------------------------------------------
# Rotary position embedding (interleaved pairs)


class RotaryEmbedding:
    """Interleaved-pair RoPE. Frequencies are computed in float32 per device (never loaded, never a buffer)."""

    def __init__(self, head_dim: int, base: float) -> None:
        self.head_dim = head_dim
        self.base = float(base)
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        cached = self._inv_freq.get(device)
        if cached is None:
            exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
            cached = self._inv_freq[device] = 1.0 / (self.base**exponents)  # (D/2,)
        return cached

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for integer `positions` (B, T), shaped (B, 1, T, D/2) float32."""
        angles = positions.to(torch.float32)[:, None, :, None] * self.inv_freq(positions.device)
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[2j], x[2j+1]) of x (B, H, T, D) by the angles behind cos/sin (.., T, D/2), in float32."""
    return rotate_pairs(x, torch.complex(cos, sin))


def rotate_pairs(x: torch.Tensor, turn: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs of x (.., D) by the unit complex numbers `turn` (broadcastable to (.., D/2)), in float32.

    Why complex: a pair (x0, x1) read as x0 + i x1 times cos + i sin is (x0 cos - x1 sin) + i (x1 cos + x0 sin),
    the interleaved RoPE rotation, in one kernel instead of a handful (it matters at one token per step).
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    if pairs.stride(-1) != 1 or any(step % 2 for step in pairs.stride()[:-2]):
        pairs = pairs.contiguous()
    rotated = torch.view_as_real(torch.view_as_complex(pairs) * turn).flatten(-2)
    return rotated.to(x.dtype)


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


# ---------------------------------------------------------------------------------------------------------------
# Modules

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


def activation_function(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation called `name` (GPT-2 naming; "gelu_new" is the tanh approximation).

    Raises:
        ValueError: for an unsupported name.
    """
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation_function={name!r} is not supported; valid: {tuple(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


WEIGHT_PRECISIONS = ("float32", "int8")


class PrecisionLinear(nn.Linear):
    """nn.Linear that can run from a derived reduced-precision copy of its weight (opt-in, CPU, never saved).

    The parameters stay as they are (same names, dtype, ties, state_dict); "int8" adds a packed copy of the weight
    (per-output-channel symmetric int8, ~1/4 of the float32 bytes) used by `forward` through fbgemm's dynamic
    quantized linear: activations are quantized per call (per tensor, 7-bit range as fbgemm needs on AVX2 without
    VNNI), products accumulate in int32 and the output is float32. "float32" drops the copy. Change the weights
    (load_state_dict, in-place edits) only in float32, or set the precision again afterwards.
    """

    _packed: Any = None

    @property
    def weight_precision(self) -> str:
        return "float32" if self._packed is None else "int8"

    def set_weight_precision(self, precision: str) -> None:
        """Switch between the float32 weight ("float32") and a packed int8 copy ("int8").

        Raises:
            ValueError: for an unknown precision.
            RuntimeError: for "int8" when the weight is not a float32 CPU tensor or no int8 engine is available.
        """
        if precision not in WEIGHT_PRECISIONS:
            raise ValueError(f"precision={precision!r} is not a known weight precision; valid: {WEIGHT_PRECISIONS}")
        self._packed = None if precision == "float32" else _pack_int8(self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None:
            return torch.ops.quantized.linear_dynamic(x, self._packed, True)  # reduce_range: AVX2 int16 accumulation
        return linear(x, self.weight, self.bias)

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> "PrecisionLinear":
        result = super()._apply(fn, *args, **kwargs)
        if self._packed is not None:
            # Why: the packed copy derives from a float32 CPU weight; rebuild it, or drop it when that no longer holds.
            if self.weight.device.type == "cpu" and self.weight.dtype == torch.float32:
                self._packed = _pack_int8(self.weight, self.bias)
            else:
                logger.warning("moving or casting a model in int8 weight precision switches it back to float32")
                self._packed = None
        return result


# A decoding step multiplies a handful of rows by every weight: memory-bound matrix-vector products. On CPU,
# F.linear sends them to a single-threaded GEMV and to a poor small-GEMM path for 2-16 rows; the same product as a
# batched matmul over SPLIT_PARTS equal blocks of output rows runs the blocks on all threads, so a decoding step
# uses the whole memory bandwidth (figures: benchmarks/measured/ and README). Same float32 math per output, only
# the summation order inside a dot product can differ (relative ~1e-7). More rows (a prompt) are GEMMs: see `linear`.
SPLIT_MAX_ROWS = 16
SPLIT_PARTS = 4


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear, with two float32 CPU fast paths: `split_matvec_linear` for up to SPLIT_MAX_ROWS rows (a generation
    step) and oneDNN for more (a prompt: oneDNN's GEMM gets closer to the CPU's peak than F.linear's). Same math;
    the summation order inside a dot product can differ (relative ~1e-7). Inside `row_invariant_products()`, every
    float32 CPU product goes through oneDNN (see there)."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32
            or not weight.is_contiguous()):
        return F.linear(x, weight, bias)
    if _ROW_INVARIANT.get() and not _needs_autograd(x, weight) and onednn_rows_invariant():
        return _onednn_rows(x, weight, bias)
    if x.numel() <= SPLIT_MAX_ROWS * x.shape[-1]:
        if weight.shape[0] % SPLIT_PARTS == 0:
            return split_matvec_linear(x, weight, bias)
        return F.linear(x, weight, bias)
    if _needs_autograd(x, weight) or not onednn_linear_usable():
        return F.linear(x, weight, bias)  # Why: the oneDNN op has no backward
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, "none", [], "")
    return out.view(*x.shape[:-1], weight.shape[0])


def _needs_autograd(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)


@functools.lru_cache(maxsize=None)
def onednn_linear_usable() -> bool:
    """Whether oneDNN's float32 linear (`torch.ops.mkldnn._linear_pointwise`, which inductor uses) runs here.

    x86-64 only (where it was measured faster than F.linear), and only if it gives F.linear's result on a probe.
    """
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return False
    try:
        x, weight = torch.arange(40.0).view(5, 8) / 7, torch.arange(24.0).view(3, 8) / 5
        out = torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
        return bool(torch.allclose(out, F.linear(x, weight), rtol=1e-6, atol=1e-6))
    except (AttributeError, RuntimeError, TypeError):  # op missing or not built for this CPU
        return False


_ROW_INVARIANT: contextvars.ContextVar[bool] = contextvars.ContextVar("moss_tts_row_invariant", default=False)


@contextlib.contextmanager
def row_invariant_products() -> Iterator[bool]:
    """Make `linear` give each row the same bits whatever the other rows of the product are (this thread only).

    A row's result then depends only on that row, not on how many rows share the product or where it sits, so a
    request batched with others computes exactly what it computes alone (the continuous-batching engine runs its
    steps inside this). How: float32 CPU products go through oneDNN with at least two rows (one row is padded to
    two): oneDNN's GEMM gives every row of two or more the same bits (`onednn_rows_invariant` probes it once), while
    the split matvec and MKL's GEMM change a row's summation order with the row count. One-row products cost more
    this way (the split matvec reads the weights with every thread). Other devices and dtypes run F.linear as
    usual: cuBLAS and the Ascend kernels pick kernels by shape, so there a row's low bits may depend on the batch.

    Yields:
        whether products are row-invariant here (False where oneDNN is unusable or fails the probe).
    """
    token = _ROW_INVARIANT.set(True)
    try:
        yield onednn_rows_invariant()
    finally:
        _ROW_INVARIANT.reset(token)


@functools.lru_cache(maxsize=None)
def onednn_rows_invariant() -> bool:
    """Whether oneDNN's float32 linear gives a row the same bits for every row count >= 2 and every position (probed
    once on a released-size weight; x86-64 with oneDNN only, see `onednn_linear_usable`)."""
    if not onednn_linear_usable():
        return False
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(768, 768, generator=generator)
    bias = torch.randn(768, generator=generator)
    rows = torch.randn(24, 768, generator=generator)
    reference = _onednn_rows(rows[:2], weight, bias)[0]
    for count, position in ((3, 2), (5, 4), (8, 3), (17, 16), (24, 9)):
        probe = rows[1 : count + 1].clone()
        probe[position] = rows[0]
        if not torch.equal(_onednn_rows(probe, weight, bias)[position], reference):
            logger.warning("oneDNN's float32 products depend on the row count on this CPU: batched requests may "
                           "differ from solo runs in their last bits")
            return False
    return True


def _onednn_rows(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    rows = flat.shape[0]
    if rows == 1:
        flat = flat.expand(2, -1)  # why: oneDNN takes a one-row product down another path (a GEMV)
    out = torch.ops.mkldnn._linear_pointwise(flat.contiguous(), weight, bias, "none", [], "")
    return out[:rows].view(*x.shape[:-1], weight.shape[0])


def split_matvec_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """F.linear(x, weight, bias) for a few rows of x, as one batched matmul over SPLIT_PARTS blocks of weight rows."""
    out_features, in_features = weight.shape
    rows = x.numel() // in_features
    blocks = weight.view(SPLIT_PARTS, out_features // SPLIT_PARTS, in_features)
    columns = x.reshape(1, rows, in_features).transpose(1, 2).expand(SPLIT_PARTS, in_features, rows)
    if bias is None:
        out = torch.bmm(blocks, columns)
    else:
        out = torch.baddbmm(bias.view(SPLIT_PARTS, out_features // SPLIT_PARTS, 1), blocks, columns)
    out = out.view(out_features, rows)
    out = out.view(1, out_features) if rows == 1 else out.t().contiguous()
    return out.view(*x.shape[:-1], out_features)


def _pack_int8(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Any:
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        raise RuntimeError(
            f"int8 weight precision needs a float32 CPU model (weight is {weight.dtype} on {weight.device}); "
            "call model.to('cpu', torch.float32) first, or keep float32"
        )
    engines = torch.backends.quantized.supported_engines
    if not {"x86", "fbgemm"} & set(engines):
        raise RuntimeError(f"int8 weight precision needs torch's x86/fbgemm quantized engine; this build has {engines}")
    if torch.backends.quantized.engine not in ("x86", "fbgemm"):
        torch.backends.quantized.engine = "x86" if "x86" in engines else "fbgemm"
    with torch.no_grad(), warnings.catch_warnings():
        # Why: torch flags its quantized-tensor constructors as deprecated; they are still the only CPU int8 path
        # here that beats float32 (torchao's eager int8 CPU kernels measured slower than float32 on AVX2).
        warnings.simplefilter("ignore", UserWarning)
        w = weight.detach()
        scales = (w.abs().amax(dim=1).double() / 127.0).clamp_min(1e-12)  # (out,)
        zero_points = torch.zeros(w.shape[0], dtype=torch.long)
        qweight = torch.quantize_per_channel(w, scales, zero_points, 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.detach())


class Attention(nn.Module):
    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        hidden = config.n_embd
        self.num_heads = config.n_head
        self.head_dim = hidden // config.n_head
        self.c_attn = PrecisionLinear(hidden, 3 * hidden)  # rows: q, k, v; heads contiguous within each
        self.c_proj = PrecisionLinear(hidden, hidden)
        scale = 1.0 / math.sqrt(self.head_dim) if config.scale_attn_weights else 1.0
        self.scale = scale / (layer_idx + 1) if config.scale_attn_by_inverse_layer_idx else scale
        self.layer_idx = layer_idx

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: AttentionMask,
                attend: AttentionFunction, cache: Optional[KVCache]) -> torch.Tensor:
        batch, length, _ = x.shape
        qkv = self.c_attn(x).view(batch, length, 3, self.num_heads, self.head_dim)
        turn = torch.complex(*rope).transpose(1, 2).unsqueeze(2)  # (B, T, 1, 1, D/2)
        q, k = rotate_pairs(qkv[:, :, :2], turn).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, D)
        v = qkv[:, :, 2].transpose(1, 2)  # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        return self.c_proj(attend(q, k, v, mask, self.scale))

    def decode_one(self, x: torch.Tensor, turn: torch.Tensor, mask: AttentionMask, attend: AttentionFunction,
                   cache: KVCache) -> torch.Tensor:
        """`forward` for one new row per batch item, x (B, H) -> (B, H): same operations, fewer of them.

        `turn` is the RoPE rotation of the new position as unit complex numbers (B, 1, D/2).
        """
        batch, hidden = x.shape
        qkv = self.c_attn.forward(x)  # (B, 3H): q, k, v
        pairs = qkv[:, : 2 * hidden].float().view(batch, 2 * self.num_heads, self.head_dim // 2, 2)
        qk = torch.view_as_real(torch.view_as_complex(pairs) * turn).to(x.dtype)
        qk = qk.view(batch, 2 * self.num_heads, 1, self.head_dim)  # (B, 2 * heads, 1, D): q heads, then k heads
        v = qkv[:, 2 * hidden :].view(batch, self.num_heads, 1, self.head_dim)
        k, v = cache.update(self.layer_idx, qk[:, self.num_heads :], v)
        return self.c_proj.forward(attend(qk[:, : self.num_heads], k, v, mask, self.scale).view(batch, hidden))


class MLP(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        inner = config.n_inner if config.n_inner is not None else 4 * config.n_embd
        self.fc_in = PrecisionLinear(config.n_embd, inner)
        self.fc_out = PrecisionLinear(inner, config.n_embd)
        self.act = activation_function(config.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class Block(nn.Module):
    """Pre-LN block: h + c_proj(attn(ln_1(h))), then h + fc_out(act(fc_in(ln_2(h))))."""

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: AttentionMask,
                attend: AttentionFunction, cache: Optional[KVCache]) -> torch.Tensor:
        h = h + self.attn(self.ln_1(h), rope, mask, attend, cache)
        return h + self.mlp(self.ln_2(h))

    def decode_one(self, h: torch.Tensor, turn: torch.Tensor, mask: AttentionMask, attend: AttentionFunction,
                   cache: KVCache) -> torch.Tensor:
        """`forward` for one new row per batch item, h (B, H); see `GPT2Decoder.forward`."""
        h = h + self.attn.decode_one(self.ln_1.forward(h), turn, mask, attend, cache)
        mlp = self.mlp
        return h + mlp.fc_out.forward(mlp.act(mlp.fc_in.forward(self.ln_2.forward(h))))


class GPT2Decoder(nn.Module):
    """A stack of `num_layers` blocks and a final LayerNorm, optionally with a token embedding `wte`.

    Positions are RoPE only (no learned position table). Hidden states of padded query rows are forced to exactly
    zero after the input, after every block and after `ln_f`.
    """

    def __init__(self, config: Any, num_layers: int, with_token_embedding: bool = True) -> None:
        super().__init__()
        if with_token_embedding:
            self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.h = nn.ModuleList(Block(config, i) for i in range(num_layers))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.num_heads = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.rotary = RotaryEmbedding(self.head_dim, getattr(config, "rope_base", 10000.0))

    def new_cache(self, batch: int, capacity: int, *, dtype: torch.dtype, device: torch.device,
                  track_padding: bool = True) -> KVCache:
        return KVCache(len(self.h), batch, self.num_heads, self.head_dim, capacity,
                       dtype=dtype, device=device, track_padding=track_padding)

    def forward(self, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: AttentionMask,
                attend: AttentionFunction, cache: Optional[KVCache] = None,
                collect_hidden: bool = False) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, ...]]]:
        """Run the stack on `hidden` (B, T, H).

        Args:
            hidden: input embeddings.
            rope: (cos, sin) for the T new positions, from `self.rotary.angles`.
            mask: the attention mask (queries are the last T keys).
            attend: the attention backend.
            cache: when given, keys/values are appended to it and `cache.length` advances by T.
            collect_hidden: also return the hidden states (input, after each block but the last, after ln_f).

        Returns:
            (output after ln_f (B, T, H), the collected hidden states or None).
        """
        if isinstance(cache, KVCache) and hidden.shape[1] == 1 and not collect_hidden:
            return self._decode_one(hidden, rope, mask, attend, cache), None
        keep = None if mask.query_valid is None else mask.query_valid[..., None]  # (B, T, 1)
        hidden = _zero_padded(hidden, keep)
        collected = [hidden] if collect_hidden else None
        for block in self.h:
            hidden = _zero_padded(block(hidden, rope, mask, attend, cache), keep)
            if collected is not None:
                collected.append(hidden)
        if cache is not None:
            cache.length += hidden.shape[1]
        hidden = _zero_padded(self.ln_f(hidden), keep)
        if collected is not None:
            collected[-1] = hidden
        return hidden, (tuple(collected) if collected is not None else None)

    def _decode_one(self, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: AttentionMask,
                    attend: AttentionFunction, cache: KVCache) -> torch.Tensor:
        """The generation step (one new row per batch item, with a cache): the general path's operations in the same
        order (same results), without its per-layer module calls and reshapes, which add several milliseconds per
        frame at one row per step. Module hooks of the blocks and their Linear/LayerNorm layers are not called."""
        batch, _, width = hidden.shape
        turn = torch.complex(*rope)  # (B or 1, 1, 1, D/2)
        turn = turn.view(turn.shape[0], 1, -1)  # (B or 1, 1, D/2)
        keep = mask.query_valid  # (B, 1) or None
        h = _zero_padded(hidden.view(batch, width), keep)
        for block in self.h:
            h = _zero_padded(block.decode_one(h, turn, mask, attend, cache), keep)
        cache.length += 1
        return _zero_padded(self.ln_f.forward(h), keep).view(batch, 1, width)


def _zero_padded(hidden: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    return hidden if keep is None else hidden.masked_fill(~keep, 0.0)
