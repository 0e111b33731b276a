"""Who may call the speech server and what one connection or request may cost: API key, content type, CORS, Host
check, input and audio limits checked before any work, hostile reference audio, and slow or idle clients (raw
sockets against a real uvicorn server on 127.0.0.1)."""

from __future__ import annotations

import base64
import socket
import struct

import httpx
import numpy as np
import pytest

import http_guards
import serve_npu
import speech_request
from serve_assets import running_server, tiny_engine, tiny_state
from serve_assets import tiny  # noqa: F401 (fixtures)

KEY = "sk-test-123"


@pytest.fixture(scope="module")
def guarded(tiny):
    """API key, loopback Host names only, CORS for one origin, short read deadlines, at most 6 connections."""
    flags = ("--do-sample", "false", "--max-new-frames", "6", "--max-input-chars", "100", "--max-audio-seconds", "2",
             "--voice-clone-max-text-tokens", "8")
    connections = serve_npu.ConnectionLimits(max_connections=6, header_timeout=1.0, body_timeout=1.0,
                                             keep_alive_timeout=1.0)
    with running_server(tiny_state(tiny, tiny_engine(tiny), flags=flags), connections=connections, api_key=KEY,
                        allowed_hosts=http_guards.LOOPBACK_HOSTS,
                        allowed_origins=["https://app.example"]) as running:
        yield running


@pytest.fixture
def client(guarded):
    with httpx.Client(base_url=guarded.url, timeout=30, headers={"Authorization": f"Bearer {KEY}"}) as http:
        yield http


def speak(client: httpx.Client, **body) -> httpx.Response:
    return client.post("/v1/audio/speech", json={"input": "Hello there.", "response_format": "pcm", **body})


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


@pytest.fixture
def submitted(guarded, monkeypatch):
    calls: list[str] = []
    submit = guarded.state.engine.submit

    def spy(text, **kwargs):
        calls.append(text)
        return submit(text, **kwargs)

    monkeypatch.setattr(guarded.state.engine, "submit", spy)
    return calls


# ---------------------------------------------------------------------------------------------------- who may call


def test_an_api_key_is_required_except_for_health(guarded, client, submitted):
    url = guarded.url + "/v1/audio/speech"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        error = error_of(httpx.post(url, json={"input": "Hi."}, headers=headers), 401)
        assert error["code"] == "invalid_api_key" and KEY not in str(error)
    assert error_of(httpx.get(guarded.url + "/v1/models"), 401)["code"] == "invalid_api_key"
    assert httpx.get(guarded.url + "/health").status_code == 200
    assert not submitted
    assert speak(client).status_code == 200 and submitted == ["Hello there."]


def test_the_openai_sdk_sends_the_key_and_reports_a_wrong_one(guarded):
    openai = pytest.importorskip("openai", reason="needs the OpenAI SDK (requirements-dev.txt)")
    with openai.OpenAI(base_url=guarded.url + "/v1", api_key=KEY, max_retries=0) as good:
        assert good.audio.speech.create(model="tts-1", voice="default", input="Hi.", response_format="pcm").content
    with openai.OpenAI(base_url=guarded.url + "/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as caught:
            bad.audio.speech.create(model="tts-1", voice="default", input="Hi.")
    assert caught.value.code == "invalid_api_key"


def test_the_api_key_comes_from_the_flag_or_the_environment(monkeypatch):
    monkeypatch.delenv(http_guards.API_KEY_ENV, raising=False)
    assert serve_npu.build_parser().parse_args(["--demo"]).api_key is None
    monkeypatch.setenv(http_guards.API_KEY_ENV, "from-env")
    assert serve_npu.build_parser().parse_args(["--demo"]).api_key == "from-env"
    assert serve_npu.build_parser().parse_args(["--demo", "--api-key", "flag"]).api_key == "flag"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          None])
def test_a_body_that_is_not_json_gets_415_before_any_work(client, submitted, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post("/v1/audio/speech", content=b'{"input": "Hi."}', headers=headers)
    assert error_of(response, 415)["code"] == "unsupported_media_type" and not submitted
    ok = client.post("/v1/audio/speech", content=b'{"input": "Hi.", "response_format": "pcm"}',
                     headers={"Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


def test_cors_only_for_the_allowed_origins(guarded, client, tiny):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    allowed = httpx.options(guarded.url + "/v1/audio/speech", headers=preflight)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    foreign = httpx.options(guarded.url + "/v1/audio/speech", headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in foreign.headers
    assert speak(client, input="Hi.").headers.get("access-control-allow-origin") is None  # no Origin: no CORS
    with running_server(tiny_state(tiny, tiny_engine(tiny))) as plain:  # no --allowed-origins: no CORS at all
        for origin in ("https://app.example", "null"):
            answer = httpx.options(plain.url + "/v1/audio/speech", headers={**preflight, "Origin": origin})
            assert not any(name.startswith("access-control-") for name in answer.headers)
            post = httpx.post(plain.url + "/v1/audio/speech", json={"input": "Hi.", "response_format": "pcm"},
                              headers={"Origin": origin}, timeout=30)
            assert post.status_code == 200 and not any(n.startswith("access-control-") for n in post.headers)


def test_a_loopback_server_answers_only_loopback_host_names(guarded, client, submitted):
    port = guarded.url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "192.168.1.5", "localhost.evil.example"):
        error = error_of(client.post("/v1/audio/speech", json={"input": "Hi."}, headers={"Host": host}), 400)
        assert error["code"] == "invalid_host"
    assert not submitted
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost", f"[::1]:{port}"):
        assert client.get("/v1/models", headers={"Host": host}).status_code == 200


def test_loopback_detection_and_host_names():
    assert all(http_guards.is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "127.0.0.2"))
    assert not any(http_guards.is_loopback(h) for h in ("0.0.0.0", "192.168.1.5", "example.com", "::"))
    assert http_guards.host_name(b"[::1]:8000") == "::1" and http_guards.host_name(b"LocalHost:80") == "localhost"
    assert http_guards.host_name(b"127.0.0.1") == "127.0.0.1"


# ---------------------------------------------------------------------------------------------------- limits


def test_an_input_over_max_input_chars_gets_400_before_any_work(client, submitted):
    error = error_of(speak(client, input="x" * 101), 400)
    assert error["param"] == "input" and error["code"] == "input_too_long" and "the limit is 100" in error["message"]
    assert not submitted and speak(client, input="x" * 100, max_new_frames=1).status_code == 200


def test_a_request_that_may_exceed_max_audio_seconds_gets_400_before_any_work(client, submitted, monkeypatch):
    decoded = []
    monkeypatch.setattr(speech_request, "decode_ref_audio", lambda value: decoded.append(value))
    error = error_of(speak(client, max_new_frames=26), 400)  # 26 frames x 80 ms > 2 s
    assert error["code"] == "audio_too_long" and error["param"] == "max_new_frames"
    long_text = "Hello there, this is a sentence. " * 3  # several chunks of the tiny tokenizer's budget
    error = error_of(speak(client, input=long_text, max_new_frames=25, ref_audio="aGk="), 400)
    assert "text chunk(s)" in error["message"] and not submitted and not decoded  # the audio was never decoded
    assert speak(client, max_new_frames=25).status_code == 200


def test_the_model_name_never_reaches_a_header_unchecked(client, submitted):
    for model in ("tts-1 ", "tts-1\r\nX-Evil: 1", "t\u00e9", "", "x" * 200):
        error = error_of(speak(client, model=model), 400)
        assert error["param"] == "model"
    assert not submitted
    assert speak(client, model="gpt-4o-mini-tts").headers["x-model"] == "gpt-4o-mini-tts"


def crafted_wav(rate: int) -> str:
    data = np.full(48000, 3000, dtype="<i2").tobytes()
    header = struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + len(data), b"WAVE", b"fmt ", 16, 1, 1, rate,
                         (rate * 2) & 0xFFFFFFFF, 2, 16, b"data", len(data))
    return base64.b64encode(header + data).decode()


@pytest.mark.parametrize("rate", [1_000_001, 4_000_001, 2_147_483_647])
def test_reference_audio_with_an_absurd_sample_rate_gets_400(client, submitted, rate):
    error = error_of(speak(client, ref_audio=crafted_wav(rate)), 400)
    assert error["param"] == "ref_audio" and f"sample rate {rate} Hz" in error["message"] and not submitted


def test_a_full_queue_answers_429_with_retry_after(tiny):
    engine = tiny_engine(tiny, max_batch_size=1, max_queue=0)
    with running_server(tiny_state(tiny, engine)) as busy, httpx.Client(base_url=busy.url, timeout=60) as http:
        long = {"input": "Keep talking.", "max_new_frames": 1500, "response_format": "pcm"}
        with http.stream("POST", "/v1/audio/speech", json=long) as first:
            chunks = first.iter_raw()  # kept: a dropped iterator would close the connection at once
            next(chunks)
            refused = http.post("/v1/audio/speech", json={"input": "Wait.", "response_format": "pcm"})
            assert error_of(refused, 429)["code"] == "queue_full" and refused.headers["retry-after"] == "1"


# ---------------------------------------------------------------------------------------------------- connections


def raw_connection(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=15)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (socket.timeout if it never does)."""
    data = b""
    while True:
        try:
            piece = sock.recv(65536)
        except ConnectionResetError:  # closed with unread input: what arrived before the reset is the answer
            return data
        if not piece:
            return data
        data += piece


def test_a_client_that_never_finishes_its_headers_gets_408_and_is_disconnected(guarded):
    with raw_connection(guarded.url) as sock:
        sock.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: localhost\r\n")  # and nothing more
        assert read_until_closed(sock).startswith(b"HTTP/1.1 408 ")
    with raw_connection(guarded.url) as idle:  # connects and says nothing
        assert read_until_closed(idle).startswith(b"HTTP/1.1 408 ")


def test_a_body_that_trickles_in_is_cut_off(guarded, submitted):
    with raw_connection(guarded.url) as sock:
        sock.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n{")
        reply = b""
        try:  # one byte at a time until the server hangs up (it does within the body deadline)
            for _ in range(200):
                sock.sendall(b" ")
                reply += sock.recv(65536) if _ % 50 == 49 else b""
                if reply:
                    break
                __import__("time").sleep(0.05)
            reply += read_until_closed(sock)
        except (BrokenPipeError, ConnectionResetError):
            pass
    assert reply == b"" or reply.startswith(b"HTTP/1.1 408 ")
    assert not submitted


def test_connections_beyond_the_cap_get_503_and_idle_ones_are_closed(guarded, client):
    idle = [raw_connection(guarded.url) for _ in range(6)]
    try:
        with httpx.Client(base_url=guarded.url, timeout=30) as fresh:
            refused = fresh.get("/health")
        assert refused.status_code == 503
        for sock in idle:  # each idle connection is closed at its header deadline
            assert read_until_closed(sock).startswith(b"HTTP/1.1 408 ")
    finally:
        for sock in idle:
            sock.close()
    assert httpx.get(guarded.url + "/health").status_code == 200


def test_oversized_headers_are_refused(guarded):
    with raw_connection(guarded.url) as sock:
        # an unfinished header line over the limit: refused once h11 has buffered more than 16 KiB of it
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 40000)
        assert read_until_closed(sock).startswith(b"HTTP/1.1 400 ")
