"""The HTTP API of serve_npu.py: OpenAI's ``POST /v1/audio/speech`` on the continuous-batching engine.

A request passes the guards (http_guards.py: Host, API key, JSON content type, body size), is checked here for
what only the API knows (speech_request.py: fields, length, format, speed, voice, the audio budget, reference
audio) and then by the engine's ``submit`` (text, mode, sampling ranges: the checks and messages of
``inference()``). Audio leaves in the requested format (audio_formats.py), sent as it is generated unless the
format needs the total length (FLAC) or the request asks for ``stream: false``; ``stream_format: "sse"`` sends
OpenAI's ``speech.audio.delta`` / ``speech.audio.done`` events. Failures reach the client as OpenAI's error JSON,
never a traceback (a 500 logs its traceback); each request is logged as one line. A client that goes away cancels
its request at once.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from .audio_formats import RESPONSE_FORMATS, AudioEncoder
from .audio_io import TARGET_SAMPLE_RATE
from .http_guards import GuardMiddleware, Guards
from .speech_openapi import install_openapi, speech_route_docs
from .speech_request import (DEFAULT_MAX_BODY_BYTES, ApiError, RequestLimits, SpeechRequest, check_request,
                             engine_arguments, failure_to_api_error, parse_request)
from .voices import Voice, describe_voices, encode_voice, load_voices

__all__ = ["DEFAULT_MAX_BODY_BYTES", "ServiceState", "Voice", "create_app", "encode_voice", "load_voices"]

logger = logging.getLogger("moss_tts_nano.server")

BYTES_PER_SAMPLE = 2  # 16-bit PCM


# ---------------------------------------------------------------------------------------------------- state


@dataclass
class ServiceState:
    """What the routes read: the engine (None while loading), voices, server-wide generation defaults and limits."""

    model_id: str = "MOSS-TTS-Nano"
    defaults: dict = field(default_factory=dict)
    limits: RequestLimits = field(default_factory=RequestLimits)
    engine: Any = None
    voices: dict[str, Voice] = field(default_factory=dict)
    count_tokens: Callable[[str], int] | None = None  # the engine's text tokens of a string (the audio budget)
    status: str = "loading"  # loading -> ready -> stopping; or failed
    error: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    keep: list = field(default_factory=list)  # objects that must live as long as the server (demo files)
    jobs: set = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ready(self, engine: Any, voices: dict[str, Voice]) -> None:
        self.engine, self.voices = engine, voices
        if self.count_tokens is None:
            self.count_tokens = lambda text: len(engine.resources.encode_text(text))
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

    def __init__(self, job: SpeechJob, req: SpeechRequest, log: RequestLog, headers: dict[str, str],
                 encoder: AudioEncoder) -> None:
        self.job, self.req, self.log, self.encoder = job, req, log, encoder
        self.status_code = 200
        self.background = None
        self.streaming = req.streamed
        self.sse = req.stream_format == "sse"
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
                logger.error("request %s failed", self.log.request_id, exc_info=exc)
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
        body = await run_in_threadpool(self._encode_whole, event["waveform"])
        self._record(event)
        if self.sse:
            body = sse_event({"type": "speech.audio.delta", "audio": base64.b64encode(body).decode()}) + \
                   sse_event(self._done(event))
        headers = self.raw_headers + [(b"content-length", str(len(body)).encode())]
        self.log.status = 200
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        self.started = True
        self.log.audio_sent()
        await self._final(send)({"type": "http.response.body", "body": body})

    def _encode_whole(self, waveform: Any) -> bytes:
        return self.encoder.feed(waveform) + self.encoder.finish()

    async def _stream(self, send: Callable, event: dict) -> None:
        self.log.status = 200
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        self.started = True
        while event["type"] != "result":
            await self._send_audio(send, self.encoder.feed(event["waveform"]))
            event = await self.job.next_event()
        await self._send_audio(send, self.encoder.finish())
        self._record(event)
        tail = sse_event(self._done(event)) if self.sse else b""
        await self._final(send)({"type": "http.response.body", "body": tail})

    async def _send_audio(self, send: Callable, data: bytes) -> None:
        if not data:
            return
        if self.sse:
            data = sse_event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})
        await send({"type": "http.response.body", "body": data, "more_body": True})
        self.log.audio_sent()

    def _done(self, result: dict) -> dict:
        """OpenAI's closing event; its usage counts the input's characters and the generated codec frames."""
        frames = int(result.get("frames", 0))
        return {"type": "speech.audio.done",
                "usage": {"input_tokens": len(self.req.input), "output_tokens": frames,
                          "total_tokens": len(self.req.input) + frames}}

    def _record(self, result: dict) -> None:
        self.log.frames = int(result.get("frames", 0))
        self.log.audio_seconds = result["waveform"].shape[-1] / TARGET_SAMPLE_RATE


def sse_event(payload: dict) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


# ---------------------------------------------------------------------------------------------------- app


def create_app(state: ServiceState, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, *, api_key: str | None = None,
               allowed_hosts: frozenset | None = None, allowed_origins: list[str] | None = None) -> FastAPI:
    """The FastAPI application serving ``state`` (whose engine may still be loading).

    Args:
        state: the served state.
        max_body_bytes: the request body limit (413 beyond).
        api_key: when given, every route but /health needs ``Authorization: Bearer <api_key>`` (401).
        allowed_hosts: when given, the Host names accepted (400 for others: DNS rebinding).
        allowed_origins: the browser origins allowed by CORS; none: no CORS headers at all.
    """
    app = FastAPI(title="MOSS-TTS-Nano speech server", docs_url=None, redoc_url=None)
    app.add_middleware(GuardMiddleware, guards=Guards(api_key, allowed_hosts, max_body_bytes))
    if allowed_origins:  # added last: it runs first, so preflights and error answers carry the CORS headers
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"],
                           expose_headers=["X-Request-Id", "X-Sample-Rate", "X-Channels", "X-Model"])

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
        return {"voices": describe_voices(state.voices)}

    @app.post("/v1/audio/speech", response_class=Response, **speech_route_docs(state.limits, state.defaults))
    async def speech(request: Request) -> Response:
        log = RequestLog(new_request_id())
        try:
            return await accept_speech(request, state, log)
        except Exception as exc:  # the API boundary: a JSON error and one log line, never a traceback
            error = failure_to_api_error(exc, state.status == "stopping")
            if error.code == "internal_error":
                logger.error("request %s failed", log.request_id, exc_info=exc)
            log.status, log.detail = error.status, f'error="{error.message}"'
            log.emit()
            return error.response({"X-Request-Id": log.request_id})

    install_openapi(app, api_key is not None)
    return app


async def accept_speech(request: Request, state: ServiceState, log: RequestLog) -> Response:
    """Validate and submit a speech request; the response then streams or sends its audio."""
    if state.status != "ready":
        code = "loading" if state.status == "loading" else "shutting_down"
        message = "the model is still loading" if code == "loading" else "the server is shutting down"
        raise ApiError(503, message, kind="server_error", code=code, headers={"Retry-After": "5"})
    req = parse_request(await request.body())
    check_request(req, state.limits)
    headers = response_headers(req, state, log)  # built (and checked) before any work
    handle = await run_in_threadpool(submit, state, req)
    try:  # after the engine's checks, so a bad request is a 400 even where the encoder cannot be made
        encoder = AudioEncoder(req.response_format, state.limits.layout, req.speed,
                               stream=req.streamed and req.stream_format == "audio")
    except BaseException:
        handle.cancel()
        raise
    return SpeechResponse(SpeechJob(handle, state), req, log, headers, encoder)


def response_headers(req: SpeechRequest, state: ServiceState, log: RequestLog) -> dict[str, str]:
    layout = state.limits.layout
    media = "text/event-stream" if req.stream_format == "sse" else RESPONSE_FORMATS[req.response_format].media_type
    headers = {"Content-Type": media, "X-Request-Id": log.request_id, "X-Sample-Rate": str(layout.sample_rate),
               "X-Channels": str(layout.channels), "X-Bits-Per-Sample": str(8 * BYTES_PER_SAMPLE)}
    if req.stream_format == "sse":
        headers["Cache-Control"] = "no-cache"
    if req.model is not None:
        headers["X-Model"] = req.model  # matched MODEL_NAME in check_request: a valid header value
    if req.instructions is not None:
        headers["X-Instructions"] = "ignored"  # this model takes no style instructions (docs/serving.md)
    return headers


def submit(state: ServiceState, req: SpeechRequest) -> Any:
    """Check the audio budget, decode the reference audio and submit (CPU work, run off the event loop).

    Every response, streamed or whole, is decoded in the windows the codec output chooses by frame count alone, so
    a whole body is the streamed body joined, byte for byte, and neither depends on what runs beside it.
    (`inference()` and files decode once at the end instead: cheaper, but a one-shot decode differs from the
    windowed one in the last bit.)"""
    kwargs = engine_arguments(req, state.defaults, state.voices, state.limits, state.count_tokens)
    return state.engine.submit(req.input, stream=True, **kwargs)
