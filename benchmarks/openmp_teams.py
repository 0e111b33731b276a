"""How a second thread's OpenMP team slows torch's small parallel products (CPU): one product timed in the main
thread, then in a new thread while the main thread holds a team (it ran a parallel product), in a new thread after
the main thread released its team (`openmp_runtime.release_idle_team`, what `SynthesisEngine.submit` and its idle
worker do) and, in a fresh process, in a thread of a process whose main thread never ran one.

GNU OpenMP (the runtime of torch's Linux wheels) gives each thread that starts a parallel region a team of its own;
once the process holds more pooled threads than CPUs, it shortens every team's spin-wait, so each of the many
small parallel regions of a frame step waits on a futex instead. Results (us per product) show the effect.

    python benchmarks/openmp_teams.py --output benchmarks/results/openmp_teams.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from measuring import add_run_arguments, apply_threads, cpu_description, load_average, write_report  # noqa: E402
import openmp_runtime  # noqa: E402  (measuring put the repository's modules on the path)


def product_us(repeats: int) -> float:
    """us per one-row product of a (4 x 96 x 768) block weight as a batched matmul (the split matvec's form)."""
    weight, column = torch.randn(4, 96, 768), torch.randn(4, 768, 1)
    for _ in range(repeats // 10 + 1):
        torch.bmm(weight, column)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.bmm(weight, column)
    return 1e6 * (time.perf_counter() - start) / repeats


def in_new_thread(repeats: int) -> float:
    out: list[float] = []
    thread = threading.Thread(target=lambda: out.append(product_us(repeats)))
    thread.start()
    thread.join()
    return out[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3000)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    if args.child:  # a process whose main thread never ran a parallel region
        print(json.dumps({"thread_alone_us": in_new_thread(args.repeats)}))
        return 0
    main_us = product_us(args.repeats)
    beside_us = in_new_thread(args.repeats)
    released = openmp_runtime.release_idle_team()
    after_release_us = in_new_thread(args.repeats) if released else None
    child = [sys.executable, __file__, "--child", "--repeats", str(args.repeats)]
    if args.threads:
        child += ["--threads", str(args.threads)]
    alone = json.loads(subprocess.run(child, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    report = {"main_thread_us": main_us, "thread_beside_a_main_team_us": beside_us,
              "thread_after_the_main_team_was_released_us": after_release_us,
              "release_unavailable": openmp_runtime.unavailable_reason() or None, **alone,
              "torch_threads": torch.get_num_threads(), "cpu": cpu_description(), "load_average_at_end": load_average()}
    write_report(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
