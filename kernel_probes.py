"""Which fused kernels this machine can run: flash-attn 2 on CUDA, and torch_npu's ``npu_fusion_attention`` and
``npu_rotary_mul`` (interleave mode) on an Atlas A2/A3 card.

Presence and hardware only, each answer probed once per process (``devices.clear_caches()`` resets them); the
deeper Ascend probes (JIT compilation, a probe call, the documented shapes per release) are in npu_probes.py. Like
devices.py, importing this module never imports flash_attn or torch_npu and never touches a device.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import re
from collections.abc import Callable
from typing import Any, Optional, Union

import torch

# Device policy internals this module builds on (devices.py owns the availability probes and the parsing rules).
from .devices import (
    DeviceLike,
    _cuda_availability,
    _npu_availability,
    _npu_soc,
    _parse_device,
    _parse_dtype,
    _target,
    _torch_npu_import,
    cached_probe,
)
from .npu_probes import torch_npu_version

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# flash-attn 2 (CUDA)

@cached_probe
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


# ---------------------------------------------------------------------------------------------------------------
# torch_npu's fused kernels (Atlas A2/A3)

# torch_npu's SocVersion enum (include/torch_npu/csrc/core/npu/NpuVariables.h; the same values in torch_npu 2.1.0.post12
# to 2.14.0): Ascend910B1..Ascend910B4_1 = 220..225 are the Atlas A2 training cards, Ascend910_9391..Ascend910_9363 =
# 250..256 the Atlas A3 ones. Not A2/A3: the first Ascend 910 (100..104, one of them named "Ascend910B"), Ascend310P
# (200..205, Atlas inference series), Ascend310B (240..243), Ascend950 (260, not in the kernels' documentation yet).
_ATLAS_A2_A3_SOC_VERSIONS = (range(220, 230), range(250, 260))
_ATLAS_A2_A3_SOC_NAME = re.compile(r"Ascend910B\d.*|Ascend910_93\d\d")  # the same cards by name (aclrtGetSocName)


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
        problem = f"torch_npu {torch_npu_version()} has no npu_fusion_attention"
    return problem


@cached_probe
def npu_fusion_attention_fn() -> Optional[Callable[..., Any]]:
    """``torch_npu.npu_fusion_attention`` where it can run (see ``npu_fusion_attention_problem``), else None
    (probed once per process: the attention backend asks at every call)."""
    return _torch_npu_import()[0].npu_fusion_attention if npu_fusion_attention_problem() is None else None


@cached_probe
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
