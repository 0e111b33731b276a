"""serve_npu.py: a real uvicorn server on 127.0.0.1 (tiny model, batching engine) and a real httpx client."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile
import torch

import demo
import serve_npu
import speech_api
from audio_io import load_prompt_audio
from pipeline import encode_prompt_audio
from serve_assets import running_server, tiny_engine, tiny_state, wav_bytes, write_checkpoint, write_voices
from serve_assets import tiny, voices_dir  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]
FRAMES = 6  # the served default (GREEDY_DEFAULTS): the tiny model always runs to max_new_frames
SAMPLES_PER_FRAME = 3840
LIMIT = 1 << 20  # the test server's body limit (1 MiB), well above the reference audio the tests send


@pytest.fixture(scope="module")
def server(tiny, voices_dir):
    voices = speech_api.load_voices(voices_dir, tiny.codec)
    with running_server(tiny_state(tiny, tiny_engine(tiny), voices), max_body_bytes=LIMIT) as running:
        yield running


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http


def speak(client: httpx.Client, **body) -> httpx.Response:
    """A whole (unstreamed) WAV unless ``body`` says otherwise (OpenAI's defaults, mp3 streamed, have own tests)."""
    return client.post("/v1/audio/speech", json={"input": "Hello there.", "response_format": "wav", "stream": False,
                                                 **body})


def samples(response_format: str, data: bytes) -> np.ndarray:
    """Decoded 16-bit samples [n, 2] of a response body, checking 48 kHz stereo."""
    if response_format == "pcm":
        return np.frombuffer(data, dtype="<i2").reshape(-1, 2)
    with soundfile.SoundFile(io.BytesIO(data)) as handle:
        assert handle.samplerate == 48000 and handle.channels == 2
        assert handle.format == response_format.upper() and handle.subtype == "PCM_16"
        return handle.read(dtype="int16", always_2d=True)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Two runs' 16-bit samples are the same, sample for sample (every response decodes in frame-count windows)."""
    return a.shape == b.shape and np.array_equal(a, b)


def assert_error(response: httpx.Response, status: int, message: str, param: str | None = "any") -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert message in error["message"] and "Traceback" not in response.text
    if param != "any":
        assert error["param"] == param
    return error


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------------- endpoints


def test_health_models_and_voices(client):
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "active": 0, "queued": 0, "max_batch_size": 4, "max_queue": 16}
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    voices = {v["name"]: v for v in client.get("/v1/audio/voices").json()["voices"]}
    assert list(voices) == ["default", "alice", "bob"]
    assert voices["alice"]["mode"] == "voice_clone" and voices["bob"]["mode"] == "continuation"
    assert 0.4 <= voices["alice"]["seconds"] <= 0.56  # 0.5 s of reference audio, in whole 80 ms codec frames


@pytest.mark.parametrize("response_format", ["wav", "pcm", "flac"])
def test_whole_and_streamed_audio_are_the_same_valid_audio(client, response_format):
    whole = speak(client, response_format=response_format)
    assert whole.status_code == 200, whole.text
    assert whole.headers["content-type"] == f"audio/{response_format}"
    assert whole.headers["x-sample-rate"] == "48000" and whole.headers["x-channels"] == "2"
    assert int(whole.headers["content-length"]) == len(whole.content)
    with client.stream("POST", "/v1/audio/speech",
                       json={"input": "Hello there.", "response_format": response_format}) as r:  # streamed by default
        assert r.status_code == 200 and r.headers["x-sample-rate"] == "48000" and r.headers["x-channels"] == "2"
        # chunked transfer as audio is decoded; FLAC once complete (its header holds the length)
        assert ("content-length" in r.headers) == (response_format == "flac")
        pieces = list(r.iter_raw())
    streamed = b"".join(pieces)
    expected = samples(response_format, whole.content)
    assert expected.shape == (FRAMES * SAMPLES_PER_FRAME, 2) and np.abs(expected).max() > 0
    assert same(samples(response_format, streamed), expected)
    if response_format == "wav":  # an open-length header, then the samples as they are decoded
        assert streamed[4:8] == b"\xff\xff\xff\xff" and streamed[40:44] == b"\xff\xff\xff\xff"
        assert streamed[44:] == whole.content[44:]  # the samples byte for byte; only the header's lengths differ
    if response_format == "pcm":
        assert len(pieces) > 1  # sent in several pieces, not at the end


def test_every_format_carries_the_same_samples(client):
    audio = {fmt: samples(fmt, speak(client, response_format=fmt).content) for fmt in ("wav", "pcm", "flac")}
    assert same(audio["wav"], audio["pcm"]) and same(audio["wav"], audio["flac"])


def test_model_is_echoed_and_a_request_id_returned(client):
    response = speak(client, model="tts-1", response_format="pcm")
    assert response.headers["x-model"] == "tts-1" and response.headers["x-request-id"].startswith("req-")


@pytest.fixture
def submitted(server, monkeypatch):
    """The keyword arguments every engine.submit call receives (the calls still go through)."""
    calls: list[dict] = []
    submit = server.state.engine.submit

    def spy(text, **kwargs):
        calls.append({"text": text, **kwargs})
        return submit(text, **kwargs)

    monkeypatch.setattr(server.state.engine, "submit", spy)
    return calls


def test_voices_and_reference_audio_reach_the_engine(client, server, tiny, voices_dir, submitted):
    encoded = base64.b64encode((voices_dir / "alice.wav").read_bytes()).decode()
    for body in ({"voice": "alice"}, {"voice": "bob"}, {"ref_audio": encoded},
                 {"ref_audio": "data:audio/wav;base64," + encoded}, {"voice": "default"}, {}):
        response = speak(client, **body)
        assert response.status_code == 200 and samples("wav", response.content).shape[0] == FRAMES * SAMPLES_PER_FRAME
    alice, bob, ref, data_url, default, omitted = submitted
    voices = server.state.voices
    assert alice["mode"] == "voice_clone" and alice["prompt_audio_codes"] is voices["alice"].codes
    assert "prompt_text" not in alice and "prompt_audio" not in alice
    assert bob["mode"] == "continuation" and bob["prompt_text"] == "Bob speaks here."
    assert bob["prompt_audio_codes"] is voices["bob"].codes
    reference = load_prompt_audio(voices_dir / "alice.wav")
    for call in (ref, data_url):
        assert call["mode"] == "voice_clone" and call["prompt_audio_sample_rate"] == 48000
        assert torch.equal(call["prompt_audio"], reference)  # read with the prompt-file rules
    assert encode_prompt_audio(tiny.codec, reference).cpu().equal(voices["alice"].codes)  # encoded alike
    for call in (default, omitted):
        assert call["mode"] == "continuation" and not {"prompt_audio", "prompt_audio_codes", "prompt_text"} & set(call)
    assert alice["text"] == "Hello there." and alice["do_sample"] is False and alice["max_new_frames"] == FRAMES


def test_request_fields_reach_the_engine(client):
    short = speak(client, max_new_frames=2, response_format="pcm")
    assert len(short.content) == 2 * SAMPLES_PER_FRAME * 4
    sampled = [samples("pcm", speak(client, do_sample=True, seed=seed, response_format="pcm").content)
               for seed in (1, 1, 2)]
    assert same(sampled[0], sampled[1]) and not same(sampled[0], sampled[2])


def test_concurrent_greedy_and_seeded_requests_equal_their_solo_runs(client, server):
    bodies = [{"input": f"Request number {i} says hello.", "response_format": "pcm", "max_new_frames": 4 + i % 3,
               **({"voice": "alice"} if i % 3 == 0 else {}), **({"do_sample": True, "seed": i} if i % 2 else {})}
              for i in range(8)]
    solo = [client.post("/v1/audio/speech", json=body).content for body in bodies]

    def post(body: dict) -> bytes:
        with httpx.Client(base_url=server.url, timeout=60) as own:
            return own.post("/v1/audio/speech", json=body).content

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(post, bodies))
    assert [len(b) for b in together] == [len(b) for b in solo]
    assert together == solo  # byte for byte: the codes are the solo run's and the decode windows count frames


# ---------------------------------------------------------------------------------------------------- cancellation


def test_a_disconnect_mid_stream_cancels_the_request_and_frees_its_slot(client, server, caplog):
    caplog.set_level(logging.INFO, logger="moss_tts_nano.server")
    body = {"input": "A very long request.", "max_new_frames": 1500, "stream": True, "response_format": "pcm"}
    with client.stream("POST", "/v1/audio/speech", json=body) as response:
        assert response.status_code == 200
        chunks = response.iter_raw()  # kept: a dropped iterator would close the connection at once
        next(chunks)
        assert client.get("/health").json()["active"] == 1
    wait_for(lambda: client.get("/health").json()["active"] == 0, timeout=5)
    assert speak(client, response_format="pcm").status_code == 200  # the next request still runs
    wait_for(lambda: any("status=499" in r.message for r in caplog.records), timeout=5)


def test_a_full_queue_answers_429(tiny):
    engine = tiny_engine(tiny, max_batch_size=1, max_queue=1)
    with running_server(tiny_state(tiny, engine)) as busy, httpx.Client(base_url=busy.url, timeout=60) as http:
        long = {"input": "Keep talking.", "max_new_frames": 1500, "stream": True, "response_format": "pcm"}
        with http.stream("POST", "/v1/audio/speech", json=long) as first:
            chunks = first.iter_raw()
            next(chunks)  # running: the only slot is taken
            queued = ThreadPoolExecutor(1).submit(lambda: httpx.post(
                busy.url + "/v1/audio/speech", json={"input": "Wait for me.", "response_format": "pcm"}, timeout=60))
            wait_for(lambda: http.get("/health").json()["queued"] == 1)
            error = assert_error(speak(http), 429, "queue is full")
            assert error["code"] == "queue_full" and error["type"] == "rate_limit_error"
        assert queued.result(timeout=30).status_code == 200  # the first stream was cancelled, the queued one ran


# ---------------------------------------------------------------------------------------------------- bad requests


def _short_wav() -> str:
    return base64.b64encode(wav_bytes(np.full((2, 480), 0.1, dtype=np.float32))).decode()  # 10 ms


@pytest.mark.parametrize("body, status, message, param", [
    (b"{not json", 400, "malformed JSON body", None),
    (b"[1, 2]", 400, "request body: Input should be an object", None),
    (b'{"voice": "alice"}', 400, "input: Field required", "input"),
    (b'{"input": 5}', 400, "input: Input should be a valid string", "input"),
    (b'{"input": "x", "stream": "yes"}', 400, "stream: Input should be a valid boolean", "stream"),
    (b'{"input": "x", "seed": 1.5}', 400, "seed: Input should be a valid integer", "seed"),
    (b'{"input": "x", "temperature": 0.5}', 400, "unknown field 'temperature'", "temperature"),
    (b'{"input": ""}', 400, "nothing to speak", "input"),
    (b'{"input": "   "}', 400, "nothing to speak", "input"),
    (b'{"input": "x", "speed": 5}', 400, "speed must be in [0.25, 4.0], got 5", "speed"),
    (b'{"input": "x", "speed": 0.2}', 400, "speed must be in [0.25, 4.0], got 0.2", "speed"),
    (b'{"input": "x", "response_format": "ogg"}', 400, "choose one of mp3, opus, aac, flac, wav, pcm",
     "response_format"),
    (b'{"input": "x", "model": "tts-1 "}', 400, "model must match", "model"),
    (b'{"input": "x", "voice": {"name": "alice"}}', 400, "voice: Input should be a string or an object", "voice"),
    (b'{"input": "x", "stream_format": "json"}', 400, "stream_format: Input should be 'audio' or 'sse'",
     "stream_format"),
    (b'{"input": "x", "response_format": "flac", "stream": true}', 400, "cannot be streamed", "stream"),
    (b'{"input": "x", "voice": "nova"}', 400, "unknown voice 'nova'; known voices: default, alice, bob", "voice"),
    (b'{"input": "x", "ref_audio": "%%%"}', 400, "ref_audio is not valid base64", "ref_audio"),
    (b'{"input": "x", "ref_audio": "aGVsbG8gd29ybGQ="}', 400, "cannot read ref_audio: Format not recognised",
     "ref_audio"),
    (b'{"input": "x", "ref_audio": "data:audio/wav,abc"}', 400, "must be base64-encoded", "ref_audio"),
    (json.dumps({"input": "x", "ref_audio": _short_wav()}).encode(), 400, "ref_audio is too short", "ref_audio"),
    (b'{"input": "x", "voice": "alice", "ref_audio": "aGk="}', 400, "either voice 'alice' or ref_audio", "ref_audio"),
    (b'{"input": "x", "audio_top_p": 2.0}', 400, "audio_top_p=2.0 must be within (0, 1]", "audio_top_p"),
    (b'{"input": "x", "do_sample": true, "text_temperature": 0}', 400,
     "text_temperature=0.0 must be > 0 when do_sample=True", "text_temperature"),
    (b'{"input": "x", "audio_repetition_penalty": 0}', 400, "audio_repetition_penalty=0.0 must be > 0",
     "audio_repetition_penalty"),
    (b'{"input": "x", "max_new_frames": 0}', 400, "max_new_frames=0 must be >= 1", "max_new_frames"),
    (b'{"input": "x", "seed": 100000000000000000000}', 400, "seed must be an int in [0, 2**32)", "seed"),
    (b'{"input": "x", "seed": -1}', 400, "seed must be an int in [0, 2**32), got -1", "seed"),  # as check_seed
    (b'{"input": "x", "seed": 4294967296}', 400, "seed must be an int in [0, 2**32)", "seed"),
    (b'{"input": "x", "audio_temperature": NaN}', 400, "audio_temperature", "audio_temperature"),
    (b'{"input": "x", "mode": "sing"}', 400, "mode='sing' is not supported", "mode"),
    (b'{"input": "x", "mode": "voice_clone"}', 400, "needs prompt audio", "mode"),
])
def test_bad_requests_get_400_and_the_server_keeps_serving(client, body, status, message, param):
    response = client.post("/v1/audio/speech", content=body, headers={"Content-Type": "application/json"})
    assert_error(response, status, message, param)
    assert speak(client, response_format="pcm").status_code == 200


def test_bodies_over_the_limit_get_413_without_being_read(client):
    error = assert_error(client.post("/v1/audio/speech", content=b"x" * (4 * LIMIT)), 413, "the limit is 1048576")
    assert error["code"] == "request_too_large"

    def chunked():  # no Content-Length: stopped once the limit is passed
        for _ in range(64):
            yield b" " * 65536

    assert_error(client.post("/v1/audio/speech", content=chunked(), headers={"Content-Type": "application/json"}),
                 413, "over 1048576 bytes")
    assert speak(client, response_format="pcm").status_code == 200


def test_the_default_body_limit_is_25_mb():
    assert serve_npu.build_parser().parse_args([]).max_body_mb * 2**20 == speech_api.DEFAULT_MAX_BODY_BYTES
    assert speech_api.DEFAULT_MAX_BODY_BYTES == 25 * 2**20


def test_unknown_routes_and_methods_get_json_errors(client):
    assert_error(client.get("/v1/nothing"), 404, "Not Found")
    assert_error(client.get("/v1/audio/speech"), 405, "Method Not Allowed")


def test_an_internal_failure_is_one_line_json_and_its_traceback_is_in_the_server_log(client, server, monkeypatch,
                                                                                     caplog):
    caplog.set_level(logging.INFO, logger="moss_tts_nano.server")

    def broken(*args, **kwargs):
        raise KeyError("secret internals")

    monkeypatch.setattr(server.state.engine, "submit", broken)
    response = speak(client)
    error = assert_error(response, 500, "internal error KeyError; see the server log")
    assert "secret" not in error["message"] and error["code"] == "internal_error"
    logged = [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info]
    assert len(logged) == 1 and response.headers["x-request-id"] in logged[0].getMessage()
    assert logged[0].exc_info[0] is KeyError and "secret internals" in caplog.text


def test_503_while_loading(tiny):
    with running_server(tiny_state(tiny, engine=None)) as loading:
        health = httpx.get(loading.url + "/health")
        assert health.status_code == 503 and health.json() == {"status": "loading"}
        error = assert_error(httpx.post(loading.url + "/v1/audio/speech", json={"input": "x"}), 503, "still loading")
        assert error["code"] == "loading"


# ---------------------------------------------------------------------------------------------------- command line


@pytest.mark.parametrize("argv, message", [
    ([], "no model given"),
    (["--demo", "--port", "70000"], "argument --port: must be <= 65535"),
    (["--demo", "--max-batch-size", "0"], "argument --max-batch-size: must be >= 1"),
    (["--demo", "--voices", "/nonexistent/voices"], "--voices '/nonexistent/voices' is not a directory"),
    (["--demo", "--max-body-mb", "0"], "argument --max-body-mb: must be > 0"),
])
def test_usage_errors_are_one_line_and_exit_2(argv, message, capsys):
    assert serve_npu.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_a_busy_port_is_one_line_and_exit_1(capsys):
    taken = serve_npu.bind_socket("127.0.0.1", 0)
    try:
        assert serve_npu.main(["--demo", "--port", str(taken.getsockname()[1])]) == 1
    finally:
        taken.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot listen on 127.0.0.1:" in err[0] and "choose another --port" in err[0]


def test_the_server_loads_the_tokenizer_and_codec_once(tiny, monkeypatch):
    """serve_npu hands its resource arguments to the engine, which loads them once; the voices use its codec."""
    import weakref

    import shared_resources

    tiny.workdir = None
    monkeypatch.setattr(demo, "build_demo_assets", lambda seed=0: tiny)
    monkeypatch.setattr(shared_resources, "_RESOURCES", weakref.WeakKeyDictionary())  # nothing loaded yet
    loads = []
    real = shared_resources.load_resources

    def counting(*args, **kwargs):
        loads.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(shared_resources, "load_resources", counting)
    monkeypatch.setattr(serve_npu, "load_resources", counting, raising=False)  # had the server called it itself
    args = serve_npu.build_parser().parse_args(["--demo", "--do-sample", "false"])
    state = speech_api.ServiceState(defaults=serve_npu.generation_defaults(args))
    serve_npu.load_service(args, None, state)
    try:
        assert len(loads) == 1 and state.status == "ready"
        assert state.voices[serve_npu.DEMO_VOICE].codes.shape[-1] == tiny.model.config.n_vq
    finally:
        state.engine.shutdown(cancel_running=True)


def test_a_bad_voice_file_fails_the_load_with_one_line(tiny, tmp_path, monkeypatch, capsys):
    tiny.workdir = None
    monkeypatch.setattr(demo, "build_demo_assets", lambda seed=0: tiny)
    (tmp_path / "carol.wav").write_bytes(b"not audio")
    assert serve_npu.main(["--demo", "--port", "0", "--voices", str(tmp_path)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and "cannot read prompt audio" in err[0] and "carol.wav" in err[0]


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"), tiny)


def refused(url: str) -> bool:
    """True once the server serves no new connection: refused outright, or (a connection the kernel queued just
    before the listening socket closed) reset or closed without any response."""
    try:
        httpx.get(url + "/health")
    except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
        return True
    return False


def _start(checkpoint: Path, *extra: str) -> tuple[subprocess.Popen, str, list[str]]:
    """Run serve_npu.py in its own process; return it, its URL (from the startup line) and its stderr lines."""
    command = [sys.executable, str(ROOT / "serve_npu.py"), "--model-path", str(checkpoint), "--port", "0",
               "--do-sample", "false", "--threads", "1", *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stderr: list[str] = []
    threading.Thread(target=lambda: stderr.extend(process.stderr), daemon=True).start()
    line = process.stdout.readline()
    assert line.startswith("serving http://127.0.0.1:"), (line, stderr)
    fields = dict(part.split("=", 1) for part in line.split()[2:] if "=" in part)
    assert fields["device"] == "cpu" and fields["dtype"] == "float32" and fields["attention"] == "sdpa/sdpa"
    return process, line.split()[1], stderr


def test_sigterm_finishes_short_requests_cancels_long_ones_and_exits_0(checkpoint):
    process, url, stderr = _start(checkpoint, "--shutdown-timeout", "3")
    try:
        assert httpx.get(url + "/health").status_code == 200
        # bound to 127.0.0.1 (the default): a foreign Host name is refused (DNS rebinding)
        assert httpx.get(url + "/v1/models", headers={"Host": "rebind.example"}).status_code == 400
        short = {"input": "A short request.", "max_new_frames": 20, "stream": True, "response_format": "pcm"}
        long = {**short, "input": "A long request.", "max_new_frames": 1500}
        with httpx.stream("POST", url + "/v1/audio/speech", json=long, timeout=60) as cut, \
                httpx.stream("POST", url + "/v1/audio/speech", json=short, timeout=60) as finished:
            cut_chunks, finished_chunks = cut.iter_raw(), finished.iter_raw()
            next(cut_chunks)
            first = next(finished_chunks)
            process.send_signal(signal.SIGTERM)
            wait_for(lambda: refused(url))  # no new connections once stopping
            assert len(first + b"".join(finished_chunks)) == 20 * SAMPLES_PER_FRAME * 4  # done within the grace
            with pytest.raises(httpx.RemoteProtocolError):  # cut short: an incomplete body, not a clean end
                for _ in cut_chunks:
                    pass
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health")
    logged = [line for line in stderr if " request req-" in line]
    assert len(logged) == 2 and all("status=200" in line and "first_audio=" in line for line in logged), stderr
    assert sum("aborted" in line for line in logged) == 1, stderr
    assert not [line for line in stderr if "Traceback" in line or "ERROR" in line], stderr
