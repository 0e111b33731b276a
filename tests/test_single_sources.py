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
    import teacher_forcing
    from pipeline_assets import tiny_tts

    model = tiny_tts()
    n_vq = model.config.n_vq
    rows = torch.full((1, 3, n_vq + 1), model.config.audio_pad_token_id)
    rows[..., 0] = 5
    frames = torch.zeros(1, 2, n_vq, dtype=torch.long)
    takers = [lambda nq: sampling.resolve_nq(nq, n_vq), lambda nq: prompting.resolve_nq(nq, n_vq),
              lambda nq: teacher_forcing.teacher_forced_logits(model, rows, None, frames, nq=nq)]
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


def test_every_file_writer_keeps_the_old_file_and_leaves_no_partial_one_on_failure(tmp_path, monkeypatch):
    """Audio, the verification report and the demo tokenizer all write through one atomic writer: when the final
    rename fails, the file that was there is untouched and no temporary file is left beside it."""
    import os

    import audio_io
    import tokenization_moss_tts_nano
    import verify_npu

    audio, report_dir = tmp_path / "out.wav", tmp_path / "report"
    report_dir.mkdir()
    audio.write_bytes(b"old audio")
    (report_dir / verify_npu.JSON_NAME).write_text("old report")

    def failing_replace(*args, **kwargs):
        raise OSError("simulated: disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    writers = [lambda: audio_io.write_audio_atomic(audio, torch.zeros(1, 480), 48000),
               lambda: verify_npu.write_text_atomic(report_dir / verify_npu.JSON_NAME, "{}"),
               lambda: tokenization_moss_tts_nano.build_demo_tokenizer(str(tmp_path / "tok"))]
    for write in writers:
        with pytest.raises(OSError, match="disk full"):
            write()
    assert audio.read_bytes() == b"old audio" and (report_dir / verify_npu.JSON_NAME).read_text() == "old report"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [verify_npu.JSON_NAME, "out.wav"]


def test_one_local_decoder_loop_for_generation_recompute_and_teacher_forcing():
    """Issue 11: the cached and recomputing local steps are one runner, step by step equal to one whole run."""
    import generation
    from pipeline_assets import tiny_tts

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
    """Issue 16: generate, inference, inference_stream and the engine all step one EngineCore each."""
    import engine
    import engine_core
    from pipeline_assets import TinyAssets

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


# ------------------------------------------------------------------------------------------------ value ranges


# (setting, value, do_sample (None: the flags' and the server's default, sampling), whether it is allowed)
SETTINGS = [
    ("text_temperature", 0.0, False, True),  # greedy: the temperature is unused (upstream's greedy calls pass any)
    ("audio_temperature", -1.0, False, True),
    ("text_temperature", 0.0, True, False),
    ("audio_temperature", 0.0, None, False),
    ("audio_temperature", 0.5, True, True),
    ("audio_top_k", -1, True, True),  # <= 0 disables top-k
    ("text_top_k", 0, None, True),
    ("audio_top_p", 1.0, True, True),
    ("audio_top_p", 0.0, True, False),
    ("text_top_p", 1.5, False, False),
    ("audio_repetition_penalty", 0.0, False, False),
    ("audio_repetition_penalty", 0.5, True, True),
    ("max_new_frames", 0, False, False),
    ("max_new_frames", 1, False, True),
]


def _request(name, value, do_sample) -> dict:
    return {"input": "x", name: value, **({} if do_sample is None else {"do_sample": do_sample})}


def _cli_accepts(name, value, do_sample) -> bool:
    import cli_common

    parser = cli_common.Parser()
    cli_common.add_sampling_arguments(parser)
    argv = [f"--{name.replace('_', '-')}", str(value)] + ([] if do_sample is None else ["--do-sample", str(do_sample)])
    try:
        parser.parse_args(argv)
    except cli_common.UsageError:
        return False
    return True


def _server_defaults() -> dict:
    import cli_common

    return {**cli_common.CLI_SAMPLING_DEFAULTS, "max_new_frames": cli_common.CLI_MAX_NEW_FRAMES}


def _server_accepts(name, value, do_sample) -> bool:
    import json

    from speech_request import ApiError, RequestLimits, engine_arguments, parse_request

    request = parse_request(json.dumps(_request(name, value, do_sample)).encode())
    try:
        engine_arguments(request, _server_defaults(), {}, RequestLimits(), lambda text: 1)
    except ApiError:
        return False
    return True


@pytest.mark.parametrize(("name", "value", "do_sample", "allowed"), SETTINGS)
def test_the_library_the_flags_and_the_server_accept_the_same_generation_settings(name, value, do_sample, allowed):
    sampling_on = True if do_sample is None else do_sample  # the flags' and the server's default: sampling
    try:
        SamplingParams(**{name: value, "do_sample": sampling_on})
        library = True
    except ValueError:
        library = False
    assert (library, _cli_accepts(name, value, do_sample), _server_accepts(name, value, do_sample)) == (allowed,) * 3


@pytest.mark.parametrize(("name", "value", "do_sample", "allowed"), SETTINGS)
def test_the_openapi_schema_accepts_the_same_generation_settings(name, value, do_sample, allowed):
    jsonschema_rs = pytest.importorskip("jsonschema_rs", reason="schema validation needs jsonschema_rs (schemathesis)")
    from speech_openapi import request_schema
    from speech_request import RequestLimits, VoiceId

    schema = {**request_schema(RequestLimits(), _server_defaults()),
              "components": {"schemas": {"VoiceId": VoiceId.model_json_schema()}}}
    assert jsonschema_rs.is_valid(schema, _request(name, value, do_sample)) == allowed


def _parse_model_flags(argv: list[str]) -> None:
    import cli_common

    parser = cli_common.Parser()
    cli_common.add_model_arguments(parser)
    parser.parse_args(argv)


@pytest.mark.parametrize(("seed", "allowed"), [(0, True), (2**32 - 1, True), (2**32, False), (-1, False)])
def test_the_library_the_flags_and_the_server_accept_the_same_seeds(seed, allowed):
    import json

    import devices
    from speech_request import ApiError, RequestLimits, engine_arguments, parse_request

    outcomes = []
    for check in (lambda: devices.check_seed(seed), lambda: _parse_model_flags(["--seed", str(seed)]),
                  lambda: engine_arguments(parse_request(json.dumps({"input": "x", "seed": seed}).encode()),
                                           _server_defaults(), {}, RequestLimits(), lambda text: 1)):
        try:
            check()
            outcomes.append(True)
        except (ValueError, ApiError):  # the flags' UsageError is a ValueError
            outcomes.append(False)
    assert outcomes == [allowed] * 3


def test_verify_npu_takes_every_dtype_name_the_library_takes():
    """One table of dtype names: whatever `devices.resolve_dtype` accepts, verify_npu's --dtypes accepts as the
    same dtype, and tolerances exist for it."""
    import devices
    import verify_npu
    from verification_metrics import tolerance_for

    for name, dtype in devices.DTYPE_ALIASES.items():
        assert devices.resolve_dtype(name, "cpu") == dtype
        assert verify_npu.parse_dtype_name(name.upper()) == dtype
        tolerance_for(name)
    assert verify_npu.parse_dtype_name("auto") is None
    with pytest.raises(ValueError, match="--dtypes entry 'float64'"):
        verify_npu.parse_dtype_name("float64")
