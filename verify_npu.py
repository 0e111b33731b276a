"""Acceptance checks for a new machine: does MOSS-TTS-Nano load, run and agree with the CPU float32 reference?

    python verify_npu.py --demo                                       # no download: random weights
    python verify_npu.py --model-path DIR --prompt-audio-path ref.wav --devices cpu,npu:0 --dtypes float32,float16

For every device and dtype: load, global hidden states, teacher-forced logits, greedy codes and codec decode against
the CPU float32 reference (each within the dtype's tolerances), and a short sampled inference run. The load column
names the kernels each device ran: attention backends, RoPE ("complex (cpu fast path)", "real" or "npu_rotary_mul") and
linear ("split-matvec/onednn (cpu fast path)" or "F.linear"); MOSS_TTS_CPU_FAST_PATHS=0 makes the CPU reference run the
accelerator path. --compile runs the checks with the compiled frame step (compiled_step.py) against the eager
reference; a line of the report names the step each target ran (eager, compiled, captured, or eager with the reason
the compiled step fell back). Writes <output-dir>/npu_verification_report.json and <output-dir>/npu_verification_report.md (also printed), and one short
WAV per device and dtype under <output-dir>/samples/.

Exit codes: 0 every check passed, 1 a check failed or a requested device is unavailable, 2 invalid arguments.
"""

from __future__ import annotations

# Run as `python verify_npu.py`: execute this file as a package module instead (repo_imports.py).
if __name__ == "__main__" and not __package__:
    __import__("repo_imports").run_script(__file__)

import argparse
import copy
import functools
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from . import environment
from . import devices
from .atomic_files import write_text_atomic
from .audio_io import load_prompt_audio
from .cli_common import CLI_SAMPLING_DEFAULTS, Parser, add_model_arguments, load_checkpoint
from .cli_common import resolve_model_path, run_cli
from .demo import build_demo_assets
from .pipeline import load_resources
from .verification import (
    JSON_NAME, REFERENCE_DTYPE, TABLE_NAME, ModelSource, Target, VerificationSettings, run_verification,
)
from .verification_metrics import DTYPE_NAMES

DEFAULT_OUTPUT_DIR = "./verification_results"
DEFAULT_TEXT = "Hello world. This is a verification run."
DEFAULT_FRAMES = 8  # enough frames to see a late greedy divergence, short enough for a CPU reference
CHECK_COLUMNS = ("load", "hidden_states", "teacher_forced_logits", "greedy_codes", "codec_decode", "inference")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    group = parser.add_argument_group("verification")
    group.add_argument("--devices", help="comma list, e.g. cpu,npu:0 (default: cpu plus every usable cuda/npu); "
                                         "--device X is the same as --devices X")
    group.add_argument("--dtypes", help="comma list of float32, float16, bfloat16, auto (default: float32 plus the "
                                        "device's default dtype); --dtype X is the same as --dtypes X")
    group.add_argument("--text", default=None, help=f"text to speak (default: '{DEFAULT_TEXT}')")
    group.add_argument("--prompt-audio-path", help="reference recording (voice_clone); default: the demo reference "
                                                   "with --demo, else continuation without prompt")
    group.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, help=f"report folder (default {DEFAULT_OUTPUT_DIR})")
    group.add_argument("--max-new-frames", type=_positive_int, default=DEFAULT_FRAMES,
                       help=f"frames of the greedy and inference runs (default {DEFAULT_FRAMES})")
    group.add_argument("--compile", action="store_true",
                       help="run the checks with the compiled frame step (inductor on a CPU, graph capture on CUDA / "
                            "NPU) against the eager CPU float32 reference; the report names the step each target ran")
    return parser


# ---------------------------------------------------------------------------------------------------- targets


def split_list(flag: str, text: str) -> list[str]:
    """"a, b" -> ["a", "b"]; ValueError naming the flag for an empty list or entry."""
    items = [item.strip() for item in text.split(",")]
    if not items or any(not item for item in items):
        raise ValueError(f"{flag} '{text}' has an empty entry; give a comma list such as cpu,npu:0 or float32,float16")
    return items


def requested_lists(args: argparse.Namespace) -> tuple[Optional[list[str]], Optional[list[str]]]:
    """(device specs, dtype names) from --devices/--device and --dtypes/--dtype; None means the defaults."""
    lists = []
    for plural, single in (("devices", "device"), ("dtypes", "dtype")):
        many, one = getattr(args, plural), getattr(args, single)
        if many is not None and one != "auto":
            raise ValueError(f"--{single} {one} and --{plural} {many} were both given; use --{plural} (a comma list)")
        lists.append(split_list(f"--{plural}", many) if many is not None else None if one == "auto" else [one])
    return lists[0], lists[1]


def parse_dtype_name(name: str) -> Optional[torch.dtype]:
    """A dtype name ("float32"/"fp32", "float16"/"fp16", "bfloat16"/"bf16") -> torch dtype; "auto" -> None.

    Raises:
        ValueError: for any other name.
    """
    key = name.strip().lower()
    if key not in DTYPE_NAMES:
        raise ValueError(f"--dtypes entry '{name}' is not supported; use float32, float16, bfloat16 "
                         "(fp32/fp16/bf16) or auto")
    return DTYPE_NAMES[key]


def available_device_specs() -> list[str]:
    """The default device list: cpu always, then cuda and npu when usable."""
    specs = ["cpu"]
    for kind in ("cuda", "npu"):
        try:
            devices.resolve_device(kind)
        except RuntimeError:
            continue
        specs.append(kind)
    return specs


def plan_targets(device_specs: Optional[Sequence[str]] = None,
                 dtype_specs: Optional[Sequence[str]] = None) -> list[Target]:
    """Every (device, dtype) to verify, in request order, without duplicates.

    Args:
        device_specs: e.g. ["cpu", "npu:0"]; None: `available_device_specs()`.
        dtype_specs: dtype names ("auto" = the device's default dtype); None: float32 plus the default dtype.

    Returns:
        Targets; an unavailable device gives one target carrying the reason (and no dtype).

    Raises:
        ValueError: a device or dtype name that is not allowed.
    """
    dtypes = [REFERENCE_DTYPE, None] if dtype_specs is None else [parse_dtype_name(n) for n in dtype_specs]
    targets: list[Target] = []
    seen: set[tuple[str, Optional[torch.dtype]]] = set()
    for spec in device_specs if device_specs is not None else available_device_specs():
        try:
            device = devices.resolve_device(spec)
        except RuntimeError as exc:  # requested but unavailable: reported, not raised
            if (spec, None) not in seen:
                seen.add((spec, None))
                targets.append(Target(spec, None, None, unavailable=str(exc)))
            continue
        for dtype in dtypes:
            resolved = devices.resolve_dtype(dtype, device)  # None -> the device's default dtype
            if (str(device), resolved) not in seen:
                seen.add((str(device), resolved))
                targets.append(Target(spec, device, resolved))
    return targets


# ---------------------------------------------------------------------------------------------------- models


def demo_source(args: argparse.Namespace, prompt_audio: Optional[torch.Tensor]) -> ModelSource:
    """Released architectures with seeded random weights (built on first use); every target copies the weights."""
    assets = functools.cache(lambda: build_demo_assets(args.seed))
    attention = args.attn_implementation

    def load_model(device: torch.device, dtype: torch.dtype) -> Any:
        devices.use_device_in_this_thread(device)  # this script's thread works on that card (npu:N, cuda:N)
        model = copy.deepcopy(assets().model).to(device=device, dtype=dtype).eval()
        model.set_attention_implementation(attention)
        return model

    def load_tools(model: Any) -> tuple[Any, Any, Optional[torch.Tensor]]:
        demo = assets()
        return demo.tokenizer, demo.codec, demo.prompt_audio if prompt_audio is None else prompt_audio

    return ModelSource(load_model, load_tools, "demo: released architectures with seeded random weights (the audio "
                       "is noise)")


def checkpoint_source(args: argparse.Namespace, prompt_audio: Optional[torch.Tensor]) -> ModelSource:
    """A checkpoint directory or hub id, loaded afresh for every target; tokenizer and codec found as for inference.

    Raises:
        ValueError: no --model-path, or a directory that lacks config, weights or tokenizer.
    """
    path = resolve_model_path(args.model_path, args.local_files_only)
    attention = args.attn_implementation

    def load_model(device: torch.device, dtype: torch.dtype) -> Any:
        devices.use_device_in_this_thread(device)  # this script's thread works on that card (npu:N, cuda:N)
        model = load_checkpoint(path, dtype).to(device)
        model.set_attention_implementation(attention)
        return model

    def load_tools(model: Any) -> tuple[Any, Any, Optional[torch.Tensor]]:
        resources = load_resources(model, audio_tokenizer_path=args.audio_tokenizer_path,
                                   local_files_only=args.local_files_only)
        return resources.tokenizer, resources.codec, prompt_audio

    return ModelSource(load_model, load_tools, f"checkpoint: {path}")


# ---------------------------------------------------------------------------------------------------- report


def _number(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def _cell(check: Optional[dict]) -> str:
    if check is None:
        return "-"
    status = "ok" if check["passed"] else "FAIL"
    name = check["name"]
    if check.get("error"):
        return f"{status} (error)"
    if name == "load":
        return (f"{status} {check['seconds']:.1f}s {check['attention']['global']}/{check['attention']['local']}, "
                f"rope: {check.get('rope', '-')}, linear: {check.get('linear', '-')}")
    if name == "hidden_states":
        return f"{status} cos {_number(check['cosine'], '.7f')}"
    if name == "teacher_forced_logits":
        return (f"{status} cos {_number(check['text_cosine'], '.7f')}/{_number(check['audio_cosine'], '.7f')} "
                f"rel {_number(check['audio_max_abs_rel'], '.1e')} argmax {_number(check['argmax_agreement'], '.3f')}")
    if name == "greedy_codes":
        first = check["first_divergent_frame"]
        return f"{status} {check['agreement']:.3f} " + ("identical" if first is None else f"diverge@{first}")
    if name == "codec_decode":
        return f"{status} SNR {_number(check['snr_db'], '.1f')} dB rel {_number(check['max_abs_rel'], '.1e')}"
    return f"{status} {check['frames']} frames" + (" (fp32 retry)" if check["float32_fallback"] else "")


def _result_rows(report: dict) -> list[str]:
    rows = []
    for result in report["results"]:
        dtype = (result["dtype"] or "-") + (" (reference)" if result["is_reference"] else "")
        if not result["available"]:
            cells = ["unavailable"] + ["-"] * (len(CHECK_COLUMNS) - 1)
        else:
            cells = [_cell(result["checks"].get(name)) for name in CHECK_COLUMNS]
        rows.append(f"| {result['device']} | {dtype} | " + " | ".join(cells) +
                    f" | {'PASS' if result['passed'] else 'FAIL'} |")
    return rows


def _problems_and_notes(report: dict) -> tuple[list[str], list[str]]:
    problems, notes = [], []
    reference = report["reference"]
    if reference["error"]:
        problems.append(f"- reference (cpu float32): {reference['error']}")
    for result in report["results"]:
        where = f"{result['device']} {result['dtype'] or ''}".strip()
        if not result["available"]:
            problems.append(f"- {where}: unavailable: {result['error']}")
        for check in result["checks"].values():
            detail = check["error"] or (check["note"] if check["note"] != reference["note"] else None)
            if not check["passed"]:
                detail = detail or f"outside the {result['dtype']} tolerances"
                problems.append(f"- {where} {check['name']}: {detail}")
            elif detail:
                notes.append(f"- {where} {check['name']}: {detail}")
    return problems, notes


def _kernel_plan_lines(report: dict) -> list[str]:
    lines = []
    for result in report["results"]:
        load = result["checks"].get("load") or {}
        if load.get("rope_reason"):
            lines.append(f"- {result['device']} {result['dtype']}: rope {load['rope']} ({load['rope_reason']}); "
                         f"attention {load['attention']['global']}/{load['attention']['local']} "
                         f"({load.get('attention_reason')})")
    return lines


def frame_step_line(report: dict) -> str:
    """Which frame step each target ran: eager, compiled or captured, or eager with the reason it fell back."""
    steps = [f"{r['device']} {r['dtype']}: {r['frame_step']}" for r in report["results"] if r.get("frame_step")]
    wanted = "compiled step requested" if report["settings"].get("compile") else "eager step requested"
    return f"frame step ({wanted}): " + ("; ".join(steps) or "no target ran")


def format_table(report: dict) -> str:
    """The report as Markdown: results table, problems, tolerances, environment."""
    env = report["environment"]
    header = ["device", "dtype", *CHECK_COLUMNS, "result"]
    lines = [f"# MOSS-TTS-Nano verification: {'PASS' if report['overall_pass'] else 'FAIL'}", "",
             f"model: {report['model']}", f"reference: cpu float32. {report['reference']['note']}",
             frame_step_line(report), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header), *_result_rows(report)]
    problems, notes = _problems_and_notes(report)
    if problems:
        lines += ["", "Problems:", *problems]
    if notes:
        lines += ["", "Notes:", *notes]
    plans = _kernel_plan_lines(report)
    if plans:
        lines += ["", "Kernel plan (why each RoPE / attention kernel was chosen):", *plans]
    lines += ["", "Tolerances (against the CPU float32 reference):", "",
              "| dtype | min cosine | max abs rel | min argmax agreement | min greedy divergence fraction | "
              "codec max abs rel | codec min SNR dB |", "|---|---|---|---|---|---|---|"]
    for name, tol in report["tolerances"].items():
        lines.append(f"| {name} | {tol['min_cosine']} | {tol['max_abs_rel']} | {tol['min_argmax_agreement']} | "
                     f"{tol['min_divergence_fraction']} | {tol['codec_max_abs_rel']} | {tol['codec_min_snr_db']} |")
    names = {r["device"]: r["device_name"] for r in report["results"] if r["device_name"]}
    lines += ["", f"environment: torch {env.get('torch')}, transformers {env.get('transformers')}, torch_npu "
                  f"{env.get('torch_npu')}, CANN {env.get('cann')}, CUDA {env.get('cuda')}, python {env.get('python')}",
              "devices: " + (", ".join(f"{device} = {name}" for device, name in names.items()) or "none available")]
    return "\n".join(lines) + "\n"


def _json_safe(value: Any) -> Any:
    """Non-finite floats become the strings "inf", "-inf", "nan" so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def write_report(report: dict, output_dir: Path) -> tuple[Path, Path]:
    """Write the JSON report and the Markdown table atomically; return their paths."""
    json_text = json.dumps(_json_safe(report), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    return (write_text_atomic(output_dir / JSON_NAME, json_text),
            write_text_atomic(output_dir / TABLE_NAME, format_table(report)))


# ---------------------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    environment.apply_npu_environment_defaults()
    targets = plan_targets(*requested_lists(args))
    prompt_audio = load_prompt_audio(args.prompt_audio_path) if args.prompt_audio_path else None
    source = demo_source(args, prompt_audio) if args.demo else checkpoint_source(args, prompt_audio)
    output_dir = Path(args.output_dir)
    settings = VerificationSettings(
        text=args.text or DEFAULT_TEXT, max_new_frames=args.max_new_frames, seed=args.seed,
        inference_kwargs={**CLI_SAMPLING_DEFAULTS}, sample_dir=output_dir / "samples", compile=args.compile,
    )
    report = run_verification(targets, source, settings)
    report["command"] = ["verify_npu.py", *argv]
    print(format_table(report))  # first: the results stay visible even if the folder cannot be written
    json_path, table_path = write_report(report, output_dir)
    print(f"report: {json_path} and {table_path}")
    return 0 if report["overall_pass"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        args = build_parser().parse_args(argv)
        return run(args, argv)

    return run_cli(body, verbose="--verbose" in argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
