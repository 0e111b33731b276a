"""Side-by-side speed of two checkouts (this tree and a baseline, e.g. 588426c in a scratch folder), alternating.

Each round runs one subprocess per tree, in turn, so that a change of load on the machine touches both alike; every
subprocess builds the demo model and measures, with the CLI sampling settings and a 1 s voice-clone reference:
plain `inference_stream` (one request, no engine) and `SynthesisEngine` with 1..N streams submitted at once
(aggregate frames/s, prompt prefill and codec decode included). Ratios are taken within a round.

    python benchmarks/compare_trees.py --baseline /path/to/588426c --levels 1,2,4,8 --rounds 2
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
if __import__("os").path.isfile(sys.argv[1] + "/repo_imports.py"):  # trees with relative imports only
    __import__("repo_imports").install()
from cli_common import CLI_SAMPLING_DEFAULTS
from demo import build_demo_assets, demo_prompt_audio
from engine import SynthesisEngine
from pipeline import encode_prompt_audio
frames, levels, precision = int(sys.argv[2]), [int(x) for x in sys.argv[3].split(",")], sys.argv[4]
if int(sys.argv[5]):
    torch.set_num_threads(int(sys.argv[5]))
def here(work):  # --layout server: in a thread that ends with the work (its OpenMP team goes with it)
    if sys.argv[6] == "main":
        return work()
    out = {}
    thread = threading.Thread(target=lambda: out.update(value=work()))
    thread.start()
    thread.join()
    return out["value"]
text = "The quick brown fox jumps over the lazy dog while the band plays on in the distance."
assets = here(lambda: build_demo_assets(seed=0))
model = assets.model
here(lambda: model.set_weight_precision(precision))
codes = here(lambda: encode_prompt_audio(assets.codec, demo_prompt_audio(seconds=1.0)))
kwargs = dict(CLI_SAMPLING_DEFAULTS, max_new_frames=frames, prompt_audio_codes=codes)
res = {"text_tokenizer": assets.tokenizer, "audio_tokenizer": assets.codec}
def plain():
    start = time.perf_counter()
    result = list(model.inference_stream(text, **res, **dict(kwargs, seed=0)))[-1]
    return result["frames"] / (time.perf_counter() - start)
here(lambda: list(model.inference_stream(text, **res, **dict(kwargs, max_new_frames=20, seed=0))))  # warm-up
out = {"plain_first": here(plain)}
with SynthesisEngine(model, **res, max_batch_size=max(levels), max_queue=max(levels)) as engine:
    engine.submit(text, **dict(kwargs, max_new_frames=20, seed=0)).result()  # warm-up
    for level in levels:
        start = time.perf_counter()
        handles = [engine.submit(text, **dict(kwargs, seed=i)) for i in range(level)]
        done = sum(int(h.result()["frames"]) for h in handles)
        out[str(level)] = done / (time.perf_counter() - start)
out["plain_last"] = here(plain)
out["plain"] = (out["plain_first"] + out["plain_last"]) / 2  # before and after the levels
print(json.dumps(out))
'''


def measure(tree: str, frames: int, levels: str, precision: str, threads: int, layout: str = "main") -> dict:
    env = dict(os.environ, PYTHONHASHSEED="0")
    proc = subprocess.run([sys.executable, "-c", CHILD, tree, str(frames), levels, precision, str(threads), layout],
                          capture_output=True,
                          text=True, env=env, cwd=tree, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="a checkout of the baseline commit")
    parser.add_argument("--levels", default="1,2,4,8")
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layout", choices=("main", "server"), default="main",
                        help="main: the model is built and plain streams run in the main thread (a script's layout); "
                             "server: both in threads that end with the work, as serve_npu.py loads its model, so "
                             "the engine's worker holds the only lasting OpenMP team (docs/performance.md)")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    trees = {"baseline": str(Path(args.baseline).resolve()), "new": str(ROOT)}
    rounds = []
    for _ in range(args.rounds):
        rounds.append({name: measure(tree, args.frames, args.levels, args.weight_precision, args.threads or 0,
                                     args.layout)
                       for name, tree in trees.items()})
        print(json.dumps(rounds[-1]), flush=True)
    keys = [key for key in rounds[0]["new"] if key in rounds[0]["baseline"]]
    report = {
        "frames_per_request": args.frames, "reference_seconds": 1.0, "weight_precision": args.weight_precision,
        "layout": args.layout,
        "torch_threads": args.threads or "torch's choice", "cpu": cpu_description(),
        "rounds": rounds, "load_average_at_end": load_average(),
        "median_frames_per_s": {name: {k: statistics.median(r[name][k] for r in rounds) for k in keys}
                                for name in trees},
        "new_vs_baseline_plain": statistics.median(r["new"]["plain"] / r["baseline"]["plain"] for r in rounds),
        "new_engine_vs_new_plain": {k: statistics.median(r["new"][k] / r["new"]["plain"] for r in rounds)
                                    for k in keys if k != "plain"},
        "baseline_engine_vs_baseline_plain": {k: statistics.median(r["baseline"][k] / r["baseline"]["plain"]
                                                                   for r in rounds) for k in keys if k != "plain"},
    }
    write_report(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
