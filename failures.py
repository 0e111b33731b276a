"""Classifying a failed call: out of memory (retry smaller) or numerical instability (retry in float32 with the
fallback attention backend), from the exception types and the CUDA / Ascend error text."""

from __future__ import annotations

import re

from .torch_compat import OutOfMemoryError

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
    """True for numerical-instability failures (NaN/inf probabilities and the device faults they cause).

    Out-of-memory errors are never stability errors (see ``is_out_of_memory_error``).
    """
    if is_out_of_memory_error(exc):
        return False
    return any(_STABILITY_PATTERN.search(str(e)) for e in _exception_chain(exc))
