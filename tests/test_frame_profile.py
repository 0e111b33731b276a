"""benchmarks/frame_profile.py splits a frame's time into the global decode and the local loop and times the same
frame's products alone (no timing checks here): every frame is timed, the products are the model's own layers,
and the byte counts behind its bandwidth figures are the weights a frame reads."""

from __future__ import annotations

import pathlib

import pytest

from conftest import load_script
from pipeline_assets import TinyAssets

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    return load_script("moss_frame_profile", ROOT / "benchmarks" / "frame_profile.py")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return TinyAssets(tmp_path_factory.mktemp("tok"))


def test_frame_split_times_the_decode_and_the_local_loop_of_every_frame(script, assets, monkeypatch):
    calls = {"global": 0, "local": 0}
    runner = script.ModelRunner
    for part in calls:
        step = getattr(runner, f"_{part}_step")
        monkeypatch.setattr(runner, f"_{part}_step",
                            lambda self, *args, _step=step, _part=part: calls.__setitem__(_part, calls[_part] + 1)
                            or _step(self, *args))
    before = (runner._global_step, runner._local_step)
    split = script.frame_split(assets.model, assets, 5, "eager")
    assert set(split) == {"global_ms_per_frame", "local_ms_per_frame"} and min(split.values()) > 0
    assert calls["local"] >= 5 + 1  # warm-up and timed frames (stop may end the warm-up early)
    assert (runner._global_step, runner._local_step) == before  # the timers are removed again


def test_products_alone_reads_every_weight_of_a_frame(script, assets):
    model = assets.model
    report = script.products_alone(model, repeats=3)
    local = sum(m.weight.numel() for m in model.local_transformer.modules() if isinstance(m, script.PrecisionLinear))
    heads = sum(h.weight.numel() for h in model.audio_lm_heads)
    bytes_local = 4 * (local * (model.config.n_vq + 1) + heads)
    expected = bytes_local / report["local_and_heads_ms"] / 1e6
    assert report["local_and_heads_gb_per_s"] == pytest.approx(expected)
    assert report["global_ms"] > 0 and report["global_gb_per_s"] > 0


def test_floors_measure_bandwidth_and_gemm_rate(script):
    report = script.floors(rows=8, read_floats=1_000_000)
    assert report["read_gb_per_s"] > 0 and report["prompt_gemm_gflop_per_s"] > 0 and report["prompt_rows"] == 8
