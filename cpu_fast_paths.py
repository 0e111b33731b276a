"""The CPU fast paths and their one switch, ``MOSS_TTS_CPU_FAST_PATHS`` (default on; 0 makes the CPU run what an
accelerator runs, so that code path can be tested on a CPU)."""

from __future__ import annotations

import functools
import os
from typing import Optional

CPU_FAST_PATHS_VARIABLE = "MOSS_TTS_CPU_FAST_PATHS"
# Every CPU fast path: (what the CPU runs by default, what it runs instead with MOSS_TTS_CPU_FAST_PATHS=0, which is
# what accelerators run). None: refused (int8 weights raise a RuntimeError that names the variable).
CPU_FAST_PATHS: dict[str, tuple[str, Optional[str]]] = {
    "rope": ("complex", "real"),  # rotary.rotate_pairs vs rotary.rotate_real
    "linear": ("split-matvec/onednn-packed", "F.linear"),  # linear_kernels.linear
    "int8_weights": ("fbgemm", None),  # linear_kernels.PrecisionLinear.set_weight_precision("int8")
}
_SWITCH_VALUES = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
                  "off": False}


@functools.cache
def cpu_fast_paths_enabled() -> bool:
    """Whether the CPU runs its fast paths (``MOSS_TTS_CPU_FAST_PATHS``, read once per process; default on).

    With ``MOSS_TTS_CPU_FAST_PATHS=0`` the CPU runs the operations an accelerator runs (real-valued RoPE, F.linear,
    no int8 weights), so the accelerator code path can be tested on a CPU. ``clear_caches()`` re-reads it.

    Raises:
        ValueError: the variable holds something other than 1/0 (true/false, yes/no, on/off).
    """
    value = os.environ.get(CPU_FAST_PATHS_VARIABLE, "").strip().lower() or "1"  # set but empty: the default
    if value not in _SWITCH_VALUES:
        raise ValueError(f"{CPU_FAST_PATHS_VARIABLE}={value!r} is not supported; use 1 (the CPU fast paths, the "
                         "default) or 0 (the operations an accelerator runs)")
    return _SWITCH_VALUES[value]


def cpu_kernel(kind: str) -> Optional[str]:
    """What the CPU runs for `kind` (a key of ``CPU_FAST_PATHS``) under the current ``MOSS_TTS_CPU_FAST_PATHS``."""
    fast, portable = CPU_FAST_PATHS[kind]
    return fast if cpu_fast_paths_enabled() else portable
