"""benchmarks/global_step_graph.py measures the one-row global decode as one graph whose key length is a dynamic size
(no timing checks here): the graph computes what the eager decode computes, writes the same cache rows, and stays
one graph while the length grows."""

from __future__ import annotations

import pathlib

import pytest
import torch

from conftest import load_script
from pipeline_assets import TinyAssets

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    return load_script("moss_global_step_graph", ROOT / "benchmarks" / "global_step_graph.py")


def test_the_graph_decode_equals_eager_step_by_step_in_one_graph(script, tmp_path):
    model = TinyAssets(tmp_path).model
    eager, row = script.decoder_with_prompt(model, prompt_rows=5, steps=6)
    graph, _ = script.decoder_with_prompt(model, prompt_rows=5, steps=6)
    decoder = script.GraphDecoder(backend="eager")  # dynamo's graph run by torch's own kernels: the same ops as eager
    with torch.inference_mode():
        for step in range(6):
            expected = script.SlotGlobal.decode(eager, [0], row + step)
            assert torch.equal(decoder.decode(graph, 0, row + step), expected)
    assert graph.cache.lengths == eager.cache.lengths == [11]
    for mine, theirs in zip(graph.cache.keys + graph.cache.values, eager.cache.keys + eager.cache.values):
        assert torch.equal(mine[:, :, :11], theirs[:, :, :11])
    assert decoder.graphs == 1  # lengths 6..11: one graph, no recompilation as the key length grows


def test_compare_reports_both_steps_and_one_graph(script, tmp_path):
    report = script.compare(TinyAssets(tmp_path).model, prompt_rows=4, steps=3, rounds=2, backend="eager")
    assert len(report["runs_ms"]["eager"]) == len(report["runs_ms"]["graph"]) == 2
    assert report["graphs_compiled"] == 1 and report["max_abs_difference"] == 0.0
    assert report["graph_vs_eager"] == pytest.approx(report["eager_ms_per_step"] / report["graph_ms_per_step"])
