"""The Ascend runtime settings applied on request, and the description of the software and device a run used
(for reports and verification tables)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, Optional

import torch

from .devices import _BACKENDS, DeviceLike, _module, resolve_device
from .npu_probes import torch_npu_version

# Recommended Ascend runtime settings (docs/model.md, Devices); applied only on request, only where unset.
NPU_ENVIRONMENT_DEFAULTS = {"PYTORCH_NPU_ALLOC_CONF": "expandable_segments:True", "TASK_QUEUE_ENABLE": "1"}


def apply_npu_environment_defaults(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set ``NPU_ENVIRONMENT_DEFAULTS`` entries that are not already in ``environ`` (call before the first NPU
    allocation: the allocator reads PYTORCH_NPU_ALLOC_CONF once).

    Returns:
        The variables this call set, with their values (empty when the user had set them all).
    """
    applied = {name: value for name, value in NPU_ENVIRONMENT_DEFAULTS.items() if name not in environ}
    environ.update(applied)
    return applied


def distribution_version(name: str) -> Optional[str]:
    """The installed version of the distribution ``name``, or None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


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
        "transformers": distribution_version("transformers"),
        "torch_npu": torch_npu_version(),
        "cann": _cann_version(),
        "cuda": torch.version.cuda,
        "device": str(resolved),
        "device_type": resolved.type,
        "device_name": _device_name(resolved),
        "device_count": _BACKENDS[resolved.type].availability().count,
    }
