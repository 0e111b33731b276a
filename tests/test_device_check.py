"""benchmarks/device_check.py (and .sh): planning, judging and reporting, with the accelerator simulated or absent.

No accelerator exists here: the plans for NPUs and GPUs are checked on simulated ones, the steps run for real in a
dry run on the CPU (verify and benchmark in-process on tiny models, the device tests as the subprocess they are on
a card), and failures and timeouts come from a simulated runner.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import compiled_step
import devices
from conftest import load_script
import verify_npu
from pipeline_assets import TinyAssets
from test_devices import block_cuda, block_torch_npu, install_simulated_cuda

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_device_probes():
    """Simulated accelerators must not outlive their test in devices.py's cached probes."""
    yield
    devices.clear_caches()


@pytest.fixture(scope="module")
def check() -> types.ModuleType:
    return load_script("moss_device_check", ROOT / "benchmarks" / "device_check.py")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyAssets:
    return TinyAssets(tmp_path_factory.mktemp("tok"))


class _NpuDevice:
    """Stands in for torch.device("npu:0"), which needs torch_npu to register the device type."""

    type, index = "npu", 0

    def __str__(self) -> str:
        return "npu:0"


def _args(check: types.ModuleType, tmp_path: Path, *argv: str) -> argparse.Namespace:
    return check.build_parser().parse_args(["--output-dir", str(tmp_path), *argv])


# ---------------------------------------------------------------------------------------------------- planning


@pytest.mark.parametrize("bf16, expected", [(True, ["float32", "float16", "bfloat16"]),
                                            (False, ["float32", "float16"])])
def test_simulated_npu_plan_covers_the_dtypes_the_card_supports(check, tmp_path, monkeypatch, bf16, expected):
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(is_bf16_supported=lambda: bf16), raising=False)
    device = _NpuDevice()
    dtypes = check.card_dtypes(device)
    assert [check.dtype_name(d) for d in dtypes] == expected
    verify, bench, tests = check.plan_steps(_args(check, tmp_path), device, dtypes)
    assert verify.argv[2:] == ["--demo", "--devices", "npu:0", "--dtypes", ",".join(expected), "--max-new-frames",
                               "8", "--output-dir", str(tmp_path / "verify")]
    assert bench.argv[bench.argv.index("--device") + 1] == "npu:0" and "--frames" in bench.argv
    assert tests.env == {"MOSS_TTS_TEST_DEVICE": "npu:0", "MOSS_TTS_TEST_DTYPES": ",".join(expected)}
    assert "-m" in tests.argv and tests.argv[tests.argv.index("-m", 2) + 1] == "device"
    assert sum(step.timeout_s for step in (verify, bench, tests)) < 600  # the whole check: under 10 minutes


def test_npu_without_the_bf16_probe_is_checked_without_bfloat16(check, monkeypatch):
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(), raising=False)  # an older torch_npu
    assert torch.bfloat16 not in check.card_dtypes(_NpuDevice())


@pytest.mark.parametrize("bf16", [True, False])
def test_simulated_gpu_is_picked_by_auto_and_planned_with_its_dtypes(check, tmp_path, monkeypatch, bf16):
    block_torch_npu(monkeypatch)
    install_simulated_cuda(monkeypatch, bf16=bf16)
    device = check.resolve_target("auto")
    assert str(device) == "cuda:0"
    assert (torch.bfloat16 in check.card_dtypes(device)) is bf16
    args = _args(check, tmp_path, "--model-path", "ckpt", "--prompt-audio-path", "ref.wav")
    verify = check.plan_steps(args, device, check.card_dtypes(device))[0]
    assert verify.argv[2:6] == ["--model-path", "ckpt", "--prompt-audio-path", "ref.wav"]


def test_with_the_accelerator_absent_auto_is_an_environment_error(check, monkeypatch, tmp_path, capsys):
    block_torch_npu(monkeypatch)
    block_cuda(monkeypatch)
    assert check.main(["--output-dir", str(tmp_path)]) == 1
    assert "no NPU or GPU is visible" in capsys.readouterr().err and not list(tmp_path.iterdir())
    assert check.resolve_target("cpu") == torch.device("cpu")  # named: the dry run


def test_planned_verify_command_is_accepted_by_verify_npu(check, tmp_path):
    device = torch.device("cpu")
    verify = check.plan_steps(_args(check, tmp_path), device, check.card_dtypes(device))[0]
    args = verify_npu.build_parser().parse_args(verify.argv[2:])
    assert args.demo and args.devices == "cpu" and args.dtypes == "float32" and args.max_new_frames == 2


# ---------------------------------------------------------------------------------------------------- dry run


def _in_process_runner(check: types.ModuleType, tiny: TinyAssets, monkeypatch: pytest.MonkeyPatch):
    """Runs verify and the benchmark in this process on tiny models; the device tests as a real subprocess. The
    benchmark's compiled step traces with dynamo's "eager" backend here (inductor compiles a 16-codebook frame for a
    minute or two on this kind of CPU; tests/test_compiled_step.py and the device tests run inductor itself)."""
    benchmark = load_script("moss_benchmark_for_device_check", ROOT / "benchmarks" / "benchmark.py")
    monkeypatch.setattr(benchmark, "build_demo_assets", lambda seed=0: tiny)
    monkeypatch.setattr(verify_npu, "build_demo_assets", lambda seed=0: tiny)
    monkeypatch.setattr(compiled_step, "_auto_backend", lambda model: "eager")
    tools = {"verify": verify_npu.main, "benchmark": benchmark.main}

    def run(step, log: Path):
        if step.name not in tools:
            return check.run_subprocess(step, log)
        with log.open("w") as handle, contextlib.redirect_stdout(handle):
            return tools[step.name](step.argv[2:])

    return run


def test_dry_run_on_cpu_with_the_accelerator_absent_runs_every_step_and_reports(check, tiny, tmp_path,
                                                                               monkeypatch, capsys):
    threads = torch.get_num_threads()
    runner = _in_process_runner(check, tiny, monkeypatch)
    code = check.main(["--device", "cpu", "--output-dir", str(tmp_path)], runner=runner)
    tiny.model.set_weight_precision("float32")
    assert torch.get_num_threads() == threads
    out = capsys.readouterr().out
    report = json.loads((tmp_path / check.JSON_NAME).read_text())
    assert code == 0, (out, report["steps"])
    assert report["overall_pass"] and report["dry_run"] and report["device"] == "cpu"
    assert report["dtypes"] == ["float32"]
    steps = {step["name"]: step for step in report["steps"]}
    assert list(steps) == ["verify", "benchmark", "device_tests"] and all(s["passed"] for s in steps.values())
    target, = steps["verify"]["summary"]["targets"]
    plan = target.pop("kernel_plan")
    assert target == {"device": "cpu", "dtype": "float32", "passed": True, "failed_checks": []}
    assert plan.startswith("rope ") and "attention sdpa/sdpa (requested " in plan  # the plan and why
    assert f"- cpu float32: {plan}" in out  # printed under "Kernel plan"
    bench = steps["benchmark"]["summary"]
    assert bench["generation_frames_per_s"] > 0 and bench["generation_frames_per_s_compiled"] > 0  # eager and compiled
    assert bench["compiled_step"].startswith("compiled (eager, ") and bench["generation_compiled_vs_eager"] > 0
    assert compiled_step.status(tiny.model) == "eager"  # the benchmark leaves the caller's model as it found it
    tests = steps["device_tests"]["summary"]
    assert tests["passed"] >= 5 and tests["failures"] == tests["errors"] == 0  # the device tests ran, on the CPU
    table = (tmp_path / check.TABLE_NAME).read_text()
    assert "dry run on the CPU" in table and "## verify_npu.py" in table and "| device_tests | PASS |" in table
    assert table in out


# ---------------------------------------------------------------------------------------------------- judging


def _write_outputs(step, verify_pass: bool, tests_skipped_all: bool) -> None:
    if step.name == "verify":
        step.output.parent.mkdir(parents=True, exist_ok=True)
        checks = {"load": {"passed": True}, "greedy_codes": {"passed": verify_pass}}
        step.output.write_text(json.dumps({"overall_pass": verify_pass, "results": [
            {"device": "cuda:0", "dtype": "float16", "passed": verify_pass, "checks": checks}]}))
    elif step.name == "device_tests":
        skipped = 11 if tests_skipped_all else 6
        step.output.write_text(f'<testsuites><testsuite tests="11" failures="0" errors="0" skipped="{skipped}"/>'
                               '</testsuites>')


@pytest.mark.parametrize("failure", ["verify check fails", "benchmark times out", "device tests all skip",
                                     "a step crashes without output", "a step leaves only an earlier run's output"])
def test_simulated_gpu_step_failure_fails_the_check_and_is_reported(check, tmp_path, monkeypatch, failure):
    block_torch_npu(monkeypatch)
    install_simulated_cuda(monkeypatch, bf16=False)

    stale = tmp_path / "verify" / "npu_verification_report.json"
    stale.parent.mkdir()
    stale.write_text(json.dumps({"overall_pass": True, "results": []}))

    def runner(step, log: Path):
        log.write_text("simulated\n")
        if failure == "a step leaves only an earlier run's output" and step.name == "verify":
            return 0
        if failure == "benchmark times out" and step.name == "benchmark":
            return None
        if failure == "a step crashes without output" and step.name == "verify":
            return -11
        _write_outputs(step, verify_pass=failure != "verify check fails",
                       tests_skipped_all=failure == "device tests all skip")
        if step.name == "benchmark":
            step.output.write_text(json.dumps({"environment": {"dtype": "bfloat16"}, "peak_memory_bytes": 1}))
        return 1 if failure == "verify check fails" and step.name == "verify" else 0

    assert check.main(["--output-dir", str(tmp_path)], runner=runner) == 1
    report = json.loads((tmp_path / check.JSON_NAME).read_text())
    failed = [step["name"] for step in report["steps"] if not step["passed"]]
    expected = {"verify check fails": ["verify"], "benchmark times out": ["benchmark"],
                "device tests all skip": ["device_tests"], "a step crashes without output": ["verify"],
                "a step leaves only an earlier run's output": ["verify"]}[failure]
    assert failed == expected and not report["overall_pass"] and report["device"] == "cuda:0"
    assert report["dtypes"] == ["float32", "float16"]
    table = (tmp_path / check.TABLE_NAME).read_text()
    assert "**FAIL**" in table and f"| {expected[0]} | FAIL |" in table
    if failure == "benchmark times out":
        assert report["steps"][1]["summary"] == {"error": "timed out after 180 s"}


def test_subprocess_runner_stops_a_step_at_its_time_limit(check, tmp_path):
    step = check.Step("benchmark", [sys.executable, "-c", "import time; time.sleep(30)"], 0.5, {}, None)
    log = tmp_path / "step.log"
    assert check.run_subprocess(step, log) is None and "timed out after" in log.read_text()


def test_device_check_sh_runs_the_driver_from_the_repository_root(tmp_path):
    python = tmp_path / "python"  # a stand-in interpreter that reports how it was called
    python.write_text('#!/bin/sh\necho "cwd=$(pwd)"\necho "args=$*"\n')
    python.chmod(0o755)
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh"), "--device", "npu:1"],
                            capture_output=True, text=True, env={**os.environ, "PYTHON": str(python)}, cwd=tmp_path,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"cwd={ROOT}", "args=benchmarks/device_check.py --device npu:1"]


def test_help_names_the_dry_run(check, capsys):
    assert check.main(["--help"]) == 0
    assert "--device cpu" in capsys.readouterr().out
