"""Pieces written once: sampling defaults, the nq rule, the mode decision, atomic writes (issue 11)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import pipeline
import prompting
import sampling
from modeling_moss_tts_nano import MossTTSNanoForCausalLM
from sampling import SamplingParams


def test_generate_signatures_and_pipeline_defaults_are_the_sampling_params_defaults():
    defaults = {f.name: f.default for f in dataclasses.fields(SamplingParams)}
    for method in (MossTTSNanoForCausalLM.generate, MossTTSNanoForCausalLM.generate_stream):
        parameters = inspect.signature(method).parameters
        assert {name: parameters[name].default for name in defaults} == defaults, method.__name__
        assert parameters["use_kv_cache"].default is True
    assert pipeline.METHOD_DEFAULTS == {**{k: v for k, v in defaults.items() if k != "nq"}, "use_kv_cache": True}
    assert pipeline.SynthesisRequest.__dataclass_fields__["max_new_frames"].default == defaults["max_new_frames"]


def test_one_nq_rule_for_prompts_generation_and_teacher_forcing():
    """The same nq values fail with the same message wherever nq is taken."""
    import verification
    from pipeline_assets import tiny_tts

    model = tiny_tts()
    n_vq = model.config.n_vq
    rows = torch.full((1, 3, n_vq + 1), model.config.audio_pad_token_id)
    rows[..., 0] = 5
    frames = torch.zeros(1, 2, n_vq, dtype=torch.long)
    takers = [lambda nq: sampling.resolve_nq(nq, n_vq), lambda nq: prompting.resolve_nq(nq, n_vq),
              lambda nq: verification.teacher_forced_logits(model, rows, None, frames, nq=nq)]
    for nq in (0, n_vq + 1, True, 2.0):
        for take in takers:
            with pytest.raises(ValueError, match=rf"nq={nq!r} must be an integer within 1\.\.{n_vq}"):
                take(nq)
    assert SamplingParams(nq=3).resolve_nq(n_vq) == 3 and sampling.resolve_nq(None, n_vq) == n_vq


@pytest.mark.parametrize(("mode", "audio", "text", "expected"), [
    (None, True, False, "voice_clone"),
    (None, False, False, "continuation"),
    (None, True, True, "continuation"),
    (None, False, True, "continuation"),  # validate_mode then says what is missing
    ("voice_clone", False, False, "voice_clone"),  # an explicit mode wins
    ("continuation", True, False, "continuation"),
])
def test_one_mode_decision(mode, audio, text, expected):
    assert prompting.infer_mode(mode, has_prompt_audio=audio, has_prompt_text=text) == expected


def test_one_atomic_write_and_the_demo_tokenizer_leaves_nothing_on_failure(tmp_path, monkeypatch):
    import os

    import audio_io
    import tokenization_moss_tts_nano
    import verify_npu

    assert audio_io.write_atomic is verify_npu.write_text_atomic.__globals__["write_atomic"]
    assert tokenization_moss_tts_nano.write_bytes_atomic.__globals__["write_atomic"] is audio_io.write_atomic

    def failing_replace(*args, **kwargs):
        raise OSError("simulated: disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        tokenization_moss_tts_nano.build_demo_tokenizer(str(tmp_path / "tok"))
    assert list((tmp_path / "tok").iterdir()) == []  # no tokenizer.model.tmp or partial file left behind


def test_one_local_decoder_loop_for_generation_recompute_and_teacher_forcing():
    """Issue 11: the cached and recomputing local steps and verification's teacher forcing are one runner."""
    import generation
    import verification
    from pipeline_assets import tiny_tts

    assert verification._local_logits.__globals__["LocalRunner"] is generation.LocalRunner
    assert not hasattr(generation, "_CachedLocal") and not hasattr(generation, "_RecomputeLocal")
    model = tiny_tts()
    attend = model.attention_functions()[1]
    inputs = torch.randn(3, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        whole = generation.LocalRunner(model, 3, 4, attend, use_kv_cache=False).run(inputs)
        for use_kv_cache in (True, False):
            runner = generation.LocalRunner(model, 3, 4, attend, use_kv_cache=use_kv_cache)
            steps = torch.stack([runner.step(inputs[:, p]) for p in range(5)], dim=1)
            assert torch.allclose(steps, whole, atol=1e-5)


def test_one_execution_core_for_every_call(monkeypatch, tmp_path):
    """Issue 16: generate, inference, inference_stream and the engine all step an EngineCore; the old frame loops,
    retry copies and the engine's fallback to the plain pipeline are gone."""
    import engine
    import engine_core
    import generation
    from pipeline_assets import TinyAssets

    gone = {generation: ("generate_frames", "_CachedGlobal", "_RecomputeGlobal", "SlotGlobal"),
            pipeline: ("generate_robust", "stream_robust", "StreamDecoder", "generate_chunks", "generate_continuation",
                       "_engine_fallback"),
            engine: ("_FrameRunner", "_CodecStreams", "_Window")}
    assert [(m.__name__, n) for m, names in gone.items() for n in names if hasattr(m, n)] == []
    steps = []
    real = engine_core.EngineCore.step

    def step(self, *args, **kwargs):
        steps.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(engine_core.EngineCore, "step", step)
    assets = TinyAssets(tmp_path)
    kwargs = dict(prompt_audio=assets.prompt_audio, max_new_frames=2, **assets.resources())
    cores = []
    rows, mask = assets.model.build_inference_input_ids(assets.tokenizer, "Hi.")
    for run in (lambda: assets.model.generate(rows, mask, max_new_frames=2),
                lambda: assets.model.inference("Hi.", **kwargs),
                lambda: list(assets.model.inference_stream("Hi.", **kwargs))):
        steps.clear()
        run()
        assert steps and len(set(map(id, steps))) == 1  # one private core, stepped in this thread
        cores.append(steps[0])
    with engine.SynthesisEngine(assets.model, **assets.resources(), max_batch_size=2) as eng:
        steps.clear()
        eng.submit("Hi.", prompt_audio=assets.prompt_audio, max_new_frames=2).result(timeout=120)
        assert steps and steps[0] is eng._core
