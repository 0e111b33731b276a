"""verify_npu.py and its modules (verification, verification_metrics, teacher_forcing): metrics, tolerances,
teacher forcing, target planning and the CLI end to end.

The CLI runs use tiny demo assets (2-layer 64-wide TTS model, 32-wide codec) patched in for the released-size demo
builder, so each run takes seconds on a CPU.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

import compiled_step
import demo
import devices
import teacher_forcing
import verification
import verification_metrics
import verify_npu
from atomic_files import write_text_atomic
from audio_io import write_audio_atomic
from modeling_moss_tts_nano import MossTTSNanoForCausalLM
from tokenization_moss_tts_nano import build_demo_tokenizer

TINY_GPT2 = {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_inner": 128, "vocab_size": 1024}
CUDA_PRESENT = torch.cuda.is_available()


def _tiny_codec_overrides() -> dict:
    released = json.loads((Path(demo.__file__).parent / "audio_tokenizer" / "config.json").read_text())

    def shrink(entries: list[dict]) -> list[dict]:
        small = [dict(entry) for entry in entries]
        for entry in small:
            if entry["module_type"] == "Transformer":
                entry.update(d_model=32, dim_feedforward=64, num_heads=2, num_layers=1)
        return small

    return {"encoder_kwargs": shrink(released["encoder_kwargs"]), "decoder_kwargs": shrink(released["decoder_kwargs"])}


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the hand-offs cost seconds."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> demo.DemoAssets:
    directory = tmp_path_factory.mktemp("tiny_tokenizer")
    return demo.DemoAssets(
        model=demo.build_demo_model(0, {"gpt2_config": TINY_GPT2}),
        tokenizer=build_demo_tokenizer(directory),
        codec=demo.build_demo_codec(0, _tiny_codec_overrides()),
        prompt_audio=demo.demo_prompt_audio(seconds=0.25, seed=0),
        workdir=None,
    )


@pytest.fixture
def tiny_demo(monkeypatch: pytest.MonkeyPatch, tiny_assets: demo.DemoAssets) -> demo.DemoAssets:
    """Make `verify_npu --demo` use the tiny assets instead of the released-size ones."""
    monkeypatch.setattr(verify_npu, "build_demo_assets", lambda seed=0: tiny_assets)
    return tiny_assets


def _run(tmp_path: Path, *extra: str) -> tuple[int, dict | None]:
    code = verify_npu.main(["--demo", "--output-dir", str(tmp_path), "--max-new-frames", "3", *extra])
    report_path = tmp_path / verification.JSON_NAME
    return code, json.loads(report_path.read_text(encoding="utf-8")) if report_path.exists() else None


def _result(report: dict, device: str, dtype: str | None) -> dict:
    return next(r for r in report["results"] if r["device"] == device and r["dtype"] == dtype)


# ---------------------------------------------------------------------------------------------------- metrics


def test_cosine_similarity_cases() -> None:
    a = torch.tensor([1.0, 2.0, 3.0])
    assert verification_metrics.cosine_similarity(a, a) == pytest.approx(1.0)
    assert verification_metrics.cosine_similarity(a, -a) == pytest.approx(-1.0)
    orthogonal = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    assert verification_metrics.cosine_similarity(*orthogonal) == pytest.approx(0.0)
    assert verification_metrics.cosine_similarity(torch.zeros(3), torch.zeros(3)) == 1.0
    assert verification_metrics.cosine_similarity(torch.zeros(3), a) == 0.0
    assert math.isnan(verification_metrics.cosine_similarity(a, torch.tensor([1.0, float("nan"), 3.0])))
    assert verification_metrics.cosine_similarity(a.bfloat16(), a) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        verification_metrics.cosine_similarity(a, torch.ones(4))


def test_snr_and_max_abs_difference() -> None:
    reference = torch.ones(2, 100)
    assert verification_metrics.snr_db(reference, reference) == math.inf
    assert verification_metrics.snr_db(reference, 0.9 * reference) == pytest.approx(20.0)  # noise power 1/100 of signal
    assert verification_metrics.snr_db(reference, 0.99 * reference) == pytest.approx(40.0)
    assert verification_metrics.snr_db(torch.zeros(4), torch.ones(4)) == -math.inf
    assert math.isnan(verification_metrics.snr_db(reference, torch.full((2, 100), float("inf"))))
    assert verification_metrics.max_abs_difference(reference, 0.75 * reference) == pytest.approx(0.25)
    assert verification_metrics.max_abs_difference(torch.zeros(0), torch.zeros(0)) == 0.0
    assert math.isnan(verification_metrics.max_abs_difference(reference, torch.full((2, 100), float("nan"))))
    with pytest.raises(ValueError, match="shapes differ"):
        verification_metrics.snr_db(reference, torch.ones(100))


def test_first_divergent_frame_and_agreement() -> None:
    reference = torch.arange(20).reshape(5, 4)
    assert verification_metrics.first_divergent_frame(reference, reference.clone()) is None
    assert verification_metrics.code_agreement(reference, reference.clone()) == 1.0
    changed = reference.clone()
    changed[2, 3] = 99
    changed[4, 0] = 99
    assert verification_metrics.first_divergent_frame(reference, changed) == 2
    assert verification_metrics.code_agreement(reference, changed) == pytest.approx(18 / 20)
    assert verification_metrics.first_divergent_frame(reference, reference[:3]) == 3  # stopped early
    assert verification_metrics.code_agreement(reference, reference[:3]) == pytest.approx(12 / 20)
    longer = torch.cat([reference, reference[:1]])
    assert verification_metrics.first_divergent_frame(reference, longer) == 5
    assert verification_metrics.first_divergent_frame(reference[:0], reference[:0]) is None
    with pytest.raises(ValueError, match="equal channels"):
        verification_metrics.first_divergent_frame(reference, reference[:, :2])


def test_tolerance_lookup() -> None:
    assert verification_metrics.tolerance_for(torch.float32) is verification_metrics.TOLERANCES["float32"]
    assert verification_metrics.tolerance_for("fp16") is verification_metrics.TOLERANCES["float16"]
    assert verification_metrics.tolerance_for(" BF16 ") is verification_metrics.TOLERANCES["bfloat16"]
    fp32, fp16, bf16 = (verification_metrics.TOLERANCES[name] for name in ("float32", "float16", "bfloat16"))
    assert fp32.min_cosine > fp16.min_cosine > bf16.min_cosine  # stricter for more precise dtypes
    assert fp32.max_abs_rel < fp16.max_abs_rel < bf16.max_abs_rel
    assert fp32.codec_max_abs_rel == 1e-4 and fp16.codec_max_abs_rel == bf16.codec_max_abs_rel == 5e-2  # CODEC §7
    assert fp32.min_divergence_fraction > 0 and fp16.min_divergence_fraction == 0.0
    assert all(tol.rationale for tol in verification_metrics.TOLERANCES.values())
    for bad in ("int8", torch.float64, "auto"):
        with pytest.raises(ValueError, match="has no tolerances"):
            verification_metrics.tolerance_for(bad)


# ---------------------------------------------------------------------------------------------------- teacher forcing


def _left_padded_prompt(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    batch = torch.full((2, 12, 17), 1024, dtype=torch.long)
    batch[..., 0] = 3
    mask = torch.zeros(2, 12, dtype=torch.bool)
    for row, length in enumerate((12, 7)):
        rows = batch[row, 12 - length :]
        rows[:, 0] = torch.randint(10, 1024, (length,), generator=generator)
        rows[length // 2 :, 0] = 8
        rows[length // 2 :, 1:] = torch.randint(0, 1024, (length - length // 2, 16), generator=generator)
        mask[row, 12 - length :] = True
    return batch, mask


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("nq", [16, 8, 1])
def test_teacher_forced_argmax_reproduces_greedy_generate(tiny_assets: demo.DemoAssets, attention: str,
                                                          nq: int) -> None:
    model = copy.deepcopy(tiny_assets.model)  # the fixture is shared: leave its attention setting alone
    model.set_attention_implementation(attention)
    input_ids, mask = _left_padded_prompt()
    out = model.generate(input_ids, mask, max_new_frames=5, do_sample=False, audio_repetition_penalty=1.0, nq=nq)
    assert out.num_frames.tolist() == [5, 5]  # every frame is real: the demo bias keeps both rows going
    logits = teacher_forcing.teacher_forced_logits(model, input_ids, mask, out.audio_token_ids, nq=nq)
    assert logits.text.shape == (2, 5, 2) and logits.audio.shape == (2, 5, nq, 1024)
    assert torch.equal(logits.argmax_codes(), out.audio_token_ids[..., :nq])
    assert bool((logits.text.argmax(-1) == 0).all())  # "continue" won every text decision, as in generation


def test_teacher_forced_logits_are_causal_in_the_fed_codes(tiny_assets: demo.DemoAssets) -> None:
    model = tiny_assets.model
    input_ids, mask = _left_padded_prompt()
    codes = model.generate(input_ids, mask, max_new_frames=3, do_sample=False).audio_token_ids
    changed = codes.clone()
    changed[:, 0, 5] = (changed[:, 0, 5] + 1) % 1024
    base = teacher_forcing.teacher_forced_logits(model, input_ids, mask, codes)
    other = teacher_forcing.teacher_forced_logits(model, input_ids, mask, changed)
    assert not torch.equal(base.text[:, 1], other.text[:, 1])  # frame 1's decision sees frame 0's codes
    assert torch.equal(base.text[:, 0], other.text[:, 0])  # frame 0's decision precedes its codes
    assert torch.equal(base.audio[:, 0, :6], other.audio[:, 0, :6])  # codebooks 0..5 precede code 5
    assert not torch.equal(base.audio[:, 0, 6], other.audio[:, 0, 6])
    assert not torch.equal(base.audio[:, 1], other.audio[:, 1])


def test_teacher_forced_logits_rejects_bad_arguments(tiny_assets: demo.DemoAssets) -> None:
    model = tiny_assets.model
    input_ids, mask = _left_padded_prompt()
    codes = torch.zeros(2, 2, 16, dtype=torch.long)
    with pytest.raises(ValueError, match="audio_token_ids"):
        teacher_forcing.teacher_forced_logits(model, input_ids, mask, codes[:, :0])
    with pytest.raises(ValueError, match="audio_token_ids"):
        teacher_forcing.teacher_forced_logits(model, input_ids, mask, codes[:1])
    with pytest.raises(ValueError, match="nq=17"):
        teacher_forcing.teacher_forced_logits(model, input_ids, mask, codes, nq=17)
    with pytest.raises(ValueError, match="attention_mask"):
        teacher_forcing.teacher_forced_logits(model, input_ids, mask[:, 1:], codes)


# ---------------------------------------------------------------------------------------------------- planning


def test_plan_targets_defaults_and_duplicates() -> None:
    targets = verify_npu.plan_targets(["cpu", "cpu"], None)
    assert [(str(t.device), t.dtype) for t in targets] == [("cpu", torch.float32)]  # cpu default dtype is float32
    assert targets[0].is_reference
    targets = verify_npu.plan_targets(["cpu"], ["bf16", "auto", "float32", "bfloat16"])
    assert [t.dtype for t in targets] == [torch.bfloat16, torch.float32]
    assert not targets[0].is_reference and targets[0].label == "cpu_bfloat16"
    default = verify_npu.plan_targets()
    assert default[0].device == torch.device("cpu") and default[0].dtype == torch.float32


@pytest.mark.skipif(CUDA_PRESENT, reason="needs a machine without a usable CUDA device")
def test_plan_targets_reports_unavailable_devices() -> None:
    targets = verify_npu.plan_targets(["cuda", "cpu"], ["float32"])
    assert targets[0].unavailable and "cuda" in targets[0].unavailable and targets[0].device is None
    assert targets[1].device == torch.device("cpu")
    assert "cuda" not in verify_npu.available_device_specs()


@pytest.mark.parametrize("devices_arg, dtypes_arg, message", [
    (["gpu"], None, "not supported"),
    (["cpu"], ["float64"], "not supported"),
])
def test_plan_targets_rejects_bad_names(devices_arg, dtypes_arg, message) -> None:
    with pytest.raises(ValueError, match=message):
        verify_npu.plan_targets(devices_arg, dtypes_arg)


# ---------------------------------------------------------------------------------------------------- CLI


def test_main_demo_cpu_float32_and_bfloat16_pass(tiny_demo, tmp_path: Path, capsys) -> None:
    code, report = _run(tmp_path, "--devices", "cpu", "--dtypes", "float32,bfloat16")
    assert code == 0
    assert report["format"] == verification.REPORT_FORMAT and report["overall_pass"] is True
    assert report["environment"]["torch"] == torch.__version__ and "transformers" in report["environment"]
    assert set(report["tolerances"]) == {"float32", "float16", "bfloat16"}
    assert report["reference"]["ok"] and report["reference"]["greedy_frames"] == 3
    assert report["reference"]["prompt_frames"] == 3  # 0.25 s of prompt audio
    assert report["summary"] == {"targets": 2, "passed": 2, "unavailable": 0}
    fp32, bf16 = _result(report, "cpu", "float32"), _result(report, "cpu", "bfloat16")
    expected = ["load", "hidden_states", "teacher_forced_logits", "greedy_codes", "codec_decode", "inference"]
    for result in (fp32, bf16):
        assert list(result["checks"]) == expected and result["passed"] and result["available"]
        assert all(check["passed"] and check["error"] is None for check in result["checks"].values())
    # the reference compared with itself: exact agreement, said so
    assert fp32["is_reference"] and not bf16["is_reference"]
    assert fp32["checks"]["teacher_forced_logits"]["audio_cosine"] == 1.0
    assert fp32["checks"]["greedy_codes"]["identical"] and fp32["checks"]["codec_decode"]["snr_db"] == "inf"
    assert fp32["checks"]["hidden_states"]["note"] == verification.REFERENCE_NOTE
    # bfloat16 really ran and differs a little
    logits = bf16["checks"]["teacher_forced_logits"]
    assert 0.995 <= logits["audio_cosine"] < 1.0 and logits["audio_max_abs_diff"] > 0
    assert 15.0 <= bf16["checks"]["codec_decode"]["snr_db"] < 200
    assert bf16["checks"]["load"]["parameter_dtype"] == "bfloat16"
    assert bf16["checks"]["inference"]["frames"] == 3 and bf16["checks"]["inference"]["float32_fallback"] is False
    assert Path(bf16["checks"]["inference"]["audio_path"]).is_file()
    table = (tmp_path / verification.TABLE_NAME).read_text(encoding="utf-8")
    assert "| cpu | bfloat16 |" in table and "PASS" in table and table in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_main_compile_runs_the_checks_with_the_compiled_step_and_says_so(tiny_demo, tmp_path: Path, capsys,
                                                                        monkeypatch) -> None:
    """--compile: the CPU float32 target's checks run the compiled frame step against the eager reference (dynamo's
    tracing-only "eager" backend keeps this cheap; tests/test_compiled_step.py runs inductor itself)."""
    monkeypatch.setattr(compiled_step, "_auto_backend", lambda model: "eager")
    code, report = _run(tmp_path, "--devices", "cpu", "--dtypes", "float32", "--compile")
    assert code == 0 and report["overall_pass"] and report["settings"]["compile"] is True
    fp32 = _result(report, "cpu", "float32")
    assert fp32["frame_step"].startswith("compiled (eager, ") and fp32["frame_step"] != "compiled (eager, 0 graphs)"
    logits = fp32["checks"]["teacher_forced_logits"]
    assert logits["step"].startswith("compiled (eager, ") and logits["argmax_agreement"] == 1.0
    assert logits["audio_cosine"] >= verification_metrics.tolerance_for("float32").min_cosine
    assert fp32["checks"]["greedy_codes"]["identical"]
    assert fp32["checks"]["hidden_states"]["note"] is None  # measured, not the reference compared with itself
    assert report["reference"]["note"] == verification.COMPILE_NOTE
    assert f"frame step (compiled step requested): cpu float32: {fp32['frame_step']}" in capsys.readouterr().out


def test_main_names_the_eager_step_and_why_compile_fell_back(tiny_demo, tmp_path: Path, capsys, monkeypatch) -> None:
    code, report = _run(tmp_path / "eager", "--devices", "cpu", "--dtypes", "float32")
    assert code == 0 and _result(report, "cpu", "float32")["frame_step"] == "eager"
    assert "frame step (eager step requested): cpu float32: eager" in capsys.readouterr().out
    monkeypatch.setattr(compiled_step, "torch_version", lambda: (2, 2))  # as a torch too old to compile
    code, report = _run(tmp_path / "old", "--devices", "cpu", "--dtypes", "float32", "--compile")
    step = _result(report, "cpu", "float32")["frame_step"]
    assert code == 0 and step.startswith("eager (compile fell back: torch ") and "older than 2.3" in step
    assert _result(report, "cpu", "float32")["checks"]["teacher_forced_logits"]["step"] == "eager"
    assert f"cpu float32: {step}" in capsys.readouterr().out


@pytest.mark.skipif(CUDA_PRESENT, reason="needs a machine without a usable CUDA device")
def test_main_reports_an_unavailable_requested_device(tiny_demo, tmp_path: Path, capsys) -> None:
    code, report = _run(tmp_path, "--devices", "cpu,cuda", "--dtypes", "float32")
    assert code == 1
    assert report["overall_pass"] is False and report["summary"]["unavailable"] == 1
    assert _result(report, "cpu", "float32")["passed"]
    cuda = _result(report, "cuda", None)
    assert cuda["available"] is False and cuda["passed"] is False and "cuda" in cuda["error"]
    out = capsys.readouterr()
    assert "| cuda | - | unavailable |" in out.out and "Traceback" not in out.err


def test_main_checkpoint_directory_with_prompt_audio_file(tiny_assets: demo.DemoAssets, tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint"
    tiny_assets.model.save_pretrained(checkpoint)
    build_demo_tokenizer(checkpoint)
    tiny_assets.codec.save_pretrained(checkpoint / "audio_tokenizer")  # found there by the pipeline
    write_audio_atomic(tmp_path / "ref.wav", tiny_assets.prompt_audio, 48000)
    output = tmp_path / "out"
    code = verify_npu.main(["--model-path", str(checkpoint), "--prompt-audio-path", str(tmp_path / "ref.wav"),
                            "--devices", "cpu", "--dtypes", "float32", "--output-dir", str(output),
                            "--max-new-frames", "3", "--local-files-only", "--attn-implementation", "eager"])
    report = json.loads((output / verification.JSON_NAME).read_text(encoding="utf-8"))
    assert code == 0 and report["overall_pass"]
    assert report["model"] == f"checkpoint: {checkpoint}" and report["settings"]["mode"] == "voice_clone"
    assert report["reference"]["prompt_frames"] == 3
    assert _result(report, "cpu", "float32")["checks"]["load"]["attention"] == {"global": "eager", "local": "eager"}


@pytest.mark.skipif(CUDA_PRESENT, reason="needs a machine without a usable CUDA device")
def test_main_with_only_unavailable_devices_skips_the_reference(tiny_demo, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(verify_npu, "build_demo_assets", lambda seed=0: pytest.fail("nothing should be built"))
    monkeypatch.setattr(verification, "compute_reference", lambda *a: pytest.fail("no reference needed"))
    code, report = _run(tmp_path, "--devices", "cuda")
    assert code == 1 and report["results"][0]["available"] is False


def test_main_simulated_nan_in_bfloat16_fails_those_checks(tiny_demo, tmp_path: Path, monkeypatch) -> None:
    original = MossTTSNanoForCausalLM.embed_rows

    def nan_in_bfloat16(self, input_ids):
        hidden = original(self, input_ids)
        return torch.full_like(hidden, float("nan")) if hidden.dtype == torch.bfloat16 else hidden

    monkeypatch.setattr(MossTTSNanoForCausalLM, "embed_rows", nan_in_bfloat16)
    code, report = _run(tmp_path, "--devices", "cpu", "--dtypes", "float32,bfloat16")
    assert code == 1 and report["overall_pass"] is False
    assert _result(report, "cpu", "float32")["passed"]
    checks = _result(report, "cpu", "bfloat16")["checks"]
    assert checks["load"]["passed"] and checks["codec_decode"]["passed"]
    assert not checks["hidden_states"]["passed"] and checks["hidden_states"]["finite"] is False
    assert not checks["teacher_forced_logits"]["passed"] and checks["teacher_forced_logits"]["finite"] is False
    assert checks["teacher_forced_logits"]["audio_cosine"] == "nan"
    assert not checks["greedy_codes"]["passed"] and "Non-finite" in checks["greedy_codes"]["error"]
    # the pipeline's float32 retry rescued the sampled run; the check still fails and says why
    assert not checks["inference"]["passed"] and checks["inference"]["float32_fallback"] is True
    assert "float32 retry" in checks["inference"]["note"]
    table = (tmp_path / verification.TABLE_NAME).read_text(encoding="utf-8")
    assert "Non-finite" in table and "FAIL" in table


def test_main_reference_failure_is_reported_not_raised(tiny_demo, tmp_path: Path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("simulated reference failure")

    monkeypatch.setattr(verification, "compute_reference", broken)
    code, report = _run(tmp_path, "--devices", "cpu", "--dtypes", "float32")
    assert code == 1
    assert report["reference"]["ok"] is False and "simulated reference failure" in report["reference"]["error"]
    checks = _result(report, "cpu", "float32")["checks"]
    assert checks["load"]["passed"] and checks["inference"]["passed"]  # the rest still ran
    assert "no CPU float32 reference" in checks["teacher_forced_logits"]["error"]


@pytest.mark.parametrize("argv, message", [
    (["--demo", "--devices", "gpu"], "not supported"),
    (["--demo", "--dtypes", "float64"], "not supported"),
    (["--demo", "--devices", "cpu,"], "empty entry"),
    (["--demo", "--device", "cpu", "--devices", "cpu"], "both given"),
    (["--demo", "--dtype", "float32", "--dtypes", "bfloat16"], "both given"),
    (["--demo", "--max-new-frames", "0"], "must be >= 1"),
    (["--demo", "--prompt-audio-path", "/nonexistent/ref.wav"], "ref.wav"),
    (["--devices", "cpu"], "no model given"),
    (["--demo", "--no-such-flag"], "unrecognized"),
])
def test_main_usage_errors_exit_2(argv, message, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(verify_npu, "build_demo_assets", lambda seed=0: pytest.fail("nothing should be built"))
    assert verify_npu.main([*argv, "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / verification.JSON_NAME).exists()


def test_device_flag_is_an_alias_of_devices(tiny_demo, tmp_path: Path) -> None:
    code, report = _run(tmp_path, "--device", "cpu", "--dtype", "float32")
    assert code == 0 and [(r["device"], r["dtype"]) for r in report["results"]] == [("cpu", "float32")]


def test_report_writing_is_strict_json_and_atomic(tmp_path: Path) -> None:
    report = {"value": math.inf, "nested": [{"x": -math.inf, "y": math.nan}], "ok": 1.5}
    assert verify_npu._json_safe(report) == {"value": "inf", "nested": [{"x": "-inf", "y": "nan"}], "ok": 1.5}
    path = write_text_atomic(tmp_path / "sub" / "a.txt", "first")
    write_text_atomic(path, "second")
    assert path.read_text() == "second" and [p.name for p in path.parent.iterdir()] == ["a.txt"]


def test_smoke_run_forces_a_few_frames_so_a_model_that_ends_at_once_still_runs(tiny_assets, tmp_path: Path) -> None:
    from pipeline_assets import tiny_tts

    ends_at_once = tiny_tts(push=-40.0)
    assert ends_at_once.inference("Hi.", text_tokenizer=tiny_assets.tokenizer, audio_tokenizer=tiny_assets.codec,
                                  max_new_frames=6, do_sample=False)["frames"] == 0
    settings = verification.VerificationSettings(text="Hi.", max_new_frames=6, inference_kwargs={"do_sample": True})
    outcome = verification.run_inference_smoke(ends_at_once, tiny_assets.tokenizer, tiny_assets.codec, None, settings,
                                               "cpu_float32")
    assert outcome.passed and outcome.metrics["frames"] >= verification.SMOKE_MIN_FRAMES == 4
    assert outcome.metrics["min_frames"] == 4 and outcome.note is None


def test_smoke_run_that_ends_early_says_so(tiny_demo, tmp_path: Path, monkeypatch) -> None:
    real = verification.run_inference_smoke

    def ends_at_once(model, *args, **kwargs):
        monkeypatch.setattr(model, "inference", lambda *a, **k: {
            "waveform": torch.zeros(2, 0), "frames": 0, "sample_rate": 48000, "float32_fallback": False,
            "audio_path": None})
        return real(model, *args, **kwargs)

    monkeypatch.setattr(verification, "run_inference_smoke", ends_at_once)
    code, report = _run(tmp_path, "--devices", "cpu", "--dtypes", "float32")
    assert code == 1
    check = _result(report, "cpu", "float32")["checks"]["inference"]
    assert not check["passed"] and check["note"] == "the model ended after 0 frames although 3 were forced"
    table = (tmp_path / verification.TABLE_NAME).read_text(encoding="utf-8")
    assert "inference: the model ended after 0 frames" in table and "tolerances" not in table.split("Problems:")[1].split("\n")[1]


def test_report_names_the_kernel_path_each_device_ran(tiny_demo, tmp_path: Path, monkeypatch, capsys) -> None:
    for fast in (True, False):
        monkeypatch.setenv("MOSS_TTS_CPU_FAST_PATHS", "1" if fast else "0")
        devices.clear_caches()
        code, report = _run(tmp_path / str(fast), "--devices", "cpu", "--dtypes", "float32")
        load = _result(report, "cpu", "float32")["checks"]["load"]
        assert code == 0
        assert load["rope"] == ("complex (cpu fast path)" if fast else "real")
        assert load["linear"].endswith("(cpu fast path)") if fast else load["linear"] == "F.linear"
        assert f"rope: {load['rope']}, linear: {load['linear']}" in capsys.readouterr().out
    devices.clear_caches()
