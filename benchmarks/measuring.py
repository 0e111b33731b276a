"""What the benchmark scripts share: their common flags (threads, weight precision, output), the machine a figure was
measured on (CPU and load, which skews every timing on a shared machine), and the JSON report (printed, and written
atomically where asked)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
__import__("repo_imports").install()  # the repository's modules by their names (repo_imports.py)

from atomic_files import write_text_atomic  # noqa: E402
from linear_kernels import WEIGHT_PRECISIONS  # noqa: E402


def add_run_arguments(parser: argparse.ArgumentParser, output: Optional[str] = None,
                      weight_precision: bool = True) -> None:
    """--threads, --weight-precision (unless ``weight_precision`` is False) and --output (default ``output``; None:
    print only)."""
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    if weight_precision:
        parser.add_argument("--weight-precision", default="float32", choices=WEIGHT_PRECISIONS,
                            help="decoder Linear weights: float32, or the opt-in int8 mode (CPU only)")
    parser.add_argument("--output", default=output, help="where to write the JSON report" +
                        (f" (default {output})" if output else " (default: print only)"))


def apply_threads(threads: Optional[int]) -> None:
    """--threads: torch's intra-op threads (None or 0 keeps torch's choice)."""
    if threads:
        torch.set_num_threads(threads)


def cpu_info(key: str) -> Optional[str]:
    """A field of the first CPU in /proc/cpuinfo (Linux: "model name", "cpu family", "model", "flags"), else None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


def load_average() -> Optional[list[float]]:
    """1/5/15-minute load averages (other work on the machine skews every timing), where the OS reports them."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def cpu_description() -> str:
    """One line: model name, family/model (a VM's model name is often only the vendor's), CPUs and AVX-512."""
    return (f"{cpu_info('model name') or '?'}, family {cpu_info('cpu family') or '?'} model {cpu_info('model') or '?'}, "
            f"{os.cpu_count()} CPUs, avx512f={'avx512f' in (cpu_info('flags') or '').split()}")


def write_report(report: dict[str, Any], output: Optional[str]) -> None:
    """Print ``report`` as JSON and write it to ``output`` (atomically; folders created) unless that is None."""
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if output:
        write_text_atomic(Path(output), text + "\n")
