"""Load on the speech server: N concurrent streaming clients against a real serve_npu.py.

    python benchmarks/serve_load.py                                  # starts serve_npu.py --demo here (CPU)
    python benchmarks/serve_load.py --server-args "--device cuda --dtype bfloat16" --concurrency 1,8,32
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --voice alice   # a server already running

Without --url the script starts `serve_npu.py --demo` (the released architectures with seeded random weights;
--server-args with --model-path serves a checkpoint instead) on a free port, with --max-batch-size set to the
highest concurrency, and stops it at the end. Each of N clients (--concurrency, default 1,2,4,8) sends
--requests-per-client streaming requests one after another (raw PCM, --frames frames each, the server's sampling
defaults, a distinct seed per request). Per level it reports:
- first-byte latency p50/p95: from sending the request to the first audio bytes;
- real-time factor p50/p95: a request's wall time (send to last byte) over the seconds of audio it returned;
- aggregate audio seconds per wall second: all audio returned at that level over the level's wall time;
- errors: non-200 answers, broken streams and transport failures (the exit code is 1 when there are any).
The JSON (printed and written to --output) records the CPU model, load averages and the server's startup line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from measuring import cpu_info, load_average  # noqa: E402

BYTES_PER_SECOND = 48000 * 2 * 2  # 48 kHz, stereo, 16-bit PCM
TEXT = "The quick brown fox jumps over the lazy dog while the band plays on in the distance."
STARTUP_TIMEOUT_S = 900.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (default: start serve_npu.py --demo here)")
    parser.add_argument("--server-args", default="", help="extra serve_npu.py flags when the script starts it")
    parser.add_argument("--concurrency", default="1,2,4,8", help="client counts, comma-separated (default 1,2,4,8)")
    parser.add_argument("--requests-per-client", type=int, default=2, help="requests each client sends in turn (2)")
    parser.add_argument("--frames", type=int, default=50, help="max_new_frames per request (50 = 4 s of audio)")
    parser.add_argument("--voice", default=None, help="voice to request (default: 'demo' on a started demo server)")
    parser.add_argument("--text", default=TEXT, help="text of every request")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take (600)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"))
    args = parser.parse_args(argv)
    try:
        args.levels = [int(n) for n in args.concurrency.split(",")]
    except ValueError:
        parser.error(f"--concurrency must be comma-separated integers, got '{args.concurrency}'")
    if not args.levels or min(args.levels) < 1:
        parser.error(f"--concurrency values must be at least 1, got '{args.concurrency}'")
    for name in ("requests_per_client", "frames"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


# ---------------------------------------------------------------------------------------------------- the server


class StartedServer:
    """serve_npu.py in a child process; its URL and startup line come from its first stdout line."""

    def __init__(self, extra: list[str], max_batch_size: int) -> None:
        model = [] if "--model-path" in extra else ["--demo"]
        command = [sys.executable, str(ROOT / "serve_npu.py"), *model, "--port", "0",
                   "--max-batch-size", str(max_batch_size), "--max-queue", str(4 * max_batch_size), *extra]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.stderr: list[str] = []
        threading.Thread(target=lambda: self.stderr.extend(self.process.stderr), daemon=True).start()
        self.startup_line = self._first_line()
        self.url = self.startup_line.split()[1]

    def _first_line(self) -> str:
        found: list[str] = []
        reader = threading.Thread(target=lambda: found.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(STARTUP_TIMEOUT_S)
        line = found[0].strip() if found else ""
        if not line.startswith("serving http"):
            self.stop()
            tail = "".join(self.stderr[-5:]).strip()
            raise RuntimeError(f"serve_npu.py did not start (exit {self.process.poll()}): {tail or line}")
        return line

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


# ---------------------------------------------------------------------------------------------------- clients


def one_request(client: httpx.Client, url: str, body: dict) -> dict[str, Any]:
    """One streaming request: first-byte latency, wall time, seconds of audio, error (None when it succeeded)."""
    start = time.perf_counter()
    first: float | None = None
    received, error = 0, None
    try:
        with client.stream("POST", url + "/v1/audio/speech", json=body) as response:
            if response.status_code != 200:
                error = f"HTTP {response.status_code}: {response.read().decode(errors='replace')[:200]}"
            else:
                for chunk in response.iter_raw():
                    if chunk and first is None:
                        first = time.perf_counter() - start
                    received += len(chunk)
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"
    wall = time.perf_counter() - start
    audio = received / BYTES_PER_SECOND
    if error is None and audio == 0:
        error = "no audio"
    return {"first_byte_s": first, "wall_s": wall, "audio_s": audio, "rtf": wall / audio if audio else None,
            "error": error}


def run_level(url: str, clients: int, args: argparse.Namespace, seeds: Iterator[int]) -> dict[str, Any]:
    """``clients`` threads, each sending its requests in turn; all start together."""
    results: list[dict] = []
    lock, barrier = threading.Lock(), threading.Barrier(clients)

    def client_loop(bodies: list[dict]) -> None:
        with httpx.Client(timeout=args.timeout) as client:
            barrier.wait()
            for body in bodies:
                outcome = one_request(client, url, body)
                with lock:
                    results.append(outcome)

    plans = [[request_body(args, next(seeds)) for _ in range(args.requests_per_client)] for _ in range(clients)]
    threads = [threading.Thread(target=client_loop, args=(plan,)) for plan in plans]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return summarize(clients, results, wall)


def request_body(args: argparse.Namespace, seed: int) -> dict:
    body = {"input": args.text, "response_format": "pcm", "stream": True, "max_new_frames": args.frames, "seed": seed}
    if args.voice:
        body["voice"] = args.voice
    return body


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None}
    return {"p50": round(float(np.percentile(values, 50)), 4), "p95": round(float(np.percentile(values, 95)), 4)}


def summarize(clients: int, results: list[dict], wall: float) -> dict[str, Any]:
    ok = [r for r in results if r["error"] is None]
    audio = sum(r["audio_s"] for r in ok)
    return {
        "clients": clients,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "error_messages": sorted({r["error"] for r in results if r["error"]})[:5],
        "first_byte_s": percentiles([r["first_byte_s"] for r in ok]),
        "rtf": percentiles([r["rtf"] for r in ok]),
        "audio_s": round(audio, 3),
        "wall_s": round(wall, 3),
        "audio_s_per_wall_s": round(audio / wall, 4) if wall > 0 else None,
    }


# ---------------------------------------------------------------------------------------------------- main


def environment(startup_line: str | None, url: str) -> dict[str, Any]:
    return {"url": url, "server": startup_line, "client_python": platform.python_version(),
            "machine": platform.machine(), "cpu_model": cpu_info("model name"), "logical_cpus": os.cpu_count(),
            "load_average_at_start": load_average()}


def measure(url: str, args: argparse.Namespace, startup_line: str | None) -> dict[str, Any]:
    health = httpx.get(url + "/health", timeout=30)
    if health.status_code != 200:
        raise RuntimeError(f"{url}/health answered {health.status_code}: {health.text[:200]}")
    report: dict[str, Any] = {"environment": environment(startup_line, url)}
    report["settings"] = {"frames": args.frames, "requests_per_client": args.requests_per_client,
                          "voice": args.voice, "text": args.text, "response_format": "pcm", "stream": True}
    seeds = iter(range(1, 1 << 30))
    with httpx.Client(timeout=args.timeout) as client:  # warm-up, not counted: first-call setup on the server
        report["warm_up"] = one_request(client, url, request_body(args, 0))
    report["levels"] = [run_level(url, n, args, seeds) for n in args.levels]
    report["environment"]["load_average_at_end"] = load_average()
    return report


def write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(partial, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    server = None
    if args.url is None:
        server = StartedServer(shlex.split(args.server_args), max(args.levels))
        args.voice = args.voice or ("demo" if "--model-path" not in args.server_args else None)
    try:
        report = measure(args.url or server.url, args, server.startup_line if server else None)
    finally:
        if server is not None:
            server.stop()
    if server is not None:
        report["environment"]["server_args"] = args.server_args
    write_json(Path(args.output), report)
    print(json.dumps(report, indent=2))
    return 1 if any(level["errors"] for level in report["levels"]) or report["warm_up"]["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
