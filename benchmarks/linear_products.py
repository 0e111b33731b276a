"""The float32 CPU products of a decoding step, one against another: the split matvec, F.linear, oneDNN on the plain
weight and oneDNN on a prepacked weight, for 1-16 rows of the released layer shapes. The weights are cycled (24 of
each shape, more than a CPU's last-level cache) so each product reads its weight from memory, as a step through 12
layers does.

    python benchmarks/linear_products.py --threads 1 --output benchmarks/results/linear_kernels.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from measuring import add_run_arguments, apply_threads, cpu_description, load_average, write_report  # noqa: E402

from linear_kernels import _packed_product, packed_onednn_usable, split_matvec_linear  # noqa: E402

SHAPES = ((2304, 768), (3072, 768), (768, 3072))  # c_attn, fc_in, fc_out of a 768-wide layer
WEIGHTS = 24  # of each shape: about 0.2 GB, beyond a CPU's last-level cache


def _onednn_plain(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    flat = x.expand(2, -1).contiguous() if x.shape[0] == 1 else x  # one row would take oneDNN's GEMV
    return torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "none", [], "")


def _time_us(product, weights, rows: int, repeats: int) -> float:
    x = torch.randn(rows, weights[0][0].shape[1])
    for _ in range(2):
        for weight, bias, packed in weights:
            product(x, weight, bias, packed)
    start = time.perf_counter()
    for _ in range(repeats):
        for weight, bias, packed in weights:
            product(x, weight, bias, packed)
    return (time.perf_counter() - start) / repeats / len(weights) * 1e6


def _largest_difference(weights: tuple, rows: int) -> float:
    """The largest |kernel - F.linear| over the kernels, for one weight and `rows` rows (all compute the same)."""
    weight, bias, packed = weights
    x = torch.randn(rows, weight.shape[1])
    reference = F.linear(x, weight, bias)
    return max(float((kernel(x, weight, bias, packed) - reference).abs().max()) for kernel in KERNELS.values())


KERNELS = {
    "split matvec": lambda x, w, b, p: split_matvec_linear(x, w, b),
    "F.linear": lambda x, w, b, p: F.linear(x, w, b),
    "oneDNN, plain weight": lambda x, w, b, p: _onednn_plain(x, w, b),
    "oneDNN, packed weight": lambda x, w, b, p: _packed_product(x, p, b),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser, weight_precision=False)
    parser.add_argument("--rows", default="1,2,3,4,8,16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--weights", type=int, default=WEIGHTS, help=f"weights of each shape, cycled ({WEIGHTS})")
    args = parser.parse_args(argv)
    if not packed_onednn_usable():
        print("oneDNN products on packed weights are not usable here (not x86-64, or no oneDNN)", file=sys.stderr)
        return 1
    apply_threads(args.threads)
    torch.manual_seed(0)
    results = []
    with torch.inference_mode():
        for out_features, in_features in SHAPES:
            weights = []
            for _ in range(args.weights):
                weight, bias = torch.randn(out_features, in_features), torch.randn(out_features)
                weights.append((weight, bias, torch.ops.mkldnn._reorder_linear_weight(weight)))
            for rows in (int(r) for r in args.rows.split(",")):
                entry = {"shape": [out_features, in_features], "rows": rows,
                         "max_abs_difference_to_f_linear": _largest_difference(weights[0], rows)}
                entry.update({name: round(_time_us(kernel, weights, rows, args.repeats), 1)
                              for name, kernel in KERNELS.items()})
                print(json.dumps(entry), file=sys.stderr, flush=True)
                results.append(entry)
    write_report({"unit": "microseconds per product", "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "cpu": cpu_description(), "load_average_at_end": load_average(), "results": results}, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
