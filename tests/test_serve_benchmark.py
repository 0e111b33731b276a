"""benchmarks/serve_load.py drives a real server with concurrent streaming clients (tiny assets, no timing checks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import load_script
from serve_assets import tiny  # noqa: F401 (a fixture)
from serve_assets import running_server, tiny_engine, tiny_state, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def serve_load():
    return load_script("moss_serve_load", ROOT / "benchmarks" / "serve_load.py")


def _check(report: dict, levels: list[int], requests_per_client: int, frames: int) -> None:
    assert [level["clients"] for level in report["levels"]] == levels
    for level in report["levels"]:
        assert level["requests"] == level["clients"] * requests_per_client
        assert level["errors"] == 0 and level["error_messages"] == []
        assert level["audio_s"] == pytest.approx(level["requests"] * frames * 0.08)
        assert level["first_byte_s"]["p50"] > 0 and level["rtf"]["p95"] >= level["rtf"]["p50"] > 0
        assert level["audio_s_per_wall_s"] > 0
    env = report["environment"]
    assert "cpu_model" in env and len(env["load_average_at_start"]) == 3 and len(env["load_average_at_end"]) == 3


def test_levels_against_a_running_server(serve_load, tiny, tmp_path, capsys):
    out = tmp_path / "load.json"
    with running_server(tiny_state(tiny, tiny_engine(tiny))) as server:
        code = serve_load.main(["--url", server.url, "--concurrency", "1,3", "--requests-per-client", "2",
                                "--frames", "3", "--output", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    _check(report, [1, 3], 2, 3)
    assert report["environment"]["server"] is None and report["settings"]["voice"] is None


def test_errors_are_counted_and_fail_the_run(serve_load, tiny, tmp_path):
    out = tmp_path / "load.json"
    with running_server(tiny_state(tiny, tiny_engine(tiny))) as server:
        code = serve_load.main(["--url", server.url, "--concurrency", "2", "--requests-per-client", "1",
                                "--frames", "2", "--voice", "nobody", "--output", str(out)])
    assert code == 1
    level = json.loads(out.read_text())["levels"][0]
    assert level["errors"] == 2 and "unknown voice 'nobody'" in level["error_messages"][0]


def test_it_starts_and_stops_its_own_server(serve_load, tiny, tmp_path):
    checkpoint = write_checkpoint(tmp_path / "ckpt", tiny)
    out = tmp_path / "load.json"
    code = serve_load.main(["--server-args", f"--model-path {checkpoint} --threads 1", "--concurrency", "2",
                            "--requests-per-client", "1", "--frames", "2", "--output", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    _check(report, [2], 1, 2)
    assert report["environment"]["server"].startswith("serving http://127.0.0.1:")
    assert "max_batch_size=2" in report["environment"]["server"]


@pytest.mark.parametrize("argv, message", [
    (["--concurrency", "1,x"], "comma-separated integers"),
    (["--concurrency", "0"], "at least 1"),
    (["--frames", "0"], "--frames must be at least 1"),
])
def test_bad_arguments_are_usage_errors(serve_load, argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        serve_load.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err
