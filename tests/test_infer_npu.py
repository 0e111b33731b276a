"""infer_npu.main([...]): demo mode, an official-format checkpoint from ../shared/golden, and every user mistake."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import soundfile
import torch

import demo
import infer_npu
from linear_kernels import resolve_linear_kernel
from pipeline_assets import TinyAssets
from rotary import resolve_rotary_kernel

ROOT = Path(__file__).resolve().parents[1]
GREEDY = ["--do-sample", "false"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    assets = TinyAssets(tmp_path_factory.mktemp("tok"))
    assets.workdir = None
    return assets


@pytest.fixture
def tiny_demo(tiny, monkeypatch):
    monkeypatch.setattr(demo, "build_demo_assets", lambda seed=0: tiny)
    return tiny


def _summary(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    line = [line for line in out if line.startswith("summary: ")][-1]
    return dict(part.split("=", 1) for part in line[len("summary: "):].split())


def test_demo_writes_the_requested_frames(tiny_demo, tmp_path, capsys):
    out = tmp_path / "demo.wav"
    code = infer_npu.main(["--demo", "--max-new-frames", "4", "--output-path", str(out), "--text", "Hi there.", *GREEDY])
    assert code == 0
    data, rate = soundfile.read(str(out), always_2d=True)
    assert rate == 48000 and data.shape == (4 * 3840, 2)
    summary = _summary(capsys)
    assert summary["device"] == "cpu" and summary["dtype"] == "float32" and summary["frames"] == "4"
    assert summary["attention"] == "sdpa/sdpa" and summary["audio"] == "0.32s" and float(summary["rtf"]) > 0
    assert summary["rope"] == resolve_rotary_kernel("cpu", 4, 16)  # "complex" unless MOSS_TTS_CPU_FAST_PATHS=0
    assert summary["linear"] == resolve_linear_kernel("cpu", torch.float32)
    assert summary["output"] == str(out)


def test_demo_stream_equals_non_stream_and_reports_latency(tiny_demo, tmp_path, capsys):
    args = ["--demo", "--max-new-frames", "5", "--text", "Hello world. How are you doing today my friend?",
            "--voice-clone-max-text-tokens", "25", *GREEDY]
    assert infer_npu.main([*args, "--output-path", str(tmp_path / "a.wav")]) == 0
    capsys.readouterr()
    assert infer_npu.main([*args, "--stream", "--output-path", str(tmp_path / "b.wav")]) == 0
    assert "first_audio" in _summary(capsys)
    a, _ = soundfile.read(str(tmp_path / "a.wav"))
    b, _ = soundfile.read(str(tmp_path / "b.wav"))
    assert a.shape == b.shape and abs(a - b).max() <= 2 / 32768  # 16-bit files: at most a rounding step apart


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An official-format directory: golden TTS weights + real tokenizer + golden codec in audio_tokenizer/."""
    from conftest import shared_path

    tts, codec = shared_path("golden", "tts_tiny"), shared_path("golden", "codec_tiny")
    tokenizer = shared_path("data", "tokenizer.model")
    root = tmp_path_factory.mktemp("ckpt")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tts / name, root / name)
    shutil.copy(tokenizer, root / "tokenizer.model")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(ROOT / name, root / name)
    (root / "audio_tokenizer").mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(codec / name, root / "audio_tokenizer" / name)
    return root


def test_official_checkpoint_voice_clone(checkpoint, tmp_path, capsys):
    from conftest import shared_path

    out = tmp_path / "out" / "vc.wav"
    code = infer_npu.main(["--model-path", str(checkpoint), "--prompt-audio-path", str(shared_path("data", "zh_1.wav")),
                           "--text", "Hello world.", "--max-new-frames", "6", "--output-path", str(out), *GREEDY])
    assert code == 0
    data, rate = soundfile.read(str(out), always_2d=True)
    assert rate == 48000 and data.shape[1] == 2 and data.shape[0] % 3840 == 0 and 0 < data.shape[0] <= 6 * 3840
    assert int(_summary(capsys)["frames"]) == data.shape[0] // 3840


def test_official_checkpoint_plain_continuation_stream(checkpoint, tmp_path):
    out = tmp_path / "c.wav"
    code = infer_npu.main(["--model-path", str(checkpoint), "--text", "今天天气真好。", "--max-new-frames", "4",
                           "--stream", "--output-path", str(out), *GREEDY])
    assert code == 0 and out.exists()


def _broken_checkpoint(checkpoint, tmp_path, mutate) -> Path:
    target = tmp_path / "broken"
    shutil.copytree(checkpoint, target)
    mutate(target)
    return target


def _truncate(directory: Path) -> None:
    data = (directory / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(data[: len(data) // 3])


def _wrong_shapes(directory: Path) -> None:
    config = json.loads((directory / "config.json").read_text())
    config["gpt2_config"]["n_inner"] = 128
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: (d / "model.safetensors").unlink(), "missing weights"),
        (lambda d: (d / "tokenizer.model").unlink(), "missing tokenizer.model"),
        (lambda d: (d / "config.json").unlink(), "missing config.json"),
        (_truncate, "model.safetensors"),
        (_wrong_shapes, "do not match"),
    ],
)
def test_broken_checkpoint_is_one_clear_line(checkpoint, tmp_path, capsys, mutate, message):
    directory = _broken_checkpoint(checkpoint, tmp_path, mutate)
    out = tmp_path / "x.wav"
    code = infer_npu.main(["--model-path", str(directory), "--text", "Hi.", "--output-path", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, code, message",
    [
        ([], 2, "no model given"),
        (["--model-path", "/nonexistent/dir"], 2, "is not a directory"),
        (["--model-path", "no-such-org/no-such-model", "--local-files-only"], 1, "pass its directory as --model-path"),
        (["--demo", "--text-top-p", "2"], 2, "--text-top-p"),
        (["--demo", "--max-new-frames", "0"], 2, "--max-new-frames"),
        (["--demo", "--max-new-frames", "-5"], 2, "--max-new-frames"),
        (["--demo", "--audio-temperature", "0"], 2, "--audio-temperature"),
        (["--demo", "--nq", "17"], 2, "--nq"),
        (["--demo", "--device", "cuda"], 1, "cuda"),
        (["--demo", "--device", "npu"], 1, "torch_npu"),
        (["--demo", "--device", "tpu"], 2, "tpu"),
        (["--demo", "--text", "   "], 2, "text"),
        (["--demo", "--prompt-audio-path", "/nonexistent.wav"], 2, "not found"),
        (["--demo", "--text-file", "/nonexistent.txt"], 2, "--text-file"),
        (["--demo", "--mode", "voice_clone", "--prompt-text", "Hello"], 2, "prompt"),
    ],
)
def test_user_mistakes_exit_with_one_line(tiny_demo, tmp_path, capsys, argv, code, message):
    out = tmp_path / "x.wav"
    assert infer_npu.main([*argv, "--output-path", str(out)]) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err
    assert len(err.splitlines()) == 1
    assert not out.exists()


def test_unwritable_output_location(tiny_demo, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = infer_npu.main(["--demo", "--max-new-frames", "2", "--output-path", str(blocker / "out.wav")])
    assert code == 1 and "cannot write" in capsys.readouterr().err


def test_verbose_shows_the_traceback(tiny_demo, tmp_path, capsys):
    assert infer_npu.main(["--demo", "--text-file", "/nonexistent.txt", "--verbose"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_help_exits_zero(capsys):
    assert infer_npu.main(["--help"]) == 0
    assert "--prompt-audio-path" in capsys.readouterr().out


def test_int8_weights_and_threads_flags(tiny_demo, tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        code = infer_npu.main(["--demo", "--max-new-frames", "3", "--weight-precision", "int8", "--threads", "1",
                               "--output-path", str(tmp_path / "q.wav"), *GREEDY])
        assert code == 0
        summary = _summary(capsys)
        assert summary["weights"] == "int8" and summary["threads"] == "1" and summary["frames"] == "3"
    finally:
        tiny_demo.model.set_weight_precision("float32")
        torch.set_num_threads(threads)


def test_int8_weights_on_a_half_precision_model_is_an_environment_error(tiny_demo, tmp_path, capsys):
    try:
        code = infer_npu.main(["--demo", "--dtype", "bfloat16", "--weight-precision", "int8",
                               "--output-path", str(tmp_path / "q.wav")])
        assert code == 1 and "int8" in capsys.readouterr().err
    finally:
        tiny_demo.model.to(torch.float32)


def _drop_tts_key(directory: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(directory / "model.safetensors"))
    state.pop("transformer.h.1.mlp.fc_out.weight")
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})


def _drop_codec_key(directory: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = directory / "audio_tokenizer" / "model.safetensors"
    state = load_file(str(path))
    state.pop(sorted(k for k in state if k.startswith("decoder."))[0])
    save_file(state, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("mutate, where", [(_drop_tts_key, "transformer.h.1.mlp.fc_out.weight"), (_drop_codec_key, "audio_tokenizer")])
def test_incomplete_checkpoints_are_refused_not_run_with_random_weights(checkpoint, tmp_path, capsys, mutate, where):
    directory = _broken_checkpoint(checkpoint, tmp_path, mutate)
    out = tmp_path / "x.wav"
    code = infer_npu.main(["--model-path", str(directory), "--text", "Hi.", "--max-new-frames", "2",
                           "--output-path", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "lacks 1 weight(s)" in err and where in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_demo_with_explicit_continuation_runs_plain_continuation(tiny_demo, tmp_path, monkeypatch, capsys):
    seen = []
    real = tiny_demo.model.inference

    def recording(*args, **kwargs):
        result = real(*args, **kwargs)
        seen.append(result)
        return result

    monkeypatch.setattr(tiny_demo.model, "inference", recording)
    argv = ["--demo", "--mode", "continuation", "--max-new-frames", "3", "--output-path", str(tmp_path / "c.wav")]
    assert infer_npu.main([*argv, *GREEDY]) == 0
    assert seen[-1]["reference_audio_token_ids"] is None  # the demo's synthetic reference was not injected
    assert infer_npu.main(["--demo", "--max-new-frames", "2", "--output-path", str(tmp_path / "v.wav"), *GREEDY]) == 0
    assert seen[-1]["voice_clone_text_chunks"] is not None  # without --mode the demo still clones its reference


def test_truncated_chunks_are_warned_about_with_the_remedy_and_counted(tiny_demo, tmp_path, capsys):
    # The tiny model never chooses audio_end, so each of the 2 chunks runs into --max-new-frames.
    argv = ["--demo", "--max-new-frames", "3", "--text", "One two three four five six. Seven eight nine ten eleven.",
            "--voice-clone-max-text-tokens", "20", "--output-path", str(tmp_path / "t.wav"), *GREEDY]
    assert infer_npu.main(argv) == 0
    captured = capsys.readouterr()
    warning = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert warning == ["warning: text chunk(s) 1, 2 of 2 reached --max-new-frames (3 frames, 0.2 s) before the model "
                       "ended it, so its audio is cut off; raise --max-new-frames or lower --voice-clone-max-text-tokens"]
    line = [x for x in captured.out.splitlines() if x.startswith("summary: ")][-1]
    assert "truncated=2" in line.split()
