"""Speed and memory of MOSS-TTS-Nano at the released sizes, with seeded random weights (no download).

    python benchmarks/benchmark.py                       # CPU float32, 3 repetitions, prints and writes JSON
    python benchmarks/benchmark.py --device npu --dtype float16 --repeats 5
    python benchmarks/benchmark.py --skip codec,e2e --threads 1 --weight-precision int8

Measures (median over repetitions):
- generation frames/s: a 150-row voice-clone prompt, the official CLI sampling settings, KV cache on (and the
  process CPU time per frame, a load-robust secondary figure); `--weight-precision int8` measures the opt-in mode;
- codec decode real-time factor: 8 s of codes one-shot, and streamed in 4-frame windows (and the process CPU
  time per frame);
- end-to-end streaming (voice clone from an 8 s reference, a 175-row prompt; text -> first audio -> last
  audio): real-time factor of the whole call, and first-audio latency measured from the moment the prompt audio
  is encoded;
- peak memory: process peak RSS (CPU) or peak device memory (accelerators).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from measuring import add_run_arguments, apply_threads, cpu_info, load_average, write_report  # noqa: E402

import compiled_step  # noqa: E402
from environment import describe_environment  # noqa: E402
import devices  # noqa: E402
from cli_common import CLI_SAMPLING_DEFAULTS  # noqa: E402
from codec_output import FRAMES_PER_SECOND  # noqa: E402
from demo import build_demo_assets, demo_prompt_audio  # noqa: E402
from engine import SynthesisEngine  # noqa: E402
from pipeline import encode_prompt_audio  # noqa: E402
from prompting import PromptTokenIds, build_prompt_template, build_voice_clone_rows, left_pad_batch  # noqa: E402

PROMPT_ROWS = 150
CODEC_SECONDS = 8.0
E2E_TEXT = "The quick brown fox jumps over the lazy dog while the band plays on in the distance."
E2E_PROMPT_SECONDS = 8.0  # reference audio: 100 frames; with the demo tokenizer's text rows, a 175-row prompt


def _median_of(repeats: int, run: Callable[[], float]) -> dict[str, Any]:
    values = [run() for _ in range(repeats)]
    return {"median": statistics.median(values), "runs": values}


def voice_clone_prompt(assets: Any, rows: int = PROMPT_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of a voice-clone prompt padded with reference frames to exactly ``rows`` rows."""
    ids = PromptTokenIds.from_config(assets.model.config)
    enc = lambda s: list(assets.tokenizer.encode(s, add_special_tokens=False))  # noqa: E731
    template = build_prompt_template(enc, ids)
    text = enc("Hello world, this is a benchmark.")
    overhead = build_voice_clone_rows(template, ids, text, torch.zeros(1, ids.n_vq, dtype=torch.long)).shape[0] - 1
    frames = torch.randint(0, 1024, (rows - overhead, ids.n_vq), generator=torch.Generator().manual_seed(0))
    return left_pad_batch([build_voice_clone_rows(template, ids, text, frames)], ids)


GREEDY = {"do_sample": False, "audio_repetition_penalty": 1.2}  # `--sampling greedy` (the golden fixtures' settings)


def generation_settings(sampling: str) -> dict[str, Any]:
    return dict(CLI_SAMPLING_DEFAULTS) if sampling == "cli" else dict(CLI_SAMPLING_DEFAULTS, **GREEDY)


def bench_generation(assets: Any, device: torch.device, frames: int, repeats: int, sampling: str = "cli",
                     modes: tuple[str, ...] = ("eager",)) -> dict[str, Any]:
    """Frames/s of `model.generate` in each of `modes` ("eager", "compiled"): each warmed up first (with compiled:
    the graph compiles there), then the modes alternate run by run, so a change of load touches both alike. One
    mode: its figures; several: {mode: figures} and the per-round ratio compiled / eager."""
    input_ids, mask = voice_clone_prompt(assets)
    input_ids, mask = input_ids.to(device), mask.to(device)
    kwargs = dict(generation_settings(sampling), max_new_frames=frames)
    results: dict[str, dict[str, Any]] = {}
    for mode in modes:
        use_mode(assets.model, mode)
        start = time.perf_counter()
        assets.model.generate(input_ids=input_ids, attention_mask=mask, **dict(kwargs, max_new_frames=4))  # warm-up
        # with compiled: the graphs' compile (first start) or cache load
        results[mode] = {"runs": [], "cpu_ms": [], "warmup_s": time.perf_counter() - start}
    for _ in range(repeats):
        for mode in modes:
            use_mode(assets.model, mode)
            devices.synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            out = assets.model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
            devices.synchronize(device)
            wall, count = time.perf_counter() - start, int(out.audio_token_ids.shape[1])
            results[mode]["runs"].append(count / wall)
            # Process CPU time per frame (all threads, prefill included): less sensitive to other load than wall time.
            results[mode]["cpu_ms"].append(1000 * (time.process_time() - cpu_start) / count)
    report = {mode: {"median": statistics.median(r["runs"]), "runs": r["runs"], "prompt_rows": int(input_ids.shape[1]),
                     "frames": frames, "sampling": sampling, "warmup_s": r["warmup_s"],
                     "cpu_ms_per_frame": {"median": statistics.median(r["cpu_ms"]), "runs": r["cpu_ms"]}}
              for mode, r in results.items()}
    if len(modes) == 1:
        return report[modes[0]]
    if "eager" in report and "compiled" in report:
        ratios = [c / e for e, c in zip(report["eager"]["runs"], report["compiled"]["runs"])]
        report["compiled_vs_eager"] = {"median": statistics.median(ratios), "per_round": ratios}
    return report


def use_mode(model: Any, mode: str) -> None:
    if mode == "compiled":
        compiled_step.enable(model)
    else:
        compiled_step.disable(model, keep_graphs=True)  # compiled once, whatever the alternation


def bench_codec(assets: Any, device: torch.device, repeats: int) -> dict[str, Any]:
    """Codec decode RTF (wall) of 8 s of codes, plus the process CPU time per frame (a load-robust figure)."""
    codec = assets.codec
    n = int(CODEC_SECONDS * FRAMES_PER_SECOND)
    codes = torch.randint(0, 1024, (16, n), generator=torch.Generator().manual_seed(1)).to(device)
    codec.batch_decode([codes[:, :4]])  # warm-up
    cpu_ms: dict[str, list[float]] = {"one_shot_rtf": [], "streaming_4frame_rtf": []}

    def one_shot() -> None:
        codec.batch_decode([codes])

    def streaming() -> None:
        try:
            for i in range(0, n, 4):
                first = {"max_batch_size": 1, "reset_stream": True} if i == 0 else {}
                codec.batch_decode([codes[:, i : i + 4]], streaming=True, **first)
        finally:
            codec._reset_batch_decode_streaming_state()

    def timed(key: str, decode: Callable[[], None]) -> float:
        devices.synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        decode()
        devices.synchronize(device)
        cpu_ms[key].append(1000 * (time.process_time() - cpu_start) / n)
        return (time.perf_counter() - start) / CODEC_SECONDS

    report = {key: _median_of(repeats, lambda k=key, d=decode: timed(k, d))
              for key, decode in (("one_shot_rtf", one_shot), ("streaming_4frame_rtf", streaming))}
    for key, values in cpu_ms.items():
        report[key]["cpu_ms_per_frame"] = statistics.median(values)
    return report


def bench_end_to_end(assets: Any, device: torch.device, frames: int, repeats: int,
                     prompt_seconds: float = E2E_PROMPT_SECONDS) -> dict[str, Any]:
    kwargs = dict(CLI_SAMPLING_DEFAULTS, max_new_frames=frames, voice_clone_max_text_tokens=75)
    resources = {"text_tokenizer": assets.tokenizer, "audio_tokenizer": assets.codec}
    prompt_audio = demo_prompt_audio(seconds=prompt_seconds)
    runs = []
    for _ in assets.model.inference_stream(E2E_TEXT, prompt_audio=prompt_audio, **resources,
                                           **dict(kwargs, max_new_frames=2)):
        pass  # warm-up (with --compile: the graph compiles here, not inside the timed runs)
    for _ in range(repeats):
        start = time.perf_counter()
        audio_samples, result = 0, {}
        for event in assets.model.inference_stream(E2E_TEXT, prompt_audio=prompt_audio, **resources, **kwargs):
            if event["type"] in ("audio", "pause"):
                audio_samples += event["waveform"].shape[-1]
            else:
                result = event
        wall = time.perf_counter() - start
        runs.append({
            "rtf": wall / (audio_samples / 48000),
            # measured by the pipeline from the end of prompt encoding to the first decoded audio
            "first_audio_s": result["first_audio_latency_s"],
            "audio_s": audio_samples / 48000,
            "frames": result["frames"],
        })
    return {
        "rtf": statistics.median(r["rtf"] for r in runs),
        "first_audio_s": statistics.median(r["first_audio_s"] for r in runs),
        "prompt_seconds": prompt_seconds,
        "runs": runs,
    }


def bench_concurrency(assets: Any, device: torch.device, levels: list[int], frames: int, repeats: int,
                      prompt_seconds: float = E2E_PROMPT_SECONDS, batch_invariant: bool = False,
                      agree: bool = False) -> dict[str, Any]:
    """Continuous batching: at each level c, c voice-clone streams submitted at once to one engine, and the same
    stream alone through plain `inference_stream` (no engine) as the baseline.

    Every stream clones the same reference (encoded once, passed as codes as a server does), speaks E2E_TEXT with the
    CLI sampling settings and its own seed, and generates `frames` frames (the demo weights never stop early). The
    levels run in turn, `repeats` rounds of them, so that a change of load on the machine touches every level alike;
    ratios are taken within a round. `agree`: then run each stream of the top level alone and compare the codes.
    """
    prompt_codes = encode_prompt_audio(assets.codec, demo_prompt_audio(seconds=prompt_seconds).to(device))
    kwargs = dict(CLI_SAMPLING_DEFAULTS, max_new_frames=frames, prompt_audio_codes=prompt_codes)
    resources = {"text_tokenizer": assets.tokenizer, "audio_tokenizer": assets.codec}
    rounds: list[dict[int, dict[str, Any]]] = []
    with SynthesisEngine(assets.model, **resources, max_batch_size=max(levels), max_queue=max(levels),
                         batch_invariant=batch_invariant) as engine:
        for level in levels:  # warm-up of every level's batch (with --compile: each bucket's graph compiles here)
            for job in [engine.submit(E2E_TEXT, **dict(kwargs, max_new_frames=2, seed=i)) for i in range(level)]:
                job.result()
        for _ in range(repeats):
            rounds.append({0: _measure_without_engine(assets, resources, kwargs)})
            for level in levels:
                window = _reset_rss_peak() if device.type == "cpu" else devices.reset_peak_memory(device) or True
                entry = rounds[-1][level] = _measure_level(engine, level, kwargs)
                # on CPU: the peak RSS of this level alone where Linux lets it be reset, else the process's so far
                entry["peak_memory_bytes"] = _rss_peak_bytes() if device.type == "cpu" and window else \
                    devices.peak_memory_bytes(device)
                entry["peak_memory_window"] = "this level" if window else "process so far"
        agreement = _solo_agreement(engine, rounds[0][max(levels)].pop("codes"), kwargs) if agree else None
    report = {"frames_per_stream": frames, "prompt_seconds": prompt_seconds, "batch_invariant": batch_invariant,
              "rounds": repeats, "levels": {str(level): _summarize_level(level, levels[0], rounds) for level in levels},
              "without_engine": _summarize_level(0, 0, rounds)}
    if agreement is not None:
        report["codes_vs_solo_at_top_level"] = agreement
    return report


def _solo_agreement(engine: Any, batched: list[torch.Tensor], kwargs: dict) -> dict[str, Any]:
    """Each stream of the top level run again alone (same seed): how many of its codes the batched run reproduced."""
    equal = total = 0
    identical, first_divergence = 0, []
    for seed, codes in enumerate(batched):
        solo = torch.cat(engine.submit(E2E_TEXT, **dict(kwargs, seed=seed)).result()["audio_token_ids"])
        frames = min(solo.shape[0], codes.shape[0])
        same = (solo[:frames] == codes[:frames]).all(dim=-1)
        equal += int((solo[:frames] == codes[:frames]).sum())
        total += max(solo.shape[0], codes.shape[0]) * solo.shape[1]
        identical += int(torch.equal(solo, codes))
        if not bool(same.all()):
            first_divergence.append(int((~same).nonzero()[0]))
        else:  # equal as far as both go: None when both also stopped together
            first_divergence.append(None if solo.shape == codes.shape else frames)
    return {"streams": len(batched), "streams_identical": identical, "code_agreement": equal / total,
            "first_divergent_frame": first_divergence}


def _summarize_level(level: int, first: int, rounds: list[dict[int, dict[str, Any]]]) -> dict[str, Any]:
    runs = [r[level] for r in rounds]
    streams = [s for run in runs for s in run["streams_detail"]]
    latencies = sorted(s["first_audio_s"] for s in streams)
    rtf = [s["rtf_after_first_audio"] for s in streams]
    return {
        "streams": level or 1,
        "aggregate_frames_per_s": statistics.median(run["aggregate_frames_per_s"] for run in runs),
        "aggregate_vs_first_level": statistics.median(
            r[level]["aggregate_frames_per_s"] / r[first]["aggregate_frames_per_s"] for r in rounds),
        "aggregate_vs_without_engine": statistics.median(
            r[level]["aggregate_frames_per_s"] / r[0]["aggregate_frames_per_s"] for r in rounds),
        "cpu_ms_per_frame": statistics.median(run["cpu_ms_per_frame"] for run in runs),
        "first_audio_p50_s": _percentile(latencies, 50),
        "first_audio_p95_s": _percentile(latencies, 95),
        "rtf_after_first_audio": {"median": statistics.median(rtf), "max": max(rtf)},
        "every_stream_ahead_of_real_time": all(s["ahead_of_real_time"] for s in streams),
        "peak_memory_bytes": max(run["peak_memory_bytes"] or 0 for run in runs),
        "peak_memory_window": runs[0]["peak_memory_window"],
        "runs": [{k: v for k, v in run.items() if k not in ("streams_detail", "codes")} for run in runs],
        "streams_detail": streams,
    }


def _measure_without_engine(assets: Any, resources: dict, kwargs: dict) -> dict[str, Any]:
    """The same stream alone through plain `inference_stream` (no engine): the baseline of one request."""
    timeline: list[tuple[float, float]] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    for event in assets.model.inference_stream(E2E_TEXT, **resources, **dict(kwargs, seed=0)):
        if event["type"] == "result":
            frames = int(event["frames"])
        else:
            timeline.append((time.perf_counter(), event["waveform"].shape[-1] / 48000))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"wall_s": wall, "frames": frames, "aggregate_frames_per_s": frames / wall,
            "cpu_ms_per_frame": 1000 * cpu / frames, "streams_detail": [_stream_timing(timeline, start)],
            "peak_memory_bytes": None, "peak_memory_window": None}


def _measure_level(engine: Any, level: int, kwargs: dict) -> dict[str, Any]:
    timelines: list[list[tuple[float, float]]] = [[] for _ in range(level)]
    results: list[dict] = [{} for _ in range(level)]
    start, cpu_start = time.perf_counter(), time.process_time()
    handles = [engine.submit(E2E_TEXT, **dict(kwargs, seed=index)) for index in range(level)]

    def consume(index: int) -> None:
        for event in handles[index].events():
            if event["type"] == "result":
                results[index] = event
            else:  # (arrival time, seconds of audio in it)
                timelines[index].append((time.perf_counter(), event["waveform"].shape[-1] / 48000))

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(level)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    frames = sum(int(r["frames"]) for r in results)
    return {
        "wall_s": wall,
        "frames": frames,
        "aggregate_frames_per_s": frames / wall,
        # process CPU time per generated frame (all threads, codec included): less sensitive to other load
        "cpu_ms_per_frame": 1000 * cpu / frames,
        "streams_detail": [_stream_timing(timeline, start) for timeline in timelines],
        "codes": [torch.cat(r["audio_token_ids"]) for r in results],
    }


def _stream_timing(timeline: list[tuple[float, float]], start: float) -> dict[str, Any]:
    """First-audio latency, and from the first audio on: the real-time factor and whether playback ever ran dry."""
    first_at = timeline[0][0]
    played = 0.0  # audio delivered before each event, played from the first audio on
    ahead = True
    for arrived, seconds in timeline:
        ahead = ahead and arrived - first_at <= played + 1e-9
        played += seconds
    after_first = played - timeline[0][1]
    return {
        "first_audio_s": first_at - start,
        "audio_s": played,
        "rtf_after_first_audio": (timeline[-1][0] - first_at) / after_first if after_first > 0 else 0.0,
        "ahead_of_real_time": ahead,
    }


def _percentile(values: list[float], percent: float) -> float:
    """Nearest-rank percentile of sorted values."""
    return values[min(len(values) - 1, max(0, -(-len(values) * percent // 100) - 1))]


def _reset_rss_peak() -> bool:
    """Start a new peak-RSS window (Linux: /proc/self/clear_refs, then VmHWM); False where the OS offers none."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return _rss_peak_bytes() is not None
    except OSError:
        return False


def _rss_peak_bytes() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def environment(device: torch.device, dtype: torch.dtype, weight_precision: str) -> dict[str, Any]:
    env = describe_environment(device)
    env.update(
        dtype=str(dtype).replace("torch.", ""),
        weight_precision=weight_precision,
        threads=torch.get_num_threads(),
        machine=platform.machine(),
        processor=platform.processor() or None,
        cpu_model=cpu_info("model name"),
        # the model name of a VM is often just the vendor's: family/model and the vector ISA torch uses tell more
        cpu_family_model=f"{cpu_info('cpu family')}/{cpu_info('model')}",
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        logical_cpus=os.cpu_count(),
        load_average_at_start=load_average(),
    )
    return env


SECTIONS = {"generation", "codec", "e2e", "concurrency"}


def run(args: argparse.Namespace, skip: set[str]) -> dict[str, Any]:
    device = devices.resolve_device(args.device)
    devices.use_device_in_this_thread(device)  # the script's own thread: streams and workspaces on that card
    dtype = devices.resolve_dtype(args.dtype, device)
    devices.seed_everything(0, device)
    assets = build_demo_assets(seed=0)
    assets.model.to(device=device, dtype=dtype)
    assets.model.set_weight_precision(args.weight_precision)
    assets.codec.to(device)
    devices.reset_peak_memory(device)
    report: dict[str, Any] = {"environment": environment(device, dtype, args.weight_precision), "repeats": args.repeats}
    modes = {"off": ["eager"], "on": ["compiled"], "both": ["eager", "compiled"]}[args.compile]
    try:
        for section, measure in _sections(args, assets, device, skip, tuple(modes)):
            if section == "generation_frames_per_s":  # the modes alternate run by run inside
                result = measure()
                if len(modes) == 1:
                    report[section] = result
                else:
                    report.update({f"{section}_{mode}": result[mode] for mode in modes})
                    report["generation_compiled_vs_eager"] = result["compiled_vs_eager"]
                    report.setdefault("compiled_step", {})[section] = compiled_step.status(assets.model)
                continue
            section_modes = modes[:1] if section == "codec" else modes  # the codec has no frame step to compile
            for mode in section_modes:  # eager and compiled side by side, section by section
                use_mode(assets.model, mode)
                key = section if len(section_modes) == 1 else f"{section}_{mode}"
                report[key] = measure()
                if mode == "compiled":
                    report.setdefault("compiled_step", {})[section] = compiled_step.status(assets.model)
        if "compiled" in modes:
            use_mode(assets.model, "compiled")
            report["environment"]["compiled_step"] = compiled_step.status(assets.model)
    finally:
        compiled_step.disable(assets.model)  # the model may be a caller's (device_check's dry run): leave it eager
    report["environment"]["load_average_at_end"] = load_average()
    report["peak_memory_bytes"] = devices.peak_memory_bytes(device)
    report["peak_memory_kind"] = "process peak RSS" if device.type == "cpu" else "peak device memory allocated"
    return report


def _sections(args: argparse.Namespace, assets: Any, device: torch.device, skip: set[str],
              modes: tuple[str, ...]) -> list:
    """(report key, measuring function) of each section to run."""
    sections = [
        ("generation_frames_per_s", lambda: bench_generation(assets, device, args.frames, args.repeats,
                                                             args.sampling, modes)),
        ("codec", lambda: bench_codec(assets, device, args.repeats)),
        ("end_to_end_streaming", lambda: bench_end_to_end(assets, device, args.e2e_frames, args.repeats,
                                                          args.e2e_prompt_seconds)),
        ("concurrency", lambda: bench_concurrency(assets, device, args.concurrency, args.concurrency_frames,
                                                  args.repeats, args.e2e_prompt_seconds, args.batch_invariant,
                                                  args.code_agreement)),
    ]
    names = {"generation_frames_per_s": "generation", "end_to_end_streaming": "e2e"}
    return [(key, measure) for key, measure in sections
            if names.get(key, key) not in skip and (key != "concurrency" or args.concurrency)]


def _levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of integers") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: stream counts must be integers >= 1")
    return levels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frames", type=int, default=100, help="frames generated per generation run")
    parser.add_argument("--e2e-frames", type=int, default=100, help="max frames per chunk in the end-to-end run")
    parser.add_argument("--e2e-prompt-seconds", type=float, default=E2E_PROMPT_SECONDS,
                        help="length of the end-to-end run's reference recording (0 < s <= 30)")
    parser.add_argument("--concurrency", type=_levels, default=[],
                        help="comma list of stream counts for the continuous-batching section, e.g. 1,2,4,8")
    parser.add_argument("--concurrency-frames", type=int, default=50, help="frames per stream in that section")
    parser.add_argument("--code-agreement", action="store_true",
                        help="then run each stream of the top level alone and report how many codes agree")
    parser.add_argument("--batch-invariant", action="store_true",
                        help="run that section's engine batch-invariant (opt-in) instead of with the fastest products")
    parser.add_argument("--compile", choices=("off", "on", "both"), default="off",
                        help="the compiled frame step (compiled_step): off, on, or both side by side (generation: "
                             "the two alternate run by run)")
    parser.add_argument("--sampling", choices=("cli", "greedy"), default="cli",
                        help="generation section: the CLI sampling settings, or greedy (repetition penalty 1.2)")
    parser.add_argument("--skip", default="", help="comma list of sections to skip: generation,codec,e2e,concurrency")
    add_run_arguments(parser, output=str(ROOT / "benchmarks" / "results" / "benchmark.json"))
    args = parser.parse_args(argv)
    for name in ("repeats", "frames", "e2e_frames", "threads", "concurrency_frames"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1 (got {value})")
    if not 0 < args.e2e_prompt_seconds <= 30:
        parser.error(f"--e2e-prompt-seconds must be in (0, 30] (got {args.e2e_prompt_seconds})")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - SECTIONS:
        parser.error(f"--skip: unknown section(s) {sorted(skip - SECTIONS)}; valid: {sorted(SECTIONS)}")
    apply_threads(args.threads)
    with torch.no_grad():
        report = run(args, skip)
    write_report(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
