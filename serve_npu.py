"""An OpenAI-compatible speech server for MOSS-TTS-Nano on Ascend NPU, CUDA or CPU (FastAPI + uvicorn).

    python serve_npu.py --demo                                   # no download: random weights, noise output
    python serve_npu.py --model-path DIR --voices voices/ --port 8000
    curl -s localhost:8000/v1/audio/speech -H 'Content-Type: application/json' \
        -d '{"input": "Hello world.", "voice": "alice"}' -o hello.wav

Endpoints: POST /v1/audio/speech, GET /v1/audio/voices, GET /v1/models, GET /health (503 until loaded), and a web
page to listen at GET / (off with --no-web).
Requests share the continuous-batching engine (--max-batch-size slots, --max-queue waiting). The generation flags
below are the server's defaults; each request may override them. --api-key (or MOSS_TTS_API_KEY) requires
"Authorization: Bearer KEY" on every route but /health; bound to a loopback address, only loopback Host names are
answered; CORS only for --allowed-origins. Ctrl-C / SIGTERM: stop accepting, let running
requests finish for --shutdown-timeout seconds, cancel the rest, exit 0.

Exit codes: 0 success, 1 environment or runtime failure, 2 invalid input (usage).
"""

from __future__ import annotations

# Run as `python serve_npu.py`: execute this file as a package module instead (repo_imports.py).
if __name__ == "__main__" and not __package__:
    __import__("repo_imports").run_script(__file__)

import argparse
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from . import environment
from .cli_common import Parser, _bounded, add_model_arguments, add_performance_arguments, add_sampling_arguments
from .cli_common import classify_failure, load_model_for_cli, run_cli
from .cli_common import resolve_model_path, sampling_kwargs
from .engine import SynthesisEngine
from .audio_formats import OUTPUT_LAYOUTS
from .http_guards import API_KEY_ENV, LOOPBACK_HOSTS, is_loopback, protocol_class
from .speech_api import DEFAULT_MAX_BODY_BYTES, QuietStreamAborted, ServiceState, Voice, create_app, encode_voice
from .speech_api import load_voices
from .speech_request import DEFAULT_MAX_AUDIO_SECONDS, DEFAULT_MAX_INPUT_CHARS, RequestLimits
from .web_page import add_web_page

logger = logging.getLogger("moss_tts_nano.server")

DEMO_VOICE = "demo"  # --demo registers the synthetic reference of infer_npu.py --demo under this name


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    server.add_argument("--port", type=_bounded(int, 0, 65535), default=8000, help="port (default 8000; 0: any free)")
    server.add_argument("--max-batch-size", type=_bounded(int, 1), default=8,
                        help="requests generated together (default 8)")
    server.add_argument("--max-queue", type=_bounded(int, 0), default=64,
                        help="requests waiting for a slot; beyond it 429 (default 64)")
    server.add_argument("--voices", help="directory of NAME.wav reference voices (NAME.txt: transcript)")
    server.add_argument("--max-body-mb", type=_bounded(float, 0, low_open=True),
                        default=DEFAULT_MAX_BODY_BYTES / 2**20, help="request body limit in MiB; beyond it 413 (25)")
    server.add_argument("--shutdown-timeout", type=_bounded(float, 0), default=5.0,
                        help="seconds running requests get to finish on Ctrl-C / SIGTERM before cancellation (5)")
    server.add_argument("--no-web", action="store_true", help="do not serve the web page at GET /")
    server.add_argument("--max-input-chars", type=_bounded(int, 1), default=DEFAULT_MAX_INPUT_CHARS,
                        help=f"longest input text; beyond it 400 ({DEFAULT_MAX_INPUT_CHARS}, OpenAI's limit)")
    server.add_argument("--max-audio-seconds", type=_bounded(float, 0, low_open=True),
                        default=DEFAULT_MAX_AUDIO_SECONDS,
                        help="most audio one request may generate (text chunks x max_new_frames); beyond it 400 "
                             f"before any work ({DEFAULT_MAX_AUDIO_SECONDS:g})")
    server.add_argument("--output-layout", choices=list(OUTPUT_LAYOUTS), default="48k-stereo",
                        help="sample rate and channels of every response (default 48k-stereo, the model's own; "
                             "24k-mono: OpenAI's pcm layout)")
    server.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                        help=f"require 'Authorization: Bearer KEY' on every route but /health (default: "
                             f"${API_KEY_ENV}; none: open)")
    server.add_argument("--allowed-origins", default="",
                        help="comma-separated browser origins allowed by CORS (default none: no CORS headers)")
    server.add_argument("--max-connections", type=_bounded(int, 1), default=256,
                        help="open connections; requests beyond it get 503 (256)")
    server.add_argument("--header-timeout", type=_bounded(float, 0, low_open=True), default=10.0,
                        help="seconds a client has to send a request's headers; then 408 and close (10)")
    server.add_argument("--body-timeout", type=_bounded(float, 0, low_open=True), default=30.0,
                        help="seconds a client has to send a request's body after its headers (30)")
    server.add_argument("--keep-alive-timeout", type=_bounded(float, 0, low_open=True), default=5.0,
                        help="seconds an idle keep-alive connection stays open (5)")
    add_sampling_arguments(parser)
    add_performance_arguments(parser)
    return parser


def generation_defaults(args: argparse.Namespace) -> dict[str, Any]:
    """The server-wide engine keywords (the official CLI values unless flags change them)."""
    return {**sampling_kwargs(args), "voice_clone_max_text_tokens": args.voice_clone_max_text_tokens}


def request_limits(args: argparse.Namespace) -> RequestLimits:
    return RequestLimits(args.max_input_chars, args.max_audio_seconds, OUTPUT_LAYOUTS[args.output_layout])


def bind_socket(host: str, port: int) -> socket.socket:
    """Listen on ``host:port`` now, so a busy port fails before the model loads (port 0 picks a free one)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ValueError(f"--host '{host}' cannot be resolved: {exc.strerror}") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port or "
                           "--host") from exc
    sock.set_inheritable(True)
    return sock


def socket_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


@dataclass(frozen=True)
class ConnectionLimits:
    """How long and how many connections the server holds (uvicorn's options and the read deadlines)."""

    max_connections: int = 256
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive_timeout: float = 5.0
    max_header_bytes: int = 16 * 1024  # h11's limit on a request's headers (400 beyond)


class SpeechServer:
    """uvicorn serving the app; signals drain the engine, then the process exits 0."""

    def __init__(self, app: Any, state: ServiceState, sock: socket.socket, shutdown_timeout: float = 5.0,
                 loader: Callable[[], None] | None = None, limits: ConnectionLimits = ConnectionLimits()) -> None:
        import uvicorn

        server = self

        class _Server(uvicorn.Server):
            async def startup(self, sockets: Any = None) -> None:
                await super().startup(sockets=sockets)
                if loader is not None and not self.should_exit:
                    threading.Thread(target=server._load, args=(loader,), name="model-loader", daemon=True).start()

            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                # why: uvicorn re-raises a captured signal after its shutdown, which would end the process with
                # that signal instead of exit code 0 once the requests are drained
                if threading.current_thread() is not threading.main_thread():
                    yield
                    return
                previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
                try:
                    yield
                finally:
                    for sig, handler in previous.items():
                        signal.signal(sig, handler)

            def handle_exit(self, sig: int, frame: Any) -> None:
                server.begin_shutdown()
                super().handle_exit(sig, frame)

        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=shutdown_timeout + 5.0,
                                http=protocol_class(limits.header_timeout, limits.body_timeout),
                                timeout_keep_alive=limits.keep_alive_timeout,
                                limit_concurrency=limits.max_connections,
                                h11_max_incomplete_event_size=limits.max_header_bytes)
        errors = logging.getLogger("uvicorn.error")  # configured by Config just above
        if not any(isinstance(f, QuietStreamAborted) for f in errors.filters):
            errors.addFilter(QuietStreamAborted())
        self.uvicorn, self.state, self.sock = _Server(config), state, sock
        self.shutdown_timeout = shutdown_timeout
        self.exit_code = 0
        self._drain: threading.Thread | None = None

    @property
    def url(self) -> str:
        return socket_url(self.sock)

    @property
    def started(self) -> bool:
        return self.uvicorn.started

    def run(self) -> int:
        """Serve until shut down (a signal, ``stop()`` or a failed load); return the exit code."""
        self.uvicorn.run(sockets=[self.sock])
        self.begin_shutdown(grace=0.0)
        if self._drain is not None:
            self._drain.join()
        return self.exit_code

    def begin_shutdown(self, grace: float | None = None) -> None:
        """Stop accepting requests and drain the engine in the background (idempotent)."""
        if self._drain is None:
            wait = self.shutdown_timeout if grace is None else grace
            self._drain = threading.Thread(target=self.state.drain, args=(wait,), name="drain", daemon=True)
            self._drain.start()

    def stop(self) -> None:
        """Shut down as a signal would (any thread)."""
        self.begin_shutdown()
        self.uvicorn.should_exit = True

    def _load(self, loader: Callable[[], None]) -> None:
        try:
            loader()
        except BaseException as exc:  # a failed load ends the server with the CLI's one line and exit code
            self.exit_code, message = classify_failure(exc)
            self.state.status, self.state.error = "failed", message
            logger.debug("loading failed", exc_info=exc)
            print(f"error: {message}", file=sys.stderr, flush=True)
            self.uvicorn.should_exit = True


def load_service(args: argparse.Namespace, path: Path | None, state: ServiceState) -> Any:
    """Load the model, codec and voices, start the engine, and mark the state ready; return the model."""
    model, resources = load_model_for_cli(args, path)
    state.keep.append(resources.pop("_demo_workdir", None))
    demo_prompt = resources.pop("prompt_audio", None)
    # The engine loads the tokenizer and codec (once); the voices are encoded with its codec.
    engine = SynthesisEngine(model, **resources, max_batch_size=args.max_batch_size, max_queue=args.max_queue)
    codec = engine.resources.codec
    voices = load_voices(args.voices, codec) if args.voices else {}
    if demo_prompt is not None:
        voices.setdefault(DEMO_VOICE, Voice(DEMO_VOICE, encode_voice(demo_prompt, codec)))
    engine.start()
    state.ready(engine, voices)
    return model


def startup_line(url: str, model: Any, args: argparse.Namespace, voices: dict) -> str:
    parameter = next(model.parameters())
    parts = [f"serving {url}", f"device={parameter.device}", f"dtype={str(parameter.dtype).replace('torch.', '')}",
             f"attention={'/'.join(model.resolved_attention_implementation())}",
             f"weights={args.weight_precision}", f"max_batch_size={args.max_batch_size}",
             f"voices={','.join(voices) or '-'}"]
    if args.demo:
        parts.append("(demo: random weights, the audio is noise)")
    return " ".join(parts)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (it may be replaced after setup)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_logging(verbose: bool) -> None:
    """One line per request on stderr (once per process, however often main() runs)."""
    if not any(getattr(h, "_moss_server", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        handler._moss_server = True
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


def build_app(args: argparse.Namespace, state: ServiceState) -> Any:
    """The API, and the web page at ``GET /`` unless ``--no-web``."""
    app = create_app(state, max_body_bytes=int(args.max_body_mb * 2**20), api_key=args.api_key,
                     allowed_hosts=LOOPBACK_HOSTS if is_loopback(args.host) else None,
                     allowed_origins=[o.strip() for o in args.allowed_origins.split(",") if o.strip()])
    if not args.no_web:
        add_web_page(app, demo=args.demo, defaults=state.defaults)
    return app


def run(args: argparse.Namespace) -> int:
    path = None if args.demo else resolve_model_path(args.model_path, args.local_files_only)
    if args.voices and not Path(args.voices).is_dir():
        raise ValueError(f"--voices '{args.voices}' is not a directory")
    state = ServiceState(model_id=Path(args.model_path).name if args.model_path else "MOSS-TTS-Nano-demo",
                         defaults=generation_defaults(args), limits=request_limits(args))
    sock = bind_socket(args.host, args.port)
    app = build_app(args, state)
    connections = ConnectionLimits(args.max_connections, args.header_timeout, args.body_timeout,
                                   args.keep_alive_timeout)

    def loader() -> None:
        model = load_service(args, path, state)
        print(startup_line(socket_url(sock), model, args, state.voices), flush=True)

    return SpeechServer(app, state, sock, args.shutdown_timeout, loader, connections).run()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        args = build_parser().parse_args(argv)
        setup_logging(args.verbose)
        environment.apply_npu_environment_defaults()
        return run(args)

    return run_cli(body, verbose="--verbose" in argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_grad_enabled(False)
    sys.exit(main())
