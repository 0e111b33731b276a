"""benchmarks/codec_sessions.py decodes several streams in one session each and in one shared multi-slot session (no
timing checks here): both layouts decode every frame in the engine's stream windows, agree on the audio, and one
stream decodes to the same bits either way."""

from __future__ import annotations

import pathlib

import pytest
import torch

from conftest import load_script
from pipeline_assets import TinyAssets

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    return load_script("moss_codec_sessions", ROOT / "benchmarks" / "codec_sessions.py")


@pytest.fixture(scope="module")
def codec(tmp_path_factory):
    return TinyAssets(tmp_path_factory.mktemp("codec")).codec


def test_stream_windows_follow_the_engine_and_cover_every_frame(script):
    assert script.stream_windows(1) == [1]
    assert script.stream_windows(5) == [1, 1, 2, 1]
    assert script.stream_windows(20) == [1, 1, 2, 4, 8, 4]
    assert sum(script.stream_windows(100)) == 100


def test_both_layouts_decode_every_frame_and_agree(script, codec):
    nq = int(codec.config.num_quantizers)
    codes = script.random_codes(3, 9, nq, int(codec.config.codebook_size))
    with torch.inference_mode():
        separate, shared = script.decode_separate(codec, codes), script.decode_shared(codec, codes)
        alone = script.decode_shared(codec, codes[1:2])
    samples = 9 * codec.config.downsample_rate
    assert [a.shape for a in separate] == [a.shape for a in shared] == [(2, samples)] * 3
    for a, b in zip(separate, shared):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.equal(separate[0], separate[1])  # the streams decode their own codes
    assert torch.equal(alone[0], separate[1])  # one stream: the same session shape, the same bits


def test_compare_reports_each_layout_per_round(script, codec):
    report = script.compare(codec, streams=2, frames=5, rounds=2, nq=int(codec.config.num_quantizers))
    assert report["windows"] == [1, 1, 2, 1]
    assert all(len(report["ms_per_frame"][k]) == 2 and report["median_ms_per_frame"][k] > 0
               for k in ("separate", "shared"))
    assert len(report["shared_over_separate"]) == 2
    assert 0 <= report["streams_bit_identical"] <= 2 and report["max_abs_difference"] < 1e-3
