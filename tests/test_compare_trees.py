"""benchmarks/compare_trees.py runs each tree in a subprocess of its own, in either thread layout, and reports every
level and the plain streams with their ratios (no timing checks here; the same tree stands in for the baseline)."""

from __future__ import annotations

import json
import pathlib

from conftest import load_script

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_both_trees_are_measured_at_every_level_in_the_server_layout(tmp_path):
    layout = "server"  # the model and the plain streams in threads that end (the default "main" runs them inline)
    script = load_script("moss_compare_trees", ROOT / "benchmarks" / "compare_trees.py")
    output = tmp_path / "trees.json"
    assert script.main(["--baseline", str(ROOT), "--levels", "1,2", "--frames", "3", "--rounds", "1",
                        "--layout", layout, "--threads", "1", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert report["layout"] == layout and len(report["rounds"]) == 1
    for tree in ("baseline", "new"):
        figures = report["median_frames_per_s"][tree]
        assert set(figures) == {"plain_first", "1", "2", "plain_last", "plain"} and min(figures.values()) > 0
    assert set(report["new_engine_vs_new_plain"]) == {"plain_first", "1", "2", "plain_last"}
