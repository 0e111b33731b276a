"""benchmarks/profile_core.py profiles the shared engine core with N streams (no timing checks here): every stream
runs to its end through one core, and each part of a step is found in the profile and fits inside the whole steps."""

from __future__ import annotations

import pathlib

import pytest

from conftest import load_script
from pipeline_assets import TinyAssets

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    return load_script("moss_profile_core", ROOT / "benchmarks" / "profile_core.py")


def test_profile_runs_every_stream_through_one_core_and_finds_each_part(script, tmp_path):
    report = script.profile(TinyAssets(tmp_path), streams=2, frames=3, reference_seconds=0.5)
    assert report["streams"] == 2 and 2 <= report["frames"] <= 6 and report["steps"] >= 1
    parts = report["cumulative_s"]
    assert set(parts) == set(script.PARTS)
    whole = parts["whole steps"]
    for name in ("prefill (global decoder, prompts)", "local codebook loop + sampling",
                 "codec output (streaming decode)"):
        assert 0 < parts[name] <= whole, name
    assert parts["sampling (inside the local loop)"] <= parts["local codebook loop + sampling"]
    assert report["aggregate_frames_per_s"] == pytest.approx(report["frames"] / report["wall_s"])
