"""The GPT-2 style decoder used twice by MOSS-TTS-Nano: attention backends, blocks, the stack, a KV cache.

Checkpoint names are kept (`c_attn`, `c_proj`, `ln_1`, `ln_2`, `mlp.fc_in`, `mlp.fc_out`, `wte`, `h`, `ln_f`).
Attention backends share one signature and live in one table (`ATTENTION_FUNCTIONS`); the model resolves its kernels
once per (device, dtype) with `resolve_kernel_plan` (attention backends, the RoPE kernel of rotary.py, the linear
kernel) and passes the chosen ones down. Every backend takes queries/keys/values as (B, heads, T, head_dim) and
returns (B, T_q, heads * head_dim). With MOSS_TTS_CPU_FAST_PATHS=0 the CPU runs what accelerators run.
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
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

try:
    from .devices import (
        CPU_FAST_PATHS,
        cpu_fast_paths_enabled,
        cpu_kernel,
        is_flash_attn_usable,
        npu_fusion_attention_fn,
        npu_fusion_attention_problem,
    )
    from .rotary import (  # noqa: F401  (apply_rotary, rotate_pairs, rotate_real: re-exported for callers)
        RotaryEmbedding,
        Rotation,
        apply_rotary,
        choose_rotary_kernel,
        make_rotation,
        resolve_rotary_kernel,
        rotate_pairs,
        rotate_real,
    )
    from .npu_probes import fusion_attention_fits, fusion_attention_limits
    from .torch_compat import sdpa_mask
except ImportError:  # not part of a package: imported from the repository root or run as a script
    if __package__:  # inside a package (remote code): a real missing dependency, reported as itself
        raise
    from devices import (
        CPU_FAST_PATHS,
        cpu_fast_paths_enabled,
        cpu_kernel,
        is_flash_attn_usable,
        npu_fusion_attention_fn,
        npu_fusion_attention_problem,
    )
    from rotary import (  # noqa: F401
        RotaryEmbedding,
        Rotation,
        apply_rotary,
        choose_rotary_kernel,
        make_rotation,
        resolve_rotary_kernel,
        rotate_pairs,
        rotate_real,
    )
    from npu_probes import fusion_attention_fits, fusion_attention_limits
    from torch_compat import sdpa_mask

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
    _dropped: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def dropped(self, num_queries: int, num_keys: int, device: torch.device) -> Optional[torch.Tensor]:
        """The mask in the Ascend kernels' convention, True = masked out: (B, 1, T_q, T_k), or (T_q, T_k) when nothing
        is padded, or None when every key may be seen. Built once per mask (one forward shares it across layers)."""
        key = (num_queries, num_keys)
        if key not in self._dropped:
            allowed = _dense_or_causal(self, num_queries, num_keys, device)
            self._dropped[key] = None if allowed is None else ~allowed
        return self._dropped[key]

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
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask(allowed, q.dtype), scale=scale)
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
    """Ascend fused kernel `torch_npu.npu_fusion_attention` (BNSD layout, fp16/bf16 on Atlas A2/A3, shapes the installed
    release documents, see `npu_probes.fusion_attention_limits`; otherwise SDPA).

    The kernel's `atten_mask` marks positions to DROP (True = masked out), the opposite of SDPA: `mask.dropped` builds
    that once per forward. Why no `.contiguous()`: torch_npu hands the kernel views with their strides and storage
    offset (op_api's ConvertType -> aclCreateTensor), so the permuted queries and the KV-cache views go in as they are.
    """
    kernel = npu_fusion_attention_fn()
    # Shapes outside what the installed torch_npu documents (e.g. one-row decode steps where S must be a multiple of
    # 16) run SDPA: decided from the shape before the call, never by catching a kernel error.
    if q.dtype not in _HALF_DTYPES or kernel is None or not fusion_attention_fits(q, k):
        return sdpa_attention(q, k, v, mask, scale)
    dropped = mask.dropped(q.shape[2], k.shape[2], q.device)  # [B,1,Sq,Skv] or [Sq,Skv]: both documented shapes
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
    on an NPU the fused kernel (fp16/bf16 on an Atlas A2/A3 card, see `devices.npu_fusion_attention_problem`) else
    sdpa; elsewhere sdpa. The NPU kernel requested off an NPU, in float32 or on another card -> sdpa. Each kind of
    downgrade of an explicit request is logged once per process, with its reason.

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
    reason = _fused_attention_problem(device_type, dtype)
    if reason is None:
        return "npu_fusion_attention"
    key = (requested, device_type, dtype)
    if key not in _DOWNGRADES_LOGGED:
        _DOWNGRADES_LOGGED.add(key)
        logger.warning("attention %r is not available on %s with %s (%s); using 'sdpa' instead",
                       requested, device_type, str(dtype).split(".")[-1], reason)
    return "sdpa"


def _fused_attention_problem(device_type: str, dtype: torch.dtype) -> Optional[str]:
    """Why the NPU fused kernel cannot serve (device, dtype), or None when it can."""
    if device_type != "npu":
        return "the fused kernels need an NPU or, for flash_attention_2, a CUDA GPU with flash-attn"
    if dtype not in _HALF_DTYPES:
        return "the NPU fused kernel is used for float16/bfloat16 only"
    return npu_fusion_attention_problem()


_DOWNGRADES_LOGGED: set[tuple[str, str, torch.dtype]] = set()


@dataclass(frozen=True)
class KernelPlan:
    """The kernels a model runs on one (device, dtype), resolved once (`resolve_kernel_plan`) and cached by the model.

    Attributes:
        attention: (global, local) keys of `ATTENTION_FUNCTIONS`.
        rope: a key of `rotary.ROTARY_KERNELS`.
        linear: what `linear` runs: "split-matvec/onednn" or "split-matvec" (CPU fast paths) or "F.linear".
    """

    attention: tuple[str, str]
    rope: str
    linear: str
    reasons: dict[str, str] = field(default_factory=dict, compare=False)  # why each choice (reports; not compared)

    def describe(self) -> dict[str, str]:
        """Names for reports, CPU fast paths marked, e.g. {"attention": "sdpa/sdpa", "rope": "complex (cpu fast
        path)", "linear": "split-matvec/onednn (cpu fast path)"}."""
        fast = {kernel for kernel, _ in CPU_FAST_PATHS.values()} | {"split-matvec"}
        named = {"rope": self.rope, "linear": self.linear}
        return {"attention": "/".join(self.attention),
                **{kind: f"{name} (cpu fast path)" if name in fast else name for kind, name in named.items()}}


def resolve_kernel_plan(requested: tuple[str, str], device: torch.device | str, dtype: torch.dtype, num_heads: int,
                        head_dim: int) -> KernelPlan:
    """Resolve the attention backends `requested` (global, local), the RoPE kernel and the linear kernel for a model
    on (device, dtype) with `num_heads` heads of `head_dim`; see the three `resolve_*` functions."""
    attention = tuple(resolve_attention_implementation(name, device, dtype) for name in requested)
    rope, rope_reason = choose_rotary_kernel(device, num_heads, head_dim, dtype)
    return KernelPlan(attention=attention, rope=rope, linear=resolve_linear_kernel(device, dtype),
                      reasons={"rope": rope_reason, "attention": _attention_reason(requested, attention, device, dtype)})


def _attention_reason(requested: tuple[str, str], resolved: tuple[str, str], device: torch.device | str,
                      dtype: torch.dtype) -> str:
    """Why the attention backends are what they are, for reports (the fused NPU kernel names its shape limits)."""
    device_type = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    if "npu_fusion_attention" in resolved:
        limits = fusion_attention_limits()
        shapes = (f"query and key lengths multiples of {limits.sequence_multiple} up to {limits.max_sequence} "
                  "(other calls, such as one-row decode steps, run sdpa)" if limits.sequence_multiple > 1
                  else f"lengths up to {limits.max_sequence}, head_dim up to {limits.max_head_dim}")
        return f"requested {'/'.join(requested)}; fused for {shapes}, per the {limits.docs}"
    if resolved == requested:
        return f"requested {'/'.join(requested)}"
    problem = _fused_attention_problem(device_type, dtype) if "npu_fusion_attention" in requested else None
    return f"requested {'/'.join(requested)}" + (f"; sdpa because {problem}" if problem else "")


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
    quantized linear: activations are quantized per row with the row's own range (per-token dynamic quantization,
    7-bit range as fbgemm needs on AVX2 without VNNI), products accumulate in int32 and the output is float32. "float32" drops the copy. Change the weights
    (load_state_dict, in-place edits) only in float32, or set the precision again afterwards.
    """

    _packed: Any = None  # the packed int8 weight (without bias: `_int8_rows` adds it), None in float32
    _packed_rows: Any = None  # (that packed copy, the sums of its dequantized rows) for `_int8_rows`

    @property
    def weight_precision(self) -> str:
        return "float32" if self._packed is None else "int8"

    def set_weight_precision(self, precision: str) -> None:
        """Switch between the float32 weight ("float32") and a packed int8 copy ("int8").

        Raises:
            ValueError: for an unknown precision.
            RuntimeError: for "int8" when the weight is not a float32 CPU tensor, no int8 engine is available, or
                MOSS_TTS_CPU_FAST_PATHS=0.
        """
        if precision not in WEIGHT_PRECISIONS:
            raise ValueError(f"precision={precision!r} is not a known weight precision; valid: {WEIGHT_PRECISIONS}")
        self._packed_rows = None if precision == "float32" else _pack_int8_rows(self.weight)
        self._packed = None if self._packed_rows is None else self._packed_rows[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None:
            # Per-row (per-token) dynamic quantization in every mode, a lone row included: a row's int8 result
            # never depends on the rows beside it (fbgemm alone would quantize a product with one range).
            return self._int8_rows(x)
        return linear(x, self.weight, self.bias)

    def _int8_rows(self, x: torch.Tensor) -> torch.Tensor:
        """int8 products whose rows do not depend on each other (per-row dynamic activation quantization).

        Why: fbgemm quantizes the activations of a product with one range for all its rows, so a row's result would
        depend on its neighbours. Here each row is mapped onto [0, 1] by its own range first, and two pinned rows (0
        and 1) fix the product's range, so every row is quantized exactly as alone, with its own 7-bit range like
        the one-row product; W x = span * (W x') + low * (W 1) restores it (W as quantized).
        """
        if self._packed_rows is None:  # derived once, like the packed copy itself
            self._packed_rows = _pack_int8_rows(self.weight)
        packed, weight_sums = self._packed_rows
        flat = x.reshape(-1, x.shape[-1])
        low = flat.amin(dim=1, keepdim=True)
        span = (flat.amax(dim=1, keepdim=True) - low).clamp_min(torch.finfo(torch.float32).tiny)
        pins = torch.stack((flat.new_zeros(flat.shape[1]), flat.new_ones(flat.shape[1])))
        out = torch.ops.quantized.linear_dynamic(torch.cat(((flat - low) / span, pins)), packed, True)
        out = out[: flat.shape[0]] * span + low * weight_sums
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], out.shape[-1])

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> "PrecisionLinear":
        result = super()._apply(fn, *args, **kwargs)
        if self._packed is not None:
            # Why: the packed copy derives from a float32 CPU weight; rebuild it, or drop it when that no longer holds.
            if self.weight.device.type == "cpu" and self.weight.dtype == torch.float32:
                self._packed_rows = _pack_int8_rows(self.weight)
                self._packed = self._packed_rows[0]
            else:
                logger.warning("moving or casting a model in int8 weight precision switches it back to float32")
                self._packed = self._packed_rows = None
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
    the summation order inside a dot product can differ (relative ~1e-7). Inside `batched_products()`, products of
    two or more rows (and with row_invariant, of one row too) go through oneDNN (see there). Plain F.linear with
    MOSS_TTS_CPU_FAST_PATHS=0 (what accelerators run)."""
    if (torch.compiler.is_compiling() or x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32
            or not weight.is_contiguous() or not cpu_fast_paths_enabled()):
        return F.linear(x, weight, bias)
    batched = _BATCHED_PRODUCTS.get()
    if batched and (batched == "row-invariant" or x.numel() > x.shape[-1]) and not _needs_autograd(x, weight) \
            and row_invariant_limit():
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


_BATCHED_PRODUCTS: contextvars.ContextVar[str] = contextvars.ContextVar("moss_tts_batched_products", default="")


@contextlib.contextmanager
def batched_products(row_invariant: bool = True) -> Iterator[int]:
    """Products for batched decoding, where a few rows share each product (this thread only; the engine's steps).

    Float32 CPU products of two or more rows go through oneDNN: its GEMM reads the weights once for all rows and
    gives a row the same bits for every row count within a range (one kernel; `row_invariant_limit()` probes it
    once), while the split matvec and MKL's GEMM change a row's summation order with the row count. With
    `row_invariant`, one row too is padded to two, so a row's result never depends on how many rows share the
    product or where it sits: a request batched with others computes exactly what it computes alone. That costs a
    lone row: the split matvec reads the weights with every thread and is faster for one row (up to about twice on
    a CPU whose local-decoder weights stay in cache). Without it, one row takes the split matvec and only its
    last bits can differ from the same row beside others. int8 weights: with `row_invariant`, each row's
    activations are quantized with the row's own range (`PrecisionLinear._int8_rows`; integer sums, so exact).
    Other devices and dtypes run as usual: cuBLAS and the Ascend kernels pick kernels by shape, so there a row's
    low bits may depend on the batch.

    Yields:
        `row_invariant_limit()`: products of 2 up to that many rows keep a row's bits here (0: none).
    """
    token = _BATCHED_PRODUCTS.set("row-invariant" if row_invariant else "batched")
    try:
        yield row_invariant_limit()
    finally:
        _BATCHED_PRODUCTS.reset(token)


def row_invariant_products() -> contextlib.AbstractContextManager:
    """`batched_products(row_invariant=True)`: a row's result never depends on the other rows of its product."""
    return batched_products(row_invariant=True)


ROW_PROBE_MAX = 64


def row_invariant_limit() -> int:
    """The largest row count R such that oneDNN's float32 linear gives a row the same bits for every row count in
    2..R and every position (probed once up to ROW_PROBE_MAX rows on a released-size weight); 0 where oneDNN is
    unusable (see `onednn_linear_usable`), two rows already differ from three, or MOSS_TTS_CPU_FAST_PATHS=0 (plain
    F.linear, as on an accelerator).

    Why a limit: oneDNN switches kernels at a row count that depends on its version and the CPU (16 rows in
    torch 2.3.1's build on AVX-512; none up to 300 rows in torch 2.13's).
    """
    return _onednn_row_limit() if cpu_fast_paths_enabled() else 0


@functools.lru_cache(maxsize=None)
def _onednn_row_limit() -> int:
    if not onednn_linear_usable():
        return 0
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(768, 768, generator=generator)
    bias = torch.randn(768, generator=generator)
    rows = torch.randn(ROW_PROBE_MAX + 1, 768, generator=generator)
    reference = _onednn_rows(rows[:2], weight, bias)[0]
    for count in range(3, ROW_PROBE_MAX + 1):
        if not all(torch.equal(_onednn_rows(_placed(rows, count, position), weight, bias)[position], reference)
                   for position in (0, count // 2, count - 1)):
            if count == 3:
                logger.warning("oneDNN's float32 products depend on the row count on this CPU: batched requests may "
                               "differ from solo runs in their last bits")
            return count - 1 if count > 3 else 0
    return ROW_PROBE_MAX


def _placed(rows: torch.Tensor, count: int, position: int) -> torch.Tensor:
    probe = rows[1 : count + 1].clone()
    probe[position] = rows[0]
    return probe


def onednn_rows_invariant() -> bool:
    """Whether `row_invariant_products` makes products of at least 2..3 rows row-invariant here."""
    return row_invariant_limit() >= 3


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


def resolve_linear_kernel(device: Union[torch.device, str], dtype: torch.dtype) -> str:
    """What `linear` runs for a model on (device, dtype): "split-matvec/onednn" (or "split-matvec" where oneDNN is not
    used) for float32 on CPU with the fast paths on, else "F.linear"."""
    device_type = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    if device_type != "cpu" or dtype != torch.float32:
        return "F.linear"
    kernel = cpu_kernel("linear")
    return "split-matvec" if kernel == "split-matvec/onednn" and not onednn_linear_usable() else kernel


def _pack_int8(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Any:
    if cpu_kernel("int8_weights") is None:
        raise RuntimeError(
            "int8 weight precision is a CPU fast path and MOSS_TTS_CPU_FAST_PATHS=0 turns the CPU fast paths off "
            "(the CPU then runs what an accelerator runs); unset MOSS_TTS_CPU_FAST_PATHS or set it to 1 for int8"
        )
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        raise RuntimeError(
            f"int8 weight precision needs a float32 CPU model (weight is {weight.dtype} on {weight.device}); "
            "call model.to('cpu', torch.float32) first, or keep float32"
        )
    engines = torch.backends.quantized.supported_engines
    if not {"x86", "fbgemm"} & set(engines):
        raise RuntimeError(f"int8 weight precision needs torch's x86/fbgemm quantized engine; this build has {engines}")
    if torch.backends.quantized.engine not in ("x86", "fbgemm"):
        # Why here only: prepacking reads the process-wide engine, but a packed weight keeps its own kernel (a later
        # engine change does not affect `linear_dynamic` on it). So the switch happens when int8 is set up (or the
        # model is moved), never during generation, where it would race with other threads.
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


def _pack_int8_rows(weight: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """The packed int8 copy without bias and the sums of its dequantized rows (W 1), for `_int8_rows`."""
    packed = _pack_int8(weight, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        qweight, _ = torch.ops.quantized.linear_unpack(packed)
        return packed, qweight.dequantize().sum(dim=1)


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

    def forward(self, x: torch.Tensor, rope: Rotation, mask: AttentionMask, attend: AttentionFunction,
                cache: Optional[KVCache]) -> torch.Tensor:
        batch, length, _ = x.shape
        qkv = self.c_attn(x).view(batch, length, 3, self.num_heads, self.head_dim)
        q, k = rope(qkv[:, :, :2]).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, D)
        v = qkv[:, :, 2].transpose(1, 2)  # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        return self.c_proj(attend(q, k, v, mask, self.scale))

    def decode_one(self, x: torch.Tensor, rope: Rotation, mask: AttentionMask, attend: AttentionFunction,
                   cache: KVCache) -> torch.Tensor:
        """`forward` for one new row per batch item, x (B, H) -> (B, H): same operations, fewer of them."""
        batch, hidden = x.shape
        qkv = self.c_attn.forward(x)  # (B, 3H): q, k, v
        qk = rope(qkv[:, : 2 * hidden].view(batch, 1, 2, self.num_heads, self.head_dim))  # (B, 1, 2, heads, D)
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

    def forward(self, h: torch.Tensor, rope: Rotation, mask: AttentionMask, attend: AttentionFunction,
                cache: Optional[KVCache]) -> torch.Tensor:
        h = h + self.attn(self.ln_1(h), rope, mask, attend, cache)
        return h + self.mlp(self.ln_2(h))

    def decode_one(self, h: torch.Tensor, rope: Rotation, mask: AttentionMask, attend: AttentionFunction,
                   cache: KVCache) -> torch.Tensor:
        """`forward` for one new row per batch item, h (B, H); see `GPT2Decoder.forward`."""
        h = h + self.attn.decode_one(self.ln_1.forward(h), rope, mask, attend, cache)
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

    def forward(self, hidden: torch.Tensor, rope: Union[Rotation, tuple[torch.Tensor, torch.Tensor]],
                mask: AttentionMask, attend: AttentionFunction, cache: Optional[KVCache] = None,
                collect_hidden: bool = False) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, ...]]]:
        """Run the stack on `hidden` (B, T, H).

        Args:
            hidden: input embeddings.
            rope: the RoPE of the T new positions: a `Rotation` from `self.rotary.rotation` (the model passes the
                kernel it resolved for its device), or (cos, sin) from `self.rotary.angles` (rotated with the
                portable "real" kernel).
            mask: the attention mask (queries are the last T keys).
            attend: the attention backend.
            cache: when given, keys/values are appended to it and `cache.length` advances by T.
            collect_hidden: also return the hidden states (input, after each block but the last, after ln_f).

        Returns:
            (output after ln_f (B, T, H), the collected hidden states or None).
        """
        if not isinstance(rope, Rotation):
            rope = make_rotation("real", *rope, hidden.dtype)
        if isinstance(cache, KVCache) and hidden.shape[1] == 1 and not collect_hidden:
            return self._decode_one(hidden, rope, mask, attend, cache), None
        padded = None if mask.query_valid is None else ~mask.query_valid[..., None]  # (B, T, 1), once per forward
        hidden = _zero_padded(hidden, padded)
        collected = [hidden] if collect_hidden else None
        for block in self.h:
            hidden = _zero_padded(block(hidden, rope, mask, attend, cache), padded)
            if collected is not None:
                collected.append(hidden)
        if cache is not None:
            cache.length += hidden.shape[1]
        hidden = _zero_padded(self.ln_f(hidden), padded)
        if collected is not None:
            collected[-1] = hidden
        return hidden, (tuple(collected) if collected is not None else None)

    def _decode_one(self, hidden: torch.Tensor, rope: Rotation, mask: AttentionMask, attend: AttentionFunction,
                    cache: KVCache) -> torch.Tensor:
        """The generation step (one new row per batch item, with a cache): the general path's operations in the same
        order (same results), without its per-layer module calls and reshapes, which add several milliseconds per
        frame at one row per step. Module hooks of the blocks and their Linear/LayerNorm layers are not called."""
        batch, _, width = hidden.shape
        padded = None if mask.query_valid is None else ~mask.query_valid  # (B, 1)
        h = _zero_padded(hidden.view(batch, width), padded)
        for block in self.h:
            h = _zero_padded(block.decode_one(h, rope, mask, attend, cache), padded)
        cache.length += 1
        return _zero_padded(self.ln_f.forward(h), padded).view(batch, 1, width)


def _zero_padded(hidden: torch.Tensor, padded: Optional[torch.Tensor]) -> torch.Tensor:
    return hidden if padded is None else hidden.masked_fill(padded, 0.0)
