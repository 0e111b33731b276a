"""Device policy: which device to run on, its default dtype, and how to ask it about memory, sync and seeds.

One ordered preference (``DEVICE_PREFERENCE``: npu > cuda > cpu) and one small table row per device type
(``_BACKENDS``). Importing this module never imports torch_npu or flash_attn and never touches a device:
availability probes import optional packages lazily through ``importlib`` and are cached (``clear_caches()``
resets them). ``torch.npu`` / ``torch.cuda`` are looked up when a function runs, not at import.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import logging
import math
import os
import platform
import random
import re
import sys
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from . import npu_probes
from .torch_compat import OutOfMemoryError, cuda_bf16_supported

logger = logging.getLogger(__name__)

DEVICE_PREFERENCE = ("npu", "cuda", "cpu")
DeviceLike = Union[str, torch.device, None]
DtypeLike = Union[str, torch.dtype, None]

# Recommended Ascend runtime settings (spec §7); applied only on request and only where the user left them unset.
NPU_ENVIRONMENT_DEFAULTS = {"PYTORCH_NPU_ALLOC_CONF": "expandable_segments:True", "TASK_QUEUE_ENABLE": "1"}

_ALLOWED_DEVICES = '"auto", "npu", "npu:N", "cuda", "cuda:N", "cpu" or a torch.device of type npu, cuda or cpu'
_DEVICE_PATTERN = re.compile(r"(npu|cuda|cpu)(?::(\d+))?")
_DTYPE_ALIASES = {
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}
_ALLOWED_DTYPES = '"auto", "float16"/"fp16", "bfloat16"/"bf16", "float32"/"fp32" or the matching torch.dtype'
_VISIBLE_DEVICES_VARIABLE = {"npu": "ASCEND_RT_VISIBLE_DEVICES", "cuda": "CUDA_VISIBLE_DEVICES"}


@dataclass(frozen=True)
class _Availability:
    count: int  # visible devices of this type (0 when unusable)
    problem: Optional[str] = None  # why the type is unusable and what to do; None when usable


@dataclass(frozen=True)
class _DeviceOps:
    """Everything the rest of this module needs to know about one device type (device index as argument)."""

    availability: Callable[[], _Availability]
    default_dtype: Callable[[], torch.dtype]
    free_memory: Callable[[int], Optional[int]]
    total_memory: Callable[[int], Optional[int]]
    synchronize: Callable[[int], None]
    seed: Callable[[int], None]
    reset_peak: Callable[[int], None]
    peak: Callable[[int], Optional[int]]
    fallback_attention: str  # attention backend of the float32 stability retry


# ---------------------------------------------------------------------------------------------------------------
# Availability probes (cached)


@functools.cache
def _torch_npu_import() -> tuple[Any, Optional[str]]:
    """Import torch_npu once: ``(module, None)`` on success, ``(None, problem)`` otherwise."""
    try:
        return importlib.import_module("torch_npu"), None
    except ModuleNotFoundError as exc:
        if exc.name == "torch_npu":
            return None, (
                f"torch_npu is not installed: pip install torch-npu matching your torch version "
                f"(torch {torch.__version__}) and install the Ascend CANN toolkit"
            )
        failure: BaseException = exc
    # Why broad: a vendor extension can fail to load with anything (OSError for a missing libascendcl.so,
    # RuntimeError for a version mismatch, AttributeError for an ABI break); all of them mean "unusable".
    except Exception as exc:  # noqa: BLE001
        failure = exc
    return None, (
        f"torch_npu is installed but failed to import ({type(failure).__name__}: {failure}): source the CANN "
        f"environment first (`source /usr/local/Ascend/ascend-toolkit/set_env.sh`) and install the torch_npu "
        f"release built for torch {torch.__version__}; if `import torch` itself breaks, set "
        f"TORCH_DEVICE_BACKEND_AUTOLOAD=0"
    )


def _visible_hint(kind: str) -> str:
    variable = _VISIBLE_DEVICES_VARIABLE[kind]
    value = os.environ.get(variable)
    return f"{variable}={value!r}" if value is not None else f"{variable} is unset"


@functools.cache
def _npu_availability() -> _Availability:
    _, problem = _torch_npu_import()
    if problem is not None:
        return _Availability(0, problem)
    npu = getattr(torch, "npu", None)
    if npu is None:
        return _Availability(0, (
            f"torch_npu imported but did not register torch.npu: install the torch_npu release built for "
            f"torch {torch.__version__}"
        ))
    count = int(npu.device_count()) if npu.is_available() else 0
    if count == 0:
        return _Availability(0, (
            f"no NPU is visible (torch.npu.is_available() is False): check the driver with `npu-smi info` and "
            f"ASCEND_RT_VISIBLE_DEVICES ({_visible_hint('npu')})"
        ))
    return _Availability(count)


@functools.cache
def _cuda_availability() -> _Availability:
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return _Availability(0, (
            f"this torch build ({torch.__version__}) is CPU-only: install a CUDA build of torch "
            f"(e.g. the default PyPI wheel)"
        ))
    count = int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    if count == 0:
        return _Availability(0, (
            f"no CUDA GPU is visible (torch.cuda.is_available() is False): check the driver with `nvidia-smi` "
            f"and CUDA_VISIBLE_DEVICES ({_visible_hint('cuda')})"
        ))
    return _Availability(count)


@functools.cache
def _flash_attn_importable() -> bool:
    try:
        if importlib.util.find_spec("flash_attn") is None:
            return False
        importlib.import_module("flash_attn")
    # Why broad: a flash_attn wheel built for another torch/CUDA fails with ImportError, OSError or RuntimeError.
    except Exception as exc:  # noqa: BLE001
        logger.warning("flash_attn is installed but failed to import (%s: %s); it will not be used",
                       type(exc).__name__, exc)
        return False
    return True


def clear_caches() -> None:
    """Forget every cached probe (torch_npu import, NPU/CUDA availability, the NPU's SoC, flash_attn, the CPU
    fast-path setting), e.g. between tests."""
    for probe in (_torch_npu_import, _npu_availability, _cuda_availability, _flash_attn_importable, _npu_soc,
                  npu_fusion_attention_fn, npu_rotary_mul_fn, cpu_fast_paths_enabled):
        probe.cache_clear()
    npu_probes.clear_caches()


# ---------------------------------------------------------------------------------------------------------------
# Per-device tables


def _module(kind: str) -> Any:
    """``torch.npu`` / ``torch.cuda`` looked up now; RuntimeError with the remedy when the type is unusable."""
    problem = _BACKENDS[kind].availability().problem
    if problem is not None:
        raise RuntimeError(f"{kind} is not usable: {problem}")
    return getattr(torch, kind)


def _cuda_default_dtype() -> torch.dtype:
    return torch.bfloat16 if cuda_bf16_supported(_module("cuda")) else torch.float16


def _npu_free_memory(index: int) -> int:
    npu = _module("npu")
    mem_get_info = getattr(npu, "mem_get_info", None)
    if mem_get_info is not None:
        return int(mem_get_info(index)[0])
    # Why: older torch_npu has no mem_get_info. Total minus what this process's caching allocator holds is the
    # most it can still get (other processes' use is invisible here). Never memory_stats()["allocated_bytes..."]:
    # that is memory in use, the opposite quantity (the seed document's bug).
    total = int(npu.get_device_properties(index).total_memory)
    if hasattr(npu, "memory_reserved"):
        reserved = int(npu.memory_reserved(index))
    else:
        reserved = int(npu.memory_stats(index).get("reserved_bytes.all.current", 0))
    return max(0, total - reserved)


def _accelerator_ops(kind: str, availability: Callable[[], _Availability],
                     default_dtype: Callable[[], torch.dtype],
                     free_memory: Callable[[int], Optional[int]]) -> _DeviceOps:
    """torch_npu mirrors the torch.cuda API, so both accelerators share everything except the first three."""
    return _DeviceOps(
        availability=availability,
        default_dtype=default_dtype,
        free_memory=free_memory,
        total_memory=lambda index: int(_module(kind).get_device_properties(index).total_memory),
        synchronize=lambda index: _module(kind).synchronize(index),
        seed=lambda seed: _module(kind).manual_seed_all(seed),
        reset_peak=lambda index: _module(kind).reset_peak_memory_stats(index),
        peak=lambda index: int(_module(kind).max_memory_allocated(index)),
        fallback_attention="sdpa",
    )


def _physical_memory_bytes() -> Optional[int]:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # not POSIX or the names are unknown
        return None


def _process_peak_rss_bytes() -> Optional[int]:
    try:
        resource = importlib.import_module("resource")  # POSIX only
    except ImportError:
        return None
    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


_BACKENDS: dict[str, _DeviceOps] = {
    "npu": _accelerator_ops("npu", _npu_availability, lambda: torch.float16, _npu_free_memory),
    "cuda": _accelerator_ops("cuda", _cuda_availability, _cuda_default_dtype,
                             lambda index: int(_module("cuda").mem_get_info(index)[0])),
    "cpu": _DeviceOps(
        availability=lambda: _Availability(1),
        default_dtype=lambda: torch.float32,
        free_memory=lambda index: None,  # unknown: callers treat None as "no memory-based batching"
        total_memory=lambda index: _physical_memory_bytes(),
        synchronize=lambda index: None,
        seed=lambda seed: None,  # torch.manual_seed already seeds the CPU generator
        reset_peak=lambda index: None,  # ru_maxrss is a process-lifetime peak and cannot be reset
        peak=lambda index: _process_peak_rss_bytes(),
        # Why: eager is the reference implementation and the CPU has no fused kernel worth keeping.
        fallback_attention="eager",
    ),
}


# ---------------------------------------------------------------------------------------------------------------
# Resolving devices and dtypes


def _parse_device(device: DeviceLike) -> tuple[str, Optional[int]]:
    """(type, index or None) of an explicit device; ValueError for anything outside the table."""
    match = _DEVICE_PATTERN.fullmatch(device.strip().lower()) if isinstance(device, str) else None
    if isinstance(device, torch.device):
        kind, index = device.type, device.index
    elif match is not None:
        kind, index = match.group(1), None if match.group(2) is None else int(match.group(2))
    else:
        raise ValueError(f"device={device!r} is not supported; use {_ALLOWED_DEVICES}")
    if kind not in _BACKENDS or (kind == "cpu" and index not in (None, 0)):
        raise ValueError(f"device={device!r} is not supported; use {_ALLOWED_DEVICES}")
    return kind, index


def _target(device: DeviceLike) -> tuple[_DeviceOps, int]:
    """Table row and concrete index of a device (an unindexed accelerator means its current device)."""
    kind, index = _parse_device(device)
    if kind == "cpu":
        return _BACKENDS[kind], 0
    if index is None:
        index = int(_module(kind).current_device())
    return _BACKENDS[kind], index


def _auto_device() -> torch.device:
    skipped = []
    for kind in DEVICE_PREFERENCE:
        problem = _BACKENDS[kind].availability().problem
        if problem is None:
            device = torch.device("cpu") if kind == "cpu" else torch.device(kind, _target(kind)[1])
            logger.info("device='auto' picked %s%s", device, "".join(f"; {reason}" for reason in skipped))
            return device
        skipped.append(f"not {kind}: {problem}")
    raise AssertionError("the CPU is always available")


def resolve_device(device: DeviceLike = "auto") -> torch.device:
    """Turn a device request into a concrete ``torch.device``.

    Args:
        device: ``"auto"`` or None (first usable of npu > cuda > cpu, logged with the reasons), or an explicit
            ``"npu"``, ``"npu:N"``, ``"cuda"``, ``"cuda:N"``, ``"cpu"`` or ``torch.device``. Explicit requests
            never fall back.

    Returns:
        The device, with an index for accelerators (the current device when none was given).

    Raises:
        ValueError: ``device`` is not one of the forms above.
        RuntimeError: an explicit device is unusable; the message names the cause and the remedy.
    """
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return _auto_device()
    kind, index = _parse_device(device)
    availability = _BACKENDS[kind].availability()
    if availability.problem is not None:
        raise RuntimeError(f"device={device!r} was requested but {availability.problem}")
    if kind == "cpu":
        return torch.device("cpu")
    if index is not None and index >= availability.count:
        raise RuntimeError(
            f"device={device!r} was requested but only {availability.count} {kind} device(s) are visible "
            f"({kind}:0 to {kind}:{availability.count - 1}); pick one of those or change "
            f"{_VISIBLE_DEVICES_VARIABLE[kind]} ({_visible_hint(kind)})"
        )
    return torch.device(kind, _target(device)[1])


def default_dtype(device: DeviceLike) -> torch.dtype:
    """Default compute dtype: npu float16, cuda bfloat16 where supported else float16, cpu float32.

    Raises:
        ValueError: unsupported ``device``.
        RuntimeError: CUDA is asked about but unusable.
    """
    return _BACKENDS[_parse_device(device)[0]].default_dtype()


def _parse_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in _DTYPE_ALIASES.values():
        return dtype
    if isinstance(dtype, str):
        resolved = _DTYPE_ALIASES.get(dtype.strip().lower().removeprefix("torch."))
        if resolved is not None:
            return resolved
    raise ValueError(f"dtype={dtype!r} is not supported; use {_ALLOWED_DTYPES}")


def resolve_dtype(dtype: DtypeLike, device: DeviceLike) -> torch.dtype:
    """Turn a dtype request into a ``torch.dtype`` for ``device``.

    Args:
        dtype: ``"auto"``/None (``default_dtype(device)``), a name or alias (float16/fp16, bfloat16/bf16,
            float32/fp32) or one of those torch dtypes. float16 on CPU is allowed but logs a warning.
        device: the device the dtype is for.

    Returns:
        The dtype.

    Raises:
        ValueError: unsupported ``dtype`` or ``device``, or bfloat16 on an NPU that lacks it (Atlas training and
            inference series before A2: ``torch.npu.is_bf16_supported()`` is False there).
    """
    if dtype is None or (isinstance(dtype, str) and dtype.strip().lower() == "auto"):
        return default_dtype(device)
    resolved = _parse_dtype(dtype)
    kind = _parse_device(device)[0]
    if resolved is torch.float16 and kind == "cpu":
        logger.warning("dtype float16 on CPU is slow and some ops are not implemented for it; "
                       "use float32 (the CPU default) or bfloat16")
    if resolved is torch.bfloat16 and kind == "npu" and not _npu_bf16_supported():
        raise ValueError(f"dtype={dtype!r} is not supported by this NPU ({_npu_soc()[1] or 'unknown SoC'}: "
                         "torch.npu.is_bf16_supported() is False); use float16 (the NPU default) or float32")
    return resolved


def _npu_bf16_supported() -> bool:
    """``torch.npu.is_bf16_supported()``, called without arguments (it takes none through torch_npu 2.10.0 and an
    unused ``including_emulation=False`` from 2.11.0); True when the NPU is unusable, so that the device request
    itself reports that problem."""
    if _npu_availability().problem is not None:
        return True
    probe = getattr(torch.npu, "is_bf16_supported", None)
    return True if probe is None else bool(probe())


# ---------------------------------------------------------------------------------------------------------------
# Memory, synchronisation, seeds


def free_memory_bytes(device: DeviceLike) -> Optional[int]:
    """Memory the device can still hand out: CUDA/NPU ``mem_get_info``, else NPU total - reserved; CPU None."""
    ops, index = _target(device)
    return ops.free_memory(index)


def total_memory_bytes(device: DeviceLike) -> Optional[int]:
    """Device memory (accelerators) or physical RAM (CPU); None when the platform cannot tell."""
    ops, index = _target(device)
    return ops.total_memory(index)


def synchronize(device: DeviceLike) -> None:
    """Wait for queued kernels on ``device`` (no-op on CPU), e.g. before reading a timer."""
    ops, index = _target(device)
    ops.synchronize(index)


def use_device_in_this_thread(device: DeviceLike) -> None:
    """Make ``device`` the current accelerator of the calling thread (``torch.npu.set_device`` /
    ``torch.cuda.set_device``); nothing for the CPU or an unindexed device.

    Why: the current device is per thread (ACL, like CUDA). torch_npu's op wrappers switch to a tensor's device for
    the op (NPUGuardImpl), but streams, workspaces and the guard's restore step use the thread's current device, which
    a fresh thread has never set: on releases without lazy device setting ("MaybeSetDevice" is absent from the
    libtorch_npu.so of 2.1.0.post8, 2.3.1.post2 and 2.5.1, present in 2.14.0) that initialises card 0 as well. Only
    for threads the caller owns: the scripts' main threads and the engine's worker thread; library calls never
    change the current device of a caller's thread.

    Raises:
        ValueError: unsupported ``device``.
    """
    kind, index = _parse_device(device)
    if kind != "cpu" and index is not None:
        _module(kind).set_device(index)


def reset_peak_memory(device: DeviceLike) -> None:
    """Start a new peak-allocation window on an accelerator. No-op on CPU: the process peak RSS cannot be reset."""
    ops, index = _target(device)
    ops.reset_peak(index)


def peak_memory_bytes(device: DeviceLike) -> Optional[int]:
    """Peak tensor memory allocated since the last reset (accelerators); on CPU the process-lifetime peak RSS."""
    ops, index = _target(device)
    return ops.peak(index)


def check_seed(seed: Any) -> int:
    """Return ``seed`` if it is an int in [0, 2**32) (numpy's range, kept for every seed here).

    Raises:
        ValueError: naming the value and the allowed range.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed!r} is not supported; use an int in [0, 2**32)")
    return seed


def new_generator(device: DeviceLike, seed: Optional[int] = None) -> torch.Generator:
    """A private ``torch.Generator`` on ``device``: seeded with ``seed``, or from the OS when it is None.

    Calls draw from one of these instead of the process-wide generators, so concurrent or interleaved requests
    neither disturb nor depend on each other (and a seeded request repeats whatever runs beside it). On the CPU a
    seed gives the same draws as ``torch.manual_seed(seed)`` did.

    Raises:
        ValueError: ``seed`` outside [0, 2**32).
    """
    generator = torch.Generator(device=torch.device(device))
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(check_seed(seed))
    return generator


def seed_everything(seed: int, device: DeviceLike = None) -> None:
    """Seed ``random``, numpy, torch and the accelerator generators (all usable ones, or ``device``'s type).

    For scripts that want a reproducible process; library calls never use it (they take ``new_generator``).

    Raises:
        ValueError: ``seed`` is not an int in [0, 2**32) (numpy's range), or ``device`` is unsupported.
    """
    check_seed(seed)
    kinds = DEVICE_PREFERENCE if device is None else (_parse_device(device)[0],)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    for kind in kinds:
        if _BACKENDS[kind].availability().problem is None:
            _BACKENDS[kind].seed(seed)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is not supported; use an int >= 1")


def chunk_batch_size(num_chunks: int, device: DeviceLike, max_gb_per_item: float, cap: Optional[int] = None) -> int:
    """How many voice-clone chunks to generate together (spec §7).

    Accelerators: ``max(1, min(num_chunks, cap, floor(0.9 * free_bytes / (max_gb_per_item * 2**30))))``.
    CPU (free memory unknown): 1, or ``min(cap, num_chunks)`` when the caller gives a cap.

    Raises:
        ValueError: ``num_chunks`` or ``cap`` not an int >= 1, ``max_gb_per_item`` not a finite number > 0.
    """
    _check_positive_int("num_chunks", num_chunks)
    if cap is not None:
        _check_positive_int("cap", cap)
    if (isinstance(max_gb_per_item, bool) or not isinstance(max_gb_per_item, (int, float))
            or not math.isfinite(max_gb_per_item) or max_gb_per_item <= 0):
        raise ValueError(f"max_gb_per_item={max_gb_per_item!r} is not supported; use a finite number > 0")
    limit = num_chunks if cap is None else min(num_chunks, cap)
    free = free_memory_bytes(device)
    if free is None:
        return limit if cap is not None else 1
    fitting = math.floor(0.9 * free / (max_gb_per_item * 2**30))
    return max(1, min(limit, fitting))


# ---------------------------------------------------------------------------------------------------------------
# Attention kernels and failure classification


def is_flash_attn_usable(device: DeviceLike, dtype: Union[str, torch.dtype]) -> bool:
    """True for CUDA with compute capability >= 8.0, float16/bfloat16 and an importable flash_attn package.

    Any other ``torch.device`` or ``torch.dtype`` (meta, float64, ...) gives False.

    Raises:
        ValueError: ``device`` or ``dtype`` is a string that names nothing supported.
    """
    if isinstance(dtype, str):
        dtype = _parse_dtype(dtype)
    kind = device.type if isinstance(device, torch.device) else _parse_device(device)[0]
    if kind != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    if _cuda_availability().problem is not None or not _flash_attn_importable():
        return False
    _, index = _target(device)
    return tuple(torch.cuda.get_device_capability(index)) >= (8, 0)  # flash-attn 2 needs Ampere or newer


# torch_npu's SocVersion enum (include/torch_npu/csrc/core/npu/NpuVariables.h; the same values in torch_npu 2.1.0.post12
# to 2.14.0): Ascend910B1..Ascend910B4_1 = 220..225 are the Atlas A2 training cards, Ascend910_9391..Ascend910_9363 =
# 250..256 the Atlas A3 ones. Not A2/A3: the first Ascend 910 (100..104, one of them named "Ascend910B"), Ascend310P
# (200..205, Atlas inference series), Ascend310B (240..243), Ascend950 (260, not in the kernels' documentation yet).
_ATLAS_A2_A3_SOC_VERSIONS = (range(220, 230), range(250, 260))
_ATLAS_A2_A3_SOC_NAME = re.compile(r"Ascend910B\d.*|Ascend910_93\d\d")  # the same cards by name (aclrtGetSocName)


@functools.cache
def _npu_soc() -> tuple[Optional[int], Optional[str]]:
    """(SoC version number, SoC name) of the NPU; each None where unreadable, both None without a usable NPU.

    Read once per process (every card of one machine has the same SoC). ``get_soc_version`` is in
    ``torch_npu.npu.utils`` in every release checked (2.1.0.post12 to 2.14.0) and in ``torch.npu`` too from 2.3.1.post4
    and 2.4.0.post2 on.
    """
    if _npu_availability().problem is not None:
        return None, None
    npu = torch.npu
    getter = getattr(npu, "get_soc_version", None) or getattr(getattr(npu, "utils", None), "get_soc_version", None)
    version = int(getter()) if getter is not None else None
    name = str(npu.get_device_properties(int(npu.current_device())).name)
    return version, name


def npu_fused_kernel_problem() -> Optional[str]:
    """Why torch_npu's fused kernels (``npu_fusion_attention``, ``npu_rotary_mul``'s interleave mode) cannot run
    here, or None when they can: on an Atlas A2 or A3 card.

    torch_npu re-exports every op whatever the card (``hasattr`` says nothing about the hardware), so the SoC decides.
    The docs list ``npu_rotary_mul``'s interleave mode for Atlas A2 and A3, ``npu_fusion_attention`` for Atlas A2
    only (the 2.1.0.post8 / 2.3.1-2.3.1.post4 / 2.4.0-2.4.0.post2 docs: also the first Atlas training series, with
    stricter shapes); A3 runs the opt-in fused attention undocumented, which only a card can settle.
    """
    problem = _npu_availability().problem
    if problem is not None:
        return problem
    version, name = _npu_soc()
    if version is not None:
        supported = any(version in soc_range for soc_range in _ATLAS_A2_A3_SOC_VERSIONS)
    else:
        supported = name is not None and _ATLAS_A2_A3_SOC_NAME.fullmatch(name) is not None
    if supported:
        return None
    return (f"this NPU ({name or 'unknown SoC'}, SoC version {version}) is not an Atlas A2/A3 card "
            "(Ascend910B1-B4, Ascend910_93xx), the only ones torch_npu documents these kernels for "
            "(npu_fusion_attention: A2 only)")


def npu_fusion_attention_problem() -> Optional[str]:
    """Why ``torch_npu.npu_fusion_attention`` cannot run here (no usable NPU, an op-less torch_npu, a card other than
    Atlas A2/A3), or None when it can."""
    problem = npu_fused_kernel_problem()
    if problem is None and getattr(_torch_npu_import()[0], "npu_fusion_attention", None) is None:
        problem = f"torch_npu {_torch_npu_version()} has no npu_fusion_attention"
    return problem


@functools.cache
def npu_fusion_attention_fn() -> Optional[Callable[..., Any]]:
    """``torch_npu.npu_fusion_attention`` where it can run (see ``npu_fusion_attention_problem``), else None
    (probed once per process: the attention backend asks at every call)."""
    return _torch_npu_import()[0].npu_fusion_attention if npu_fusion_attention_problem() is None else None


@functools.cache
def npu_rotary_mul_fn() -> Optional[Callable[..., Any]]:
    """``torch_npu.npu_rotary_mul`` where it can rotate interleaved pairs, else None (probed once per process).

    Needs the op's ``rotary_mode`` argument, read from its schema: present in torch_npu 2.1.0.post12, 2.3.1.post6,
    2.4.0.post4 and 2.5.1 on; torch_npu 2.3.1 to 2.3.1.post4 and 2.4.0 to 2.4.0.post2 have
    ``npu_rotary_mul(Tensor self, Tensor r1, Tensor r2)``, rotate-half only. And an Atlas A2/A3 card, the documented
    products of ``rotary_mode="interleave"``.
    """
    op = getattr(_torch_npu_import()[0], "npu_rotary_mul", None)
    if op is None or npu_fused_kernel_problem() is not None:
        return None
    schema = getattr(getattr(op, "default", None), "_schema", None)  # the OpOverloadPacket's FunctionSchema
    arguments = {argument.name for argument in getattr(schema, "arguments", ())}
    return op if "rotary_mode" in arguments else None


CPU_FAST_PATHS_VARIABLE = "MOSS_TTS_CPU_FAST_PATHS"
# Every CPU fast path: (what the CPU runs by default, what it runs instead with MOSS_TTS_CPU_FAST_PATHS=0, which is
# what accelerators run). None: refused (int8 weights raise a RuntimeError that names the variable).
CPU_FAST_PATHS: dict[str, tuple[str, Optional[str]]] = {
    "rope": ("complex", "real"),  # rotary.rotate_pairs vs rotary.rotate_real
    "linear": ("split-matvec/onednn", "F.linear"),  # linear_kernels.linear
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


_OOM_TYPES = (OutOfMemoryError, MemoryError)
# Ascend error text, from the torch_npu wheels (2.1.0.post12 to 2.14.0): a failed ACL call raises
# "NPU function error: <call>, error code is <N>" (or "NPU error, error code is <N>", "OPS function error: ...") with
# the code's description from include/torch_npu/csrc/core/npu/NPUErrorCodes.h; the symbolic names of
# third_party/acl/inc/acl/error_codes/rt_error_codes.h (ACL_ERROR_RT_MEMORY_ALLOCATION, ...) are never printed.
# Allocation failures: 200000 and 207001 / 207005 ("Failed to apply for memory."), 207018 ("The memory on the device
# is exhausted."); the caching allocator's own "NPU out of memory. Tried to allocate ..." (libtorch_npu.so).
_NPU_OOM_CODES = "200000|207001|207005|207018"
_OOM_PATTERN = re.compile(
    r"out of memory"  # "CUDA out of memory", "NPU out of memory. Tried to allocate", "CUDA error: out of memory"
    rf"|error code is (?:{_NPU_OOM_CODES})\b"
    r"|Failed to apply for memory|The memory on the device is exhausted"
    r"|EL0004"  # CANN: "EL0004: Failed to allocate memory"
    r"|can't allocate memory",  # torch CPU allocator
    re.IGNORECASE,
)
# Numerical failures that a float32 retry with the fallback attention backend can cure. Ascend has no device assert:
# a kernel fed NaN/inf-derived values or indices (an embedding row picked from NaN probabilities) faults, reported by
# code (NPUErrorCodes.h) and in the CANN log text ("there is an aicore error exception" / "aivec error exception"):
#   numerical or data-dependent, retried: 207003 aicore operator overflow; 507015 aicore / 507035 vector core
#   execution abnormal; 507016 / 507036 their trap exceptions; 507018 AI CPU execution abnormal; 507042-507045
#   aicore / vector core trap read or write out of bounds.
#   hard faults, not retried (a float32 rerun cannot help and a timeout would only double the wait): the timeouts
#   507014 / 507017 / 507034 / 507048, 507010 lost heartbeat, 507013 DMA hardware error, 507033 device start failure,
#   507899-507901 driver / AI CPU module / host-device link, "FORCE STOP", "HBM MULTI BIT ECC ERROR", "UCE ERROR".
# Also deliberately not matched: CUDA "illegal memory access" (a kernel bug that poisons the context); the generic
# Ascend "EZ9999: Inner Error" and torch_npu "ERR01xxx" (operator-category) codes, which also cover invalid
# shapes/parameters. Note a CUDA device-side assert is sticky: the retry then fails with the same error, which
# propagates.
_NPU_NUMERICAL_FAULT_CODES = "207003|5070(?:15|16|18|35|36|4[2-5])"
_STABILITY_PATTERN = re.compile(
    r"non-finite"  # this repository's and upstream's check on logits/probabilities
    r"|probability tensor contains either"  # torch.multinomial on inf/nan/negative probabilities
    r"|device-side assert triggered"  # CUDA kernels asserting on NaN-derived indices
    r"|aicore (?:error )?exception|aivec error exception|vector core exception"
    rf"|\b(?:{_NPU_NUMERICAL_FAULT_CODES})\b",  # "error code is 507015", "... synchronize failed, error code:507015"
    re.IGNORECASE,
)


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain = [exc]
    while chain[-1].__cause__ is not None and len(chain) < 8:
        chain.append(chain[-1].__cause__)
    return chain


def is_out_of_memory_error(exc: BaseException) -> bool:
    """True for out-of-memory failures on any device (OutOfMemoryError, MemoryError, CUDA/NPU messages)."""
    return any(isinstance(e, _OOM_TYPES) or _OOM_PATTERN.search(str(e)) for e in _exception_chain(exc))


def is_stability_error(exc: BaseException) -> bool:
    """True for numerical-instability failures (NaN/inf probabilities and the device faults they cause, spec §7).

    Out-of-memory errors are never stability errors (see ``is_out_of_memory_error``).
    """
    if is_out_of_memory_error(exc):
        return False
    return any(_STABILITY_PATTERN.search(str(e)) for e in _exception_chain(exc))


def fallback_attention_implementation(device: DeviceLike) -> str:
    """Attention backend of the float32 stability retry: sdpa on npu (eager there is the upstream defect) and
    cuda, eager (the reference) on cpu."""
    return _BACKENDS[_parse_device(device)[0]].fallback_attention


# ---------------------------------------------------------------------------------------------------------------
# Environment


def apply_npu_environment_defaults(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set ``NPU_ENVIRONMENT_DEFAULTS`` entries that are not already in ``environ`` (call before the first NPU
    allocation: the allocator reads PYTORCH_NPU_ALLOC_CONF once).

    Returns:
        The variables this call set, with their values (empty when the user had set them all).
    """
    applied = {name: value for name, value in NPU_ENVIRONMENT_DEFAULTS.items() if name not in environ}
    environ.update(applied)
    return applied


def _distribution_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _torch_npu_version() -> Optional[str]:
    module = sys.modules.get("torch_npu")
    if module is not None and getattr(module, "__version__", None):
        return str(module.__version__)
    return _distribution_version("torch_npu")


def _cann_version() -> Optional[str]:
    """CANN version from the toolkit's version files (set_env.sh exports ASCEND_TOOLKIT_HOME/ASCEND_HOME_PATH)."""
    for variable in ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH"):
        home = os.environ.get(variable)
        if not home:
            continue
        root = Path(home)
        candidates = [root / "compiler" / "version.info", root / "runtime" / "version.info", root / "version.info"]
        for path in [*candidates, *sorted(root.glob("*/ascend_toolkit_install.info"))]:
            if not path.is_file():
                continue
            for line in path.read_text(errors="replace").splitlines():
                key, _, value = line.partition("=")
                if key.strip().lower() == "version" and value.strip():
                    return value.strip()
    return None


def _device_name(device: torch.device) -> str:
    if device.type == "cpu":
        return platform.processor() or platform.machine()
    # Why not get_device_name(index): torch_npu's ignores the index (it names the current card) in 2.1.0.post12,
    # 2.3.1.post6, 2.4.0.post4 and 2.5.1 on; get_device_properties(index).name is the indexed card's everywhere.
    return str(_module(device.type).get_device_properties(device.index).name)


def describe_environment(device: DeviceLike = None) -> dict[str, Any]:
    """Versions and the device, for logs and bug reports.

    Args:
        device: the device to describe (None: ``resolve_device("auto")``).

    Returns:
        Keys python, platform, torch, transformers, torch_npu, cann, cuda (None where absent), device,
        device_type, device_name, device_count.
    """
    resolved = resolve_device(device)
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": _distribution_version("transformers"),
        "torch_npu": _torch_npu_version(),
        "cann": _cann_version(),
        "cuda": torch.version.cuda,
        "device": str(resolved),
        "device_type": resolved.type,
        "device_name": _device_name(resolved),
        "device_count": _BACKENDS[resolved.type].availability().count,
    }
