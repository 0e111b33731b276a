"""Streaming decode (session and batch_decode protocol), chunked encode/decode and the streaming() context."""

from __future__ import annotations

import sys

import pytest
import torch

from test_codec_common import (  # noqa: F401 (single_thread is an autouse fixture)
    FRAME,
    max_rel,
    random_codes,
    random_wav,
    stream_decode,
    tiny_model,
    single_thread,
)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _peak(audio: torch.Tensor) -> float:
    return float(audio.abs().max())


@pytest.mark.parametrize("windows", [[1] * 16, [3, 4, 9], [2, 5, 1, 8], [16]])
def test_streaming_equals_one_shot(model, windows):
    codes = random_codes(16, seed=1)
    one_shot = model.batch_decode([codes]).audio[0]
    streamed = stream_decode(model, codes, windows)
    assert max_rel(streamed, one_shot, _peak(one_shot)) <= 1e-5


def test_any_window_split_matches_single_frames(model):
    """A call's frames run as one chunk, so splits agree up to float rounding (the spec's 1e-6 P streaming bound)."""
    codes = random_codes(12, seed=2)
    reference = stream_decode(model, codes, [1] * 12)
    for windows in ([4, 4, 4], [12], [5, 7]):
        assert max_rel(stream_decode(model, codes, windows), reference, _peak(reference)) <= 1e-6


def test_session_steps_runs_of_frames_that_advance_the_same_slots(model):
    assert model._session_segments([4, 4]) == [(0, 4, [True, True])]
    assert model._session_segments([4, 0, 2]) == [(0, 2, [True, False, True]), (2, 4, [True, False, False])]
    assert model._session_segments([20, 3]) == [(0, 3, [True, True]), (3, 11, [True, False]),
                                                (11, 19, [True, False]), (19, 20, [True, False])]


def test_context_shorter_than_a_frame_chunk():
    small = tiny_model(contexts=(0.05, 0.05, 0.08, 0.16))  # 20 tokens at 400 Hz, where one frame is 32 tokens
    assert small.config.transformer_contexts()[1] == [8, 8, 10, 20]
    codes = random_codes(10, seed=3)
    one_shot = small.batch_decode([codes]).audio[0]
    assert max_rel(stream_decode(small, codes, [1, 3, 6]), one_shot, _peak(one_shot)) <= 1e-5


def test_two_rows_with_finalize_and_slot_reuse(model):
    rows = {"a": random_codes(9, seed=4), "b": random_codes(8, seed=5), "c": random_codes(5, seed=6)}
    expected = {name: model.batch_decode([codes]).audio[0] for name, codes in rows.items()}
    pieces = {name: [] for name in rows}
    calls = [([("a", 0, 3), ("b", 0, 3)], None), ([("a", 3, 9), ("b", 3, 3)], [0]),
             ([("b", 3, 8), ("c", 0, 2)], None), ([("b", 8, 8), ("c", 2, 5)], [0, 1])]
    try:
        for index, (spec, finalize) in enumerate(calls):
            out = model.batch_decode([rows[n][:, a:b] for n, a, b in spec], streaming=True,
                                     reset_stream=index == 0, max_batch_size=2 if index == 0 else None,
                                     finalize_indices=finalize)
            assert out.audio.shape == (len(spec), 2, max(b - a for _, a, b in spec) * FRAME)
            for row, (name, start, stop) in enumerate(spec):
                assert out.audio_lengths[row] == (stop - start) * FRAME
                assert not out.audio[row, :, (stop - start) * FRAME:].any()  # zero padding
                pieces[name].append(out.audio[row, :, : (stop - start) * FRAME])
            if index == 2:  # "c" reused the slot that "a" freed
                session = model._stream_decode.session
                assert session.active_request_ids == [1, 2] and session._slot_of == {1: 1, 2: 0}
    finally:
        model._reset_batch_decode_streaming_state()
    for name in rows:
        decoded = torch.cat(pieces[name], dim=-1)
        assert max_rel(decoded, expected[name], _peak(expected[name])) <= 1e-5


def test_session_api(model):
    codes_a, codes_b = random_codes(6, seed=7), random_codes(4, seed=8)
    with model.create_decode_session(max_batch_size=2) as session:
        assert session.append("a") == 0 and session.append("b") == 1
        ids, audio, lengths = session.step(["a", "b"], torch.stack([codes_a[:, :4], codes_b[:, :4]], 1), [4, 2])
        assert ids == ["a", "b"] and lengths.tolist() == [4 * FRAME, 2 * FRAME]
        session.remove("a")
        _, audio_a2, _ = session.step(["b"], codes_b[:, 2:4], [2])
        assert session.code_offsets == {"b": 4} and session.audio_offsets == {"b": 4 * FRAME}
        assert session.append("c") == 0
    assert session.closed and session.state is None
    whole_b = model.batch_decode([codes_b]).audio[0]
    streamed_b = torch.cat([audio[1, :, : 2 * FRAME], audio_a2[0]], dim=-1)
    assert max_rel(streamed_b, whole_b, _peak(whole_b)) <= 1e-5


def test_session_errors(model):
    with pytest.raises(ValueError, match="max_batch_size"):
        model.create_decode_session(0)
    session = model.create_decode_session(1)
    try:
        session.append("x")
        with pytest.raises(RuntimeError, match="already active"):
            session.append("x")
        with pytest.raises(RuntimeError, match="slots"):
            session.append("y")
        with pytest.raises(ValueError, match="active_request_ids"):
            session.step(["z"], random_codes(2), [2])
        with pytest.raises(ValueError, match="code_lengths"):
            session.step(["x"], random_codes(2), [3])
        with pytest.raises(ValueError, match="code_lengths"):
            session.step(["x"], random_codes(2), [0])
        with pytest.raises(ValueError, match="codes"):
            session.step(["x"], random_codes(2) + 1024, [2])
        with pytest.raises(RuntimeError, match="not active"):
            session.remove("nope")
    finally:
        session.close()
        session.close()  # idempotent
    assert model.batch_decode([random_codes(2)]).audio.shape == (1, 2, 2 * FRAME)


def test_error_inside_step_closes_session(model, monkeypatch):
    session = model.create_decode_session(1)
    session.append(0)

    def boom(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(model, "_decode_session_frames", boom)
    with pytest.raises(RuntimeError, match="simulated failure"):
        session.step([0], random_codes(1), [1])
    assert session.closed and session.state is None


def test_batch_decode_streaming_errors(model):
    codes = random_codes(4, seed=9)
    try:
        model.batch_decode([codes[:, :1]], streaming=True, reset_stream=True, max_batch_size=2)
        with pytest.raises(ValueError, match="max_batch_size=3"):
            model.batch_decode([codes[:, 1:2]], streaming=True, max_batch_size=3)
        with pytest.raises(ValueError, match="exceed"):
            model.batch_decode([codes[:, 1:2]] * 3, streaming=True)
        assert model._stream_decode.session is not None  # kept
        model.batch_decode([codes[:, 1:2], codes[:, :1]], streaming=True)
        with pytest.raises(ValueError, match="rows are active"):
            model.batch_decode([codes[:, 2:3]], streaming=True)
        for bad in ([2], [0, 0], [-1]):
            with pytest.raises(ValueError, match="finalize_indices"):
                model.batch_decode([codes[:, 2:3], codes[:, 1:2]], streaming=True, finalize_indices=bad)
        with pytest.raises(ValueError, match="empty"):
            model.batch_decode([codes[:, :0], codes[:, :0]], streaming=True)
        assert model._stream_decode.session is None
    finally:
        model._reset_batch_decode_streaming_state()
        model._reset_batch_decode_streaming_state()
    with pytest.raises(ValueError, match="max_batch_size"):
        model.batch_decode([codes], streaming=True, max_batch_size=0)


def test_use_cuda_graph_is_accepted_and_ignored(model):
    """Upstream's keyword changes nothing: streamed and whole decodes give the same audio with and without it."""
    codes = random_codes(3, seed=10)
    streamed = []
    for extra in ({}, {"use_cuda_graph": True}):
        try:
            streamed.append(model.batch_decode([codes], streaming=True, reset_stream=True, **extra).audio)
        finally:
            model._reset_batch_decode_streaming_state()
    assert streamed[0].shape == (1, 2, 3 * FRAME) and torch.equal(streamed[1], streamed[0])
    assert torch.equal(model.batch_decode([codes], use_cuda_graph=True).audio, model.batch_decode([codes]).audio)


def test_chunked_decode_matches_one_shot(model):
    items = [random_codes(11, seed=11), random_codes(4, seed=12), random_codes(0, seed=13)]
    one_shot = model.batch_decode(items)
    chunked = model.batch_decode(items, chunk_duration=0.24)
    assert chunked.audio_lengths.tolist() == one_shot.audio_lengths.tolist() == [11 * FRAME, 4 * FRAME, 0]
    for row, n in enumerate([11, 4]):
        expected = model.batch_decode([items[row]]).audio[0]
        assert max_rel(chunked.audio[row, :, : n * FRAME], expected, _peak(expected)) <= 1e-5


def test_chunked_encode_matches_one_shot(model):
    wavs = [random_wav(10 * FRAME + 700, seed=14), random_wav(3 * FRAME + 5, seed=15), random_wav(2000, seed=16)]
    one_shot = model.batch_encode(wavs)
    chunked = model.batch_encode(wavs, chunk_duration=0.32)
    assert one_shot.audio_codes_lengths.tolist() == chunked.audio_codes_lengths.tolist() == [10, 3, 0]
    assert chunked.audio_codes.shape == (16, 3, 10) and one_shot.audio_codes.shape == (16, 3, 11)
    for row, n in enumerate([10, 3]):
        assert torch.equal(chunked.audio_codes[:, row, :n], model.batch_encode([wavs[row]]).audio_codes[:, 0, :n])
    with pytest.raises(ValueError, match="chunk_duration"):
        model.batch_encode(wavs, chunk_duration=0.1)


def test_streaming_context_and_exec_mask(model):
    with pytest.raises(ValueError, match="batch_size"):
        with model.streaming(0):
            pass
    with pytest.raises(RuntimeError, match="not streaming"):
        model._set_streaming_exec_mask([True])
    codes = random_codes(5, seed=17)
    with torch.inference_mode():
        embedding = model.quantizer.decode(codes[:, None])
    with model.streaming(2), torch.inference_mode():
        with pytest.raises(RuntimeError, match="already streaming"):
            with model.streaming(1):
                pass
        with pytest.raises(ValueError, match="exec mask"):
            model._set_streaming_exec_mask([True])
        outputs = []
        for f in range(5):
            model._set_streaming_exec_mask([True, False])  # row 1 computes junk but keeps its state
            both = torch.cat([embedding[..., f: f + 1], torch.randn_like(embedding[..., :1])], dim=0)
            outputs.append(model._decode_embedding(both, None)[0])
    assert model._streaming_context is None
    expected = model.batch_decode([codes]).audio[0]
    assert max_rel(torch.cat(outputs, dim=-1), expected, _peak(expected)) <= 1e-5


def test_streaming_state_lives_on_parameter_device(model):
    with model.create_decode_session(1) as session:
        session.append(0)
        session.step([0], random_codes(2), [2])
        states = session.state.stages
        assert all(s.offsets.device == model.device for s in states)
        assert all(buf.device == model.device for s in states for pair in s.buffers for buf in pair)
        assert [int(s.offsets[0]) for s in states] == [8, 16, 32, 64]


def _poison_single_slot_buffers(model, monkeypatch) -> list[tuple[int, bool]]:
    """Fill every new single-slot stream buffer with NaN; record (slots, allocated all-zero) per allocation."""
    layers = sys.modules[type(model).__module__.rsplit(".", 1)[0] + ".codec_layers"]
    real = layers.StageStreamState._allocate
    allocated = []

    def poisoned(self, heads, head_dim, dtype):
        buffer = real(self, heads, head_dim, dtype)
        allocated.append((self.num_slots, bool((buffer == 0).all())))
        return buffer.fill_(float("nan")) if self.num_slots == 1 else buffer

    monkeypatch.setattr(layers.StageStreamState, "_allocate", poisoned)
    return allocated


def test_single_slot_stream_never_reads_unwritten_buffer_entries(model, monkeypatch):
    """One slot allocates its key/value buffers uninitialised: poisoning them with NaN changes nothing.

    The windows cross the buffer compaction and growth (contexts are 10-40 tokens, a frame is 4-32 of them)."""
    codes = random_codes(14, seed=7)
    windows = [1, 3, 2, 8]
    reference = stream_decode(model, codes, windows)
    allocated = _poison_single_slot_buffers(model, monkeypatch)
    streamed = stream_decode(model, codes, windows)
    assert allocated and all(slots == 1 for slots, _ in allocated)
    assert torch.isfinite(streamed).all() and torch.equal(streamed, reference)


def test_several_slots_keep_zero_filled_buffers(model, monkeypatch):
    """With two slots, a shorter history reads masked entries of the window, so those buffers start at zero."""
    allocated = _poison_single_slot_buffers(model, monkeypatch)
    a, b = random_codes(6, seed=8), random_codes(6, seed=9)
    try:
        model.batch_decode([a[:, :4]], streaming=True, reset_stream=True, max_batch_size=2)
        out = model.batch_decode([a[:, 4:], b[:, :2]], streaming=True)  # b joins with a shorter history
    finally:
        model._reset_batch_decode_streaming_state()
    assert torch.isfinite(out.audio).all()
    assert allocated and all(slots == 2 and zero for slots, zero in allocated)
