"""Where a frame's time goes, against what this machine can do (demo model at the released sizes, CPU, one stream).

Measures, in one run:
- per generated frame, the global one-row decode and the local codebook loop (with sampling), eager and compiled
  (`compiled_step`), from a 150-row voice-clone prompt with the CLI sampling settings;
- the same frame's products alone (the global decoder's 48 and the local decoder's 68 plus 16 codebook heads, one
  row each, through `linear_kernels.linear`), the global ones after the local ones have filled the cache, as in a frame;
- the floors: the machine's read bandwidth (a sum over 400 MB) and oneDNN's float32 GEMM rate at the prompt's shape.

    python benchmarks/frame_profile.py --frames 60 --output benchmarks/results/frame_profile.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from measuring import add_run_arguments, apply_threads, cpu_description, load_average, write_report  # noqa: E402

import compiled_step  # noqa: E402
from benchmark import generation_settings, use_mode, voice_clone_prompt  # noqa: E402
from demo import build_demo_assets  # noqa: E402
from linear_kernels import PrecisionLinear, linear  # noqa: E402
from model_runner import ModelRunner  # noqa: E402


def frame_split(model: Any, assets: Any, frames: int, mode: str) -> dict[str, float]:
    """Median ms per frame of the global decode and of the local loop over one `generate` call (after a warm-up)."""
    timings: dict[str, list[float]] = {"global": [], "local": []}
    runner_global, runner_local = ModelRunner._global_step, ModelRunner._local_step

    def timed(part: str, step: Callable) -> Callable:
        def run(self: Any, rows: Any, *rest: Any) -> Any:
            start = time.perf_counter()
            out = step(self, rows, *rest)
            if part == "local" or all(row.prompt is None for row in rows):  # the prefill is not a frame
                timings[part].append(time.perf_counter() - start)
            return out
        return run

    use_mode(model, mode)
    ids, mask = voice_clone_prompt(assets)
    settings = generation_settings("cli")
    ModelRunner._global_step, ModelRunner._local_step = timed("global", runner_global), timed("local", runner_local)
    try:
        model.generate(input_ids=ids, attention_mask=mask, **dict(settings, max_new_frames=4))  # warm-up / compile
        timings = {"global": [], "local": []}
        model.generate(input_ids=ids, attention_mask=mask, **dict(settings, max_new_frames=frames))
    finally:
        ModelRunner._global_step, ModelRunner._local_step = runner_global, runner_local
    return {f"{part}_ms_per_frame": 1000 * statistics.median(values) for part, values in timings.items()}


def products_alone(model: Any, repeats: int = 15) -> dict[str, float]:
    """ms for one frame's one-row products: the local decoder at 17 positions with the heads, then the global one."""
    def layers(module: Any) -> list[PrecisionLinear]:
        return [m for m in module.modules() if isinstance(m, PrecisionLinear)]

    local, heads, global_ = layers(model.local_transformer), list(model.audio_lm_heads), layers(model.transformer)
    positions = model.config.n_vq + 1

    inputs = {width: torch.randn(1, width) for width in {layer.in_features for layer in local + heads + global_}}

    def run(weights: list[Any]) -> None:
        for layer in weights:
            linear(inputs[layer.in_features], layer.weight, layer.bias)

    def local_frame() -> None:
        for position in range(positions):
            run(local + ([heads[position - 1]] if position else []))

    out: dict[str, list[float]] = {"local_and_heads_ms": [], "global_ms": []}
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            local_frame()
            middle = time.perf_counter()
            run(global_)
            out["local_and_heads_ms"].append(1000 * (middle - start))
            out["global_ms"].append(1000 * (time.perf_counter() - middle))
    size = lambda layers_: sum(layer.weight.numel() * 4 for layer in layers_)  # noqa: E731  (float32 bytes)
    mb = {"local_and_heads_ms": size(local) * positions + size(heads), "global_ms": size(global_)}
    report = {key: statistics.median(values[2:]) for key, values in out.items()}
    report.update({key.replace("_ms", "_gb_per_s"): mb[key] / report[key] / 1e6 for key in mb})
    return report


def floors(rows: int = 175, read_floats: int = 100_000_000) -> dict[str, float]:
    """The read bandwidth (GB/s, a sum over 400 MB) and the float32 GEMM rate (GFLOP/s) at the prompt's shapes."""
    data = torch.randn(read_floats)
    data.sum()
    start = time.perf_counter()
    for _ in range(5):
        data.sum()
    bandwidth = 5 * data.numel() * 4 / (time.perf_counter() - start) / 1e9
    del data
    rates = []
    for inner, outer in ((768, 3072), (3072, 768), (768, 2304)):
        x, weight = torch.randn(rows, inner), torch.randn(outer, inner)
        with torch.inference_mode():
            linear(x, weight)
            start = time.perf_counter()
            for _ in range(20):
                linear(x, weight)
        rates.append(20 * 2 * rows * inner * outer / (time.perf_counter() - start) / 1e9)
    return {"read_gb_per_s": bandwidth, "prompt_gemm_gflop_per_s": statistics.median(rates), "prompt_rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--compile", choices=("off", "both"), default="both")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    assets = build_demo_assets(seed=0)
    model = assets.model
    model.set_weight_precision(args.weight_precision)
    modes = ["eager", "compiled"] if args.compile == "both" else ["eager"]
    try:
        split = {mode: frame_split(model, assets, args.frames, mode) for mode in modes}
    finally:
        compiled_step.disable(model)
    report = {"frames": args.frames, "weight_precision": args.weight_precision, "threads": torch.get_num_threads(),
              "frame": split, "products_alone": products_alone(model), "floors": floors(),
              "cpu": cpu_description(), "load_average_at_end": load_average()}
    write_report(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
