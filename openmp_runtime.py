"""Release the calling thread's idle OpenMP team (CPU; GNU OpenMP, the runtime of torch's Linux wheels).

GNU OpenMP gives every thread that runs a parallel region a team of pooled threads and keeps it while that thread
lives. Once the process holds more pooled threads than CPUs, every team spins shorter before it sleeps, and a frame
step's many small parallel regions then wait on a futex: one product ran 20-30% slower in a thread beside a main
thread that had run torch (docs/performance.md, "OpenMP teams").

`release_idle_team()` frees the calling thread's team with OpenMP 5.0's `omp_pause_resource_all(omp_pause_soft)`. In
libgomp that pauses the calling thread's pool only (`gomp_pause_host`: the pooled threads exit and are joined, and
the process's count of pooled threads drops); the thread's next parallel region builds a new team of the same size,
so no result and no setting changes. Nothing else is touched: other OpenMP runtimes (LLVM's, Intel's) are left
alone, since only libgomp's per-thread pause was read and tested here, and a libgomp without OpenMP 5.0 (GCC < 9,
e.g. the one in torch 2.3.1's x86 wheel; its aarch64 wheel, an Ascend host's, has the call) has none;
`release_idle_team()` then returns False and does nothing.
"""

from __future__ import annotations

if not __package__:  # imported by file name from a clone's root: become a package member (see repo_imports.py)
    __import__("repo_imports").adopt(globals())

import ctypes
import os
import threading
from typing import Optional

import torch  # noqa: F401  (imported first: torch loads its OpenMP runtime, which `_resolve` then finds)

_OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: omp_pause_soft = 1, omp_pause_hard = 2
_lock = threading.Lock()
_pauses: Optional[list] = None  # the `omp_pause_resource_all` of every GNU OpenMP mapped in this process
_why_not = ""


def _mapped_gnu_openmp(maps_path: str = "/proc/self/maps") -> list[str]:
    """Paths of the GNU OpenMP libraries this process has loaded (Linux; empty elsewhere)."""
    try:
        with open(maps_path, encoding="utf-8", errors="replace") as maps:
            paths = {line.split(maxsplit=5)[-1].strip() for line in maps if "libgomp" in line}
    except OSError:
        return []
    return sorted(path for path in paths if os.path.basename(path).startswith("libgomp") and ".so" in path)


def _resolve() -> list:
    global _pauses, _why_not
    if _pauses is not None:  # resolved once; the lock only guards the first resolution
        return _pauses
    with _lock:
        if _pauses is None:
            pauses, missing = [], []
            for path in _mapped_gnu_openmp():
                try:
                    function = ctypes.CDLL(path).omp_pause_resource_all
                except (OSError, AttributeError):
                    missing.append(os.path.basename(path))
                    continue
                function.argtypes, function.restype = [ctypes.c_int], ctypes.c_int
                pauses.append(function)
            _why_not = "" if pauses else (
                f"{', '.join(missing)} has no omp_pause_resource_all (OpenMP 5.0)" if missing
                else "no GNU OpenMP runtime is loaded in this process")
            _pauses = pauses
        return _pauses


def release_idle_team() -> bool:
    """Free the calling thread's idle OpenMP team, if it has one. True when a runtime took the call.

    Call it only where the thread has finished its parallel work for a while (it is waiting, or hands its work to
    another thread): its next parallel region pays a thread start to build the team again."""
    released = False
    for pause in _resolve():
        released = pause(_OMP_PAUSE_SOFT) == 0 or released
    return released


def unavailable_reason() -> str:
    """Why `release_idle_team` does nothing here ("" when it works)."""
    _resolve()
    return _why_not


__all__ = ["release_idle_team", "unavailable_reason"]
