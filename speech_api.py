"""The HTTP API of serve_npu.py: OpenAI's ``POST /v1/audio/speech`` on the continuous-batching engine.

A request is checked here for what only the API knows (field types, response format, speed, voice, reference
audio) and then by the engine's ``submit`` (text, mode, sampling ranges: the checks and messages of
``inference()``). Audio leaves as WAV, raw PCM (16-bit little-endian, 48 kHz, stereo, interleaved) or FLAC; with
``stream: true`` WAV and PCM are sent as they are decoded (WAV with an open-length header), FLAC once complete
(its header carries the length). Failures reach the client as OpenAI's error JSON, never a traceback; each
request is logged as one line. A client that goes away cancels its request at once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import itertools
import logging
import os
import re
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import anyio
import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

try:
    from .cli_common import SAMPLING_BOUNDS, bound_error
    from .audio_io import TARGET_CHANNELS, TARGET_SAMPLE_RATE, load_prompt_audio, prepare_prompt_waveform
    from .engine import EngineClosed, EngineFull, RequestCancelled
    from .pipeline import SAMPLES_PER_FRAME, encode_prompt_audio
except ImportError:  # not part of a package: imported from the repository root or run as a script
    if __package__:  # inside a package (remote code): a real missing dependency, reported as itself
        raise
    from cli_common import SAMPLING_BOUNDS, bound_error
    from audio_io import TARGET_CHANNELS, TARGET_SAMPLE_RATE, load_prompt_audio, prepare_prompt_waveform
    from engine import EngineClosed, EngineFull, RequestCancelled
    from pipeline import SAMPLES_PER_FRAME, encode_prompt_audio

logger = logging.getLogger("moss_tts_nano.server")

DEFAULT_MAX_BODY_BYTES = 25 * 1024 * 1024
DEFAULT_VOICE = "default"
BYTES_PER_SAMPLE = 2  # 16-bit PCM
MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac"}
VOICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Request fields passed to the engine under the same name (upstream's inference keywords).
ENGINE_FIELDS = ("mode", "prompt_text", "seed", "max_new_frames", "do_sample", "text_temperature", "text_top_p",
                 "text_top_k", "audio_temperature", "audio_top_p", "audio_top_k", "audio_repetition_penalty")
# Where an engine ValueError's message points (first match wins; longer names first so text_top_p beats text).
_PARAM_HINTS = tuple(sorted(ENGINE_FIELDS, key=len, reverse=True)) + (
    ("prompt audio", "ref_audio"), ("prompt_audio", "ref_audio"), ("text", "input"))


class SpeechRequest(BaseModel):
    """OpenAI's speech request plus upstream's inference keywords. Strict types: ``"1"`` is not a number."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    model: Optional[str] = None
    input: str
    voice: Optional[str] = None
    response_format: str = "wav"
    speed: float = 1.0
    stream: bool = False
    mode: Optional[str] = None
    prompt_text: Optional[str] = None
    ref_audio: Optional[str] = None
    seed: Optional[int] = None
    max_new_frames: Optional[int] = None
    do_sample: Optional[bool] = None
    text_temperature: Optional[float] = None
    text_top_p: Optional[float] = None
    text_top_k: Optional[int] = None
    audio_temperature: Optional[float] = None
    audio_top_p: Optional[float] = None
    audio_top_k: Optional[int] = None
    audio_repetition_penalty: Optional[float] = None


# ---------------------------------------------------------------------------------------------------- errors


class ApiError(Exception):
    """A failure answered with OpenAI's error JSON."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def response(self, headers: dict | None = None) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def param_for(message: str) -> str | None:
    """The request field an engine validation message is about, when it names one."""
    for hint in _PARAM_HINTS:
        name, param = hint if isinstance(hint, tuple) else (hint, hint)
        if name in message:
            return param
    return None


def failure_to_api_error(exc: BaseException, stopping: bool) -> ApiError:
    """Map a request's failure (from submit or from generation) to its status and error JSON."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, EngineFull):
        return ApiError(429, "the request queue is full; retry later", kind="rate_limit_error", code="queue_full")
    if isinstance(exc, (EngineClosed, RequestCancelled)) and stopping:
        return ApiError(503, "the server is shutting down", kind="server_error", code="shutting_down")
    if isinstance(exc, ValueError):
        message = first_line(exc)
        return ApiError(400, message, param=param_for(message))
    if isinstance(exc, (RuntimeError, OSError)):
        return ApiError(500, first_line(exc), kind="server_error", code="generation_failed")
    return ApiError(500, f"internal error {type(exc).__name__}; see the server log", kind="server_error",
                    code="internal_error")


# ---------------------------------------------------------------------------------------------------- audio


def pcm16(waveform: torch.Tensor) -> bytes:
    """``[channels, n]`` float audio to interleaved 16-bit little-endian PCM (clipped; scaled like libsndfile)."""
    samples = torch.nan_to_num(waveform.detach().float().cpu(), nan=0.0).clamp(-1.0, 1.0)
    ints = samples.mul(32767.0).round().to(torch.int16)  # (C, n)
    return ints.t().contiguous().numpy().astype("<i2", copy=False).tobytes()


def wav_header(frames: int | None, sample_rate: int = TARGET_SAMPLE_RATE, channels: int = TARGET_CHANNELS) -> bytes:
    """A 44-byte PCM WAV header; ``frames=None`` writes the open length (0xFFFFFFFF) of a stream."""
    block = channels * BYTES_PER_SAMPLE
    data = 0xFFFFFFFF if frames is None else frames * block
    riff = 0xFFFFFFFF if frames is None else 36 + data
    return struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", riff, b"WAVE", b"fmt ", 16, 1, channels, sample_rate,
                       sample_rate * block, block, 8 * BYTES_PER_SAMPLE, b"data", data)


def flac_bytes(pcm: bytes, sample_rate: int = TARGET_SAMPLE_RATE, channels: int = TARGET_CHANNELS) -> bytes:
    import soundfile

    samples = np.frombuffer(pcm, dtype="<i2").reshape(-1, channels)
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, sample_rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def encode_audio(waveform: torch.Tensor, response_format: str) -> bytes:
    """A complete file (wav, flac) or raw PCM for ``[2, n]`` float audio; every format holds the same samples."""
    pcm = pcm16(waveform)
    if response_format == "pcm":
        return pcm
    if response_format == "wav":
        return wav_header(len(pcm) // (TARGET_CHANNELS * BYTES_PER_SAMPLE)) + pcm
    return flac_bytes(pcm)


def decode_ref_audio(value: str) -> torch.Tensor:
    """``ref_audio`` (base64, or a data URL, of a WAV/FLAC/OGG/MP3 file) as a ``[2, N]`` 48 kHz tensor.

    Raises:
        ApiError: 400 naming what is wrong (encoding, unreadable audio, and the prompt-file checks).
    """
    import soundfile

    payload = value
    if value.startswith("data:"):
        header, _, payload = value.partition(",")
        if not header.endswith(";base64"):
            raise ApiError(400, "ref_audio data URL must be base64-encoded (data:audio/wav;base64,...)", "ref_audio")
    try:
        raw = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, f"ref_audio is not valid base64: {first_line(exc)}", "ref_audio") from exc
    if not raw:
        raise ApiError(400, "ref_audio is empty", "ref_audio")
    try:
        data, rate = soundfile.read(io.BytesIO(raw), dtype="float32", always_2d=True)
    except Exception as exc:  # libsndfile reports unreadable data as several exception types
        reason = re.sub(r"^Error opening <[^>]*>: ", "", first_line(exc))  # the in-memory file's repr says nothing
        raise ApiError(400, f"cannot read ref_audio: {reason} (supported: WAV, FLAC, OGG, MP3 via libsndfile)",
                       "ref_audio") from exc
    if data.shape[0] == 0:
        raise ApiError(400, "ref_audio contains no samples", "ref_audio")
    try:
        return prepare_prompt_waveform(np.ascontiguousarray(data.T), int(rate), source="ref_audio")
    except ValueError as exc:
        raise ApiError(400, first_line(exc), "ref_audio") from exc


# ---------------------------------------------------------------------------------------------------- voices


@dataclass(frozen=True)
class Voice:
    """A reference voice encoded once at startup: prompt codes, and its transcript when one was given."""

    name: str
    codes: torch.Tensor  # (T_ref, n_vq) int64, CPU
    prompt_text: str | None = None

    def describe(self) -> dict:
        return {"name": self.name, "mode": "continuation" if self.prompt_text else "voice_clone",
                "seconds": round(self.codes.shape[0] * SAMPLES_PER_FRAME / TARGET_SAMPLE_RATE, 2),
                "transcript": self.prompt_text is not None}


def load_voices(directory: str | os.PathLike, codec: Any) -> dict[str, Voice]:
    """Encode every ``NAME.wav`` in ``directory`` (with ``NAME.txt`` as its transcript when present).

    Raises:
        ValueError: not a directory, no .wav files, a bad name, an empty transcript, or unusable audio.
    """
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"--voices '{root}' is not a directory")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() == ".wav")
    if not files:
        raise ValueError(f"--voices '{root}' holds no .wav files (expected NAME.wav, optionally NAME.txt)")
    voices: dict[str, Voice] = {}
    for path in files:
        name = path.stem
        if not VOICE_NAME.match(name) or name == DEFAULT_VOICE:
            raise ValueError(f"voice file '{path}': the name '{name}' must match {VOICE_NAME.pattern} and not be "
                             f"'{DEFAULT_VOICE}'")
        voices[name] = Voice(name, encode_voice(load_prompt_audio(path), codec), read_transcript(path))
    return voices


def read_transcript(wav_path: Path) -> str | None:
    path = wav_path.with_suffix(".txt")
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as exc:
        raise ValueError(f"voice transcript '{path}' is not UTF-8 text: {exc}") from exc
    if not text:
        raise ValueError(f"voice transcript '{path}' is empty; delete it to clone the voice without a transcript")
    return text


def encode_voice(waveform: torch.Tensor, codec: Any) -> torch.Tensor:
    with torch.inference_mode():
        return encode_prompt_audio(codec, waveform).cpu()


# ---------------------------------------------------------------------------------------------------- state


@dataclass
class ServiceState:
    """What the routes read: the engine (None while loading), voices, server-wide generation defaults."""

    model_id: str = "MOSS-TTS-Nano"
    defaults: dict = field(default_factory=dict)
    engine: Any = None
    voices: dict[str, Voice] = field(default_factory=dict)
    status: str = "loading"  # loading -> ready -> stopping; or failed
    error: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    keep: list = field(default_factory=list)  # objects that must live as long as the server (demo files)
    jobs: set = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ready(self, engine: Any, voices: dict[str, Voice]) -> None:
        self.engine, self.voices = engine, voices
        if self.status == "loading":
            self.status = "ready"

    def live_jobs(self) -> list:
        with self.lock:
            return list(self.jobs)

    def drain(self, grace: float) -> None:
        """Stop accepting, let running requests finish for ``grace`` seconds, then cancel what is left."""
        self.status = "stopping"
        deadline = time.monotonic() + grace
        while self.live_jobs() and time.monotonic() < deadline:
            time.sleep(0.05)
        for job in self.live_jobs():
            job.cancel()
        if self.engine is not None:
            self.engine.shutdown(cancel_running=True, timeout=max(1.0, grace))


# ---------------------------------------------------------------------------------------------------- requests


_request_ids = itertools.count(1)


def new_request_id() -> str:
    return f"req-{os.getpid():x}-{next(_request_ids)}"


def parse_request(body: bytes) -> SpeechRequest:
    try:
        return SpeechRequest.model_validate_json(body)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        if error["type"] == "json_invalid":
            raise ApiError(400, f"malformed JSON body: {error['ctx']['error']}") from None
        param = ".".join(str(part) for part in error["loc"]) or None
        if error["type"] == "extra_forbidden":
            allowed = ", ".join(SpeechRequest.model_fields)
            raise ApiError(400, f"unknown field '{param}'; allowed: {allowed}", param) from None
        where = f"{param}: " if param else "request body: "
        raise ApiError(400, where + error["msg"], param) from None


def resolve_voice(name: str | None, voices: dict[str, Voice]) -> Voice | None:
    if name is None or name == DEFAULT_VOICE:
        return None
    if name not in voices:
        known = ", ".join([DEFAULT_VOICE, *sorted(voices)])
        raise ApiError(400, f"unknown voice '{name}'; known voices: {known}", "voice")
    return voices[name]


def engine_arguments(req: SpeechRequest, state: ServiceState) -> dict[str, Any]:
    """The keyword arguments of ``engine.submit`` for a request (server defaults, then the request's values)."""
    if req.response_format not in MEDIA_TYPES:
        raise ApiError(400, f"response_format '{req.response_format}' is not supported; choose one of "
                            f"{', '.join(MEDIA_TYPES)}", "response_format")
    if req.speed != 1.0:
        raise ApiError(400, f"speed={req.speed:g} is not supported: only 1.0", "speed")
    given = {name: getattr(req, name) for name in ENGINE_FIELDS if getattr(req, name) is not None}
    check_ranges(given)
    kwargs = {**state.defaults, **given}
    voice = resolve_voice(req.voice, state.voices)
    if voice is not None and req.ref_audio is not None:
        raise ApiError(400, f"give either voice '{voice.name}' or ref_audio, not both", "ref_audio")
    if voice is not None:
        kwargs["prompt_audio_codes"] = voice.codes
        if voice.prompt_text and req.prompt_text is None:
            kwargs["prompt_text"] = voice.prompt_text
    elif req.ref_audio is not None:
        kwargs["prompt_audio"] = decode_ref_audio(req.ref_audio)
        kwargs["prompt_audio_sample_rate"] = TARGET_SAMPLE_RATE
    if "mode" not in kwargs:  # as infer_npu.py infers it: a transcript or no prompt audio means continuation
        has_audio = "prompt_audio_codes" in kwargs or "prompt_audio" in kwargs
        kwargs["mode"] = "continuation" if kwargs.get("prompt_text") or not has_audio else "voice_clone"
    return kwargs


def check_ranges(values: dict[str, Any]) -> None:
    """The command line's ranges for the generation settings (so a greedy request cannot carry a bad value)."""
    for name, (_, *bounds) in SAMPLING_BOUNDS.items():
        problem = bound_error(values[name], *bounds) if name in values else None
        if problem:
            raise ApiError(400, f"{name} {problem}", name)
    seed = values.get("seed")
    if seed is not None and not -(2**63) <= seed < 2**64:
        raise ApiError(400, f"seed must be a 64-bit integer, got {seed}", "seed")


class SpeechJob:
    """One submitted request: a thread drains the engine handle's events into an asyncio queue."""

    def __init__(self, handle: Any, state: ServiceState) -> None:
        self.handle, self.state = handle, state
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        with state.lock:
            state.jobs.add(self)
        threading.Thread(target=self._pump, name=f"pump-{handle.id}", daemon=True).start()

    def _pump(self) -> None:
        try:
            for event in self.handle.events():
                self._put(event)
        except BaseException as exc:  # the request's own failure, handed to the response that awaits it
            self._put(exc)

    def _put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop has closed: nobody is waiting any more
            pass

    async def next_event(self) -> dict:
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self.handle.cancel()

    def close(self) -> None:
        """Cancel the request unless it finished (idempotent), and forget it."""
        if not self.handle.done:
            self.handle.cancel()
        with self.state.lock:
            self.state.jobs.discard(self)


@dataclass
class RequestLog:
    """The one line logged per request."""

    request_id: str
    started: float = field(default_factory=time.perf_counter)
    status: int = 0
    frames: int | None = None
    audio_seconds: float | None = None
    first_audio: float | None = None
    detail: str = ""

    def audio_sent(self) -> None:
        if self.first_audio is None:
            self.first_audio = time.perf_counter() - self.started

    def emit(self) -> None:
        parts = [f"request {self.request_id} status={self.status}",
                 f"frames={self.frames if self.frames is not None else '-'}",
                 f"audio={self.audio_seconds:.2f}s" if self.audio_seconds is not None else "audio=-",
                 f"wall={time.perf_counter() - self.started:.2f}s",
                 f"first_audio={self.first_audio:.3f}s" if self.first_audio is not None else "first_audio=-"]
        if self.detail:
            parts.append(self.detail)
        logger.info(" ".join(parts))


class StreamAborted(Exception):
    """Raised to the ASGI server after a response has started, so it drops the connection (an incomplete body)."""


class QuietStreamAborted(logging.Filter):
    """Drops the ASGI server's traceback for a StreamAborted: the request's own log line already says it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], StreamAborted))


class SpeechResponse(Response):
    """Sends one request's audio, streamed or whole; a client disconnect cancels the request at once."""

    def __init__(self, job: SpeechJob, req: SpeechRequest, log: RequestLog, headers: dict[str, str]) -> None:
        self.job, self.req, self.log = job, req, log
        self.status_code = 200
        self.background = None
        self.streaming = req.stream and req.response_format != "flac"  # FLAC's header needs the total length
        self.raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        self.started = self.finished = self.disconnected = self.aborted = False

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        self.scope = scope
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._watch_disconnect, receive, group.cancel_scope)
                try:
                    await self._respond(send)
                finally:
                    group.cancel_scope.cancel()
        finally:
            self.job.close()
            if self.disconnected:
                self.log.status, self.log.detail = 499, "client disconnected; request cancelled"
            self.log.emit()
        if self.aborted:
            raise StreamAborted(self.log.request_id)

    async def _watch_disconnect(self, receive: Callable, scope: anyio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not self.finished:
            self.disconnected = True
            self.job.cancel()  # frees the slot at the next frame boundary
            scope.cancel()

    async def _respond(self, send: Callable) -> None:
        try:
            event = await self.job.next_event()
            if self.streaming:
                await self._stream(send, event)
            else:
                await self._send_whole(send, event)
        except Exception as exc:  # the request failed: an error JSON if nothing was sent, else a dropped stream
            error = failure_to_api_error(exc, self.job.state.status == "stopping")
            if error.code == "internal_error":
                logger.debug("request %s failed", self.log.request_id, exc_info=exc)
            if self.started:  # the status line is gone: the client learns from the dropped connection
                self.aborted, self.log.detail = True, f'aborted error="{error.message}"'
            else:
                self.log.status, self.log.detail = error.status, f'error="{error.message}"'
                await error.response({"X-Request-Id": self.log.request_id})(self.scope, None, self._final(send))

    def _final(self, send: Callable) -> Callable:
        async def wrapped(message: dict) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.finished = True
            await send(message)

        return wrapped

    async def _send_whole(self, send: Callable, event: dict) -> None:
        while event["type"] != "result":
            event = await self.job.next_event()
        body = encode_audio(event["waveform"], self.req.response_format)
        self._record(event)
        headers = self.raw_headers + [(b"content-length", str(len(body)).encode())]
        self.log.status = 200
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        self.started = True
        self.log.audio_sent()
        await self._final(send)({"type": "http.response.body", "body": body})

    async def _stream(self, send: Callable, event: dict) -> None:
        self.log.status = 200
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        self.started = True
        if self.req.response_format == "wav":
            await send({"type": "http.response.body", "body": wav_header(None), "more_body": True})
        while event["type"] != "result":
            await send({"type": "http.response.body", "body": pcm16(event["waveform"]), "more_body": True})
            self.log.audio_sent()
            event = await self.job.next_event()
        self._record(event)
        await self._final(send)({"type": "http.response.body", "body": b""})

    def _record(self, result: dict) -> None:
        self.log.frames = int(result.get("frames", 0))
        self.log.audio_seconds = result["waveform"].shape[-1] / TARGET_SAMPLE_RATE


# ---------------------------------------------------------------------------------------------------- app


class BodyLimit:
    """ASGI middleware: 413 for a body over ``limit`` bytes, decided from Content-Length or while it arrives, so an
    oversized body is never read whole."""

    def __init__(self, app: Callable, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await self._reject(scope, send, ApiError(400, "invalid Content-Length header"))
            if int(length) > self.limit:
                return await self._reject(scope, send, self._too_large(f"{int(length)} bytes"))
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:  # a chunked body: read it up to the limit, then hand it on
            message = await receive()
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            if size > self.limit:
                return await self._reject(scope, send, self._too_large(f"over {self.limit} bytes"))
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed() -> dict:
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)

    def _too_large(self, size: str) -> ApiError:
        return ApiError(413, f"request body is {size}; the limit is {self.limit} bytes (--max-body-mb)",
                        code="request_too_large")

    @staticmethod
    async def _reject(scope: dict, send: Callable, error: ApiError) -> None:
        logger.info("request - status=%d %s", error.status, error.message)
        await error.response({"Connection": "close"})(scope, None, send)


def create_app(state: ServiceState, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI application serving ``state`` (whose engine may still be loading)."""
    app = FastAPI(title="MOSS-TTS-Nano speech server", docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, limit=max_body_bytes)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ApiError(exc.status_code, str(exc.detail), code=None).response()

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.status != "ready":
            body = {"status": state.status, **({"error": state.error} if state.error else {})}
            return JSONResponse(body, status_code=503)
        return JSONResponse({"status": "ok", **state.engine.stats()})

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": state.model_id, "object": "model", "created": state.created,
                                            "owned_by": "OpenMOSS"}]}

    @app.get("/v1/audio/voices")
    async def voices() -> dict:
        default = {"name": DEFAULT_VOICE, "mode": "continuation", "seconds": 0.0, "transcript": False}
        return {"voices": [default, *(voice.describe() for voice in state.voices.values())]}

    @app.post("/v1/audio/speech")
    async def speech(request: Request) -> Response:
        log = RequestLog(new_request_id())
        try:
            return await accept_speech(request, state, log)
        except Exception as exc:  # the API boundary: a JSON error and one log line, never a traceback
            error = failure_to_api_error(exc, state.status == "stopping")
            if error.code == "internal_error":
                logger.debug("request %s failed", log.request_id, exc_info=exc)
            log.status, log.detail = error.status, f'error="{error.message}"'
            log.emit()
            return error.response({"X-Request-Id": log.request_id})

    return app


async def accept_speech(request: Request, state: ServiceState, log: RequestLog) -> Response:
    """Validate and submit a speech request; the response then streams or sends its audio."""
    if state.status != "ready":
        code = "loading" if state.status == "loading" else "shutting_down"
        message = "the model is still loading" if code == "loading" else "the server is shutting down"
        raise ApiError(503, message, kind="server_error", code=code)
    req = parse_request(await request.body())
    handle = await run_in_threadpool(submit, state, req)
    job = SpeechJob(handle, state)
    headers = {"Content-Type": MEDIA_TYPES[req.response_format], "X-Request-Id": log.request_id,
               "X-Sample-Rate": str(TARGET_SAMPLE_RATE), "X-Channels": str(TARGET_CHANNELS),
               "X-Bits-Per-Sample": str(8 * BYTES_PER_SAMPLE)}
    if req.model is not None:
        headers["X-Model"] = "".join(c for c in req.model[:200] if " " <= c <= "~")  # printable ASCII only
    return SpeechResponse(job, req, log, headers)


def submit(state: ServiceState, req: SpeechRequest) -> Any:
    """Decode the reference audio and submit (both CPU work, run off the event loop)."""
    # a whole response is decoded once at the end (its bytes depend only on its codes); a stream in windows
    stream = req.stream and req.response_format != "flac"
    return state.engine.submit(req.input, stream=stream, **engine_arguments(req, state))
