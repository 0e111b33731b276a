"""Real speech servers on tiny assets: uvicorn on 127.0.0.1 with a free port in a thread, the engine on a tiny model."""

from __future__ import annotations

import contextlib
import io
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import soundfile

import serve_npu
import speech_api
from engine import SynthesisEngine
from pipeline_assets import TinyAssets

GREEDY_DEFAULTS = ("--do-sample", "false", "--max-new-frames", "6")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyAssets:
    """Tiny assets for a test module's servers (import it by name to use it)."""
    return TinyAssets(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def voices_dir(tiny: TinyAssets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A --voices folder with the voices of `write_voices` (import it by name to use it)."""
    return write_voices(tmp_path_factory.mktemp("voices"), tiny)


def tiny_engine(tiny: TinyAssets, max_batch_size: int = 4, max_queue: int = 16) -> SynthesisEngine:
    engine = SynthesisEngine(tiny.model, text_tokenizer=tiny.tokenizer, audio_tokenizer=tiny.codec,
                             max_batch_size=max_batch_size, max_queue=max_queue)
    engine.start()
    return engine


def tiny_state(tiny: TinyAssets, engine: SynthesisEngine | None, voices: dict | None = None,
               flags: tuple[str, ...] = GREEDY_DEFAULTS) -> speech_api.ServiceState:
    """A served state whose defaults and limits come from serve_npu's own flags (``flags``), ready when ``engine``
    is given."""
    args = serve_npu.build_parser().parse_args(["--demo", *flags])
    state = speech_api.ServiceState(model_id="tiny", defaults=serve_npu.generation_defaults(args),
                                    limits=serve_npu.request_limits(args))
    if engine is not None:
        state.ready(engine, voices or {})
    return state


@contextlib.contextmanager
def running_server(state: speech_api.ServiceState, max_body_bytes: int = speech_api.DEFAULT_MAX_BODY_BYTES,
                   shutdown_timeout: float = 2.0, connections: serve_npu.ConnectionLimits | None = None,
                   app: Any = None, **app_options) -> Iterator[serve_npu.SpeechServer]:
    """Serve ``app`` (default: the API alone, ``speech_api.create_app`` with ``app_options``: api_key,
    allowed_hosts, allowed_origins) for ``state``."""
    sock = serve_npu.bind_socket("127.0.0.1", 0)
    app = speech_api.create_app(state, max_body_bytes, **app_options) if app is None else app
    server = serve_npu.SpeechServer(app, state, sock, shutdown_timeout,
                                    limits=connections or serve_npu.ConnectionLimits())
    thread = threading.Thread(target=server.run, name="test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.02)
    try:
        yield server
    finally:
        server.stop()
        thread.join(30)


def wav_bytes(waveform, sample_rate: int = 48000) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.asarray(waveform).T, sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def write_voices(directory: Path, tiny: TinyAssets) -> Path:
    """alice.wav (voice clone) and bob.wav + bob.txt (continuation with a transcript)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "alice.wav").write_bytes(wav_bytes(tiny.prompt_audio))
    (directory / "bob.wav").write_bytes(wav_bytes(tiny.prompt_audio.flip(-1)))
    (directory / "bob.txt").write_text("Bob speaks here.\n", encoding="utf-8")
    return directory


def write_checkpoint(directory: Path, tiny: TinyAssets) -> Path:
    """An official-format checkpoint directory of the tiny model, tokenizer and codec (audio_tokenizer/)."""
    from tokenization_moss_tts_nano import build_demo_tokenizer

    tiny.model.save_pretrained(directory)
    build_demo_tokenizer(directory)
    tiny.codec.save_pretrained(directory / "audio_tokenizer")
    return directory
