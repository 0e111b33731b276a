"""What one graph for the one-row global decode would give here: eager against `torch.compile` (key length dynamic).

`compiled_step.py` compiles the local codebook loop and keeps the global one-row decode eager: its key length grows
every frame. This script measures that decode as one graph with the key length as a dynamic size (one graph for
every length, the slot KV cache written in place), eager and compiled alternating, from a prompt of
`--prompt-rows` rows (the demo model at the released sizes, CPU, one stream). It reports ms per decode step, the
compile time, how many graphs were compiled (1: no recompilation as the length grows) and the largest difference
between the two outputs.

    python benchmarks/global_step_graph.py --weight-precision int8 --output benchmarks/results/global_step_graph.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from measuring import add_run_arguments, apply_threads, cpu_description, load_average, write_report  # noqa: E402

from demo import build_demo_assets  # noqa: E402
from kv_cache import write_rows  # noqa: E402
from linear_kernels import register_graph_linear  # noqa: E402
from model_runner import _NO_MASK, ModelRunner, SlotGlobal  # noqa: E402


class _GraphView:
    """A `SlotGlobal` decode's cache view with only tensors and one int (`end`) in it, so that a graph over it does
    not depend on the step's length except through `end` (a dynamic size)."""

    def __init__(self, keys: list, values: list, index: torch.Tensor, positions: torch.Tensor, end: int) -> None:
        self.keys, self.values, self.index, self.positions, self.end = keys, values, index, positions, end
        self.length = 0  # GPT2Decoder.forward advances it (unused here)

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return write_rows(self.keys[layer], self.values[layer], self.index, self.positions, key, value)

    def attention(self, attend: Any) -> Callable:
        def attend_slot(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: Any, scale: float) -> Any:
            return attend(q, keys[:, :, : self.end], values[:, :, : self.end], _NO_MASK, scale)
        return attend_slot


def graph_decode(model: Any, attend: Any, rotate: Callable, tables: tuple, embeds: torch.Tensor,
                 positions: torch.Tensor, index: torch.Tensor, end: int, keys: list, values: list) -> torch.Tensor:
    """`SlotGlobal.decode` of one slot's row (1, 1, H) at `positions` (1,) in slot `index` (1,), keys up to `end`.
    The positions' RoPE comes prepared as its kernel `rotate` and `tables` (outside the graph: the kernel plan reads
    the environment, torch 2.3's dynamo cannot build the `Rotation` dataclass and guards on its identity)."""
    rope = lambda qk: rotate(qk, *tables)  # noqa: E731
    view = _GraphView(keys, values, index, positions, end)
    out, _ = model.transformer(embeds, rope, _NO_MASK, view.attention(attend), view)
    return out[:, 0]


class GraphDecoder:
    """The one-row decode of a `SlotGlobal` through `graph_decode` compiled with `backend` (dynamic sizes), as a
    code object of its own (dynamo caches per code object, so `graphs` counts this decoder's graphs only)."""

    def __init__(self, backend: Any = "inductor") -> None:
        register_graph_linear()  # the graph's products run eager's kernels; int8 layers stay int8 (as compiled_step)
        self.code = graph_decode.__code__.replace(co_name=f"graph_decode_{id(self)}")
        function = types.FunctionType(self.code, graph_decode.__globals__, self.code.co_name)
        self.compiled = torch.compile(function, backend=backend, dynamic=True)

    @property
    def graphs(self) -> int:
        """Graphs compiled so far (dynamo's cache entries for this decoder's code)."""
        return len(torch._dynamo.eval_frame._debug_get_cache_entry_list(self.code))

    def decode(self, slot_global: SlotGlobal, slot: int, embeds: torch.Tensor) -> torch.Tensor:
        cache = slot_global.cache
        length = cache.lengths[slot]
        model, positions = slot_global.model, torch.tensor([length])
        rope = model.rotation(model.transformer, positions[:, None])
        out = self.compiled(model, slot_global.attend, rope.rotate, rope.tables, embeds, positions,
                            torch.tensor([slot]), length + 1, cache.keys, cache.values)
        cache.lengths[slot] = length + 1
        return out


def decoder_with_prompt(model: Any, prompt_rows: int, steps: int, seed: int = 0) -> tuple[SlotGlobal, torch.Tensor]:
    """A one-slot `SlotGlobal` holding a random prompt of `prompt_rows` rows, room for `steps` more, and one row."""
    runner = ModelRunner(model, 1)
    slot_global = runner.global_
    slot_global.reserve(prompt_rows + steps)
    hidden = model.transformer.wte.weight.shape[1]
    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        slot_global.prefill(0, torch.randn(prompt_rows, hidden, generator=generator))
    return slot_global, torch.randn(1, 1, hidden, generator=generator)


def compare(model: Any, prompt_rows: int, steps: int, rounds: int, backend: Any = "inductor") -> dict[str, Any]:
    """ms per one-row decode step, eager and as one graph, alternating round by round (see the module docstring)."""
    slot_global, row = decoder_with_prompt(model, prompt_rows, steps)
    graph = GraphDecoder(backend)

    def run(decode: Callable) -> tuple[float, torch.Tensor]:
        slot_global.cache.lengths[0] = prompt_rows
        outputs = []
        start = time.perf_counter()
        for _ in range(steps):
            outputs.append(decode(row))
        return 1000 * (time.perf_counter() - start) / steps, torch.cat(outputs)

    eager_step = lambda x: SlotGlobal.decode(slot_global, [0], x)  # noqa: E731
    graph_step = lambda x: graph.decode(slot_global, 0, x)  # noqa: E731
    timings: dict[str, list[float]] = {"eager": [], "graph": []}
    with torch.inference_mode():
        _, eager_out = run(eager_step)
        start = time.perf_counter()
        _, graph_out = run(graph_step)
        compile_s = time.perf_counter() - start
        for _ in range(rounds):
            for name, step in (("eager", eager_step), ("graph", graph_step)):
                timings[name].append(run(step)[0])
    eager_ms, graph_ms = statistics.median(timings["eager"]), statistics.median(timings["graph"])
    return {"prompt_rows": prompt_rows, "steps": steps, "rounds": rounds,
            "eager_ms_per_step": eager_ms, "graph_ms_per_step": graph_ms, "graph_vs_eager": eager_ms / graph_ms,
            "runs_ms": timings, "first_graph_run_s": compile_s, "graphs_compiled": graph.graphs,
            "max_abs_difference": float((eager_out - graph_out).abs().max())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-rows", type=int, default=175)
    parser.add_argument("--steps", type=int, default=20, help="decode steps per timed run")
    parser.add_argument("--rounds", type=int, default=15)
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    model = build_demo_assets(seed=0).model
    model.set_weight_precision(args.weight_precision)
    report = compare(model, args.prompt_rows, args.steps, args.rounds)
    report.update({"weight_precision": args.weight_precision, "threads": torch.get_num_threads(),
                   "torch": torch.__version__, "cpu": cpu_description(), "load_average_at_end": load_average()})
    write_report(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
