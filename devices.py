"""Device policy: which device to run on, its default dtype, and how to ask it about memory, sync and seeds.

One ordered preference (``DEVICE_PREFERENCE``: npu > cuda > cpu) and one small table row per device type
(``_BACKENDS``). Importing this module never imports torch_npu and never touches a device: availability probes
import optional packages lazily through ``importlib`` and are cached (``clear_caches()`` resets them, and those of
kernel_probes.py, which says which fused kernels the device can run). ``torch.npu`` / ``torch.cuda`` are looked up
when a function runs, not at import.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import os
import random
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch

from . import npu_probes
from .cpu_fast_paths import cpu_fast_paths_enabled
from .torch_compat import cuda_bf16_supported
from .value_bounds import seed_error

logger = logging.getLogger(__name__)

DEVICE_PREFERENCE = ("npu", "cuda", "cpu")
DeviceLike = Union[str, torch.device, None]
DtypeLike = Union[str, torch.dtype, None]


_ALLOWED_DEVICES = '"auto", "npu", "npu:N", "cuda", "cuda:N", "cpu" or a torch.device of type npu, cuda or cpu'
_DEVICE_PATTERN = re.compile(r"(npu|cuda|cpu)(?::(\d+))?")
DTYPE_ALIASES = {  # every dtype name the CLIs, the library and verify_npu accept (one source)
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
    synchronize: Callable[[int], None]
    seed: Callable[[int], None]
    reset_peak: Callable[[int], None]
    peak: Callable[[int], Optional[int]]
    fallback_attention: str  # attention backend of the float32 stability retry


# ---------------------------------------------------------------------------------------------------------------
# Availability probes (cached)


_CACHED_PROBES: list[Any] = []  # every probe made with cached_probe, here and in kernel_probes.py


def cached_probe(probe: Callable[..., Any]) -> Any:
    """``functools.cache`` for an availability probe, registered so that ``clear_caches()`` forgets its answer."""
    cached = functools.cache(probe)
    _CACHED_PROBES.append(cached)
    return cached


@cached_probe
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


@cached_probe
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


@cached_probe
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


@cached_probe
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


def clear_caches() -> None:
    """Forget every cached probe (torch_npu import, NPU/CUDA availability, the NPU's SoC, the fused kernels of
    kernel_probes.py and npu_probes.py, the CPU fast-path setting), e.g. between tests."""
    for probe in (*_CACHED_PROBES, cpu_fast_paths_enabled):
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
        synchronize=lambda index: _module(kind).synchronize(index),
        seed=lambda seed: _module(kind).manual_seed_all(seed),
        reset_peak=lambda index: _module(kind).reset_peak_memory_stats(index),
        peak=lambda index: int(_module(kind).max_memory_allocated(index)),
        fallback_attention="sdpa",
    )


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


def fallback_attention_implementation(device: DeviceLike) -> str:
    """Attention backend of the float32 stability retry: sdpa on npu (eager there is the upstream defect) and
    cuda, eager (the reference) on cpu."""
    return _BACKENDS[_parse_device(device)[0]].fallback_attention


def _parse_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPE_ALIASES.values():
        return dtype
    if isinstance(dtype, str):
        resolved = DTYPE_ALIASES.get(dtype.strip().lower().removeprefix("torch."))
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
    if seed_error(seed):
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
    """How many voice-clone chunks to generate together (docs/model.md, Devices).

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

