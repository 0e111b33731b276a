"""Parity with upstream on ../shared/golden/codec_tiny (CODEC_SPEC §7, float32 on CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from audio_tokenizer.modeling_moss_audio_tokenizer import MossAudioTokenizerModel
from conftest import shared_path
from test_codec_common import (  # noqa: F401 (single_thread is an autouse fixture)
    FRAME,
    max_rel,
    random_codes,
    random_wav,
    stream_decode,
    single_thread,
)


@pytest.fixture(scope="module")
def golden():
    directory = shared_path("golden", "codec_tiny")
    data = np.load(directory / "golden.npz")
    model = MossAudioTokenizerModel.from_pretrained(directory)
    return {"dir": directory, "model": model, "peak": float(np.abs(data["decoded"]).max()),
            **{key: data[key] for key in data.files}}


def test_strict_load_of_fixture(golden):
    state = load_file(golden["dir"] / "model.safetensors")
    model = MossAudioTokenizerModel(golden["model"].config)
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert len(model.state_dict()) == len(state) == 214


def test_contexts_from_config(golden):
    assert golden["model"].config.transformer_contexts() == ([1600, 1200, 800, 500], [500, 800, 1200, 1600])


def test_encode_codes_exact(golden):
    out = golden["model"].batch_encode([torch.from_numpy(golden["waveform"])])
    assert out.audio_codes.shape == (16, 1, 17) and out.audio_codes.dtype == torch.int64
    assert out.audio_codes_lengths.tolist() == [int(golden["codes_length"])] == [16]
    assert out.encoder_hidden_states.shape == (1, 768, 17)
    assert torch.equal(out.audio_codes[:, 0, :16], torch.from_numpy(golden["codes"]))


def test_decode_matches_upstream(golden):
    out = golden["model"].batch_decode([torch.from_numpy(golden["codes"])])
    assert out.audio.shape == (1, 2, 61440) and out.audio.dtype == torch.float32
    assert out.audio_lengths.tolist() == [61440]
    assert max_rel(out.audio[0], golden["decoded"], golden["peak"]) <= 1e-5


def test_decode_eight_quantizers_matches_upstream(golden):
    codes = torch.from_numpy(golden["codes"])
    by_slice = golden["model"].batch_decode([codes[:8]]).audio[0]
    by_argument = golden["model"].batch_decode([codes], num_quantizers=8).audio[0]
    assert torch.equal(by_slice, by_argument)
    assert max_rel(by_slice, golden["decoded_nq8"], golden["peak"]) <= 1e-5


def test_streaming_windows_match_upstream(golden):
    streamed = stream_decode(golden["model"], torch.from_numpy(golden["codes"]), [3, 4, 9])
    assert max_rel(streamed, golden["decoded_streaming"], golden["peak"]) <= 1e-6
    assert max_rel(streamed, golden["decoded"], golden["peak"]) <= 1e-5


def test_long_stream_crosses_every_window(golden):
    """150 frames (12 s) pass every attention window: one-shot (Δ < ctx masks) equals 1-frame streaming."""
    model, codes = golden["model"], random_codes(150, seed=3)
    one_shot = model.batch_decode([codes]).audio[0]
    streamed = stream_decode(model, codes, [1] * 150)
    assert max_rel(streamed, one_shot, float(one_shot.abs().max())) <= 1e-5


def test_chunked_encode_matches_one_shot(golden):
    model, wav = golden["model"], random_wav(12 * 48000, seed=4)
    one_shot = model.batch_encode([wav])
    chunked = model.batch_encode([wav], chunk_duration=0.8)
    assert one_shot.audio_codes.shape == (16, 1, 150) and chunked.audio_codes.shape == (16, 1, 150)
    assert torch.equal(chunked.audio_codes, one_shot.audio_codes)
    assert torch.allclose(chunked.encoder_hidden_states, one_shot.encoder_hidden_states, atol=1e-5, rtol=0)


def test_multi_row_session_matches_one_shot(golden):
    model = golden["model"]
    rows = {name: random_codes(n, seed=s) for name, n, s in (("a", 9, 5), ("b", 7, 6), ("c", 6, 7))}
    expected = {name: model.batch_decode([codes]).audio[0] for name, codes in rows.items()}
    got = {name: [] for name in rows}
    calls = [  # (rows of this call as (name, start, stop), finalize_indices)
        ([("a", 0, 4), ("b", 0, 2)], None),
        ([("a", 4, 9), ("b", 2, 2)], [0]),
        ([("b", 2, 7), ("c", 0, 3)], None),
        ([("b", 7, 7), ("c", 3, 6)], [0, 1]),
    ]
    try:
        for index, (spec, finalize) in enumerate(calls):
            codes = [rows[name][:, start:stop] for name, start, stop in spec]
            out = model.batch_decode(codes, streaming=True, reset_stream=index == 0,
                                     max_batch_size=3 if index == 0 else None, finalize_indices=finalize)
            assert out.audio_lengths.tolist() == [(stop - start) * FRAME for _, start, stop in spec]
            for row, (name, start, stop) in enumerate(spec):
                got[name].append(out.audio[row, :, : (stop - start) * FRAME])
    finally:
        model._reset_batch_decode_streaming_state()
    for name in rows:
        decoded = torch.cat(got[name], dim=-1)
        assert max_rel(decoded, expected[name], float(expected[name].abs().max())) <= 1e-5


def test_forward_encodes_then_decodes(golden):
    model = golden["model"]
    out = model(torch.from_numpy(golden["waveform"])[None])
    assert out.audio_codes.shape == (16, 1, 17) and out.audio_codes_lengths.tolist() == [16]
    assert out.audio.shape == (1, 2, 17 * FRAME) and out.audio_lengths.tolist() == [16 * FRAME]
    assert torch.equal(out.audio_codes[:, 0, :16], torch.from_numpy(golden["codes"]))
