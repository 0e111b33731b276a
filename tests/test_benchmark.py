"""benchmarks/benchmark.py runs every section and writes the JSON the README quotes (tiny assets, no timing checks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import cpu_fast_paths
from conftest import load_script
from serve_assets import tiny  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def benchmark():
    return load_script("moss_benchmark", ROOT / "benchmarks" / "benchmark.py")


@pytest.fixture
def tiny_benchmark(benchmark, tiny, monkeypatch):
    monkeypatch.setattr(benchmark, "build_demo_assets", lambda seed=0: tiny)
    yield benchmark
    tiny.model.set_weight_precision("float32")


def _run(module, tmp_path, *extra):
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    grad = torch.is_grad_enabled()
    assert module.main(["--repeats", "2", "--frames", "3", "--e2e-frames", "3", "--output", str(out), *extra]) == 0
    assert torch.get_num_threads() == threads and torch.is_grad_enabled() == grad  # no global state left behind
    return json.loads(out.read_text())


def test_every_section_is_measured_and_written(tiny_benchmark, tmp_path, capsys):
    report = _run(tiny_benchmark, tmp_path, "--e2e-prompt-seconds", "0.5")
    assert json.loads(capsys.readouterr().out) == report  # printed and written alike
    env = report["environment"]
    assert env["device_type"] == "cpu" and env["dtype"] == "float32" and env["weight_precision"] == "float32"
    assert env["threads"] == torch.get_num_threads() and "cpu_model" in env and "load_average_at_start" in env
    assert "cpu_capability" in env and "cpu_family_model" in env and "load_average_at_end" in env
    generation = report["generation_frames_per_s"]
    assert len(generation["runs"]) == 2 and generation["median"] > 0 and generation["frames"] == 3
    assert generation["prompt_rows"] == tiny_benchmark.PROMPT_ROWS
    assert generation["cpu_ms_per_frame"]["median"] > 0
    for key in ("one_shot_rtf", "streaming_4frame_rtf"):
        assert len(report["codec"][key]["runs"]) == 2 and report["codec"][key]["median"] > 0
    e2e = report["end_to_end_streaming"]
    assert len(e2e["runs"]) == 2 and e2e["rtf"] > 0 and e2e["first_audio_s"] > 0
    assert e2e["prompt_seconds"] == 0.5
    assert all(0 < run["frames"] <= 3 and run["audio_s"] > 0 for run in e2e["runs"])
    assert report["peak_memory_bytes"] > 0 and report["peak_memory_kind"] == "process peak RSS"


def test_int8_mode_and_skipped_sections(tiny_benchmark, tmp_path):
    report = _run(tiny_benchmark, tmp_path, "--weight-precision", "int8", "--skip", "codec,e2e")
    assert report["environment"]["weight_precision"] == "int8"
    assert "generation_frames_per_s" in report and "codec" not in report and "end_to_end_streaming" not in report


def test_concurrency_section_runs_every_level_in_rounds(tiny_benchmark, tmp_path):
    report = _run(tiny_benchmark, tmp_path, "--skip", "generation,codec,e2e", "--concurrency", "1,2",
                  "--concurrency-frames", "3", "--e2e-prompt-seconds", "0.5")
    section = report["concurrency"]
    assert section["batch_invariant"] is False and section["rounds"] == 2 and set(section["levels"]) == {"1", "2"}
    for level, entry in section["levels"].items():
        streams = int(level)
        assert entry["streams"] == streams and entry["aggregate_frames_per_s"] > 0 and entry["cpu_ms_per_frame"] > 0
        assert len(entry["runs"]) == 2 and all(run["frames"] == 3 * streams for run in entry["runs"])
        assert 0 < entry["first_audio_p50_s"] <= entry["first_audio_p95_s"]
        assert len(entry["streams_detail"]) == 2 * streams
        assert all(s["audio_s"] == pytest.approx(3 * 0.08) for s in entry["streams_detail"])
        assert entry["rtf_after_first_audio"]["median"] <= entry["rtf_after_first_audio"]["max"]
        assert isinstance(entry["every_stream_ahead_of_real_time"], bool) and entry["peak_memory_bytes"] > 0
    assert section["levels"]["1"]["aggregate_vs_first_level"] == 1.0
    assert "generation_frames_per_s" not in report and "codes_vs_solo_at_top_level" not in section
    baseline = section["without_engine"]
    assert baseline["streams"] == 1 and len(baseline["runs"]) == 2 and baseline["runs"][0]["frames"] == 3
    assert all(entry["aggregate_vs_without_engine"] > 0 for entry in section["levels"].values())


@pytest.mark.skipif(cpu_fast_paths.cpu_kernel("int8_weights") is None,
                    reason="int8 weights are a CPU fast path: MOSS_TTS_CPU_FAST_PATHS=0")
def test_concurrency_section_batch_invariant(tiny_benchmark, tmp_path):
    report = _run(tiny_benchmark, tmp_path, "--skip", "generation,codec,e2e", "--concurrency", "2",
                  "--concurrency-frames", "2", "--batch-invariant", "--weight-precision", "int8",
                  "--code-agreement")
    assert report["concurrency"]["batch_invariant"] is True and report["environment"]["weight_precision"] == "int8"
    assert report["concurrency"]["levels"]["2"]["runs"][0]["frames"] == 4
    agreement = report["concurrency"]["codes_vs_solo_at_top_level"]
    assert agreement["streams"] == 2 and 0 <= agreement["code_agreement"] <= 1
    assert len(agreement["first_divergent_frame"]) == 2


@pytest.mark.parametrize("argv, message", [
    (["--concurrency", "1,0"], "stream counts must be integers >= 1"),
    (["--concurrency", "1,x"], "is not a comma list of integers"),
    (["--concurrency-frames", "0"], "--concurrency-frames must be at least 1"),
    (["--skip", "codecs"], "unknown section"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--frames", "-2"], "--frames must be at least 1"),
    (["--e2e-prompt-seconds", "0"], "--e2e-prompt-seconds must be in (0, 30]"),
    (["--e2e-prompt-seconds", "45"], "--e2e-prompt-seconds must be in (0, 30]"),
])
def test_bad_arguments_are_usage_errors(benchmark, argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        benchmark.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err
