"""Codec stages: patch (un)folding, RoPE, windowed causal attention and the projected transformer.

Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` with boolean masks (True = may attend)
on every device. A query at position i sees keys j with ``0 <= i - j < context`` (exactly ``context`` keys).

Streaming keeps, per transformer stage, one key/value buffer per layer laid out chronologically: the cached window
of ``context`` tokens is followed by room for the new chunk, so attention reads one contiguous slice that holds the
same keys in the same order as upstream's ``cat([cache, new])`` without reallocating or copying the cache every
step; entries no slot has filled yet are left out of the slice. The window slides through a buffer twice the context
long and is compacted back to the start only when it reaches the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention, ``(B,H,Lq,Dh)`` x ``(B,H,Lk,Dh)`` with a boolean ``(B|1,1,Lq,Lk)`` mask."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# Why "flash_attention_2" maps to SDPA: flash-attn's sliding window admits one key more than the released
# model's `i - j < context` rule and needs fp16/bf16; SDPA with the exact boolean mask is correct everywhere.
ATTENTION_FUNCTIONS = {"sdpa": sdpa_attention, "flash_attention_2": sdpa_attention}

MIN_QUERY_BLOCK = 128  # smallest one-shot query block: smaller ones add SDPA calls without saving work


def patch_fold(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Encoder patching ``(B,D,L) -> (B,D*h,L/h)`` with ``y[b, c*h + j, t] = x[b, c, t*h + j]``."""
    batch, channels, length = x.shape
    x = x.reshape(batch, channels, length // patch_size, patch_size)  # (B, D, L/h, h)
    return x.transpose(2, 3).reshape(batch, channels * patch_size, length // patch_size)


def patch_unfold(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Decoder un-patching ``(B,D*h,L) -> (B,D,L*h)``, the exact inverse of ``patch_fold``."""
    batch, channels, length = x.shape
    x = x.reshape(batch, channels // patch_size, patch_size, length)  # (B, D, h, L)
    return x.transpose(2, 3).reshape(batch, channels // patch_size, length * patch_size)


class PatchedPretransform(nn.Module):
    """Parameter-free patching: folds time into channels in the encoder, unfolds it in the decoder."""

    def __init__(self, patch_size: int, upsample: bool) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.upsample = upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return patch_unfold(x, self.patch_size) if self.upsample else patch_fold(x, self.patch_size)

    def map_lengths(self, lengths: list[int]) -> list[int]:
        """Valid lengths after this module (floor on the encoder side, as upstream)."""
        if self.upsample:
            return [n * self.patch_size for n in lengths]
        return [n // self.patch_size for n in lengths]


def rope_inverse_frequencies(head_dim: int, max_period: float, device: torch.device) -> torch.Tensor:
    """``exp(i * kappa)`` for ``i < head_dim / 2``, kappa = -2 ln(max_period) / head_dim rounded to fp32."""
    kappa = -2.0 * math.log(max_period) / head_dim
    return torch.exp(torch.arange(head_dim // 2, dtype=torch.float32, device=device) * kappa)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Angles for fp32 ``positions (..., L)``; returns cos/sin shaped ``(..., L, 1, 1, Dh/2)``."""
    theta = positions.unsqueeze(-1) * inv_freq  # (..., L, Dh/2)
    return theta.cos()[..., None, None, :], theta.sin()[..., None, None, :]


def apply_rope(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``qk (B,L,2,H,Dh)`` in fp32 and cast back (one fp32 op per product and sum)."""
    pairs = qk.float().unflatten(-1, (-1, 2))  # (B, L, 2, H, Dh/2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)
    return rotated.flatten(-2).to(qk.dtype)


@dataclass
class StepGate:
    """Which streaming rows advance their state this step (``rows is None``: all of them)."""

    rows: tuple[bool, ...] | None = None
    active: torch.Tensor | None = None  # (S,) int64 1/0, on the state device
    idle_index: torch.Tensor | None = None  # (n_idle,) int64 slots whose state must not change

    @property
    def all_idle(self) -> bool:
        return self.rows is not None and not any(self.rows)

    @classmethod
    def from_rows(cls, rows: list[bool] | tuple[bool, ...] | None, device: torch.device) -> "StepGate":
        if rows is None or all(rows):
            return cls()
        rows = tuple(bool(r) for r in rows)
        active = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
        idle = torch.tensor([i for i, r in enumerate(rows) if not r], dtype=torch.int64).to(device, non_blocking=True)
        return cls(rows, active, idle)


class WindowPlan:
    """One-shot attention over a whole sequence: causal window, key padding and select-zeroing of padded queries."""

    def __init__(self, length: int, context: int, lengths: torch.Tensor | None, device: torch.device) -> None:
        self.context = context
        self.lengths = lengths  # (B,) int64 on device, or None when no row is padded
        self.blocks = self._blocks(length, context)
        shared: dict[tuple[int, int, int], torch.Tensor] = {}
        self.masks = [self._mask(qs, qe, ks, device, shared) for qs, qe, ks in self.blocks]
        self.query_valid = None
        if lengths is not None:
            self.query_valid = (torch.arange(length, device=device) < lengths[:, None])[:, None, :, None]

    @staticmethod
    def _blocks(length: int, context: int) -> list[tuple[int, int, int]]:
        # Why blocks: one L x L mask makes SDPA score every key, but a query only sees the `context` keys before it.
        # Query blocks of an eighth of the context (at least MIN_QUERY_BLOCK rows) score at most block - 1 keys too
        # many per query: for the released decoder's last stage (3200 tokens, context 1600) 0.4x the attention work.
        block = max(MIN_QUERY_BLOCK, -(-context // 8))
        if length <= block:
            return [(0, length, 0)]
        return [(qs, min(qs + block, length), max(0, qs - context + 1)) for qs in range(0, length, block)]

    def _mask(self, qs: int, qe: int, ks: int, device: torch.device, shared: dict) -> torch.Tensor:
        key = (qe - qs, qe - ks, qs - ks)  # the window part depends only on the block's shape and key offset
        if key not in shared:
            delta = torch.arange(qs - ks, qe - ks, device=device)[:, None] - torch.arange(qe - ks, device=device)
            shared[key] = (delta >= 0) & (delta < self.context)  # (Lq, Lk)
        mask = shared[key]
        if self.lengths is None:
            return mask[None, None]
        keys_valid = torch.arange(ks, qe, device=device)[None, :] < self.lengths[:, None]  # (B, Lk)
        return (mask[None] & keys_valid[:, None, :])[:, None]  # (B, 1, Lq, Lk)

    def attend(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention) -> torch.Tensor:
        if len(self.blocks) == 1:
            out = attention(q, k, v, self.masks[0])
        else:
            out = torch.cat([attention(q[:, :, qs:qe], k[:, :, ks:qe], v[:, :, ks:qe], mask)
                             for (qs, qe, ks), mask in zip(self.blocks, self.masks)], dim=2)
        if self.query_valid is not None:
            # A padded query row may be fully masked (SDPA gives NaN there): select, never multiply, to zero it.
            out = torch.where(self.query_valid, out, 0.0)
        return out


class StageStreamState:
    """Streaming state of one transformer stage: per-slot token offsets and one sliding K/V buffer per layer."""

    def __init__(self, num_slots: int, context: int, num_layers: int, device: torch.device) -> None:
        self.num_slots = num_slots
        self.context = context
        self.device = device
        self.offsets = torch.zeros(num_slots, dtype=torch.int64, device=device)
        self.cached = [0] * num_slots  # host copy of min(offset, context): filled cache entries per slot
        self.buffers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.chunk_capacity = 0  # W: the largest chunk the buffers hold after the window
        self.start = 0  # buffer index of the oldest cached position
        self.gate = StepGate()
        self._static_masks: dict[int, torch.Tensor] = {}
        self._key_index: dict[int, torch.Tensor] = {}

    @property
    def capacity(self) -> int:
        return 2 * self.context + self.chunk_capacity

    def begin_step(self, chunk: int, inv_freq: torch.Tensor | None) -> "StreamStep":
        """Make room for ``chunk`` new tokens and build the step's mask and RoPE angles."""
        if chunk > self.chunk_capacity:
            self._grow(chunk)
        elif self.start + self.context + chunk > self.capacity:
            self._compact()
        # Why skip: cache entries no slot has filled yet are masked for every query; leaving them out of the
        # attention saves up to a whole context of keys per query until the window is full.
        skip = self.context - max(self.cached)
        mask = self._static_mask(chunk)[None, None]  # (1, 1, Lc, ctx + Lc): every slot's window is full
        if min(self.cached) < self.context:
            valid = self.offsets.clamp(max=self.context)  # cached positions per slot
            dynamic = self._keys(chunk)[None, :] >= (self.context - valid)[:, None]  # (S, ctx + Lc)
            mask = (mask[0] & dynamic[:, None, :])[:, None]  # (S, 1, Lc, ctx + Lc)
        cos = sin = None
        if inv_freq is not None:
            positions = (self.offsets[:, None] + self._keys(chunk)[:chunk]).float()  # (S, Lc)
            cos, sin = rope_cos_sin(positions, inv_freq)
        return StreamStep(self, chunk, skip, mask[..., skip:], cos, sin)

    def _keys(self, chunk: int) -> torch.Tensor:
        if chunk not in self._key_index:
            self._key_index[chunk] = torch.arange(self.context + chunk, device=self.device)
        return self._key_index[chunk]

    def _static_mask(self, chunk: int) -> torch.Tensor:
        if chunk not in self._static_masks:
            t = torch.arange(chunk, device=self.device)[:, None]
            j = torch.arange(self.context, device=self.device)[None, :]
            cached = j > t  # cache entry j holds position offset - ctx + j: allowed iff t + ctx - j < ctx
            delta = t - torch.arange(chunk, device=self.device)[None, :]
            new = (delta >= 0) & (delta < self.context)
            self._static_masks[chunk] = torch.cat((cached, new), dim=1)  # (Lc, ctx + Lc)
        return self._static_masks[chunk]

    def _grow(self, chunk: int) -> None:
        old, start = self.buffers, self.start
        self.chunk_capacity, self.start = chunk, 0
        self.buffers = [None] * len(old)
        for index, pair in enumerate(old):
            if pair is None:
                continue
            new_pair = tuple(self._allocate(buf.shape[1], buf.shape[3], buf.dtype) for buf in pair)
            for new, buf in zip(new_pair, pair):
                new[:, :, : self.context].copy_(buf[:, :, start : start + self.context])
            self.buffers[index] = new_pair

    def _compact(self) -> None:
        # start >= context here, so the source and destination windows never overlap.
        for pair in self.buffers:
            for buf in pair or ():
                buf[:, :, : self.context].copy_(buf[:, :, self.start : self.start + self.context])
        self.start = 0

    def _allocate(self, heads: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
        shape = (self.num_slots, heads, self.capacity, head_dim)
        if self.num_slots == 1:
            # Why not zeros: with one slot, every attention window starts at the slot's oldest written entry (see
            # `skip` in `begin_step`), so unwritten entries are never read; skipping the fill of these buffers
            # (about 51 MB for the released decoder) shortens the wait for the first decoded frame.
            return torch.empty(shape, dtype=dtype, device=self.device)
        # Several slots: a slot with a shorter history reads masked, unwritten entries, which must be finite.
        return torch.zeros(shape, dtype=dtype, device=self.device)

    def layer_buffers(self, index: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's (K, V) buffers ``(S, H, capacity, Dh)``, allocated on first use with ``like``'s dtype."""
        pair = self.buffers[index]
        if pair is None:
            heads, head_dim = like.shape[1], like.shape[3]
            pair = (self._allocate(heads, head_dim, like.dtype), self._allocate(heads, head_dim, like.dtype))
            self.buffers[index] = pair
        return pair

    def end_step(self, chunk: int) -> None:
        """Slide the window by ``chunk`` for active slots; idle slots keep their window and offset."""
        gate = self.gate
        if gate.all_idle:
            return
        if gate.idle_index is not None:
            src = slice(self.start, self.start + self.context)
            dst = slice(self.start + chunk, self.start + chunk + self.context)
            for pair in self.buffers:
                for buf in pair or ():
                    kept = buf[:, :, src].index_select(0, gate.idle_index)
                    buf[:, :, dst].index_copy_(0, gate.idle_index, kept)
            self.offsets.add_(gate.active * chunk)
        else:
            self.offsets.add_(chunk)
        rows = gate.rows or (True,) * self.num_slots
        self.cached = [min(n + chunk, self.context) if r else n for n, r in zip(self.cached, rows)]
        self.start += chunk

    def reset_slot(self, slot: int) -> None:
        """Forget everything slot ``slot`` has seen."""
        self.offsets[slot] = 0
        self.cached[slot] = 0
        for pair in self.buffers:
            for buf in pair or ():
                buf[slot].zero_()


@dataclass
class StreamStep:
    """One streaming step of a stage: the shared mask and angles, and where each layer's new keys go."""

    state: StageStreamState
    chunk: int
    skip: int  # leading window entries that no slot has filled (left out of the attention)
    mask: torch.Tensor
    cos: torch.Tensor | None
    sin: torch.Tensor | None

    def attend(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention) -> torch.Tensor:
        state = self.state
        k_buf, v_buf = state.layer_buffers(layer_index, k)
        window = slice(state.start + self.skip, state.start + state.context + self.chunk)
        new = slice(state.start + state.context, state.start + state.context + self.chunk)
        k_buf[:, :, new].copy_(k)
        v_buf[:, :, new].copy_(v)
        # `.to` is a no-op unless compute_dtype changed while streaming (the buffers keep their first dtype).
        return attention(q, k_buf[:, :, window].to(q.dtype), v_buf[:, :, window].to(q.dtype), self.mask)


class MultiheadAttention(nn.Module):
    """Fused-projection self-attention with interleaved RoPE on q and k (no biases)."""

    def __init__(self, d_model: int, num_heads: int, layer_index: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.layer_index = layer_index
        self.attention_implementation = "sdpa"
        self.in_proj = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, plan, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.in_proj(x).view(batch, length, 3, self.num_heads, self.head_dim)  # (B, L, 3, H, Dh)
        qk = qkv[:, :, :2] if cos is None else apply_rope(qkv[:, :, :2], cos, sin)  # (B, L, 2, H, Dh)
        q, k = qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2)  # (B, H, L, Dh)
        v = qkv[:, :, 2].transpose(1, 2)
        out = plan.attend(self.layer_index, q, k, v, ATTENTION_FUNCTIONS[self.attention_implementation])
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class LayerScale(nn.Module):
    """Per-channel residual-branch scale (channel-last)."""

    def __init__(self, channels: int, init: float) -> None:
        super().__init__()
        self.init_value = float(init)
        self.scale = nn.Parameter(torch.full((channels,), self.init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class TransformerLayer(nn.Module):
    """Pre-norm layer: ``y = x + s1 * Attn(LN1(x)); out = y + s2 * FFN(LN2(y))`` with an exact-erf GELU FFN."""

    def __init__(self, entry: dict, layer_index: int) -> None:
        super().__init__()
        d_model, scale = entry["d_model"], entry.get("layer_scale")
        self.self_attn = MultiheadAttention(d_model, entry["num_heads"], layer_index)
        self.norm1 = nn.LayerNorm(d_model, eps=1e-5)
        self.norm2 = nn.LayerNorm(d_model, eps=1e-5)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, entry["dim_feedforward"], bias=False),
            nn.GELU(),
            nn.Linear(entry["dim_feedforward"], d_model, bias=False),
        )
        self.layer_scale_1 = LayerScale(d_model, scale) if scale is not None else nn.Identity()
        self.layer_scale_2 = LayerScale(d_model, scale) if scale is not None else nn.Identity()

    def forward(self, x: torch.Tensor, plan, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
        x = x + self.layer_scale_1(self.self_attn(self.norm1(x), plan, cos, sin))
        return x + self.layer_scale_2(self.ffn(self.norm2(x)))


class _LayerStack(nn.Module):
    def __init__(self, entry: dict) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(entry, i) for i in range(entry["num_layers"]))


class ProjectedTransformer(nn.Module):
    """``(B,Cin,L) -> input_proj -> layers -> output_proj -> (B,Cout,L)``, one-shot or streaming."""

    def __init__(self, entry: dict, context: int) -> None:
        super().__init__()
        self.context = context
        self.head_dim = entry["d_model"] // entry["num_heads"]
        self.max_period = entry["max_period"]
        self.use_rope = entry["positional_embedding"] == "rope"
        self.input_proj = nn.Linear(entry["input_dimension"], entry["d_model"], bias=False)
        self.transformer = _LayerStack(entry)
        self.output_proj = nn.Linear(entry["d_model"], entry["output_dimension"], bias=False)
        self.stream_state: StageStreamState | None = None
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    @property
    def num_layers(self) -> int:
        return len(self.transformer.layers)

    def inverse_frequencies(self, device: torch.device) -> torch.Tensor | None:
        """RoPE frequencies on ``device``, computed on first use (no buffer, so nothing to load or corrupt)."""
        if not self.use_rope:
            return None
        if device not in self._inv_freq:
            with torch.inference_mode(False):  # a normal tensor: the cache outlives the inference_mode call
                self._inv_freq[device] = rope_inverse_frequencies(self.head_dim, self.max_period, device)
        return self._inv_freq[device]

    def start_streaming(self, num_slots: int, device: torch.device) -> None:
        self.stream_state = StageStreamState(num_slots, self.context, self.num_layers, device)

    def stop_streaming(self) -> None:
        self.stream_state = None

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Run the stage. ``lengths (B,)`` marks padding in one-shot mode; it is ignored while streaming."""
        # The cast matters only for reduced-precision parameters without autocast (e.g. loaded with dtype=bf16).
        hidden = self.input_proj(x.transpose(1, 2).to(self.input_proj.weight.dtype))  # (B, L, d_model)
        length, device = hidden.shape[1], hidden.device
        inv_freq = self.inverse_frequencies(device)
        state = self.stream_state
        if state is not None:
            plan = state.begin_step(length, inv_freq)
            cos, sin = plan.cos, plan.sin
        else:
            plan = WindowPlan(length, self.context, lengths, device)
            cos = sin = None
            if inv_freq is not None:
                cos, sin = rope_cos_sin(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
        for layer in self.transformer.layers:
            hidden = layer(hidden, plan, cos, sin)
        if state is not None:
            state.end_step(length)
        return self.output_proj(hidden).transpose(1, 2)
