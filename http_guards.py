"""Who may call the speech server and how much a connection may hold: the ASGI middleware in front of the routes
(API key, Host check, JSON content type, body size) and the HTTP protocol's read deadlines.

uvicorn's own options cover idle keep-alive connections (``timeout_keep_alive``), the number of connections
(``limit_concurrency``: 503 beyond it) and the header size (``h11_max_incomplete_event_size``). uvicorn has no
deadline for a request that arrives slowly, so ``DeadlineH11Protocol`` adds one: the headers must arrive within
``header_timeout`` seconds of the connection waiting for them, and the body within ``body_timeout`` seconds of the
headers; otherwise the client gets 408 and the connection is closed.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from dataclasses import dataclass
from typing import Any, Callable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .speech_request import ApiError
from .web_page import PAGE_PATHS

logger = logging.getLogger("moss_tts_nano.server")

API_KEY_ENV = "MOSS_TTS_API_KEY"
# answered without an API key: /health (load balancers, probes) and the web page, which must load to ask for the key
OPEN_PATHS = frozenset({"/health", *PAGE_PATHS})
JSON_BODY_PATHS = frozenset({"/v1/audio/speech"})
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
TIMEOUT_RESPONSE = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


@dataclass(frozen=True)
class Guards:
    """The server's access settings (its flags)."""

    api_key: str | None = None
    allowed_hosts: frozenset | None = None  # None: any Host header
    max_body_bytes: int = 25 * 1024 * 1024


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(value: bytes) -> str:
    """The name of a Host header without its port (``[::1]:8000`` -> ``::1``)."""
    text = value.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1:].split("]", 1)[0]
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


class GuardMiddleware:
    """ASGI middleware: Host check (DNS rebinding), API key (401), JSON content type (415), body size (413).

    The body limit is decided from Content-Length or while the body arrives, so an oversized body is never read
    whole.
    """

    def __init__(self, app: Callable, guards: Guards) -> None:
        self.app, self.guards = app, guards

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        error = self._refusal(scope, headers)
        if error is not None:
            return await self._reject(scope, send, error)
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await self._reject(scope, send, ApiError(400, "invalid Content-Length header"))
            if int(length) > self.guards.max_body_bytes:
                return await self._reject(scope, send, self._too_large(f"{int(length)} bytes"))
        error = self._media_refusal(scope, headers)
        if error is not None:
            return await self._reject(scope, send, error)
        if length is not None:
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:  # a chunked body: read it up to the limit, then hand it on
            message = await receive()
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            if size > self.guards.max_body_bytes:
                return await self._reject(scope, send, self._too_large(f"over {self.guards.max_body_bytes} bytes"))
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed() -> dict:
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)

    def _refusal(self, scope: dict, headers: dict) -> ApiError | None:
        allowed = self.guards.allowed_hosts
        if allowed is not None and host_name(headers.get(b"host", b"")) not in allowed:
            return ApiError(400, "the Host header names another server (this one is bound to a loopback address; "
                                 "use localhost or its IP, or --host to serve other names)", code="invalid_host")
        if scope["method"] == "OPTIONS":  # CORS preflights carry no credentials
            return None
        if self.guards.api_key is not None and scope["path"] not in OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            expected = b"Bearer " + self.guards.api_key.encode()
            if not hmac.compare_digest(given, expected):
                return ApiError(401, "Incorrect API key provided: send 'Authorization: Bearer KEY' with the "
                                     "server's --api-key", kind="invalid_request_error", code="invalid_api_key")
        return None

    @staticmethod
    def _media_refusal(scope: dict, headers: dict) -> ApiError | None:
        """415 unless a JSON route gets JSON (a browser form post cannot send application/json cross-site)."""
        if scope["method"] == "POST" and scope["path"] in JSON_BODY_PATHS:
            media = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if media != b"application/json":
                shown = media.decode("latin-1") or "none"
                return ApiError(415, f"Content-Type must be application/json, got {shown}",
                                code="unsupported_media_type")
        return None

    def _too_large(self, size: str) -> ApiError:
        return ApiError(413, f"request body is {size}; the limit is {self.guards.max_body_bytes} bytes "
                             "(--max-body-mb)", code="request_too_large")

    @staticmethod
    async def _reject(scope: dict, send: Callable, error: ApiError) -> None:
        logger.info("request - status=%d %s", error.status, error.message)
        await error.response({"Connection": "close"})(scope, None, send)


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with read deadlines: headers within ``header_timeout`` s, the body within
    ``body_timeout`` s of the headers (408, then the connection is closed)."""

    header_timeout = 10.0
    body_timeout = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: Any = None
        self._waiting_for: Any = None

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._arm(None)
        super().connection_lost(exc)

    def _watch(self) -> None:
        """Arm the deadline of what the connection now waits for (headers, body, or nothing)."""
        if self.transport is None or self.transport.is_closing():
            return self._arm(None)
        state = self.conn.their_state
        if state is h11.IDLE and (self.cycle is None or self.cycle.response_complete):
            self._arm("headers")
        elif state is h11.SEND_BODY:
            self._arm("body")
        else:
            self._arm(None)

    def _arm(self, waiting_for: str | None) -> None:
        if waiting_for == self._waiting_for:
            return  # the deadline runs from when the wait began, however the data trickles in
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._waiting_for = waiting_for
        if waiting_for is not None:
            delay = self.header_timeout if waiting_for == "headers" else self.body_timeout
            self._deadline = self.loop.call_later(delay, self._expire)

    def _expire(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        started = self.cycle is not None and getattr(self.cycle, "response_started", False)
        logger.info("request - status=408 the %s did not arrive within the deadline; connection closed",
                    self._waiting_for)
        if not started:
            self.transport.write(TIMEOUT_RESPONSE)
        self.transport.close()


def protocol_class(header_timeout: float, body_timeout: float) -> type:
    """A ``DeadlineH11Protocol`` with these deadlines (uvicorn instantiates the class per connection)."""
    return type("ServerH11Protocol", (DeadlineH11Protocol,),
                {"header_timeout": header_timeout, "body_timeout": body_timeout})
