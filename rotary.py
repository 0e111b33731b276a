"""Rotary position embedding (interleaved pairs, docs/model.md, Weights) and its kernels, one table (`ROTARY_KERNELS`).

The pair (x[2j], x[2j+1]) turns by angle p * base^(-2j/D). Three interchangeable kernels: "complex" (a CPU fast path),
"real" (real-valued arithmetic, every device) and "npu_rotary_mul" (Ascend's fused kernel in interleave mode where
torch_npu and the card offer it). The model resolves one per device once (`resolve_rotary_kernel`) and prepares its
tables once per forward (`Rotation`), shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from .cpu_fast_paths import cpu_kernel
from .kernel_probes import npu_fused_kernel_problem, npu_rotary_mul_fn
from .npu_probes import probe_tensor_device, rotary_interleave_problem


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


def resolve_rotary_kernel(device: Union[torch.device, str], num_heads: int, head_dim: int,
                          dtype: torch.dtype = torch.float16) -> str:
    """The RoPE kernel for a device (see `choose_rotary_kernel`, which also says why)."""
    return choose_rotary_kernel(device, num_heads, head_dim, dtype)[0]


def choose_rotary_kernel(device: Union[torch.device, str], num_heads: int, head_dim: int,
                         dtype: torch.dtype = torch.float16) -> tuple[str, str]:
    """(kernel, why) for a model with `num_heads` heads of `head_dim` in `dtype` on `device`.

    "complex" on CPU (a fast path; "real" with MOSS_TTS_CPU_FAST_PATHS=0); "npu_rotary_mul" on an NPU where
    `kernel_probes.npu_rotary_mul_fn` finds the interleave mode, the shape fits its documented limits, JIT
    compilation is off and one tiny call matches the real-valued kernel (`npu_probes.rotary_interleave_problem`);
    "real" elsewhere.
    The model calls this once per (device, dtype) and caches the plan.
    """
    device_type = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    if device_type == "cpu":
        kernel = cpu_kernel("rope")
        return kernel, ("CPU fast path" if kernel == "complex" else "MOSS_TTS_CPU_FAST_PATHS=0: the accelerator path")
    if device_type != "npu":
        return "real", f"the portable kernel ({device_type} has no fused interleaved RoPE here)"
    problem = _npu_rotary_problem(device, num_heads, head_dim, dtype)
    return ("real", problem) if problem else ("npu_rotary_mul", "interleave mode: schema, SoC, jit_compile off and a "
                                                                "probe call matching the real-valued kernel")


def _npu_rotary_problem(device: Union[torch.device, str], num_heads: int, head_dim: int,
                        dtype: torch.dtype) -> Optional[str]:
    if not (2 * num_heads < _NPU_ROTARY_MAX_HEADS_TIMES_TWO and head_dim < _NPU_ROTARY_MAX_HEAD_DIM
            and head_dim % 2 == 0):
        return (f"{num_heads} heads of {head_dim} are outside the interleave mode's documented shapes "
                "(B*N < 1000 with N = 2 * heads, head_dim even and < 896)")
    if npu_rotary_mul_fn() is None:
        problem = npu_fused_kernel_problem()
        return problem or ("this torch_npu has no npu_rotary_mul with a rotary_mode argument (2.3.1-2.3.1.post4 and "
                           "2.4.0-2.4.0.post2 have only the rotate-half op)")
    tolerance = _PROBE_TOLERANCE.get(dtype, 1e-2)
    return rotary_interleave_problem(torch.npu, lambda: _probe_difference(device, num_heads, head_dim, dtype),
                                     tolerance)


# Largest |fused - real| accepted by the probe for inputs in [-1, 1): a few units in the last place of the dtype.
_PROBE_TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def _probe_difference(device: Union[torch.device, str], num_heads: int, head_dim: int, dtype: torch.dtype) -> float:
    """max |npu_rotary_mul - real| of one tiny rotation (B=1, T=3, the model's heads and head_dim) on `device`."""
    target = probe_tensor_device(device)
    generator = torch.Generator().manual_seed(0)
    qk = (torch.rand(1, 3, 2, num_heads, head_dim, generator=generator) * 2 - 1).to(target).to(dtype)
    embedding = RotaryEmbedding(head_dim, 10000.0)
    positions = torch.arange(5, 8, device=target)[None]  # (1, 3)
    with torch.no_grad():
        fused = embedding.rotation(positions, "npu_rotary_mul", dtype)(qk)
        real = embedding.rotation(positions, "real", dtype)(qk)
    return float((fused.cpu().float() - real.cpu().float()).abs().max())
