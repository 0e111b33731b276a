"""Decode sessions own their state: many open at once on one codec, interleaved or in threads, beside other calls."""

from __future__ import annotations

import threading

import pytest
import torch

from test_codec_common import (  # noqa: F401 (single_thread is an autouse fixture)
    FRAME,
    random_codes,
    random_wav,
    single_thread,
    stream_decode,
    tiny_model,
)

WINDOWS = [1, 3, 2, 5, 1]  # crosses every stage's context window (10-40 tokens; a frame is 4-32 of them)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _solo(model, codes: torch.Tensor, windows=WINDOWS) -> torch.Tensor:
    with model.create_decode_session(1) as session:
        session.append(0)
        return _feed(session, codes, windows)


def _feed(session, codes: torch.Tensor, windows) -> torch.Tensor:
    pieces, start = [], 0
    for size in windows:
        _, audio, _ = session.step([0], codes[:, start: start + size], [size])
        pieces.append(audio[0])
        start += size
    return torch.cat(pieces, dim=-1)


def test_interleaved_sessions_each_give_their_solo_audio(model):
    streams = [random_codes(sum(WINDOWS), seed=s) for s in range(3)]
    solo = [_solo(model, codes) for codes in streams]
    sessions = [model.create_decode_session(1) for _ in streams]
    pieces = [[] for _ in streams]
    starts = [0] * len(streams)
    for session in sessions:
        session.append("r")
    for step, size in enumerate(WINDOWS):
        for i, (session, codes) in enumerate(zip(sessions, streams)):
            if not session.closed:
                _, audio, _ = session.step(["r"], codes[:, starts[i]: starts[i] + size], [size])
                pieces[i].append(audio[0])
                starts[i] += size
        if step == 1:
            sessions[1].close()  # closing one never touches the others
    for i in (0, 2):
        assert torch.equal(torch.cat(pieces[i], dim=-1), solo[i])
        sessions[i].close()


def test_other_calls_while_sessions_are_open_leave_them_alone(model):
    codes, other = random_codes(sum(WINDOWS), seed=10), random_codes(6, seed=11)
    wav = random_wav(5 * FRAME + 100, seed=12)
    expected = {
        "decode": model.batch_decode([other]).audio,
        "chunked_decode": model.batch_decode([other], chunk_duration=0.16).audio,
        "encode": model.batch_encode([wav]).audio_codes,
        "chunked_encode": model.batch_encode([wav], chunk_duration=0.16).audio_codes,
        "default_stream": stream_decode(model, other, [2, 4]),
    }
    solo = _solo(model, codes)
    with model.create_decode_session(1) as session:
        session.append(0)
        head = _feed(session, codes, WINDOWS[:2])  # the session is mid-stream during every other call
        assert torch.equal(model.batch_decode([other]).audio, expected["decode"])
        assert torch.equal(model.decode(other).audio, expected["decode"])
        assert torch.equal(model.batch_decode([other], chunk_duration=0.16).audio, expected["chunked_decode"])
        assert torch.equal(model.batch_encode([wav]).audio_codes, expected["encode"])
        assert torch.equal(model.batch_encode([wav], chunk_duration=0.16).audio_codes, expected["chunked_encode"])
        assert torch.equal(stream_decode(model, other, [2, 4]), expected["default_stream"])
        with model.streaming(1):
            pass
        with model.create_decode_session(2):
            pass
        tail = _feed(session, codes[:, sum(WINDOWS[:2]):], WINDOWS[2:])
    assert torch.equal(torch.cat([head, tail], dim=-1), solo)


def test_sessions_in_threads_each_give_their_solo_audio(model):
    streams = [random_codes(sum(WINDOWS), seed=20 + s) for s in range(4)]
    solo = [_solo(model, codes) for codes in streams]
    results: dict[int, torch.Tensor] = {}
    barrier = threading.Barrier(len(streams))

    def worker(index: int) -> None:
        with model.create_decode_session(1) as session:
            session.append(index)
            barrier.wait()
            pieces, start = [], 0
            for size in WINDOWS:
                _, audio, _ = session.step([index], streams[index][:, start: start + size], [size])
                pieces.append(audio[0])
                start += size
        results[index] = torch.cat(pieces, dim=-1)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(streams))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == list(range(len(streams)))
    for index, audio in results.items():
        assert torch.equal(audio, solo[index])


def test_session_state_lives_on_the_session_not_the_model(model):
    before = {name: set(module.__dict__) for name, module in model.named_modules()}
    session = model.create_decode_session(1)
    session.append(0)
    session.step([0], random_codes(2), [2])
    after = {name: set(module.__dict__) for name, module in model.named_modules()}
    assert before == after and len(session.state.stages) == 4
    session.close()
    assert session.state is None
