"""One `model.inference` call in the main thread, before and after other threads ran calls of their own and went idle
(a server's pool threads between requests), in this tree and a baseline checkout, alternating subprocesses.

A thread that ran torch keeps an OpenMP team while it lives unless the call released it (`openmp_runtime`); with
more pooled threads than CPUs every team spins shorter, so the main thread's call slows down. Each subprocess builds
the demo model, times the main thread's call twice, lets `--pool-threads` threads run one short call each and wait,
then times the main thread's call twice again. The report gives each tree's after / before time per round.

    python benchmarks/idle_threads.py --baseline /path/to/610e439 --rounds 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from measuring import add_run_arguments, cpu_description, load_average, write_report  # noqa: E402

CHILD = r'''
import json, sys, threading, time, torch
sys.path.insert(0, sys.argv[1])
__import__("repo_imports").install()
from cli_common import CLI_SAMPLING_DEFAULTS
from demo import build_demo_assets, demo_prompt_audio
from pipeline import encode_prompt_audio
frames, pool_threads, threads = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if threads:
    torch.set_num_threads(threads)
assets = build_demo_assets(seed=0)
model = assets.model
codes = encode_prompt_audio(assets.codec, demo_prompt_audio(seconds=1.0))
text = "The quick brown fox jumps over the lazy dog while the band plays on in the distance."
kwargs = dict(CLI_SAMPLING_DEFAULTS, prompt_audio_codes=codes, text_tokenizer=assets.tokenizer,
              audio_tokenizer=assets.codec)
def call(max_new_frames, seed=0):
    start = time.perf_counter()
    model.inference(text, **dict(kwargs, max_new_frames=max_new_frames, seed=seed))
    return time.perf_counter() - start
call(min(frames, 10))  # warm-up
before = [call(frames) for _ in range(2)]
stop, done = threading.Event(), [threading.Event() for _ in range(pool_threads)]
def pool_thread(index):
    call(min(frames, 10), seed=index + 1)
    done[index].set()
    stop.wait()  # alive and idle, as a pool thread between requests
pool = [threading.Thread(target=pool_thread, args=(i,), daemon=True) for i in range(pool_threads)]
for thread in pool:
    thread.start()
for event in done:
    event.wait()
after = [call(frames) for _ in range(2)]
stop.set()
print(json.dumps({"before_s": before, "after_s": after}))
'''


def measure(tree: str, frames: int, pool_threads: int, threads: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, tree, str(frames), str(pool_threads), str(threads)],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONHASHSEED="0"), cwd=tree,
                          check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["after_over_before"] = statistics.median(out["after_s"]) / statistics.median(out["before_s"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="a checkout of the baseline commit")
    parser.add_argument("--frames", type=int, default=60, help="frames of each timed call")
    parser.add_argument("--pool-threads", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    add_run_arguments(parser, weight_precision=False)
    args = parser.parse_args(argv)
    trees = {"baseline": str(Path(args.baseline).resolve()), "new": str(ROOT)}
    rounds = []
    for _ in range(args.rounds):
        rounds.append({name: measure(tree, args.frames, args.pool_threads, args.threads or 0)
                       for name, tree in trees.items()})
        print(json.dumps(rounds[-1]), flush=True)
    report = {
        "frames_per_call": args.frames, "pool_threads": args.pool_threads, "reference_seconds": 1.0,
        "torch_threads": args.threads or "torch's choice", "cpu": cpu_description(), "rounds": rounds,
        "after_over_before": {name: [r[name]["after_over_before"] for r in rounds] for name in trees},
        "median_after_over_before": {name: statistics.median(r[name]["after_over_before"] for r in rounds)
                                     for name in trees},
        "load_average_at_end": load_average(),
    }
    write_report(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
