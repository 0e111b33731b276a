"""benchmarks/linear_products.py times the float32 CPU products of a decoding step (no timing checks here): it
runs every kernel on every shape and row count it is asked for, and they all compute F.linear's product."""

from __future__ import annotations

import json
import pathlib

import pytest

import linear_kernels
from conftest import load_script

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not linear_kernels.packed_onednn_usable(), reason="no oneDNN products on packed weights here")
def test_every_kernel_is_timed_and_computes_the_same_product(tmp_path):
    script = load_script("moss_linear_products", ROOT / "benchmarks" / "linear_products.py")
    output = tmp_path / "products.json"
    assert script.main(["--rows", "1,3", "--repeats", "1", "--weights", "2", "--threads", "1",
                        "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert [(tuple(r["shape"]), r["rows"]) for r in report["results"]] == [
        (shape, rows) for shape in script.SHAPES for rows in (1, 3)]
    for entry in report["results"]:
        assert all(entry[name] > 0 for name in script.KERNELS)
        assert entry["max_abs_difference_to_f_linear"] < 1e-3
    assert "family" in report["cpu"] and report["threads"] == 1
