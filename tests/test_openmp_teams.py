"""benchmarks/openmp_teams.py times one product in the main thread, in a thread beside the main thread's OpenMP
team, in a thread after that team was released, and in a thread of a process without one (no timing checks here:
each figure is measured and reported)."""

from __future__ import annotations

import json
import pathlib

from conftest import load_script

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_placement_is_measured(tmp_path):
    script = load_script("moss_openmp_teams", ROOT / "benchmarks" / "openmp_teams.py")
    output = tmp_path / "teams.json"
    assert script.main(["--repeats", "20", "--threads", "2", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    for key in ("main_thread_us", "thread_beside_a_main_team_us", "thread_alone_us"):
        assert report[key] > 0
    assert report["torch_threads"] == 2 and "family" in report["cpu"]
    if report["release_unavailable"]:  # e.g. torch 2.3.1's libgomp: no OpenMP 5.0 pause
        assert report["thread_after_the_main_team_was_released_us"] is None
    else:
        assert report["thread_after_the_main_team_was_released_us"] > 0
