"""Rotary position embedding (interleaved pairs, TTS_SPEC §4) and its kernels, one table (`ROTARY_KERNELS`).

The pair (x[2j], x[2j+1]) turns by angle p * base^(-2j/D). Three interchangeable kernels: "complex" (a CPU fast path),
"real" (real-valued arithmetic, every device) and "npu_rotary_mul" (Ascend's fused kernel in interleave mode where
torch_npu and the card offer it). The model resolves one per device once (`resolve_rotary_kernel`) and prepares its
tables once per forward (`Rotation`), shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import torch

try:
    from .devices import cpu_kernel, npu_rotary_mul_fn
except ImportError:  # not part of a package: imported from the repository root or run as a script
    if __package__:  # inside a package (remote code): a real missing dependency, reported as itself
        raise
    from devices import cpu_kernel, npu_rotary_mul_fn


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

    def rotation(self, positions: torch.Tensor, kernel: str = "real", dtype: torch.dtype = torch.float32) -> "Rotation":
        """The RoPE of `positions` (B, T) for one forward, with `kernel`'s tables prepared (see `ROTARY_KERNELS`).

        Args:
            positions: integer positions (B, T) (B may be 1: broadcast over the batch).
            kernel: a key of `ROTARY_KERNELS` (`resolve_rotary_kernel` picks one per device).
            dtype: the model's dtype (the fused NPU kernel takes its tables in it; the others rotate in float32).

        Raises:
            ValueError: for an unknown kernel.
        """
        if kernel not in ROTARY_KERNELS:
            raise ValueError(f"kernel={kernel!r} is not a known RoPE kernel; valid: {tuple(ROTARY_KERNELS)}")
        return make_rotation(kernel, *self.angles(positions), dtype)


@dataclass(frozen=True)
class Rotation:
    """RoPE for one forward: a kernel and its tables, prepared once from (cos, sin) and shared by every layer.

    Calling it rotates q and k heads `qk` (B, T, 2, heads, D) (a view of the fused projection is fine) and returns a
    new (B, T, 2, heads, D) tensor in qk's dtype.
    """

    kernel: str
    rotate: Callable[..., torch.Tensor]
    tables: tuple[torch.Tensor, ...]

    def __call__(self, qk: torch.Tensor) -> torch.Tensor:
        return self.rotate(qk, *self.tables)


def make_rotation(kernel: str, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> Rotation:
    """`Rotation` of `kernel` from float32 (cos, sin) (B or 1, 1, T, D/2), as `RotaryEmbedding.angles` gives them."""
    prepare, rotate = ROTARY_KERNELS[kernel]
    return Rotation(kernel, rotate, prepare(cos.transpose(1, 2)[:, :, None], sin.transpose(1, 2)[:, :, None], dtype))


# Interleaved pairs, three ways; all give (x0 cos - x1 sin, x1 cos + x0 sin) for the pair (x[2j], x[2j+1]).
# `prepare` turns cos/sin (B, T, 1, 1, D/2) into a kernel's tables (once per forward); `rotate(qk, *tables)` runs
# per layer.


def _complex_tables(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor]:
    return (torch.complex(cos, sin),)  # (B, T, 1, 1, D/2) complex64


def rotate_pairs(x: torch.Tensor, turn: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs of x (.., D) by the unit complex numbers `turn` (broadcastable to (.., D/2)), in float32.

    Why complex (a CPU fast path only): a pair (x0, x1) read as x0 + i x1 times cos + i sin is (x0 cos - x1 sin) +
    i (x1 cos + x0 sin), the interleaved RoPE rotation, in one kernel instead of a handful; measured several times
    faster than the real-valued form on CPU. Accelerators avoid complex tensors (Ascend rejects or offloads them).
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    if pairs.stride(-1) != 1 or any(step % 2 for step in pairs.stride()[:-2]):
        pairs = pairs.contiguous()
    rotated = torch.view_as_real(torch.view_as_complex(pairs) * turn).flatten(-2)
    return rotated.to(x.dtype)


def _real_tables(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack((cos, cos), dim=-1), torch.stack((-sin, sin), dim=-1)  # each (B, T, 1, 1, D/2, 2)


def rotate_real(x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs of x (.., D) in float32 with real arithmetic: pairs * (cos, cos) + swapped pairs * (-sin, sin).

    `cos2`/`sin2` broadcast to (.., D/2, 2). The portable form: every device runs it (no complex dtype anywhere).
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # (.., D/2, 2)
    return (pairs * cos2 + pairs.flip(-1) * sin2).flatten(-2).to(x.dtype)


def _npu_tables(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """r1/r2 of `npu_rotary_mul`'s interleave mode: cos and sin each repeated for both members of a pair, as
    (1, B*T, 1, D) in the model's dtype (the layout 1S1D it requires for BSND input, batch folded into S)."""
    rows = cos.shape[0] * cos.shape[1]
    return tuple(torch.stack((t, t), dim=-1).reshape(1, rows, 1, -1).to(dtype) for t in (cos, sin))


def rotate_npu(qk: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """`torch_npu.npu_rotary_mul(x, r1, r2, rotary_mode="interleave")` on qk (B, T, 2, heads, D) as BSND with the
    batch folded into S: x (1, B*T, 2*heads, D), r1/r2 (1, B*T, 1, D) (the interleave mode takes only 1S1D tables
    for BSND and needs B*N < 1000; `resolve_rotary_kernel` checks 2*heads < 1000 and D)."""
    batch, length, _, heads, dim = qk.shape
    if r1.shape[1] != batch * length:  # tables prepared for a batch of 1 (shared positions): repeat them per row
        r1, r2 = (t.view(-1, length, dim).expand(batch, length, dim).reshape(1, batch * length, 1, dim)
                  for t in (r1, r2))
    x = qk.reshape(1, batch * length, 2 * heads, dim)
    return npu_rotary_mul_fn()(x, r1, r2, rotary_mode="interleave").view(batch, length, 2, heads, dim)


RotaryKernel = tuple[Callable[..., tuple[torch.Tensor, ...]], Callable[..., torch.Tensor]]
ROTARY_KERNELS: dict[str, RotaryKernel] = {
    "complex": (_complex_tables, rotate_pairs),  # CPU fast path
    "real": (_real_tables, rotate_real),  # every device
    "npu_rotary_mul": (_npu_tables, rotate_npu),  # Ascend A2/A3 with a torch_npu whose op has rotary_mode
}
_NPU_ROTARY_MAX_HEADS_TIMES_TWO = 1000  # interleave mode: B * N < 1000 (N = 2 * heads with B folded to 1)
_NPU_ROTARY_MAX_HEAD_DIM = 896  # interleave mode: D < 896 and even


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[2j], x[2j+1]) of x (B, H, T, D) by the angles behind cos/sin (.., T, D/2), in float32."""
    return rotate_real(x, torch.stack((cos, cos), dim=-1), torch.stack((-sin, sin), dim=-1))


def resolve_rotary_kernel(device: Union[torch.device, str], num_heads: int, head_dim: int) -> str:
    """The RoPE kernel for a device: "complex" on CPU (a fast path; "real" with MOSS_TTS_CPU_FAST_PATHS=0),
    "npu_rotary_mul" on an NPU where `devices.npu_rotary_mul_fn` finds the interleave mode and the shape fits it,
    "real" everywhere else."""
    device_type = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    if device_type == "cpu":
        return cpu_kernel("rope")
    fits = 2 * num_heads < _NPU_ROTARY_MAX_HEADS_TIMES_TWO and head_dim < _NPU_ROTARY_MAX_HEAD_DIM and head_dim % 2 == 0
    if device_type == "npu" and fits and npu_rotary_mul_fn() is not None:
        return "npu_rotary_mul"
    return "real"
