"""benchmarks/idle_threads.py times the main thread's call before and after pool threads ran calls and went idle, in
both trees (no timing checks here; the same tree stands in for the baseline)."""

from __future__ import annotations

import json
import pathlib

from conftest import load_script

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_both_trees_are_timed_before_and_after_the_pool_threads(tmp_path):
    script = load_script("moss_idle_threads", ROOT / "benchmarks" / "idle_threads.py")
    output = tmp_path / "idle.json"
    assert script.main(["--baseline", str(ROOT), "--frames", "2", "--pool-threads", "1", "--rounds", "1",
                        "--threads", "1", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert report["pool_threads"] == 1 and len(report["rounds"]) == 1
    for tree in ("baseline", "new"):
        run = report["rounds"][0][tree]
        assert len(run["before_s"]) == len(run["after_s"]) == 2 and min(run["before_s"] + run["after_s"]) > 0
        assert report["median_after_over_before"][tree] > 0
