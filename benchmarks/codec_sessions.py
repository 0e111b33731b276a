"""The codec's streaming decode for several streams at once: one decode session per stream (the CPU layout of
`codec_output.CodecStreams`) against one shared multi-slot session stepped for all of them (the accelerator layout),
with every stream's windows aligned (the shared layout's best case), and whether the shared layout gives each stream
the same audio bits as its own session.

Each stream decodes `--frames` random codes in the engine's stream windows (`codec_output.window_frames`: 1, 1, 2, 4,
then 8 frames). The two layouts alternate for `--rounds` rounds; seconds per decoded frame are reported per round
and as medians, with the shared / separate ratio of each round.

    python benchmarks/codec_sessions.py --streams 4 --frames 100 --rounds 3 --threads 2 --output <json>
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from measuring import add_run_arguments, apply_threads, cpu_description, load_average, write_report  # noqa: E402
from codec_output import window_frames  # noqa: E402  (measuring put the repository's modules on the path)


def stream_windows(frames: int) -> list[int]:
    """The decode windows of a stream of `frames` frames (the last one may be short)."""
    windows, decoded = [], 0
    while decoded < frames:
        windows.append(min(window_frames(decoded), frames - decoded))
        decoded += windows[-1]
    return windows


def random_codes(streams: int, frames: int, nq: int, codebook: int, seed: int = 0) -> torch.Tensor:
    """(streams, nq, frames) codes."""
    return torch.randint(0, codebook, (streams, nq, frames), generator=torch.Generator().manual_seed(seed))


def decode_separate(codec: Any, codes: torch.Tensor) -> list[torch.Tensor]:
    """Each stream in its own one-slot session, window by window: a (2, samples) waveform per stream."""
    sessions = []
    for stream in range(codes.shape[0]):
        sessions.append(codec.create_decode_session(1))
        sessions[-1].append(stream)
    parts: list[list[torch.Tensor]] = [[] for _ in sessions]
    start = 0
    for window in stream_windows(codes.shape[2]):
        for stream, session in enumerate(sessions):
            _, audio, lengths = session.step([stream], codes[stream : stream + 1, :, start : start + window]
                                             .transpose(0, 1), [window])
            parts[stream].append(audio[0, :, : int(lengths[0])])
        start += window
    for session in sessions:
        session.close()
    return [torch.cat(p, dim=-1) for p in parts]


def decode_shared(codec: Any, codes: torch.Tensor) -> list[torch.Tensor]:
    """Every stream in one multi-slot session, all of them stepped together, window by window."""
    streams = list(range(codes.shape[0]))
    session = codec.create_decode_session(len(streams))
    for stream in streams:
        session.append(stream)
    parts: list[list[torch.Tensor]] = [[] for _ in streams]
    start = 0
    for window in stream_windows(codes.shape[2]):
        _, audio, lengths = session.step(streams, codes[:, :, start : start + window].transpose(0, 1),
                                         [window] * len(streams))
        for stream in streams:
            parts[stream].append(audio[stream, :, : int(lengths[stream])])
        start += window
    session.close()
    return [torch.cat(p, dim=-1) for p in parts]


def compare(codec: Any, streams: int, frames: int, rounds: int, nq: int) -> dict:
    codes = random_codes(streams, frames, nq, int(codec.config.codebook_size))
    seconds: dict[str, list[float]] = {"separate": [], "shared": []}
    audio: dict[str, list[torch.Tensor]] = {}
    with torch.inference_mode():
        for _ in range(rounds):
            for layout, decode in (("separate", decode_separate), ("shared", decode_shared)):
                start = time.perf_counter()
                audio[layout] = decode(codec, codes)
                seconds[layout].append(time.perf_counter() - start)
    decoded = streams * frames
    differences = [float((a - b).abs().max()) for a, b in zip(audio["separate"], audio["shared"])]
    return {
        "streams": streams, "frames_per_stream": frames, "num_quantizers": nq, "windows": stream_windows(frames),
        "ms_per_frame": {layout: [1e3 * s / decoded for s in runs] for layout, runs in seconds.items()},
        "median_ms_per_frame": {layout: 1e3 * statistics.median(runs) / decoded for layout, runs in seconds.items()},
        "shared_over_separate": [b / a for a, b in zip(seconds["separate"], seconds["shared"])],
        "streams_bit_identical": sum(torch.equal(a, b) for a, b in zip(audio["separate"], audio["shared"])),
        "max_abs_difference": max(differences),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--frames", type=int, default=100, help="frames per stream")
    parser.add_argument("--rounds", type=int, default=3)
    add_run_arguments(parser, weight_precision=False)
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    from demo import build_demo_assets

    codec = build_demo_assets(seed=0).codec
    report = compare(codec, args.streams, args.frames, args.rounds, int(codec.config.num_quantizers))
    report.update(torch_threads=torch.get_num_threads(), cpu=cpu_description(), load_average_at_end=load_average())
    write_report(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
