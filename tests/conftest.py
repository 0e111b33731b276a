"""Shared test helpers: repository import path and access to ../shared fixtures."""

from __future__ import annotations

import os
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("MOSS_TTS_SHARED_DIR", ROOT.parent / "shared"))

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
__import__("repo_imports").install()  # `import devices` means the package module moss_tts_nano.devices (repo_imports.py)

from torch_compat import SAFE_TORCH_LOAD_VERSION, torch_version  # noqa: E402

# Before torch 2.6 torch.load is unsafe: .bin checkpoints are read by safe_checkpoint.py there (tests/test_safe_checkpoint.py).
needs_safe_torch_load = pytest.mark.skipif(
    torch_version() < SAFE_TORCH_LOAD_VERSION,
    reason=f"torch {torch.__version__} has no safe torch.load (CVE-2025-32434); "
           "tests/test_safe_checkpoint.py covers the reader used there instead",
)

# The tests run tiny models made of thousands of small ops: on a small shared CPU, OpenMP barriers between
# threads cost far more than they save (about 10x slower). Results do not depend on the thread count.
torch.set_num_threads(int(os.environ.get("MOSS_TTS_TEST_THREADS", "1")))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "device: runs on an NPU or GPU against CPU float32 (tests/test_device.py); skipped without one")


def shared_path(*parts: str) -> pathlib.Path:
    """Return a path under ../shared, or skip the calling test with the reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(
            f"{path} is not available: these tests read the shared fixtures that CI places beside the "
            "clone (../shared); set MOSS_TTS_SHARED_DIR to point elsewhere"
        )
    return path


def load_script(name: str, path: pathlib.Path):
    """Import a script that is not a module of the package (benchmarks/*.py) under ``name``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


class TorchKernels:
    """Context manager that records the name of every torch kernel the current thread runs (``detach``, ``cat``)."""

    def __enter__(self) -> "TorchKernels":
        from torch.utils._python_dispatch import TorchDispatchMode

        ops = self.ops = []

        class _Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                ops.append(str(func).split(".")[1])
                return func(*args, **(kwargs or {}))

        self._mode = _Record()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._mode.__exit__(*exc_info)


@pytest.fixture(params=["cpu fast paths", "accelerator path"])
def cpu_path(request, monkeypatch):
    """Run the test twice: with the CPU fast paths, and with MOSS_TTS_CPU_FAST_PATHS=0 (the operations an accelerator
    runs: real-valued RoPE, F.linear, no int8). Yields whether the fast paths are on."""
    import devices

    fast = request.param == "cpu fast paths"
    monkeypatch.setenv("MOSS_TTS_CPU_FAST_PATHS", "1" if fast else "0")
    devices.clear_caches()  # the variable is read once per process
    yield fast
    monkeypatch.undo()
    devices.clear_caches()
