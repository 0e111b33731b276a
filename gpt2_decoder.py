"""The GPT-2 style decoder used twice by MOSS-TTS-Nano (global and local): blocks, the stack, and its kernel plan.

Checkpoint names are kept (`c_attn`, `c_proj`, `ln_1`, `ln_2`, `mlp.fc_in`, `mlp.fc_out`, `wte`, `h`, `ln_f`). The
model resolves its kernels once per (device, dtype) with `resolve_kernel_plan` (attention backends of attention.py,
the RoPE kernel of rotary.py, the linear kernel of linear_kernels.py) and passes the chosen ones down; caches are in
kv_cache.py. One forward serves prefill and the one-row generation step.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionFunction, AttentionMask, resolve_attention_implementation, fused_attention_problem
from .cpu_fast_paths import CPU_FAST_PATHS
from .kv_cache import KVCache
from .linear_kernels import PrecisionLinear, resolve_linear_kernel
from .npu_probes import fusion_attention_limits
from .rotary import RotaryEmbedding, Rotation, choose_rotary_kernel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelPlan:
    """The kernels a model runs on one (device, dtype), resolved once (`resolve_kernel_plan`) and cached by the model.

    Attributes:
        attention: (global, local) keys of `ATTENTION_FUNCTIONS`.
        rope: a key of `rotary.ROTARY_KERNELS`.
        linear: what the decoder Linear layers run: "split-matvec/onednn-packed", "split-matvec/onednn" or "split-matvec" (CPU fast paths),
            "F.linear", or "fbgemm" for int8 weights (the model sets it; see `set_weight_precision`).
    """

    attention: tuple[str, str]
    rope: str
    linear: str
    reasons: dict[str, str] = field(default_factory=dict, compare=False)  # why each choice (reports; not compared)

    def describe(self) -> dict[str, str]:
        """Names for reports, CPU fast paths marked, e.g. {"attention": "sdpa/sdpa", "rope": "complex (cpu fast
        path)", "linear": "split-matvec/onednn-packed (cpu fast path)"}."""
        fast = {kernel for kernel, _ in CPU_FAST_PATHS.values()} | {"split-matvec/onednn", "split-matvec"}
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
    problem = fused_attention_problem(device_type, dtype) if "npu_fusion_attention" in requested else None
    return f"requested {'/'.join(requested)}" + (f"; sdpa because {problem}" if problem else "")


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

    def forward(self, hidden: torch.Tensor, rope: Rotation,
                mask: AttentionMask, attend: AttentionFunction, cache: Optional[KVCache] = None,
                collect_hidden: bool = False) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, ...]]]:
        """Run the stack on `hidden` (B, T, H).

        Args:
            hidden: input embeddings.
            rope: the RoPE of the T new positions, from `self.rotary.rotation` (the model passes the kernel it
                resolved for its device).
            mask: the attention mask (queries are the last T keys).
            attend: the attention backend.
            cache: when given, keys/values are appended to it and `cache.length` advances by T.
            collect_hidden: also return the hidden states (input, after each block but the last, after ln_f).

        Returns:
            (output after ln_f (B, T, H), the collected hidden states or None).
        """
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


def _zero_padded(hidden: torch.Tensor, padded: Optional[torch.Tensor]) -> torch.Tensor:
    return hidden if padded is None else hidden.masked_fill(padded, 0.0)
