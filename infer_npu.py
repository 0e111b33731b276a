"""One-off synthesis with MOSS-TTS-Nano on Ascend NPU, CUDA or CPU.

    python infer_npu.py --demo                                   # no download: random weights, noise output
    python infer_npu.py --model-path DIR --audio-tokenizer-path CODEC_DIR \
        --prompt-audio-path ref.wav --text "Hello world."

Exit codes: 0 success, 1 environment or runtime failure, 2 invalid input (usage).
"""

from __future__ import annotations

# Run as `python infer_npu.py`: execute this file as a package module instead (repo_imports.py).
if __name__ == "__main__" and not __package__:
    __import__("repo_imports").run_script(__file__)

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from . import compiled_step, devices
from .cli_common import Parser, add_model_arguments, add_performance_arguments, add_sampling_arguments
from .cli_common import load_model_for_cli, run_cli
from .cli_common import resolve_model_path, sampling_kwargs
from .codec_output import FRAMES_PER_SECOND
from .demo import DEMO_TEXT

DEFAULT_OUTPUT = "generated_audio/npu_output.wav"
DEMO_FRAMES = 50  # 4 s of audio: enough to show the pipeline without a long wait on a CPU


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    text = parser.add_mutually_exclusive_group()
    text.add_argument("--text", help="text to speak")
    text.add_argument("--text-file", help="read the text to speak from this UTF-8 file")
    parser.add_argument("--prompt-audio-path", help="reference recording (voice_clone) or prompt audio (continuation)")
    parser.add_argument("--prompt-text", help="transcript of the prompt audio (continuation mode only)")
    parser.add_argument("--mode", choices=("voice_clone", "continuation"), default=None,
                        help="voice_clone (default with prompt audio and no prompt text) or continuation")
    parser.add_argument("--output-path", default=DEFAULT_OUTPUT, help=f"output WAV (default {DEFAULT_OUTPUT})")
    parser.add_argument("--downmix", action="store_true", help="average prompt audio with more than 2 channels")
    parser.add_argument("--stream", action="store_true", help="stream: decode audio as frames are generated")
    add_sampling_arguments(parser)
    add_performance_arguments(parser)
    return parser


def resolve_text(args: argparse.Namespace) -> str:
    if args.text_file:
        path = Path(args.text_file)
        if not path.is_file():
            raise ValueError(f"--text-file '{path}' does not exist")
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"--text-file '{path}' is not UTF-8 text: {exc}") from exc
    if args.text is not None:
        return args.text
    if args.demo:
        return DEMO_TEXT
    raise ValueError("no text given: pass --text or --text-file")


def demo_prompt_audio_wanted(args: argparse.Namespace) -> bool:
    """Whether the demo's synthetic reference stands in for --prompt-audio-path: not for plain continuation."""
    return not args.prompt_audio_path and (args.mode != "continuation" or bool(args.prompt_text))


def synthesize(model: Any, resources: dict, args: argparse.Namespace, text: str) -> tuple[dict, float]:
    """Run inference (streaming or not) and return the result dict and the wall time.

    The mode is left to `inference` when --mode is not given (one decision: prompting.infer_mode).
    """
    resources = {k: v for k, v in resources.items() if not k.startswith("_")}
    prompt_audio = resources.pop("prompt_audio", None)
    kwargs: dict[str, Any] = dict(
        mode=args.mode,
        prompt_text=args.prompt_text,
        prompt_audio_path=args.prompt_audio_path,
        prompt_audio=prompt_audio if prompt_audio is not None and demo_prompt_audio_wanted(args) else None,
        downmix=args.downmix,
        seed=args.seed,
        voice_clone_max_text_tokens=args.voice_clone_max_text_tokens,
        progress=lambda message: print(message, file=sys.stderr),
        **sampling_kwargs(args),
        **resources,
    )
    start = time.perf_counter()
    if not args.stream:
        return model.inference(text, args.output_path, **kwargs), time.perf_counter() - start
    result: dict = {}
    for event in model.inference_stream(text, args.output_path, **kwargs):
        if event["type"] == "result":
            result = event
    return result, time.perf_counter() - start


def truncation_warning(args: argparse.Namespace, result: dict) -> str | None:
    """One line naming the chunks that reached --max-new-frames before the model ended them, and the remedy."""
    truncated = result["truncated_chunks"]
    if not truncated:
        return None
    frames = sampling_kwargs(args)["max_new_frames"]
    count = len(result["text_chunks"])
    which = "the text" if count == 1 else f"text chunk(s) {', '.join(str(i + 1) for i in truncated)} of {count}"
    return (f"warning: {which} reached --max-new-frames ({frames} frames, {frames / FRAMES_PER_SECOND:.1f} s) before "
            "the model ended it, so its audio is cut off; raise --max-new-frames or lower "
            "--voice-clone-max-text-tokens")


def kernel_reasons(model: Any) -> str:
    """One line: why the planned RoPE and attention kernels were chosen (e.g. why not the NPU fused ones), and
    how the frame step runs (compiled, eager, or eager because compilation fell back, with the reason)."""
    plan = model.kernel_plan()
    return (f"kernels: rope={plan.rope} ({plan.reasons.get('rope', 'n/a')}); attention={'/'.join(plan.attention)} "
            f"({plan.reasons.get('attention', 'n/a')}); frame step: {compiled_step.status(model)}")


def summary(model: Any, args: argparse.Namespace, result: dict, wall: float) -> str:
    device = next(model.parameters()).device
    seconds = result["waveform"].shape[-1] / result["sample_rate"]
    peak = devices.peak_memory_bytes(device)
    parts = [
        f"device={device}",
        f"dtype={str(next(model.parameters()).dtype).replace('torch.', '')}",
        f"weights={args.weight_precision}",
        f"threads={torch.get_num_threads()}",
        f"attention={'/'.join(model.kernel_plan().attention)}",
        f"rope={model.kernel_plan().rope}",
        f"linear={model.kernel_plan().linear}",
        f"step={compiled_step.status(model).split(' ')[0]}",
        f"frames={result['frames']}",
        f"truncated={len(result['truncated_chunks'])}",
        f"audio={seconds:.2f}s",
        f"wall={wall:.2f}s",
        f"rtf={wall / seconds:.3f}" if seconds > 0 else "rtf=n/a",
    ]
    if result.get("first_audio_latency_s") is not None:
        parts.append(f"first_audio={result['first_audio_latency_s'] * 1000:.0f}ms")
    parts.append(f"peak_memory={peak / 2**20:.0f}MiB" if peak else "peak_memory=n/a")
    parts.append(f"output={result['audio_path']}")
    return "summary: " + " ".join(parts)


def run(args: argparse.Namespace) -> int:
    path = None if args.demo else resolve_model_path(args.model_path, args.local_files_only)
    text = resolve_text(args)
    model, resources = load_model_for_cli(args, path)
    devices.reset_peak_memory(next(model.parameters()).device)
    result, wall = synthesize(model, resources, args, text)
    warning = truncation_warning(args, result)
    if warning:
        print(warning, file=sys.stderr)
    if args.demo:
        print("demo: released architectures with seeded random weights; the audio is noise, not speech")
    print(kernel_reasons(model))
    print(summary(model, args, result, wall))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        args = build_parser().parse_args(argv)
        if args.demo and args.max_new_frames is None:
            args.max_new_frames = DEMO_FRAMES
        return run(args)

    return run_cli(body, verbose="--verbose" in argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_grad_enabled(False)
    sys.exit(main())
