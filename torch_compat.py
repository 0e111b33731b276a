"""The one place this repository meets torch releases older than the newest: APIs, defects and policies.

torch 2.3.1 is the oldest torch this repository supports: it is the torch of the torch_npu 2.3.1 / CANN stack
that Ascend machines run with upstream's transformers 4.57.1. Here are a fallback for each newer API the code
uses, the workaround for torch 2.3's CPU attention defect (``sdpa_mask``), and pickled checkpoints before torch
2.6 (``load_pickled_weights``: safe_checkpoint.py reads them without unpickling). tests/test_torch_compat.py scans
the sources for direct uses of newer APIs and proves every fallback with the newer API removed. The codec
(``audio_tokenizer/``) is its own remote-code package and has its own copy of what it needs
(``audio_tokenizer/torch_compat.py``, ``audio_tokenizer/safe_checkpoint.py``).
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from .safe_checkpoint import load_state_dict as read_zip_state_dict


def torch_version() -> tuple[int, int]:
    """(major, minor) of the installed torch, e.g. (2, 3) for "2.3.1+cu121"."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


# torch >= 2.5 aliases the allocator's out-of-memory error at top level; torch.cuda has had the same class since
# 1.13 (and raises it for every caching allocator, NPU included once torch_npu registers one).
OutOfMemoryError: type[Exception] = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


def add_load_state_dict_pre_hook(module: nn.Module, hook: Callable[..., None]) -> RemovableHandle:
    """``module.register_load_state_dict_pre_hook(hook)``: ``hook(module, state_dict, prefix, ...)`` runs first.

    The public method is torch >= 2.5. Before that, the private ``_register_load_state_dict_pre_hook`` (in torch
    since 1.x) does the same when asked to pass the module (``with_module=True``; without it the hook would not
    get the module as its first argument).
    """
    public = getattr(module, "register_load_state_dict_pre_hook", None)
    if public is not None:
        return public(hook)
    return module._register_load_state_dict_pre_hook(hook, with_module=True)


def is_compiling() -> bool:
    """``torch.compiler.is_compiling()``: whether torch.compile is tracing the caller.

    ``torch.compiler.is_compiling`` is torch >= 2.3. Before that, dynamo's own flag answers where dynamo was ever
    imported (``torch._dynamo.is_compiling``); where it was not, nothing is being compiled.
    """
    probe = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if probe is None:
        probe = getattr(sys.modules.get("torch._dynamo"), "is_compiling", None)
    return bool(probe()) if probe is not None else False


@functools.lru_cache(maxsize=None)
def _accepts_keyword(function: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False


def cuda_bf16_supported(cuda: Any) -> bool:
    """Whether the current CUDA/ROCm device has bfloat16 in hardware (emulated bf16 is slow), given ``torch.cuda``.

    ``is_bf16_supported(including_emulation=False)`` is torch >= 2.4. torch 2.3.1's ``is_bf16_supported()`` counts
    emulation (any device that can hold a bf16 tensor), so there the hardware test it starts with is done here:
    ROCm, or compute capability 8.0 and newer.
    """
    if _accepts_keyword(cuda.is_bf16_supported, "including_emulation"):
        return bool(cuda.is_bf16_supported(including_emulation=False))
    if torch.version.hip:
        return True
    return cuda.get_device_properties(cuda.current_device()).major >= 8


@functools.lru_cache(maxsize=None)
def _cpu_sdpa_nan_after_masked_key_block() -> bool:
    """Whether this torch's fused CPU SDPA returns NaN for a query whose first block of keys is all masked.

    torch 2.3's CPU flash-attention kernel does (its running maximum starts at -inf and stays there through a
    whole masked key block, then computes exp(-inf - -inf)); newer releases do not. Asked once, on a tiny input.
    """
    query, keys = torch.ones(1, 1, 1, 8), torch.ones(1, 1, 1024, 8)
    mask = torch.zeros(1, 1024, dtype=torch.bool)
    mask[:, -1] = True
    return bool(torch.isnan(F.scaled_dot_product_attention(query, keys, keys, attn_mask=mask)).any())


def sdpa_mask(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A boolean attention mask (True = may attend) in the form ``F.scaled_dot_product_attention`` gets right.

    That is the mask itself (or None), except on a CPU whose torch has the masked-key-block NaN (torch 2.3; a
    sliding window or left padding longer than the kernel's 512-key block hits it): there an additive ``dtype``
    mask of ``finfo.min``, whose scores stay finite, so masked keys still get weight exactly 0 once a visible key
    is seen. A query with no visible key gets the mean of the values instead of NaN; callers zero such queries.
    """
    if mask is None or mask.dtype != torch.bool or mask.device.type != "cpu":
        return mask
    if not _cpu_sdpa_nan_after_masked_key_block():
        return mask
    return torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, torch.finfo(dtype).min)


# Why 2.6: before it, torch.load can run code from a crafted file even with weights_only=True (CVE-2025-32434), so
# transformers refuses .bin checkpoints there. This code reads a zip-format pytorch_model.bin there with
# safe_checkpoint.py instead (no unpickling: a plain state dict or a refusal), and torch.load from 2.6 on.
SAFE_TORCH_LOAD_VERSION = (2, 6)
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
HUB_ARGUMENTS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")


def pickled_weights_refusal(path: "str | os.PathLike") -> str:
    """Why ``path`` (a sharded pickled checkpoint) is not loaded with this torch, and what to do instead."""
    return (f"'{path}' is a sharded pickled checkpoint, which torch {torch.__version__} cannot load safely (before "
            "torch 2.6, torch.load can run code from a crafted file even with weights_only=True: CVE-2025-32434; "
            "transformers refuses it too, and only a single pytorch_model.bin is read without torch.load): convert "
            "it once to model.safetensors on a machine with torch >= 2.6, or upgrade torch")


def load_pickled_weights(path: "str | os.PathLike", **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True, **kwargs)``; before torch 2.6 ``safe_checkpoint.load_state_dict(path,
    map_location)`` instead (other keywords, such as ``mmap``, are then ignored).

    Raises:
        UnsafeCheckpointError: (torch < 2.6) anything but a plain zip-format state dict.
    """
    if torch_version() < SAFE_TORCH_LOAD_VERSION:
        return read_zip_state_dict(path, map_location=kwargs.get("map_location", "cpu"))
    return torch.load(path, weights_only=True, **kwargs)


def pickled_only_weights(path: "str | os.PathLike | None", **hub_kwargs: Any) -> "str | None":
    """The ``pytorch_model.bin`` that ``from_pretrained`` must read with ``load_pickled_weights`` because transformers
    refuses it (torch < 2.6, no safetensors weights beside it), else None.

    Args:
        path: a checkpoint folder or hub id (None and file paths: None).
        hub_kwargs: ``from_pretrained``'s download arguments (the names in ``HUB_ARGUMENTS``; others ignored).
    """
    if torch_version() >= SAFE_TORCH_LOAD_VERSION or path is None or os.path.isfile(path):
        return None
    hub = {name: hub_kwargs[name] for name in HUB_ARGUMENTS if hub_kwargs.get(name) is not None}
    if os.path.isdir(path):
        folder = os.path.join(path, hub.get("subfolder", ""))
        if any(os.path.isfile(os.path.join(folder, name)) for name in SAFETENSORS_WEIGHTS):
            return None
        candidate = os.path.join(folder, PICKLED_WEIGHTS[0])
        return candidate if os.path.isfile(candidate) else None
    from transformers.utils import cached_file  # a hub id: the files transformers itself would look for

    def find(name: str) -> "str | None":
        return cached_file(str(path), name, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False, **hub)

    if any(find(name) for name in SAFETENSORS_WEIGHTS):
        return None
    return find(PICKLED_WEIGHTS[0])


def pickled_weights_problem(directory: "str | os.PathLike") -> "str | None":
    """The refusal for a checkpoint folder whose only weights are a sharded .bin and this torch predates 2.6, else
    None (a single pytorch_model.bin is read with safe_checkpoint.py there)."""
    if torch_version() >= SAFE_TORCH_LOAD_VERSION:
        return None
    present = {name for name in (*SAFETENSORS_WEIGHTS, *PICKLED_WEIGHTS) if os.path.isfile(os.path.join(directory, name))}
    if present & {*SAFETENSORS_WEIGHTS, PICKLED_WEIGHTS[0]} or PICKLED_WEIGHTS[1] not in present:
        return None
    return pickled_weights_refusal(os.path.join(directory, PICKLED_WEIGHTS[1]))
