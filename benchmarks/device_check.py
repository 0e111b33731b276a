"""One acceptance command for a machine with an NPU or GPU: verification, benchmark and device tests, one report.

    bash benchmarks/device_check.sh                                  # the first NPU, else the first GPU
    bash benchmarks/device_check.sh --device npu:1 --model-path ./MOSS-TTS-Nano \
        --audio-tokenizer-path ./MOSS-Audio-Tokenizer-Nano --prompt-audio-path reference.wav
    bash benchmarks/device_check.sh --device cpu                     # dry run: the same steps on the CPU, small

Steps, each a subprocess with a time limit (a hang or a crash fails its step, and the report is still written):
1. verify: verify_npu.py on the device in every dtype the card supports, against CPU float32 (--demo weights
   unless --model-path is given);
2. benchmark: benchmarks/benchmark.py on the device in its default dtype, short runs, eager and with the frame step
   compiled (graph capture on the card, inductor in the dry run) side by side;
3. device tests: the test suite's device-marked tests (tests/test_device.py) on the device, in the same dtypes.
Writes <output-dir>/device_check_report.json and device_check_report.md, with each step's log beside them. The
step limits add up to 9.5 minutes, so the whole check ends within 10 minutes on one card.

Exit codes: 0 every step passed, 1 a step failed or timed out (or no accelerator is visible), 2 invalid arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
__import__("repo_imports").install()  # the repository's modules by their names (repo_imports.py)

import environment  # noqa: E402
import devices  # noqa: E402
from atomic_files import write_text_atomic  # noqa: E402
from cli_common import Parser, run_cli  # noqa: E402
from torch_compat import cuda_bf16_supported  # noqa: E402
from verification import JSON_NAME as VERIFY_JSON, TABLE_NAME as VERIFY_TABLE  # noqa: E402
from verification_metrics import dtype_name  # noqa: E402

REPORT_FORMAT = "moss-tts-nano-device-check/1"
JSON_NAME = "device_check_report.json"
TABLE_NAME = "device_check_report.md"
DEFAULT_OUTPUT_DIR = "./verification_results/device_check"
DEVICE_TEST_ENV = ("MOSS_TTS_TEST_DEVICE", "MOSS_TTS_TEST_DTYPES")  # read by tests/test_device.py


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much each step does: small enough for the time limits, large enough to mean something."""

    verify_frames: int
    bench_repeats: int
    bench_frames: int
    bench_prompt_seconds: float


# Why these sizes: on an accelerator the CPU float32 reference of verify (released sizes, 8 frames) dominates;
# the benchmark's 50-frame runs are 4 s of audio each. The dry run only proves the steps work together.
ACCELERATOR_SIZES = Sizes(verify_frames=8, bench_repeats=2, bench_frames=50, bench_prompt_seconds=8.0)
DRY_RUN_SIZES = Sizes(verify_frames=2, bench_repeats=1, bench_frames=2, bench_prompt_seconds=1.0)
STEP_LIMITS_S = {"verify": 270.0, "benchmark": 180.0, "device_tests": 120.0}  # 9.5 minutes in all


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    argv: list[str]
    timeout_s: float
    env: dict[str, str]  # added to the environment
    output: Optional[Path]  # the machine-readable file the step writes


@dataclasses.dataclass
class StepResult:
    name: str
    command: str
    returncode: Optional[int]  # None: timed out
    seconds: float
    log: str
    passed: bool = False
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- planning


def bf16_supported(device: torch.device) -> bool:
    """Whether the card has bfloat16 (CUDA: in hardware; NPU: ``torch.npu.is_bf16_supported()``, no arguments)."""
    if device.type == "cuda":
        return cuda_bf16_supported(torch.cuda)
    probe = getattr(getattr(torch, device.type, None), "is_bf16_supported", None)
    return bool(probe()) if probe is not None else False


def card_dtypes(device: torch.device) -> list[torch.dtype]:
    """float32, float16 and (where the card has it) bfloat16; the dry run on CPU checks float32 only."""
    if device.type == "cpu":
        return [torch.float32]
    return [torch.float32, torch.float16] + ([torch.bfloat16] if bf16_supported(device) else [])


def resolve_target(spec: str) -> torch.device:
    """The device to check. "auto" is the first accelerator (npu, then cuda); the CPU only when named.

    Raises:
        RuntimeError: "auto" on a machine without an accelerator, or a named device that is not usable.
    """
    device = devices.resolve_device(spec)
    if spec == "auto" and device.type == "cpu":
        raise RuntimeError("no NPU or GPU is visible: this check is for a machine with one (--device npu or "
                           "--device cuda says why one is not usable; --device cpu is a dry run on the CPU)")
    return device


def plan_steps(args: argparse.Namespace, device: torch.device, dtypes: Sequence[torch.dtype]) -> list[Step]:
    """The three steps for ``device``, with the dry-run sizes on the CPU."""
    sizes = DRY_RUN_SIZES if device.type == "cpu" else ACCELERATOR_SIZES
    out, python, names = Path(args.output_dir), sys.executable, ",".join(dtype_name(d) for d in dtypes)
    source = ["--model-path", args.model_path] if args.model_path else ["--demo"]
    for flag in ("audio_tokenizer_path", "prompt_audio_path"):
        if getattr(args, flag):
            source += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
    verify = [python, str(ROOT / "verify_npu.py"), *source, "--devices", str(device), "--dtypes", names,
              "--max-new-frames", str(sizes.verify_frames), "--output-dir", str(out / "verify")]
    bench_json = out / "benchmark.json"
    bench = [python, str(ROOT / "benchmarks" / "benchmark.py"), "--device", str(device), "--repeats",
             str(sizes.bench_repeats), "--frames", str(sizes.bench_frames), "--e2e-frames", str(sizes.bench_frames),
             "--e2e-prompt-seconds", str(sizes.bench_prompt_seconds), "--compile", "both", "--output", str(bench_json)]
    tests_xml = out / "device_tests.xml"
    tests = [python, "-m", "pytest", "-q", "-rs", "-m", "device", "-p", "no:cacheprovider",
             f"--junitxml={tests_xml}", str(ROOT / "tests")]
    test_env = dict(zip(DEVICE_TEST_ENV, (str(device), names)))
    return [Step("verify", verify, STEP_LIMITS_S["verify"], {}, out / "verify" / VERIFY_JSON),
            Step("benchmark", bench, STEP_LIMITS_S["benchmark"], {}, bench_json),
            Step("device_tests", tests, STEP_LIMITS_S["device_tests"], test_env, tests_xml)]


# ---------------------------------------------------------------------------------------------------- running


Runner = Callable[[Step, Path], Optional[int]]


def run_subprocess(step: Step, log: Path) -> Optional[int]:
    """Run ``step`` (in this working directory, like the paths it was given) with its output in ``log``.

    Returns:
        The exit code, or None when the step ran past its time limit (it is killed).
    """
    with log.open("w", encoding="utf-8") as handle:
        try:
            return subprocess.run(step.argv, env={**os.environ, **step.env}, stdout=handle,
                                  stderr=subprocess.STDOUT, timeout=step.timeout_s, check=False).returncode
        except subprocess.TimeoutExpired:
            handle.write(f"\ndevice_check: timed out after {step.timeout_s:.0f} s\n")
            return None


def _verify_summary(report: dict) -> tuple[bool, dict[str, Any]]:
    results = [{"device": r["device"], "dtype": r["dtype"], "passed": r["passed"],
                "failed_checks": [name for name, check in r["checks"].items() if not check.get("passed", False)],
                "kernel_plan": _kernel_plan(r["checks"].get("load") or {})}
               for r in report["results"]]
    return bool(report["overall_pass"]), {"targets": results}


def _kernel_plan(load: dict[str, Any]) -> Optional[str]:
    """The RoPE and attention kernels verify_npu's load check planned, and why (None when it did not load)."""
    if "rope" not in load:
        return None
    attention = load.get("attention") or {}
    return (f"rope {load['rope']} ({load.get('rope_reason')}); attention {attention.get('global')}/"
            f"{attention.get('local')} ({load.get('attention_reason')})")


def _benchmark_summary(report: dict) -> tuple[bool, dict[str, Any]]:
    """The eager figures, the compiled step's beside them (`--compile both`) and which step that was."""
    codec = report.get("codec", {})
    summary = {"dtype": report["environment"].get("dtype")}
    for mode, suffix in (("eager", ""), ("compiled", "_compiled")):
        generation = report.get(f"generation_frames_per_s_{mode}", {})
        end_to_end = report.get(f"end_to_end_streaming_{mode}", {})
        summary.update({f"generation_frames_per_s{suffix}": generation.get("median"),
                        f"end_to_end_rtf{suffix}": end_to_end.get("rtf"),
                        f"first_audio_s{suffix}": end_to_end.get("first_audio_s")})
    eager, compiled = summary["generation_frames_per_s"], summary["generation_frames_per_s_compiled"]
    summary["generation_compiled_vs_eager"] = compiled / eager if eager and compiled else None
    summary["compiled_step"] = report["environment"].get("compiled_step")
    summary.update({"codec_one_shot_rtf": codec.get("one_shot_rtf", {}).get("median"),
                    "codec_streaming_rtf": codec.get("streaming_4frame_rtf", {}).get("median"),
                    "peak_memory_bytes": report.get("peak_memory_bytes")})
    return True, summary


def _tests_summary(path: Path) -> tuple[bool, dict[str, Any]]:
    suite = ElementTree.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    # Why passed > 0: every test skipping (the device not seen by pytest) must not count as a pass.
    return counts["failures"] == counts["errors"] == 0 and counts["passed"] > 0, counts


SUMMARIES: dict[str, Callable[[Path], tuple[bool, dict[str, Any]]]] = {
    "verify": lambda path: _verify_summary(json.loads(path.read_text(encoding="utf-8"))),
    "benchmark": lambda path: _benchmark_summary(json.loads(path.read_text(encoding="utf-8"))),
    "device_tests": _tests_summary,
}


def run_step(step: Step, output_dir: Path, runner: Runner) -> StepResult:
    """Run one step and judge it: exit code 0 and a readable output that says it passed."""
    log = output_dir / f"{step.name}.log"
    if step.output is not None:
        step.output.unlink(missing_ok=True)  # a previous run's output must not stand in for this one's
    start = time.perf_counter()
    returncode = runner(step, log)
    result = StepResult(step.name, " ".join(step.argv), returncode, round(time.perf_counter() - start, 1),
                        log.name)
    if returncode is None:
        result.summary = {"error": f"timed out after {step.timeout_s:.0f} s"}
        return result
    try:
        ok, result.summary = SUMMARIES[step.name](step.output)
    except (OSError, ValueError, KeyError, AttributeError, TypeError, ElementTree.ParseError) as exc:
        result.summary = {"error": f"no readable output at {step.output} ({type(exc).__name__}: {exc}); see {log}"}
        return result
    result.passed = ok and returncode == 0
    return result


# ---------------------------------------------------------------------------------------------------- report


def build_report(device: torch.device, dtypes: Sequence[torch.dtype], results: Sequence[StepResult],
                 seconds: float) -> dict[str, Any]:
    return {
        "format": REPORT_FORMAT,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "dry_run": device.type == "cpu",
        "dtypes": [dtype_name(d) for d in dtypes],
        "environment": environment.describe_environment(device),
        "overall_pass": bool(results) and all(r.passed for r in results),
        "seconds": round(seconds, 1),
        "steps": [dataclasses.asdict(r) for r in results],
    }


def _summary_cell(summary: dict[str, Any]) -> str:
    if "targets" in summary:  # verify: one entry per (device, dtype)
        return "; ".join(f"{t['device']} {t['dtype']} "
                         + ("ok" if t["passed"] else "FAILED " + ",".join(t["failed_checks"]))
                         for t in summary["targets"])
    return "; ".join(f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}"
                     for key, value in summary.items())


def format_markdown(report: dict, verify_table: Optional[str]) -> str:
    env = report["environment"]
    lines = [f"# Device check: {report['device']}{' (dry run on the CPU)' if report['dry_run'] else ''}", "",
             f"result: **{'PASS' if report['overall_pass'] else 'FAIL'}** in {report['seconds']} s; dtypes "
             f"{', '.join(report['dtypes'])}; torch {env.get('torch')}, torch_npu {env.get('torch_npu')}, "
             f"CANN {env.get('cann')}, CUDA {env.get('cuda')}, device {env.get('device_name')}", "",
             "| step | result | seconds | summary | log |", "|---|---|---|---|---|"]
    lines += [f"| {step['name']} | {'PASS' if step['passed'] else 'FAIL'} | {step['seconds']} | "
              f"{_summary_cell(step['summary'])} | {step['log']} |" for step in report["steps"]]
    plans = [f"- {t['device']} {t['dtype']}: {t['kernel_plan']}" for step in report["steps"] if step["name"] == "verify"
             for t in step["summary"].get("targets", []) if t.get("kernel_plan")]
    if plans:
        lines += ["", "## Kernel plan (RoPE and attention, and why)", "", *plans]
    if verify_table:
        lines += ["", "## verify_npu.py", "", verify_table.strip()]
    return "\n".join(lines) + "\n"


def write_report(report: dict, output_dir: Path) -> tuple[Path, Path]:
    verify_table = output_dir / "verify" / VERIFY_TABLE
    table = format_markdown(report, verify_table.read_text(encoding="utf-8") if verify_table.is_file() else None)
    return (write_text_atomic(output_dir / JSON_NAME, json.dumps(report, indent=2, default=str) + "\n"),
            write_text_atomic(output_dir / TABLE_NAME, table))


# ---------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (npu > cuda), npu[:N], cuda[:N], or cpu (dry run)")
    parser.add_argument("--model-path", help="checkpoint folder for verify (default: --demo, random weights)")
    parser.add_argument("--audio-tokenizer-path", help="codec folder for verify, as in verify_npu.py")
    parser.add_argument("--prompt-audio-path", help="reference recording for verify, as in verify_npu.py")
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR,
                        help=f"report folder (default {DEFAULT_OUTPUT_DIR})")
    parser.add_argument("--verbose", action="store_true", help="print the traceback of a failure")
    return parser


def run(args: argparse.Namespace, runner: Runner = run_subprocess) -> int:
    if importlib.util.find_spec("pytest") is None:
        raise RuntimeError("pytest is not installed, and the device tests need it: pip install -r requirements-dev.txt")
    device = resolve_target(args.device)
    dtypes = card_dtypes(device)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    start, results = time.perf_counter(), []
    for step in plan_steps(args, device, dtypes):
        results.append(run_step(step, output_dir, runner))
        print(f"{step.name}: {'PASS' if results[-1].passed else 'FAIL'} ({results[-1].seconds} s)", flush=True)
    report = build_report(device, dtypes, results, time.perf_counter() - start)
    json_path, table_path = write_report(report, output_dir)
    print(table_path.read_text(encoding="utf-8"))
    print(f"report: {json_path} and {table_path}")
    return 0 if report["overall_pass"] else 1


def main(argv: Sequence[str] | None = None, runner: Runner = run_subprocess) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli(lambda: run(build_parser().parse_args(argv), runner), verbose="--verbose" in argv)


if __name__ == "__main__":
    sys.exit(main())
