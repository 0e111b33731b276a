"""Every call owns its state: one model and one codec serve interleaved streams and threads, each with its solo output.

Run with our codec and with a stand-in for upstream's codec class (one streaming state per object), which the
pipeline runs through this repository's codec over the stand-in's own parameters.
"""

from __future__ import annotations

import os
import random
import stat
import threading

import numpy as np
import pytest
import torch

import audio_io
import pipeline
from linear_kernels import PrecisionLinear
from pipeline_assets import TinyAssets, tiny_tts, upstream_style_codec

FRAMES = 6
REQUESTS = (  # (text, extra keywords): voice clone twice and a continuation that primes the stream with its prompt
    ("Hello world.", {}),
    ("Good morning to you all.", {}),
    (" world.", {"mode": "continuation", "prompt_text": "Hello"}),
)
HAS_INT8 = bool({"x86", "fbgemm"} & set(torch.backends.quantized.supported_engines))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return TinyAssets(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def standin():
    return upstream_style_codec(seed=0)  # the weights of the TinyAssets codec


@pytest.fixture(params=["ours", "upstream_standin"])
def codec(request, assets, standin):
    return assets.codec if request.param == "ours" else standin


def _kwargs(assets, codec, extra: dict, **overrides) -> dict:
    kwargs = dict(prompt_audio=assets.prompt_audio, text_tokenizer=assets.tokenizer, audio_tokenizer=codec,
                  max_new_frames=FRAMES, do_sample=False)
    kwargs.update(extra)
    kwargs.update(overrides)
    return kwargs


def _consume(stream) -> dict:
    events = list(stream)
    result = events[-1]
    assert result["type"] == "result"
    result["streamed"] = torch.cat([e["waveform"] for e in events[:-1]], dim=-1)
    return result


def _codes(result: dict) -> torch.Tensor:
    """All of a result's codes, [frames, n_vq] (``audio_token_ids`` holds one tensor per text chunk)."""
    return torch.cat(result["audio_token_ids"], dim=0)


def _assert_same_output(got: dict, solo: dict) -> None:
    assert len(got["audio_token_ids"]) == len(solo["audio_token_ids"]) and torch.equal(_codes(got), _codes(solo))
    peak = float(solo["waveform"].abs().max())
    assert peak > 0 and got["waveform"].shape == solo["waveform"].shape
    assert float((got["waveform"] - solo["waveform"]).abs().max()) <= 1e-6 * peak


def _solo_streams(assets, codec, **overrides) -> list[dict]:
    return [_consume(assets.model.inference_stream(text, **_kwargs(assets, codec, extra, **overrides)))
            for text, extra in REQUESTS]


# ---------------------------------------------------------------------------------------------- interleaved and threads


def _round_robin(streams: list) -> list[dict]:
    events: list[list[dict]] = [[] for _ in streams]
    live = set(range(len(streams)))
    while live:
        for index in sorted(live):
            try:
                events[index].append(next(streams[index]))
            except StopIteration:
                live.discard(index)
    results = []
    for evs in events:
        result = evs[-1]
        result["streamed"] = torch.cat([e["waveform"] for e in evs[:-1]], dim=-1)
        results.append(result)
    return results


def test_interleaved_streams_each_give_their_solo_output(assets, codec):
    solo = _solo_streams(assets, codec)
    streams = [assets.model.inference_stream(text, **_kwargs(assets, codec, extra)) for text, extra in REQUESTS]
    for got, alone in zip(_round_robin(streams), solo):
        _assert_same_output(got, alone)
        assert float((got["streamed"] - got["waveform"]).abs().max()) == 0.0


def test_interleaved_seeded_sampled_streams_equal_their_solo_runs(assets, codec):
    sampled = dict(do_sample=True, audio_temperature=1.0, audio_top_k=50, audio_top_p=0.95)
    solo = [_consume(assets.model.inference_stream(text, **_kwargs(assets, codec, extra, seed=7 + i, **sampled)))
            for i, (text, extra) in enumerate(REQUESTS)]
    streams = [assets.model.inference_stream(text, **_kwargs(assets, codec, extra, seed=7 + i, **sampled))
               for i, (text, extra) in enumerate(REQUESTS)]
    for got, alone in zip(_round_robin(streams), solo):
        _assert_same_output(got, alone)
    other_seed = _consume(assets.model.inference_stream(REQUESTS[0][0], **_kwargs(assets, codec, {}, seed=99,
                                                                                    **sampled)))
    assert not torch.equal(_codes(other_seed), _codes(solo[0]))  # the seed matters


def test_threads_calling_inference_and_streams_each_give_their_solo_output(assets, codec):
    solo_streams = _solo_streams(assets, codec)
    solo_calls = [assets.model.inference(text, **_kwargs(assets, codec, extra)) for text, extra in REQUESTS]
    barrier = threading.Barrier(2 * len(REQUESTS))
    results: dict[tuple[str, int], dict] = {}
    errors: list[BaseException] = []

    def worker(kind: str, index: int) -> None:
        text, extra = REQUESTS[index]
        try:
            barrier.wait(timeout=60)
            if kind == "stream":
                results[kind, index] = _consume(assets.model.inference_stream(text, **_kwargs(assets, codec, extra)))
            else:
                results[kind, index] = assets.model.inference(text, **_kwargs(assets, codec, extra))
        except BaseException as exc:  # reported below, with the others' results
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(kind, i)) for i in range(len(REQUESTS))
               for kind in ("stream", "call")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    for index in range(len(REQUESTS)):
        _assert_same_output(results["stream", index], solo_streams[index])
        _assert_same_output(results["call", index], solo_calls[index])


def test_leaving_a_stream_early_then_calling_works_at_once(assets, codec):
    solo = assets.model.inference(REQUESTS[0][0], **_kwargs(assets, codec, {}))
    stream = assets.model.inference_stream(REQUESTS[1][0], **_kwargs(assets, codec, {}))
    for event in stream:
        break
    assert event["type"] == "audio"
    _assert_same_output(assets.model.inference(REQUESTS[0][0], **_kwargs(assets, codec, {})), solo)
    rest = list(stream)  # the abandoned stream is still intact
    assert rest[-1]["type"] == "result" and _codes(rest[-1]).shape == (FRAMES, 16)


def test_upstream_style_codec_is_run_over_its_own_parameters(assets, standin):
    synthesizer = pipeline.synthesizer_for(assets.model, text_tokenizer=assets.tokenizer, audio_tokenizer=standin)
    bound = synthesizer.codec
    assert bound is not standin and type(bound).independent_decode_sessions
    ours, theirs = dict(bound.named_parameters()), dict(standin.named_parameters())
    assert ours.keys() == theirs.keys() and all(ours[k] is theirs[k] for k in ours)  # shared, not copied
    _consume(assets.model.inference_stream("Hello world.", **_kwargs(assets, standin, {})))
    assert standin.sessions_opened == 0 and standin._stream_decode.session is None  # its own state never used
    with_ours = assets.model.inference("Hello world.", **_kwargs(assets, assets.codec, {}))
    _assert_same_output(assets.model.inference("Hello world.", **_kwargs(assets, standin, {})), with_ours)


# ---------------------------------------------------------------------------------------------------- randomness


def _global_rng_states() -> tuple:
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def test_calls_neither_read_nor_change_the_global_random_generators(assets):
    sampled = dict(do_sample=True, audio_temperature=1.0)
    before = _global_rng_states()
    seeded = assets.model.inference("Hello world.", **_kwargs(assets, assets.codec, {}, seed=3, **sampled))
    assets.model.inference("Hello world.", **_kwargs(assets, assets.codec, {}, **sampled))  # unseeded sampling
    after = _global_rng_states()
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]
    torch.manual_seed(12345)  # a changed global generator does not change a seeded call
    again = assets.model.inference("Hello world.", **_kwargs(assets, assets.codec, {}, seed=3, **sampled))
    assert torch.equal(_codes(again), _codes(seeded))


def test_generator_keyword_draws_like_the_same_seed(assets):
    sampled = dict(do_sample=True, audio_temperature=1.0)
    seeded = assets.model.inference("Hello world.", **_kwargs(assets, assets.codec, {}, seed=5, **sampled))
    generator = torch.Generator().manual_seed(5)
    given = assets.model.inference("Hello world.", **_kwargs(assets, assets.codec, {}, generator=generator, **sampled))
    assert torch.equal(_codes(given), _codes(seeded))
    streamed = _consume(assets.model.inference_stream(
        "Hello world.", **_kwargs(assets, assets.codec, {}, generator=torch.Generator().manual_seed(5), **sampled)))
    assert torch.equal(_codes(streamed), _codes(seeded))


@pytest.mark.parametrize("extra, message", [
    ({"seed": 1, "generator": torch.Generator()}, "not both"),
    ({"generator": 5}, "torch.Generator"),
    ({"seed": -1}, "seed"),
])
def test_bad_randomness_arguments_are_value_errors(assets, extra, message):
    with pytest.raises(ValueError, match=message):
        assets.model.inference("Hello world.", **_kwargs(assets, assets.codec, {}, **extra))


# ------------------------------------------------------------------------------------------------- shared state


def _float32_retry_scene(model, assets, monkeypatch):
    """Thread B's first step fails numerically; while its float32 re-run is paused, the main thread runs a call on
    the same model and records what it sees. Returns (observed, B's result, the main thread's result)."""
    import model_runner

    real = model_runner.sample_frame
    retry_started, main_done = threading.Event(), threading.Event()
    failing = {"calls": 0}

    def sample_frame(step_model, *args, **kwargs):
        frame = real(step_model, *args, **kwargs)
        if threading.current_thread() is failing.get("thread"):
            failing["calls"] += 1
            if failing["calls"] == 1:
                frame.audio_finite = torch.zeros_like(frame.audio_finite)
            elif not retry_started.is_set():
                retry_started.set()  # the re-run, paused until the main thread's call is done
                main_done.wait(timeout=120)
        return frame

    monkeypatch.setattr(model_runner, "sample_frame", sample_frame)
    kwargs = _kwargs(assets, assets.codec, {})
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(b=model.inference("Good morning to you all.", **kwargs)))
    failing["thread"] = thread
    thread.start()
    assert retry_started.wait(timeout=120)
    observed = {"dtype": next(model.parameters()).dtype, "attention": model.get_attention_implementation(),
                "packed": [m._packed for m in model.modules() if isinstance(m, PrecisionLinear)],
                "engine": torch.backends.quantized.engine}
    try:
        main = model.inference("Hello world.", **kwargs)
    finally:
        main_done.set()
        thread.join(timeout=120)
    return observed, out["b"], main


def test_float32_retry_leaves_the_callers_model_alone_while_another_thread_runs(assets, monkeypatch):
    model = tiny_tts().to(torch.bfloat16)
    kwargs = _kwargs(assets, assets.codec, {})
    solo = model.inference("Hello world.", **kwargs)
    attention = model.get_attention_implementation()
    observed, retried, main = _float32_retry_scene(model, assets, monkeypatch)
    assert observed["dtype"] == torch.bfloat16 and observed["attention"] == attention
    assert retried["float32_fallback"] is True and main["float32_fallback"] is False
    _assert_same_output(main, solo)
    assert next(model.parameters()).dtype == torch.bfloat16 and model.get_attention_implementation() == attention


@pytest.mark.skipif(not HAS_INT8, reason="this torch build has no x86/fbgemm quantized engine")
def test_float32_retry_keeps_int8_weights_and_the_quantized_engine(assets, monkeypatch):
    model = tiny_tts()
    model.set_weight_precision("int8")
    packed = [m._packed for m in model.modules() if isinstance(m, PrecisionLinear)]
    engine = torch.backends.quantized.engine
    observed, retried, _ = _float32_retry_scene(model, assets, monkeypatch)
    assert retried["float32_fallback"] is True and model.weight_precision == "int8"
    after = [m._packed for m in model.modules() if isinstance(m, PrecisionLinear)]
    assert all(a is b for a, b in zip(observed["packed"], packed)) and all(a is b for a, b in zip(after, packed))
    assert observed["engine"] == engine == torch.backends.quantized.engine


def test_writing_files_never_changes_the_umask(assets, monkeypatch, tmp_path):
    mask = os.umask(0o027)
    try:
        calls = []
        monkeypatch.setattr(os, "umask", lambda *args: calls.append(args) or pytest.fail("os.umask was called"))
        path = audio_io.write_audio_atomic(tmp_path / "a.wav", torch.zeros(2, 480), 48000)
        result = assets.model.inference("Hello world.", output_audio_path=tmp_path / "b.wav",
                                        **_kwargs(assets, assets.codec, {}))
        assert calls == []
        for written in (path, result["audio_path"]):
            assert stat.S_IMODE(os.stat(written).st_mode) == 0o666 & ~0o027
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "b.wav"]  # no temporary file left
    finally:
        monkeypatch.undo()
        os.umask(mask)


def test_device_argument_moves_the_model_only_when_it_is_elsewhere(assets, monkeypatch, caplog):
    moves = []
    monkeypatch.setattr(assets.model, "to", lambda *args, **kwargs: moves.append(args))
    result = assets.model.inference("Hello world.", device="cpu", **_kwargs(assets, assets.codec, {}))
    assert moves == [] and "moves the model" not in caplog.text
    assert _codes(result).shape == (FRAMES, 16)
    pipeline.place_model(assets.model, torch.device("meta"))  # elsewhere: moved (here: recorded), with a warning
    assert moves == [(torch.device("meta"),)] and "moves the model from cpu to meta" in caplog.text


def test_resources_live_on_a_synthesizer_not_on_the_model(assets):
    resources = dict(text_tokenizer=assets.tokenizer, audio_tokenizer=assets.codec)
    assets.model.inference("Hello world.", **_kwargs(assets, assets.codec, {}))
    assert not any(name.startswith("_moss") for name in vars(assets.model))
    first, second = pipeline.synthesizer_for(assets.model, **resources), pipeline.synthesizer_for(assets.model,
                                                                                                  **resources)
    assert first.resources is second.resources and first.codec is assets.codec
    synthesizer = pipeline.Synthesizer(assets.model, **resources)
    own = synthesizer.inference("Hello world.", prompt_audio=assets.prompt_audio, max_new_frames=FRAMES,
                                do_sample=False)
    _assert_same_output(own, assets.model.inference("Hello world.", **_kwargs(assets, assets.codec, {})))
    with pytest.raises(ValueError, match="owns its resources"):
        synthesizer.inference("Hello world.", audio_tokenizer=assets.codec, prompt_audio=assets.prompt_audio)
