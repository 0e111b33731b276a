"""Where a step of the shared engine core spends its time with N streams (demo model, CPU): prefill, the global
decode, the local codebook loop and sampling, and the codec output. Runs a core in this thread (what the engine's
worker does) under cProfile and reports the cumulative seconds of each part.

    python benchmarks/profile_core.py --streams 4 --frames 100 --weight-precision float32
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import pstats
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from measuring import add_run_arguments, apply_threads, cpu_description, load_average, write_report  # noqa: E402

from cli_common import CLI_SAMPLING_DEFAULTS  # noqa: E402
from demo import build_demo_assets, demo_prompt_audio  # noqa: E402
from engine_core import EngineCore  # noqa: E402
from pipeline import Plan, core_request, encode_prompt_audio, plan_chunks  # noqa: E402
from shared_resources import cached_resources  # noqa: E402
from synthesis_request import build_request  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog while the band plays on in the distance."
PARTS = {  # report name -> (file suffix, function name) in the profile
    "prefill (global decoder, prompts)": ("model_runner.py", "prefill"),
    "decode (global decoder, one row per stream)": ("model_runner.py", "decode"),
    "local codebook loop + sampling": ("generation.py", "sample_frame"),
    "sampling (inside the local loop)": ("sampling.py", "_select"),
    "codec output (streaming decode)": ("codec_output.py", "flush"),
    "whole steps": ("engine_core.py", "step"),
}


def profile(assets: Any, streams: int, frames: int, reference_seconds: float) -> dict[str, Any]:
    """Run `streams` voice-clone streams of `frames` frames through one core (after a 2-frame warm-up request) under
    cProfile; the wall time, the frames made and the cumulative seconds of each of PARTS."""
    resources = cached_resources(assets.model, text_tokenizer=assets.tokenizer, audio_tokenizer=assets.codec)
    codes = encode_prompt_audio(assets.codec, demo_prompt_audio(seconds=reference_seconds))
    core = EngineCore(assets.model, assets.codec, slots=streams, shared=True)
    requests = []
    for seed in range(streams):
        request = build_request(TEXT, **dict(CLI_SAMPLING_DEFAULTS, max_new_frames=frames,
                                             prompt_audio_codes=codes, seed=seed))
        plan = Plan(request, resources, codes, *plan_chunks(request, resources), None,
                    request.call_generator(assets.model.device))
        requests.append(core_request(plan, stream=True, request_id=str(seed)))
    warm = core_request(plan, stream=True, request_id="warm-up")
    warm.params = dataclasses.replace(warm.params, max_new_frames=2)
    core.add(warm)
    while not warm.done:
        core.step()
    for request in requests:
        core.add(request)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    steps = 0
    while not all(r.done for r in requests):
        core.step()
        steps += 1
    profiler.disable()
    wall = time.perf_counter() - start
    made = sum(sum(c.shape[0] for c in r.codes) for r in requests)
    stats = pstats.Stats(profiler).stats
    parts = {name: sum(entry[3] for (path, _, func), entry in stats.items()
                       if path.endswith(suffix) and func == function)
             for name, (suffix, function) in PARTS.items()}
    return {"streams": streams, "frames": made, "steps": steps, "wall_s": wall,
            "aggregate_frames_per_s": made / wall, "reference_seconds": reference_seconds, "cumulative_s": parts,
            "note": "cProfile adds overhead per Python call; compare the parts with each other"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--reference-seconds", type=float, default=1.0)
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    assets = build_demo_assets(seed=0)
    assets.model.set_weight_precision(args.weight_precision)
    report = profile(assets, args.streams, args.frames, args.reference_seconds)
    report.update({"weight_precision": args.weight_precision, "torch_threads": torch.get_num_threads(),
                   "cpu": cpu_description(), "load_average_at_end": load_average()})
    write_report(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
