"""The continuous-batching engine on tiny assets: every request gets its solo output whatever runs beside it, joins and
leaves at frame boundaries, back-pressure, cancellation from other threads, shutdown, and the event shapes."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch

import cpu_fast_paths
import codec_output
import model_runner as runner_module
from engine import EngineClosed, EngineFull, RequestCancelled, SynthesisEngine
from model_runner import SlotGlobal
from linear_kernels import batched_products, linear, row_invariant_limit
from pipeline_assets import TinyAssets
from sampling import RowSampler, SamplingParams, select_tokens

SAMPLED = {"do_sample": True, "text_temperature": 1.0, "text_top_p": 1.0, "text_top_k": 50, "audio_temperature": 0.8,
           "audio_top_p": 0.95, "audio_top_k": 25, "audio_repetition_penalty": 1.2}
TEXTS = ("Hello world, this is the first request.", "A second one.",
         "And a third request, which is longer than the other two by a few words.")

needs_int8 = pytest.mark.skipif(
    cpu_fast_paths.cpu_kernel("int8_weights") is None, reason="int8 weights are a CPU fast path: MOSS_TTS_CPU_FAST_PATHS=0")
needs_row_invariance = pytest.mark.skipif(
    row_invariant_limit() < 3, reason="oneDNN's float32 products are not row-invariant on this CPU (see docs/performance.md)")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return TinyAssets(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def engine(assets):
    with SynthesisEngine(assets.model, **assets.resources(), max_batch_size=4, max_queue=8,
                         batch_invariant=True) as eng:
        yield eng


def _request(assets, index: int, **kwargs) -> dict:
    kwargs.setdefault("prompt_audio", assets.prompt_audio)
    kwargs.setdefault("max_new_frames", (6, 11, 8)[index % 3])
    return kwargs


def _solo(engine, text, **kwargs) -> dict:
    return engine.submit(text, **kwargs).result(timeout=120)


def _assert_same_output(result: dict, solo: dict) -> None:
    codes, expected = result["audio_token_ids"], solo["audio_token_ids"]
    if isinstance(expected, list):
        assert len(codes) == len(expected) and all(torch.equal(a, b) for a, b in zip(codes, expected))
    else:
        assert torch.equal(codes, expected)
    assert result["waveform"].shape == solo["waveform"].shape
    peak = solo["waveform"].abs().max()
    assert (result["waveform"] - solo["waveform"]).abs().max() <= 1e-6 * peak


def _staggered(engine, requests: list[tuple[str, dict]]) -> list[dict]:
    """Submit each request once the previous one has produced audio (joins mid-way); return the results."""
    handles, events = [], []
    for text, kwargs in requests:
        handle = engine.submit(text, **kwargs)
        stream = handle.events(timeout=120)
        first = next(stream)
        assert first["type"] == "audio"
        handles.append(handle)
        events.append(stream)
    overlapped = [not h.done for h in handles[:-1]]
    results = [list(stream)[-1] for stream in events]
    assert any(overlapped), "the requests never ran together"
    return results


# ------------------------------------------------------------------------------------------- solo equality


@needs_row_invariance
@pytest.mark.parametrize("sampling", [{"do_sample": False}, dict(SAMPLED, seed=1234)], ids=["greedy", "sampled"])
def test_staggered_requests_equal_their_solo_runs(engine, assets, sampling):
    requests = [(text, _request(assets, i, **sampling)) for i, text in enumerate(TEXTS)]
    solos = [_solo(engine, text, **kwargs) for text, kwargs in requests]
    for result, solo in zip(_staggered(engine, requests), solos):
        _assert_same_output(result, solo)
    assert len({int(s["frames"]) for s in solos}) > 1  # they leave at different frames


def test_non_streamed_results_are_byte_identical_to_solo_runs_under_concurrency(assets):
    """Default (fast) mode, greedy: codes agree with the solo runs, and a non-streamed request is decoded once at
    its end, so its waveform is bit-identical whatever ran beside it."""
    requests = [(text, _request(assets, i)) for i, text in enumerate(TEXTS)]
    with SynthesisEngine(assets.model, **assets.resources(), max_batch_size=4) as eng:
        solos = [eng.submit(text, stream=False, **kwargs).result(timeout=120) for text, kwargs in requests]
        handles = [eng.submit(text, stream=False, **kwargs) for text, kwargs in requests]
        for handle, solo in zip(handles, solos):
            result = handle.result(timeout=120)
            assert all(torch.equal(a, b) for a, b in zip(result["audio_token_ids"], solo["audio_token_ids"]))
            assert torch.equal(result["waveform"], solo["waveform"])
    direct = assets.model.inference(TEXTS[0], **assets.resources(), **requests[0][1])
    assert torch.equal(direct["waveform"], solos[0]["waveform"])  # the same bytes as a plain inference() call


@needs_row_invariance
def test_mixed_settings_modes_and_codebooks_share_frames(engine, assets):
    prompt = assets.prompt_audio
    requests = [
        ("Greedy voice clone.", {"prompt_audio": prompt, "max_new_frames": 7}),
        ("Sampled voice clone.", dict(SAMPLED, prompt_audio=prompt, max_new_frames=9, seed=7)),
        ("Eight codebooks.", dict(SAMPLED, prompt_audio=prompt, max_new_frames=5, nq=8, seed=3)),
        ("Plain continuation.", {"mode": "continuation", "max_new_frames": 6, "audio_repetition_penalty": 1.5}),
        (" continued.", {"mode": "continuation", "prompt_text": "Prompt", "prompt_audio": prompt,
                         "max_new_frames": 8}),
    ]
    solos = [_solo(engine, text, **kwargs) for text, kwargs in requests]
    handles = [engine.submit(text, **kwargs) for text, kwargs in requests]
    for handle, solo in zip(handles, solos):
        _assert_same_output(handle.result(timeout=120), solo)
    assert solos[2]["audio_token_ids"][0][:, 8:].eq(assets.model.config.audio_pad_token_id).all()


@needs_row_invariance
def test_threads_submitting_at_once_each_get_their_solo_output(engine, assets):
    requests = [(TEXTS[i % 3], _request(assets, i, **dict(SAMPLED, seed=100 + i))) for i in range(6)]
    solos = [_solo(engine, text, **kwargs) for text, kwargs in requests]
    results: list = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def client(index: int) -> None:
        barrier.wait()
        text, kwargs = requests[index]
        results[index] = engine.submit(text, **kwargs).result(timeout=120)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for result, solo in zip(results, solos):
        _assert_same_output(result, solo)


def test_long_text_chunks_run_in_order_with_pauses_like_inference_stream(engine, assets):
    text = "One two three four five six. Seven eight nine ten eleven twelve. Thirteen fourteen."
    kwargs = {"prompt_audio": assets.prompt_audio, "max_new_frames": 4, "voice_clone_max_text_tokens": 30}
    events = list(engine.submit(text, **kwargs).events(timeout=120))
    reference = list(assets.model.inference_stream(text, **assets.resources(), **kwargs))
    kinds = [e["type"] for e in events]
    assert kinds.count("pause") == len(events[-1]["voice_clone_text_chunks"]) - 1 >= 1
    assert [e["chunk_index"] for e in events if e["type"] == "pause"] == \
        [e["chunk_index"] for e in reference if e["type"] == "pause"]
    result, expected = events[-1], reference[-1]
    assert result["voice_clone_text_chunks"] == expected["voice_clone_text_chunks"]
    assert all(torch.equal(a, b) for a, b in zip(result["audio_token_ids"], expected["audio_token_ids"]))
    assert result["waveform"].shape == expected["waveform"].shape
    assert torch.allclose(result["waveform"], expected["waveform"], atol=1e-5)


def test_long_continuation_continues_one_stream_like_inference_stream(engine, assets):
    text = " one two three four five six. Seven eight nine ten eleven twelve. Thirteen fourteen."
    kwargs = {"prompt_text": "Zero", "prompt_audio": assets.prompt_audio, "max_new_frames": 4,
              "voice_clone_max_text_tokens": 30}
    events = list(engine.submit(text, **kwargs).events(timeout=120))
    reference = list(assets.model.inference_stream(text, **assets.resources(), **kwargs))
    result, expected = events[-1], reference[-1]
    assert len(result["text_chunks"]) >= 2 and result["text_chunks"] == expected["text_chunks"]
    assert not any(e["type"] == "pause" for e in events)  # one continuous waveform
    assert all(torch.equal(a, b) for a, b in zip(result["audio_token_ids"], expected["audio_token_ids"]))
    assert torch.allclose(result["waveform"], expected["waveform"], atol=1e-5)


def test_min_new_frames_and_truncation_are_per_request(engine, assets):
    stop_early = {"prompt_audio": assets.prompt_audio, "max_new_frames": 6}
    with torch.no_grad():  # make the tiny model choose audio_end at once, unless forced to continue
        bias = assets.model.local_transformer.ln_f.bias
        saved = bias.clone()
        wte = assets.model.transformer.wte.weight
        bias -= 200 * (wte[9] - wte[7]) / (wte[9] - wte[7]).pow(2).sum()
    try:
        forced = engine.submit("Forced.", min_new_frames=3, **stop_early)
        free = engine.submit("Free.", **stop_early)
        forced, free = forced.result(timeout=120), free.result(timeout=120)
    finally:
        with torch.no_grad():
            bias.copy_(saved)
    assert forced["frames"] == 3 and free["frames"] == 0
    assert forced["truncated_chunks"] == [] and free["truncated_chunks"] == []
    longer = engine.submit("Hello.", **stop_early).result(timeout=120)
    assert longer["frames"] == 6 and longer["truncated_chunks"] == [0]


# ------------------------------------------------------------------------------------------- events


def test_events_have_inference_stream_shapes(engine, assets, tmp_path):
    out = tmp_path / "engine.wav"
    events = list(engine.submit("Hello world.", prompt_audio=assets.prompt_audio, max_new_frames=6,
                                output_audio_path=out).events(timeout=120))
    reference = list(assets.model.inference_stream("Hello world.", **assets.resources(),
                                                   prompt_audio=assets.prompt_audio, max_new_frames=6))
    *audio, result = events
    assert audio and all(e["type"] == "audio" and e["sample_rate"] == 48000 and e["chunk_index"] == 0 for e in audio)
    for event in audio:
        wave = event["waveform"]
        assert wave.dtype == torch.float32 and wave.device.type == "cpu" and wave.dim() == 2 and wave.shape[0] == 2
    assert result["type"] == "result" and set(reference[-1]) <= set(result)
    assert torch.equal(torch.cat([e["waveform"] for e in audio], dim=-1), result["waveform"])
    assert result["waveform"].shape == (2, 6 * 3840) and result["first_audio_latency_s"] > 0
    assert result["audio_path"] == str(out) and out.is_file()


def test_submit_validates_like_inference(engine, assets):
    with pytest.raises(ValueError, match="needs prompt audio"):
        engine.submit("Hello.", mode="voice_clone")
    with pytest.raises(ValueError, match="audio_top_p"):
        engine.submit("Hello.", prompt_audio=assets.prompt_audio, audio_top_p=0.0)
    with pytest.raises(ValueError, match="SynthesisEngine"):
        engine.submit("Hello.", prompt_audio=assets.prompt_audio, text_tokenizer=assets.tokenizer)
    with pytest.raises(ValueError, match="prompt_audio_codes"):
        engine.submit("Hello.", prompt_audio_codes=torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="device='meta' is not supported"):
        engine.submit("Hello.", prompt_audio=assets.prompt_audio, device="meta")
    assert engine.submit("Hello.", prompt_audio=assets.prompt_audio, device="cpu", max_new_frames=1).result(120)
    assert engine.stats() == {"active": 0, "queued": 0, "max_batch_size": 4, "max_queue": 8}


@needs_row_invariance
def test_prompt_codes_stand_for_the_prompt_audio(engine, assets):
    from audio_io import prepare_prompt_waveform
    from pipeline import encode_prompt_audio

    codes = encode_prompt_audio(assets.codec, prepare_prompt_waveform(assets.prompt_audio.numpy(), 48000))
    by_audio = _solo(engine, "Hello.", prompt_audio=assets.prompt_audio, max_new_frames=5)
    by_codes = _solo(engine, "Hello.", prompt_audio_codes=codes, max_new_frames=5)
    _assert_same_output(by_codes, by_audio)


def test_prompt_audio_is_encoded_in_a_thread_that_ends_with_it(engine, assets, monkeypatch, tmp_path):
    """On a CPU the encoding's OpenMP team must not stay with the caller's (long-lived) thread: docs/performance.md,
    "OpenMP teams". Its errors still reach the caller, and codes given by the caller are not re-encoded."""
    import pipeline

    threads = []
    encode = pipeline.encode_prompt_audio
    monkeypatch.setattr(pipeline, "encode_prompt_audio",
                        lambda *args: threads.append(threading.current_thread()) or encode(*args))
    handle = engine.submit("Hello.", prompt_audio=assets.prompt_audio, max_new_frames=2)
    assert len(threads) == 1 and threads[0] is not threading.current_thread() and not threads[0].is_alive()
    assert handle.result(120)["audio_token_ids"]
    with pytest.raises(ValueError, match="prompt audio is too short"):  # raised in that thread, re-raised here
        engine.submit("Hello.", prompt_audio=torch.zeros(2, 100), max_new_frames=2)
    engine.submit("Hello.", prompt_audio_codes=torch.zeros(3, assets.model.config.n_vq, dtype=torch.long),
                  max_new_frames=2).result(120)
    assert len(threads) == 1  # the codes were used as they are


def test_the_result_is_joined_without_a_torch_kernel_in_the_consumers_thread(engine, assets):
    """A torch copy of the whole waveform would give the consumer's thread an OpenMP team (docs/performance.md)."""
    from conftest import TorchKernels

    handle = engine.submit("Hello there.", prompt_audio=assets.prompt_audio, max_new_frames=6)
    while not handle.done:  # the worker's own kernels run before the mode (modes are per thread anyway)
        time.sleep(0.01)
    with TorchKernels() as seen:
        result = handle.result(120)
    assert result["waveform"].shape[-1] == 3840 * sum(c.shape[0] for c in result["audio_token_ids"])
    assert set(seen.ops) <= {"detach", "to", "resolve_conj", "resolve_neg", "lift_fresh", "alias"}, seen.ops


# ------------------------------------------------------------------------------------------- back-pressure


def test_queue_limit_raises_engine_full_and_shutdown_cancels_waiting(assets):
    eng = SynthesisEngine(assets.model, **assets.resources(), max_batch_size=1, max_queue=2)  # not started
    waiting = [eng.submit("Hello.", prompt_audio=assets.prompt_audio) for _ in range(2)]
    with pytest.raises(EngineFull, match="max_queue=2"):
        eng.submit("Hello.", prompt_audio=assets.prompt_audio)
    assert eng.stats()["queued"] == 2 and isinstance(EngineFull("x"), RuntimeError)
    eng.shutdown(cancel_running=True)
    for handle in waiting:
        assert handle.done
        with pytest.raises(RequestCancelled):
            handle.result(timeout=1)
    with pytest.raises(EngineClosed):
        eng.submit("Hello.", prompt_audio=assets.prompt_audio)
    eng.shutdown()  # idempotent


@needs_row_invariance
def test_cancel_waiting_request_from_another_thread(assets):
    kwargs = {"prompt_audio": assets.prompt_audio, "max_new_frames": 10}
    with SynthesisEngine(assets.model, **assets.resources(), max_batch_size=1) as eng:
        solo = _solo(eng, "Keep going.", **kwargs)
        running = eng.submit("Keep going.", **kwargs)
        waiting = eng.submit("Never runs.", **kwargs)
        thread = threading.Thread(target=waiting.cancel)
        thread.start()
        thread.join()
        assert waiting.done and eng.stats()["queued"] == 0
        with pytest.raises(RequestCancelled):
            list(waiting.events(timeout=1))
        waiting.cancel()  # idempotent
        _assert_same_output(running.result(timeout=120), solo)


@needs_row_invariance
def test_cancel_running_request_frees_its_slot_for_the_next(assets):
    kwargs = {"prompt_audio": assets.prompt_audio, "max_new_frames": 6}
    with SynthesisEngine(assets.model, **assets.resources(), max_batch_size=1) as eng:
        solo = _solo(eng, "The next one.", **kwargs)
        long_running = eng.submit("A long one.", prompt_audio=assets.prompt_audio, max_new_frames=500)
        waiting = eng.submit("The next one.", **kwargs)
        stream = long_running.events(timeout=120)
        assert next(stream)["type"] == "audio" and eng.stats()["queued"] == 1
        threading.Thread(target=long_running.cancel).start()
        _assert_same_output(waiting.result(timeout=120), solo)  # it got the only slot
        with pytest.raises(RequestCancelled):
            list(stream)
        assert long_running.done and eng.stats()["active"] == 0


def test_failing_request_raises_its_error_and_the_others_finish(assets, monkeypatch):
    real = runner_module.sample_frame

    def poisoned(model, h, local, sampler, *args, **kwargs):
        frame = real(model, h, local, sampler, *args, **kwargs)
        frame.audio_finite = frame.audio_finite & (torch.tensor(sampler.row_nq) != 7)  # the nq=7 request fails
        return frame

    monkeypatch.setattr(runner_module, "sample_frame", poisoned)
    with SynthesisEngine(assets.model, **assets.resources(), max_batch_size=4) as eng:
        bad = eng.submit("Bad.", prompt_audio=assets.prompt_audio, nq=7, max_new_frames=5)
        good = eng.submit("Good.", prompt_audio=assets.prompt_audio, max_new_frames=5)
        with pytest.raises(RuntimeError, match="Non-finite audio logits"):
            bad.result(timeout=120)
        assert good.result(timeout=120)["frames"] == 5


def test_shutdown_finishes_running_requests_then_refuses(assets):
    eng = SynthesisEngine(assets.model, **assets.resources(), max_batch_size=2).start()
    handles = [eng.submit(text, prompt_audio=assets.prompt_audio, max_new_frames=4) for text in TEXTS]
    eng.shutdown(timeout=120)
    assert all(h.result(timeout=1)["frames"] == 4 for h in handles)
    with pytest.raises(EngineClosed):
        eng.submit("Late.", prompt_audio=assets.prompt_audio)
    assert eng.stats()["active"] == 0


# ------------------------------------------------------------------------------------------- the pieces


@needs_row_invariance
@pytest.mark.parametrize("shape", [(96, 32), (64, 32), (32, 64), (2, 32), (1024, 32), (2304, 768)])
def test_row_invariant_products_do_not_depend_on_the_other_rows(shape):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(*shape, generator=generator)
    bias = torch.randn(shape[0], generator=generator)
    rows = torch.randn(41, shape[1], generator=generator)
    with batched_products(row_invariant=True) as limit:
        assert limit >= 3
        alone = linear(rows[:1], weight, bias)
        for count, position in ((2, 1), (3, 0), (7, 5), (15, 14), (16, 15), (17, 3), (40, 39)):
            if count > limit:  # beyond the probed range of one oneDNN kernel (16 rows in torch 2.3.1)
                break
            batch = rows[1 : count + 1].clone()
            batch[position] = rows[0]
            assert torch.equal(linear(batch, weight, bias)[position], alone[0])
    usual = linear(rows[:1], weight, bias)
    assert torch.allclose(usual, alone, rtol=1e-5, atol=1e-4)
    with batched_products(row_invariant=False):  # two rows and more as above, one row by the usual path
        assert torch.equal(linear(rows[:3], weight, bias)[0], alone[0])
        assert torch.equal(linear(rows[:1], weight, bias), usual)


@needs_row_invariance
def test_packed_global_forward_equals_each_sequence_alone(assets):
    model = assets.model
    hidden = model.config.hidden_size
    prompts = [torch.randn(n, hidden, generator=torch.Generator().manual_seed(n)) for n in (5, 9, 3)]
    steps = [torch.randn(1, hidden, generator=torch.Generator().manual_seed(50 + i)) for i in range(3)]
    attend = model.attention_functions()[0]

    def alone(i: int) -> list[torch.Tensor]:
        runner = SlotGlobal(model, 1, 16, attend)
        return [runner.run([(0, prompts[i])]), runner.run([(0, steps[i])])]

    with torch.inference_mode(), batched_products(row_invariant=True):
        expected = [alone(i) for i in range(3)]
        runner = SlotGlobal(model, 4, 10, attend)
        first = runner.run([(3, prompts[0]), (1, prompts[1])])  # two prefills packed
        runner.cache.reserve(16)  # grows between forwards
        second = runner.run([(1, steps[1]), (0, prompts[2]), (3, steps[0])])  # steps and a newcomer packed
        third = runner.run([(0, steps[2])])
    assert torch.equal(first[0], expected[0][0][0]) and torch.equal(first[1], expected[1][0][0])
    assert torch.equal(second[0], expected[1][1][0]) and torch.equal(second[2], expected[0][1][0])
    assert torch.equal(second[1], expected[2][0][0]) and torch.equal(third[0], expected[2][1][0])
    assert runner.cache.lengths == [4, 10, 0, 6]


def test_row_sampler_draws_each_row_from_its_own_generator():
    scores = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(do_sample=True, audio_top_k=10), SamplingParams(), SamplingParams(do_sample=True),
              SamplingParams(do_sample=True, audio_top_k=10), SamplingParams(do_sample=True, nq=2)]
    seeds = [1, None, 2, 3, 4]
    make = [lambda s=s: None if s is None else torch.Generator().manual_seed(s) for s in seeds]
    codes = RowSampler(params, [m() for m in make], n_vq=4).audio(scores, channel=1)
    for row, (item, new) in enumerate(zip(params, make)):
        alone = select_tokens(scores[row : row + 1], do_sample=item.do_sample, temperature=item.audio_temperature,
                              top_k=item.audio_top_k, top_p=item.audio_top_p, generator=new())
        assert int(codes[row]) == int(alone[0])
    sampler = RowSampler(params, None, n_vq=4)
    assert sampler.nq == 4 and sampler.uses(1) is None and sampler.uses(2) == [True, True, True, True, False]
    assert int(sampler.audio(scores, channel=3)[4]) == 0  # a row past its nq draws nothing


@needs_row_invariance
@pytest.mark.parametrize("block, precision", [(None, "float32"), (2, "float32"),
                                              pytest.param(None, "int8", marks=needs_int8)],
                         ids=["one-block", "blocks-of-2", "int8"])
def test_each_rows_hidden_states_are_bit_identical_to_its_solo_run(assets, monkeypatch, block, precision):
    """The strongest form of the guarantee: not only the codes, every global hidden state a request's frames are
    sampled from is the same bits batched as alone (requests are told apart by their nq). With a smaller
    row-invariant range (torch 2.3.1's oneDNN: 15 rows) the rows go through blocks of that many."""
    if block is not None:
        real_products = runner_module.batched_products

        @contextlib.contextmanager
        def small_range(row_invariant):
            with real_products(row_invariant):
                yield block

        monkeypatch.setattr(runner_module, "batched_products", small_range)
    real, seen = runner_module.sample_frame, {}

    def recording(model, h, local, sampler, *args, **kwargs):
        for row, nq in enumerate(sampler.row_nq):
            seen.setdefault(nq, []).append(h[row].clone())
        return real(model, h, local, sampler, *args, **kwargs)

    monkeypatch.setattr(runner_module, "sample_frame", recording)
    requests = [(TEXTS[i % 3], _request(assets, i, nq=16 - i, **dict(SAMPLED, seed=i))) for i in range(6)]
    assets.model.set_weight_precision(precision)
    try:
        with SynthesisEngine(assets.model, **assets.resources(), max_batch_size=6, batch_invariant=True) as eng:
            for text, kwargs in requests:
                _solo(eng, text, **kwargs)
            solo, seen = seen, {}
            for handle in [eng.submit(text, **kwargs) for text, kwargs in requests]:
                handle.result(timeout=120)
    finally:
        assets.model.set_weight_precision("float32")
    assert seen.keys() == solo.keys()
    for nq, states in seen.items():
        assert len(states) == len(solo[nq]) and all(torch.equal(a, b) for a, b in zip(states, solo[nq]))


def test_fast_products_mode_serves_the_same_requests(assets):
    """batch_invariant=False: a lone row takes the one-row path; greedy output still matches a solo run here."""
    requests = [(text, _request(assets, i)) for i, text in enumerate(TEXTS)]
    with SynthesisEngine(assets.model, **assets.resources(), max_batch_size=3, batch_invariant=False) as eng:
        solos = [_solo(eng, text, **kwargs) for text, kwargs in requests]
        handles = [eng.submit(text, **kwargs) for text, kwargs in requests]
        for handle, solo in zip(handles, solos):
            result = handle.result(timeout=120)
            assert all(torch.equal(a, b) for a, b in zip(result["audio_token_ids"], solo["audio_token_ids"]))


@needs_row_invariance
def test_codec_layouts_give_the_same_audio(assets, monkeypatch):
    """A session per stream (the CPU layout) and one multi-slot session for all (accelerators) decode alike."""
    requests = [(text, _request(assets, i)) for i, text in enumerate(TEXTS)]
    outputs = {}
    for separate in (True, False):
        monkeypatch.setattr(codec_output, "separate_codec_sessions", lambda codec, separate=separate: separate)
        with SynthesisEngine(assets.model, **assets.resources(), max_batch_size=3, batch_invariant=True) as eng:
            outputs[separate] = [h.result(timeout=120) for h in [eng.submit(t, **k) for t, k in requests]]
            assert eng._core.streams.shared is not separate
    for per_stream, shared in zip(outputs[True], outputs[False]):
        _assert_same_output(shared, per_stream)


# ------------------------------------------------------------------------------------------- inference(engine=...)


@needs_row_invariance
def test_inference_and_inference_stream_run_on_an_engine(engine, assets):
    kwargs = dict(SAMPLED, prompt_audio=assets.prompt_audio, max_new_frames=7, seed=11)
    solo = _solo(engine, "Hello world.", **kwargs)
    others = [engine.submit(text, **_request(assets, i)) for i, text in enumerate(TEXTS)]
    result = assets.model.inference("Hello world.", engine=engine, **kwargs)
    events = list(assets.model.inference_stream("Hello world.", engine=engine, **kwargs))
    for other in others:
        other.result(timeout=120)
    _assert_same_output(result, solo)
    _assert_same_output(events[-1], solo)
    assert torch.equal(torch.cat([e["waveform"] for e in events[:-1]], dim=-1), events[-1]["waveform"])
    with pytest.raises(ValueError, match="SynthesisEngine"):
        assets.model.inference("Hello.", engine=engine, prompt_audio=assets.prompt_audio, **assets.resources())


def test_engine_of_another_model_is_refused(engine, assets):
    from pipeline_assets import tiny_tts

    with pytest.raises(ValueError, match="does not serve this model"):
        tiny_tts().inference("Hello.", engine=engine, prompt_audio=assets.prompt_audio)


def test_leaving_an_engine_stream_early_frees_its_slot(assets):
    with SynthesisEngine(assets.model, **assets.resources(), max_batch_size=1) as eng:
        stream = assets.model.inference_stream("Long.", engine=eng, prompt_audio=assets.prompt_audio,
                                               max_new_frames=500)
        assert next(stream)["type"] == "audio"
        stream.close()  # the request is cancelled: the only slot serves the next one
        assert eng.submit("Next.", prompt_audio=assets.prompt_audio, max_new_frames=3).result(timeout=120)["frames"] == 3


def test_numerical_failure_on_the_engine_runs_the_request_again_in_float32(assets, monkeypatch):
    def poisoned(model, h, local, sampler, *args, **kwargs):
        frame = real(model, h, local, sampler, *args, **kwargs)
        if model is assets.model:  # the float32 retry model is a copy beside it
            frame.text_finite = torch.zeros_like(frame.text_finite)
        return frame

    real = runner_module.sample_frame
    monkeypatch.setattr(runner_module, "sample_frame", poisoned)
    kwargs = {"prompt_audio": assets.prompt_audio, "max_new_frames": 4}
    with SynthesisEngine(assets.model, **assets.resources()) as eng:
        result = assets.model.inference("Hello.", engine=eng, **kwargs)
        streamed = list(assets.model.inference_stream("Hello.", engine=eng, **kwargs))[-1]
    monkeypatch.setattr(runner_module, "sample_frame", real)
    expected = assets.model.inference("Hello.", **assets.resources(), **kwargs)
    assert result["frames"] == streamed["frames"] == 4
    assert result["float32_fallback"] and streamed["float32_fallback"] and not expected["float32_fallback"]
    assert all(torch.equal(a, b) for a, b in zip(result["audio_token_ids"], expected["audio_token_ids"]))


@needs_int8
def test_int8_rows_are_quantized_each_with_its_own_range(assets):
    """int8 inside batched_products(row_invariant=True): a row's result does not depend on the rows beside it,
    and stays as close to float32 as the one-row int8 product."""
    from linear_kernels import PrecisionLinear

    torch.manual_seed(0)
    layer = PrecisionLinear(64, 96)
    rows = torch.randn(9, 64) * torch.linspace(0.1, 5, 9)[:, None]
    exact = layer(rows).detach()
    layer.set_weight_precision("int8")
    with torch.inference_mode():
        one_row = layer(rows[:1])
        with batched_products(row_invariant=True):
            alone = layer(rows[:1])
            for count in (2, 5, 9):
                assert torch.equal(layer(rows[:count].flip(0))[count - 1], alone[0])
    scale = exact[0].abs().max()
    assert (alone - exact[:1]).abs().max() <= 2 * (one_row - exact[:1]).abs().max() + 1e-6 * scale
    assert (alone - exact[:1]).abs().max() < 0.05 * scale


@needs_int8
def test_a_lone_int8_row_outside_batch_invariance_takes_fbgemms_own_range_product(assets):
    """A lone row's range is its own, so outside batch-invariant steps it takes fbgemm's dynamic product directly
    (the fast kernel); several rows still get each their own range (the result of a row is the same beside others)."""
    from linear_kernels import PrecisionLinear

    torch.manual_seed(1)
    layer = PrecisionLinear(64, 96)
    rows = torch.randn(5, 64) * torch.linspace(0.2, 4, 5)[:, None]
    layer.set_weight_precision("int8")
    with torch.inference_mode():
        fbgemm = torch.ops.quantized.linear_dynamic(rows[:1], layer._packed, True) + layer.bias
        assert torch.equal(layer(rows[:1]), fbgemm)
        assert torch.equal(layer(rows[None, :1]), fbgemm[None])  # (B, T, C) with one row: the same product
        assert torch.equal(layer(rows)[3], layer(rows[2:4])[1])  # several rows: each with its own range
        with batched_products(row_invariant=True):
            assert not torch.equal(layer(rows[:1]), fbgemm)  # batch-invariant: the pinned-row form, as beside others


def test_an_error_inside_a_frame_fails_its_requests_and_the_engine_serves_on(assets, monkeypatch):
    real, calls = runner_module.sample_frame, []

    def broken_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("simulated kernel failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner_module, "sample_frame", broken_once)
    with SynthesisEngine(assets.model, **assets.resources(), max_batch_size=2) as eng:
        failed = eng.submit("Hello.", prompt_audio=assets.prompt_audio, max_new_frames=6)
        with pytest.raises(ValueError, match="simulated"):
            failed.result(timeout=120)
        later = eng.submit("Hello.", prompt_audio=assets.prompt_audio, max_new_frames=6).result(timeout=120)
        assert later["frames"] == 6 and eng.stats()["active"] == 0


def test_the_worker_reads_the_model_in_inference_mode(assets, monkeypatch):
    """The worker builds its core and steps in inference mode: outside it, its ops on parameters that require grad
    take their autograd locks, which deadlocked against a caller's thread indexing the same weights (torch 2.13)."""
    modes = []
    real = runner_module.frame_constants

    def recording(model):
        modes.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        return real(model)

    monkeypatch.setattr(runner_module, "frame_constants", recording)
    assert assets.model.transformer.wte.weight.requires_grad  # the case that deadlocked
    with SynthesisEngine(assets.model, **assets.resources(), max_batch_size=1) as eng:
        eng.submit("Hello.", prompt_audio=assets.prompt_audio, max_new_frames=2).result(timeout=120)
    assert modes and all(inference and not grad for inference, grad in modes)
