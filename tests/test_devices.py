"""Device policy tests. Everything runs on the CPU: NPUs and CUDA GPUs are simulated (fake torch.npu, torch_npu
module and patched torch.cuda functions), so these also pass, unchanged, on machines that have the real thing."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.metadata
import json
import logging
import math
import pathlib
import sys
import types

import pytest
import torch

import environment
import failures
import kernel_probes
import devices
from npu_simulation import run_python
from torch_compat import OutOfMemoryError

GiB = 2**30
ROOT = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# Simulated accelerators


def fake_accelerator(count: int = 1, total: int = 32 * GiB, reserved: int = 6 * GiB, allocated: int = 5 * GiB,
                     free: int | None = None, without: tuple[str, ...] = (), name: str = "Ascend910B4",
                     peak: int = 7 * GiB) -> types.SimpleNamespace:
    """A torch.cuda-like namespace (what torch_npu installs as torch.npu); ``calls`` records side effects."""
    calls: list[tuple] = []
    module = types.SimpleNamespace(
        calls=calls,
        is_available=lambda: count > 0,
        device_count=lambda: count,
        current_device=lambda: 0,
        get_device_name=lambda index=None: name,
        get_device_properties=lambda index=None: types.SimpleNamespace(total_memory=total, name=name),
        mem_get_info=lambda index=None: (free, total),
        memory_reserved=lambda index=None: reserved,
        memory_allocated=lambda index=None: allocated,
        memory_stats=lambda index=None: {"reserved_bytes.all.current": reserved,
                                         "allocated_bytes.all.current": allocated},
        max_memory_allocated=lambda index=None: peak,
        synchronize=lambda index=None: calls.append(("synchronize", index)),
        manual_seed_all=lambda seed: calls.append(("manual_seed_all", seed)),
        reset_peak_memory_stats=lambda index=None: calls.append(("reset_peak_memory_stats", index)),
    )
    if free is None:
        without = (*without, "mem_get_info")
    for attribute in without:
        delattr(module, attribute)
    return module


def fake_npu_attention(*args, **kwargs):
    raise AssertionError("the simulated kernel is never called")


def install_simulated_npu(monkeypatch: pytest.MonkeyPatch, count: int = 1, **kwargs) -> types.SimpleNamespace:
    """Make ``import torch_npu`` succeed and ``torch.npu`` exist, as the real torch_npu does on import."""
    torch_npu = types.ModuleType("torch_npu")
    torch_npu.__version__ = "2.6.0.post-simulated"
    torch_npu.npu_fusion_attention = fake_npu_attention
    fake = fake_accelerator(count, **kwargs)
    monkeypatch.setitem(sys.modules, "torch_npu", torch_npu)
    monkeypatch.setattr(torch, "npu", fake, raising=False)
    devices.clear_caches()
    return fake


def install_simulated_cuda(monkeypatch: pytest.MonkeyPatch, count: int = 1, bf16: bool = True,
                           capability: tuple[int, int] = (8, 0), **kwargs) -> types.SimpleNamespace:
    """Patch the torch.cuda functions devices.py calls so they describe ``count`` simulated GPUs."""
    fake = fake_accelerator(count, name="Simulated GPU", **kwargs)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    for attribute, value in vars(fake).items():
        if attribute != "calls":
            monkeypatch.setattr(torch.cuda, attribute, value)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    devices.clear_caches()
    return fake


def block_torch_npu(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch_npu not installed (None in sys.modules makes its import raise ModuleNotFoundError)."""
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    monkeypatch.delattr(torch, "npu", raising=False)
    devices.clear_caches()


def block_cuda(monkeypatch: pytest.MonkeyPatch, cpu_only_build: bool = True) -> None:
    if cpu_only_build:
        monkeypatch.setattr(torch.version, "cuda", None)
        monkeypatch.setattr(torch.version, "hip", None, raising=False)
    else:
        monkeypatch.setattr(torch.version, "cuda", "12.4")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    devices.clear_caches()


class _FailingLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise OSError("libascendcl.so: cannot open shared object file: No such file or directory")


class _FailingTorchNpuFinder(importlib.abc.MetaPathFinder):
    """A torch_npu that is installed but cannot load its native libraries (CANN environment not sourced)."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch_npu":
            return importlib.machinery.ModuleSpec(name, _FailingLoader())
        return None


def install_broken_torch_npu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    monkeypatch.delattr(torch, "npu", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_FailingTorchNpuFinder(), *sys.meta_path])
    devices.clear_caches()


@pytest.fixture(autouse=True)
def plain_cpu_machine(monkeypatch):
    """Every test starts on a CPU-only machine without torch_npu, with fresh probe caches."""
    block_torch_npu(monkeypatch)
    block_cuda(monkeypatch)
    for variable in ("ASCEND_RT_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH"):
        monkeypatch.delenv(variable, raising=False)
    yield
    devices.clear_caches()


# ---------------------------------------------------------------------------------------------------------------
# Import hygiene and the NPU success paths (both need a fresh interpreter)


def test_import_never_loads_optional_packages_or_touches_devices():
    output = run_python(
        "import os, sys\n"
        "before = dict(os.environ)\n"
        "import devices, torch\n"
        "assert 'torch_npu' not in sys.modules, 'torch_npu imported'\n"
        "assert 'flash_attn' not in sys.modules, 'flash_attn imported'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
        "assert dict(os.environ) == before, 'environment changed'\n"
        "print(devices.DEVICE_PREFERENCE)\n"
    )
    assert output.strip() == "('npu', 'cuda', 'cpu')"


def test_simulated_npu_resolves_to_npu_devices():
    # torch.device("npu") only parses after the privateuse1 backend is renamed, which real torch_npu does on
    # import and which cannot be undone: so this runs in its own interpreter.
    output = run_python(
        "import json, pytest, torch\n"
        "import devices, test_devices as t\n"
        "torch.utils.rename_privateuse1_backend('npu')\n"
        "patch = pytest.MonkeyPatch()\n"
        "results = {}\n"
        "for cuda_count in (0, 1):\n"
        "    t.block_cuda(patch) if cuda_count == 0 else t.install_simulated_cuda(patch, cuda_count)\n"
        "    t.install_simulated_npu(patch, count=2)\n"
        "    results[f'auto, cuda={cuda_count}'] = str(devices.resolve_device('auto'))\n"
        "    patch.undo()\n"
        "t.install_simulated_npu(patch, count=2)\n"
        "results['npu'] = str(devices.resolve_device('npu'))\n"
        "results['NPU:1'] = str(devices.resolve_device(' NPU:1 '))\n"
        "results['device'] = str(devices.resolve_device(torch.device('npu', 1)))\n"
        "results['dtype'] = str(devices.default_dtype(devices.resolve_device('npu')))\n"
        "try:\n"
        "    devices.resolve_device('npu:2')\n"
        "except RuntimeError as error:\n"
        "    results['npu:2'] = str(error)\n"
        "print(json.dumps(results))\n"
    )
    results = json.loads(output.strip().splitlines()[-1])
    assert results["auto, cuda=0"] == "npu:0"
    assert results["auto, cuda=1"] == "npu:0"  # npu beats cuda
    assert results["npu"] == "npu:0"
    assert results["NPU:1"] == results["device"] == "npu:1"
    assert results["dtype"] == "torch.float16"
    assert "only 2 npu device(s) are visible" in results["npu:2"] and "npu:0 to npu:1" in results["npu:2"]
    assert "ASCEND_RT_VISIBLE_DEVICES" in results["npu:2"]


# ---------------------------------------------------------------------------------------------------------------
# resolve_device


@pytest.mark.parametrize("npu_state", ["absent", "broken", "no_devices"])
@pytest.mark.parametrize("cuda_count", [0, 1])
def test_simulated_auto_prefers_cuda_then_cpu_when_npu_unusable(monkeypatch, caplog, npu_state, cuda_count):
    if cuda_count:
        install_simulated_cuda(monkeypatch, cuda_count)
    if npu_state == "broken":
        install_broken_torch_npu(monkeypatch)
    elif npu_state == "no_devices":
        install_simulated_npu(monkeypatch, count=0)
    with caplog.at_level(logging.INFO, logger=devices.logger.name):
        device = devices.resolve_device("auto")
    assert device == (torch.device("cuda", 0) if cuda_count else torch.device("cpu"))
    assert f"picked {device}" in caplog.text
    assert "not npu:" in caplog.text  # says why npu was skipped


def test_auto_and_none_are_the_same_request():
    assert devices.resolve_device(None) == devices.resolve_device("auto") == devices.resolve_device(" AUTO ")
    assert devices.resolve_device() == torch.device("cpu")


def test_simulated_cuda_explicit_devices(monkeypatch):
    install_simulated_cuda(monkeypatch, count=2)
    assert devices.resolve_device("cuda") == torch.device("cuda", 0)
    assert devices.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert devices.resolve_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    with pytest.raises(RuntimeError, match=r"only 2 cuda device\(s\) are visible \(cuda:0 to cuda:1\)") as info:
        devices.resolve_device("cuda:2")
    assert "CUDA_VISIBLE_DEVICES" in str(info.value)


def test_cpu_is_always_resolvable(monkeypatch):
    install_simulated_cuda(monkeypatch)
    assert devices.resolve_device("cpu") == devices.resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert devices.resolve_device("cpu:0") == torch.device("cpu")


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "npu:-1", "mps", "cpu:1", "", 0, torch.device("meta")])
def test_invalid_device_requests_list_the_allowed_forms(bad):
    with pytest.raises(ValueError, match="is not supported; use \"auto\", \"npu\", \"npu:N\"") as info:
        devices.resolve_device(bad)
    assert repr(bad) in str(info.value)


def test_simulated_npu_not_installed_message():
    with pytest.raises(RuntimeError) as info:
        devices.resolve_device("npu")
    message = str(info.value)
    assert message.startswith("device='npu' was requested but torch_npu is not installed")
    assert "pip install torch-npu matching your torch version" in message and torch.__version__ in message


def test_simulated_npu_import_failure_message(monkeypatch):
    install_broken_torch_npu(monkeypatch)
    with pytest.raises(RuntimeError) as info:
        devices.resolve_device("npu:0")
    message = str(info.value)
    assert "torch_npu is installed but failed to import (OSError: libascendcl.so" in message
    assert "source /usr/local/Ascend/ascend-toolkit/set_env.sh" in message
    assert "TORCH_DEVICE_BACKEND_AUTOLOAD=0" in message


def test_simulated_npu_without_visible_devices_message(monkeypatch):
    install_simulated_npu(monkeypatch, count=0)
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "7")
    devices.clear_caches()
    with pytest.raises(RuntimeError, match="no NPU is visible") as info:
        devices.resolve_device("npu")
    assert "npu-smi info" in str(info.value) and "ASCEND_RT_VISIBLE_DEVICES='7'" in str(info.value)


def test_simulated_npu_module_missing_after_import(monkeypatch):
    install_simulated_npu(monkeypatch)
    monkeypatch.delattr(torch, "npu")
    devices.clear_caches()
    with pytest.raises(RuntimeError, match="did not register torch.npu"):
        devices.resolve_device("npu")


def test_simulated_cuda_cpu_only_build_message():
    with pytest.raises(RuntimeError, match="is CPU-only: install a CUDA build of torch"):
        devices.resolve_device("cuda")


def test_simulated_cuda_without_visible_gpu_message(monkeypatch):
    block_cuda(monkeypatch, cpu_only_build=False)
    with pytest.raises(RuntimeError, match="no CUDA GPU is visible") as info:
        devices.resolve_device("cuda:0")
    assert "nvidia-smi" in str(info.value) and "CUDA_VISIBLE_DEVICES is unset" in str(info.value)


def test_probes_are_cached_until_cleared(monkeypatch):
    probes = []
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: probes.append(1) or False)
    devices.clear_caches()
    for _ in range(3):
        with pytest.raises(RuntimeError):
            devices.resolve_device("cuda")
    assert len(probes) == 1
    install_simulated_cuda(monkeypatch)  # the GPU "appears"; clear_caches makes it visible
    assert devices.resolve_device("cuda") == torch.device("cuda", 0)


# ---------------------------------------------------------------------------------------------------------------
# dtypes


def test_simulated_default_dtypes(monkeypatch):
    assert devices.default_dtype(torch.device("cpu")) is torch.float32
    install_simulated_npu(monkeypatch)
    assert devices.default_dtype("npu:0") is torch.float16
    install_simulated_cuda(monkeypatch, bf16=True)
    assert devices.default_dtype("cuda:0") is torch.bfloat16
    install_simulated_cuda(monkeypatch, bf16=False)
    assert devices.default_dtype(torch.device("cuda", 0)) is torch.float16


@pytest.mark.parametrize(("request_", "expected"), [
    ("float16", torch.float16), ("fp16", torch.float16), ("bfloat16", torch.bfloat16), ("BF16", torch.bfloat16),
    ("float32", torch.float32), ("fp32", torch.float32), ("torch.bfloat16", torch.bfloat16),
    (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
])
def test_resolve_dtype_names_and_dtypes(request_, expected):
    assert devices.resolve_dtype(request_, "cpu") is expected


def test_resolve_dtype_auto_uses_the_device_default(monkeypatch):
    assert devices.resolve_dtype("auto", "cpu") is devices.resolve_dtype(None, "cpu") is torch.float32
    install_simulated_npu(monkeypatch)
    assert devices.resolve_dtype("auto", "npu") is torch.float16


@pytest.mark.parametrize("bad", ["float64", "int8", "fp8", torch.float64, torch.int64, 16])
def test_resolve_dtype_rejects_unsupported(bad):
    with pytest.raises(ValueError, match=r"dtype=.* is not supported; use \"auto\", \"float16\"/\"fp16\""):
        devices.resolve_dtype(bad, "cpu")


def test_float16_on_cpu_is_allowed_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger=devices.logger.name):
        assert devices.resolve_dtype("fp16", "cpu") is torch.float16
    assert "float16 on CPU is slow" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=devices.logger.name):
        devices.resolve_dtype("bf16", "cpu")
    assert caplog.text == ""


# ---------------------------------------------------------------------------------------------------------------
# Memory


def test_simulated_npu_free_memory_uses_mem_get_info_when_present(monkeypatch):
    install_simulated_npu(monkeypatch, free=20 * GiB, total=32 * GiB)
    assert devices.free_memory_bytes("npu:0") == 20 * GiB


@pytest.mark.parametrize("reserved_source", ["memory_reserved", "memory_stats"])
def test_simulated_npu_free_memory_without_mem_get_info_is_total_minus_reserved(monkeypatch, reserved_source):
    without = ("memory_reserved",) if reserved_source == "memory_stats" else ()
    install_simulated_npu(monkeypatch, total=32 * GiB, reserved=6 * GiB, allocated=5 * GiB, without=without)
    free = devices.free_memory_bytes("npu")
    assert free == 26 * GiB  # total - reserved
    assert free != 5 * GiB  # never allocated bytes (the seed document's bug)


def test_simulated_cuda_free_memory_uses_mem_get_info(monkeypatch):
    install_simulated_cuda(monkeypatch, free=11 * GiB, total=80 * GiB)
    assert devices.free_memory_bytes("cuda") == 11 * GiB


def test_cpu_free_memory_is_unknown():
    assert devices.free_memory_bytes("cpu") is None


def test_memory_queries_on_an_unusable_device_say_what_to_do():
    with pytest.raises(RuntimeError, match="torch_npu is not installed"):
        devices.free_memory_bytes("npu")
    with pytest.raises(RuntimeError, match="CPU-only"):
        devices.peak_memory_bytes("cuda")


def test_simulated_npu_peak_reset_and_synchronize(monkeypatch):
    fake = install_simulated_npu(monkeypatch, count=2, peak=3 * GiB)
    assert devices.peak_memory_bytes("npu:1") == 3 * GiB
    devices.reset_peak_memory("npu:1")
    devices.synchronize("npu")
    assert fake.calls == [("reset_peak_memory_stats", 1), ("synchronize", 0)]


def test_cpu_peak_is_process_rss_and_reset_is_a_no_op():
    before = devices.peak_memory_bytes("cpu")
    assert before > 1024 * 1024  # bytes (ru_maxrss is KiB on Linux), and a Python process uses more than 1 MiB
    devices.reset_peak_memory("cpu")
    devices.synchronize("cpu")
    assert devices.peak_memory_bytes("cpu") >= before  # process-lifetime peak: cannot go down


# ---------------------------------------------------------------------------------------------------------------
# chunk_batch_size (docs/model.md, Devices)


def test_simulated_cuda_chunk_batch_size_formula(monkeypatch):
    install_simulated_cuda(monkeypatch, free=20 * GiB)
    # floor(0.9 * 20 / 4) = floor(4.5) = 4
    assert devices.chunk_batch_size(10, "cuda", 4.0) == 4
    assert devices.chunk_batch_size(3, "cuda", 4.0) == 3  # never more than the chunks
    assert devices.chunk_batch_size(10, "cuda", 4.0, cap=2) == 2  # cap limits accelerators too
    assert devices.chunk_batch_size(40, "cuda", 0.5) == math.floor(0.9 * 20 / 0.5) == 36
    assert devices.chunk_batch_size(10, "cuda", 30.0) == 1  # at least one even when nothing fits


def test_simulated_npu_chunk_batch_size_uses_free_not_allocated(monkeypatch):
    install_simulated_npu(monkeypatch, total=64 * GiB, reserved=10 * GiB, allocated=2 * GiB)
    # free = 64 - 10 = 54 GiB -> floor(0.9 * 54 / 6) = floor(8.1) = 8 (allocated bytes would give 0 -> 1)
    assert devices.chunk_batch_size(20, "npu", 6) == 8


def test_cpu_chunk_batch_size_is_one_unless_capped():
    assert devices.chunk_batch_size(10, "cpu", 1.0) == 1
    assert devices.chunk_batch_size(10, "cpu", 1.0, cap=4) == 4
    assert devices.chunk_batch_size(3, "cpu", 1.0, cap=4) == 3


@pytest.mark.parametrize(("arguments", "name"), [
    ((0, "cpu", 1.0, None), "num_chunks"), ((2.0, "cpu", 1.0, None), "num_chunks"),
    ((True, "cpu", 1.0, None), "num_chunks"), ((2, "cpu", 1.0, 0), "cap"),
    ((2, "cpu", 0.0, None), "max_gb_per_item"), ((2, "cpu", -1.0, None), "max_gb_per_item"),
    ((2, "cpu", float("nan"), None), "max_gb_per_item"), ((2, "cpu", "1", None), "max_gb_per_item"),
])
def test_chunk_batch_size_validates_arguments(arguments, name):
    with pytest.raises(ValueError, match=f"^{name}="):
        devices.chunk_batch_size(*arguments)


# ---------------------------------------------------------------------------------------------------------------
# Seeds


def test_seed_everything_is_reproducible():
    import random

    import numpy as np

    def draw():
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    devices.seed_everything(1234, "cpu")
    first = draw()
    devices.seed_everything(1234)
    assert draw() == first


def test_simulated_npu_seed_everything_seeds_the_npu(monkeypatch):
    fake = install_simulated_npu(monkeypatch)
    devices.seed_everything(7, "npu:0")
    assert fake.calls == [("manual_seed_all", 7)]
    devices.seed_everything(8)  # all usable accelerators
    assert fake.calls[-1] == ("manual_seed_all", 8)


@pytest.mark.parametrize("bad", [-1, 2**32, 1.5, "3", True])
def test_seed_everything_validates_the_seed(bad):
    with pytest.raises(ValueError, match=r"^seed="):
        devices.seed_everything(bad)


# ---------------------------------------------------------------------------------------------------------------
# Attention kernels and error classification


def install_simulated_flash_attn(monkeypatch):
    module = types.ModuleType("flash_attn")
    module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    devices.clear_caches()


def test_simulated_cuda_flash_attn_usable_only_with_half_precision_and_ampere(monkeypatch):
    install_simulated_cuda(monkeypatch)
    assert not kernel_probes.is_flash_attn_usable("cuda", torch.float16)  # package absent
    install_simulated_flash_attn(monkeypatch)
    assert kernel_probes.is_flash_attn_usable("cuda", torch.float16)
    assert kernel_probes.is_flash_attn_usable("cuda:0", "bf16")
    assert not kernel_probes.is_flash_attn_usable("cuda", torch.float32)
    assert not kernel_probes.is_flash_attn_usable("cpu", torch.float16)
    assert not kernel_probes.is_flash_attn_usable(torch.device("meta"), torch.float16)
    assert not kernel_probes.is_flash_attn_usable("cuda", torch.float64)
    with pytest.raises(ValueError, match="dtype='fp64'"):
        kernel_probes.is_flash_attn_usable("cuda", "fp64")
    install_simulated_cuda(monkeypatch, capability=(7, 5))
    assert not kernel_probes.is_flash_attn_usable("cuda", torch.float16)


def test_simulated_npu_flash_attn_never_usable_but_fusion_kernel_found(monkeypatch):
    assert kernel_probes.npu_fusion_attention_fn() is None  # torch_npu absent
    install_simulated_npu(monkeypatch)
    install_simulated_flash_attn(monkeypatch)
    assert not kernel_probes.is_flash_attn_usable("npu", torch.float16)
    assert kernel_probes.npu_fusion_attention_fn() is fake_npu_attention


@pytest.mark.parametrize("message", [
    "Non-finite logits at step 3",
    "probability tensor contains either `inf`, `nan` or element < 0",
    "CUDA error: device-side assert triggered\nCUDA kernel errors might be asynchronously reported",
    "EZ9999: Inner Error! The error from device(chipId:0, dieId:0), serial number is 3, there is an aicore error "
    "exception, core id is 12, error code = 0x800000",
    "there is an aivec error exception, core id is 40, error code = 0x800000",
    "ACL stream synchronize failed, error code:507015",
    "NPU function error: c10_npu::acl::AclrtSynchronizeStreamWithTimeout(stream), error code is 507035\n"
    "[Error]: The vector core execution is abnormal. ",
])
def test_stability_errors_are_recognised(message):
    assert failures.is_stability_error(RuntimeError(message))
    assert not failures.is_out_of_memory_error(RuntimeError(message))


@pytest.mark.parametrize("error", [
    ValueError("text='' is empty; give non-empty text"),
    RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"),
    RuntimeError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("EZ9999: Inner Error! Op Sort does not support this dtype"),
    RuntimeError("[ERROR] ERR01002 OPS invalid type"),
    RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB; non-finite garbage follows"),
])
def test_ordinary_errors_and_oom_are_not_stability_errors(error):
    assert not failures.is_stability_error(error)


@pytest.mark.parametrize("error", [
    OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("NPU out of memory. Tried to allocate 1.50 GiB (NPU 0; 32.00 GiB total capacity)"),
    RuntimeError("EL0004: Failed to allocate memory."),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
    MemoryError(),
])
def test_out_of_memory_errors_are_recognised(error):
    assert failures.is_out_of_memory_error(error)
    assert not failures.is_stability_error(error)


def test_error_classification_follows_explicit_causes():
    try:
        try:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        except RuntimeError as inner:
            raise RuntimeError("voice clone chunk 2 failed") from inner
    except RuntimeError as outer:
        assert failures.is_stability_error(outer)
    assert not failures.is_out_of_memory_error(ValueError("max_new_frames=0 is not supported"))


@pytest.mark.parametrize(("device", "backend"), [("npu:0", "sdpa"), ("cuda", "sdpa"), ("cpu", "eager")])
def test_fallback_attention_implementation_per_device(device, backend):
    assert devices.fallback_attention_implementation(device) == backend


# ---------------------------------------------------------------------------------------------------------------
# Environment


def test_npu_environment_defaults_are_set_only_when_unset():
    environ = {"TASK_QUEUE_ENABLE": "2"}
    applied = environment.apply_npu_environment_defaults(environ)
    assert applied == {"PYTORCH_NPU_ALLOC_CONF": "expandable_segments:True"}
    assert environ == {"TASK_QUEUE_ENABLE": "2", "PYTORCH_NPU_ALLOC_CONF": "expandable_segments:True"}
    assert environment.apply_npu_environment_defaults(environ) == {}
    empty: dict[str, str] = {}
    assert environment.apply_npu_environment_defaults(empty) == environment.NPU_ENVIRONMENT_DEFAULTS == empty


def test_describe_environment_on_cpu():
    info = environment.describe_environment()
    assert set(info) == {"python", "platform", "torch", "transformers", "torch_npu", "cann", "cuda", "device",
                         "device_type", "device_name", "device_count"}
    assert info["torch"] == torch.__version__
    assert info["device"] == "cpu" and info["device_type"] == "cpu" and info["device_count"] == 1
    assert info["torch_npu"] is None and info["cann"] is None and info["cuda"] is None
    assert info["transformers"] == importlib.metadata.version("transformers")


def test_simulated_cuda_describe_environment(monkeypatch):
    install_simulated_cuda(monkeypatch, count=2)
    info = environment.describe_environment("cuda:1")
    assert (info["device"], info["device_name"], info["device_count"], info["cuda"]) == \
        ("cuda:1", "Simulated GPU", 2, "12.4")


@pytest.mark.parametrize("variable", ["ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH"])
def test_simulated_npu_describe_environment_reads_cann_version(monkeypatch, tmp_path, variable):
    (tmp_path / "runtime").mkdir()
    (tmp_path / "runtime" / "version.info").write_text("Version=8.0.RC3\nversion_dir=8.0.RC3\n")
    monkeypatch.setenv(variable, str(tmp_path))
    install_simulated_npu(monkeypatch)
    info = environment.describe_environment("cpu")
    assert info["cann"] == "8.0.RC3"
    assert info["torch_npu"] == "2.6.0.post-simulated"
