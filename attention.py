"""Attention for the GPT-2 style decoders: masks, the backends (one signature, one table `ATTENTION_FUNCTIONS`) and
the choice of a backend for a (device, dtype).

Every backend takes queries/keys/values as (B, heads, T, head_dim) and returns (B, T_q, heads * head_dim).
"""

from __future__ import annotations

import functools
import importlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from .kernel_probes import is_flash_attn_usable, npu_fusion_attention_fn, npu_fusion_attention_problem
from .npu_probes import fusion_attention_fits
from .torch_compat import sdpa_mask

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
    on an NPU the fused kernel (fp16/bf16 on an Atlas A2/A3 card, see `kernel_probes.npu_fusion_attention_problem`)
    else sdpa; elsewhere sdpa. The NPU kernel requested off an NPU, in float32 or on another card -> sdpa. Each kind
    of downgrade of an explicit request is logged once per process, with its reason.

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
    reason = fused_attention_problem(device_type, dtype)
    if reason is None:
        return "npu_fusion_attention"
    key = (requested, device_type, dtype)
    if key not in _DOWNGRADES_LOGGED:
        _DOWNGRADES_LOGGED.add(key)
        logger.warning("attention %r is not available on %s with %s (%s); using 'sdpa' instead",
                       requested, device_type, str(dtype).split(".")[-1], reason)
    return "sdpa"


def fused_attention_problem(device_type: str, dtype: torch.dtype) -> Optional[str]:
    """Why the NPU fused kernel cannot serve (device, dtype), or None when it can."""
    if device_type != "npu":
        return "the fused kernels need an NPU or, for flash_attention_2, a CUDA GPU with flash-attn"
    if dtype not in _HALF_DTYPES:
        return "the NPU fused kernel is used for float16/bfloat16 only"
    return npu_fusion_attention_problem()


_DOWNGRADES_LOGGED: set[tuple[str, str, torch.dtype]] = set()
