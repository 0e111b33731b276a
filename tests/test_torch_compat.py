"""torch 2.3.1, the oldest supported torch: no newer API without its fallback, and every fallback works.

The fallback tests run under any torch: they remove the newer API (monkeypatch) or simulate torch 2.3's
behaviour, so the path an old torch takes is exercised under the newest one too. CI also runs the whole suite
under a real torch 2.3.1 (.ci/run).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import pathlib
import re
import sys
import tokenize
import types
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import audio_tokenizer.torch_compat as codec_compat
import cli_common
import convert_to_safetensors
import failures
import devices
import gpt2_decoder
import torch_compat
from audio_tokenizer import codec_layers
from audio_tokenizer.modeling_moss_audio_tokenizer import MossAudioTokenizerModel
from configuration_moss_tts_nano import MossTTSNanoConfig
from conftest import needs_safe_torch_load
from modeling_moss_tts_nano import MossTTSNanoForCausalLM
from test_codec_common import random_codes, tiny_model as tiny_codec

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMPAT_MODULES = (ROOT / "torch_compat.py", ROOT / "audio_tokenizer" / "torch_compat.py")


@dataclasses.dataclass(frozen=True)
class NewerApi:
    name: str
    pattern: str  # a use in source code
    first_in: tuple[int, int]  # first torch release that has it
    present: Callable[[], bool]  # whether the installed torch has it
    instead: str  # what the project calls instead


def _sdpa_has_enable_gqa() -> bool:
    return "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


# torch APIs newer than 2.3.1 (read from the torch 2.3.1 sources and the release notes).
NEWER_APIS = (
    NewerApi("nn.Module.register_load_state_dict_pre_hook", r"\.register_load_state_dict_pre_hook\(", (2, 5),
             lambda: hasattr(nn.Module, "register_load_state_dict_pre_hook"),
             "torch_compat.add_load_state_dict_pre_hook(module, hook)"),
    NewerApi("torch.amp.is_autocast_available", r"\bis_autocast_available\(", (2, 4),
             lambda: hasattr(torch.amp, "is_autocast_available"), "audio_tokenizer.torch_compat.autocast_available"),
    NewerApi("torch.OutOfMemoryError", r"\btorch\.OutOfMemoryError\b", (2, 5),
             lambda: hasattr(torch, "OutOfMemoryError"), "torch_compat.OutOfMemoryError"),
    NewerApi("torch.cuda.is_bf16_supported(including_emulation=...)", r"\bincluding_emulation\s*=\s*False", (2, 4),
             lambda: torch_compat._accepts_keyword(torch.cuda.is_bf16_supported, "including_emulation"),
             "torch_compat.cuda_bf16_supported"),
    NewerApi("safe torch.load (CVE-2025-32434)", r"\btorch\.load\(", (2, 6),
             lambda: torch_compat.torch_version() >= (2, 6), "torch_compat.load_pickled_weights"),
    NewerApi("nn.Buffer", r"\bnn\.Buffer\(", (2, 5), lambda: hasattr(nn, "Buffer"), "register_buffer"),
    NewerApi("F.rms_norm / nn.RMSNorm", r"\b(?:rms_norm|RMSNorm)\(", (2, 4), lambda: hasattr(F, "rms_norm"),
             "an explicit RMS norm"),
    NewerApi("scaled_dot_product_attention(enable_gqa=...)", r"\benable_gqa\s*=", (2, 5), _sdpa_has_enable_gqa,
             "repeat_interleave the key/value heads"),
    NewerApi("torch.serialization.add_safe_globals", r"\badd_safe_globals\(", (2, 4),
             lambda: hasattr(torch.serialization, "add_safe_globals"), "plain tensors in checkpoints"),
    NewerApi("torch.nn.attention.flex_attention", r"\bflex_attention\b", (2, 5),
             lambda: importlib.util.find_spec("torch.nn.attention.flex_attention") is not None,
             "the attention backends table"),
    NewerApi("torch.library.custom_op", r"\btorch\.library\.custom_op\b", (2, 4),
             lambda: hasattr(torch.library, "custom_op"), "plain Python functions"),
    # In 2.3 itself (so present on every supported stack), but absent from the torch 2.1 / 2.2 builds of older
    # torch_npu stacks: used through its fallback only.
    NewerApi("torch.compiler.is_compiling", r"\bcompiler\.is_compiling\b", (2, 3),
             lambda: hasattr(torch.compiler, "is_compiling"), "torch_compat.is_compiling"),
    NewerApi("torch.accelerator", r"\btorch\.accelerator\b", (2, 6), lambda: hasattr(torch, "accelerator"),
             "devices.py's per-device table"),
)


def _project_sources() -> list[pathlib.Path]:
    skipped = {*COMPAT_MODULES, pathlib.Path(__file__).resolve()}
    return [path for path in sorted(ROOT.rglob("*.py"))
            if path.resolve() not in skipped and not any(part.startswith(".") for part in path.relative_to(ROOT).parts)]


def _code_lines(path: pathlib.Path) -> dict[int, str]:
    """The code of each line, without comments and string literals (docstrings may name any API)."""
    lines: dict[int, str] = {}
    with path.open("rb") as handle:
        for token in tokenize.tokenize(handle.readline):
            if token.type not in (tokenize.COMMENT, tokenize.STRING, tokenize.ENCODING):
                lines[token.start[0]] = lines.get(token.start[0], "") + token.string
    return lines


def test_no_torch_api_newer_than_2_3_1_is_used_outside_the_compat_modules():
    sources = _project_sources()
    assert ROOT / "modeling_moss_tts_nano.py" in sources and ROOT / "tests" / "test_devices.py" in sources
    uses = []
    for path in sources:
        for number, code in _code_lines(path).items():
            uses += [f"{path.relative_to(ROOT)}:{number}: {api.name} (use {api.instead})"
                     for api in NEWER_APIS if re.search(api.pattern, code)]
    assert uses == []


def test_the_scan_sees_code_and_ignores_comments_and_strings(tmp_path):
    source = tmp_path / "sample.py"
    source.write_text('"""torch.OutOfMemoryError in a docstring."""\nx = 1  # torch.OutOfMemoryError\n'
                      'error = torch.OutOfMemoryError\nmodule.register_load_state_dict_pre_hook(hook)\n')
    code = _code_lines(source)
    hits = [number for number, text in code.items() for api in NEWER_APIS if re.search(api.pattern, text)]
    assert hits == [3, 4]


@pytest.mark.parametrize("api", NEWER_APIS, ids=lambda api: api.name)
def test_the_newer_api_table_matches_the_installed_torch(api):
    """Under torch 2.3.1 every listed API is absent, under the newest torch every one is present (both in CI)."""
    assert api.present() == (torch_compat.torch_version() >= api.first_in)


# ------------------------------------------------------------------------------------------------ load_state_dict hook


def _tiny_tts() -> MossTTSNanoForCausalLM:
    config = MossTTSNanoConfig(gpt2_config=dict(n_embd=32, n_head=4, n_layer=1, n_inner=64, vocab_size=64,
                                                n_positions=1024), n_vq=4, audio_vocab_size=16, audio_pad_token_id=16)
    torch.manual_seed(0)
    return MossTTSNanoForCausalLM(config).eval()


@pytest.mark.parametrize("compat", [torch_compat, codec_compat], ids=["repository", "codec"])
def test_pre_hook_without_the_public_method_gets_the_module_first(monkeypatch, compat):
    monkeypatch.delattr(nn.Module, "register_load_state_dict_pre_hook", raising=False)  # as in torch < 2.5
    seen = []
    module = nn.Linear(2, 2)
    compat.add_load_state_dict_pre_hook(module, lambda m, state, prefix, *rest: seen.append((m, prefix)))
    module.load_state_dict(nn.Linear(2, 2).state_dict())
    assert seen == [(module, "")]


def test_tts_model_builds_and_drops_the_stray_key_without_the_public_pre_hook(monkeypatch):
    monkeypatch.delattr(nn.Module, "register_load_state_dict_pre_hook", raising=False)  # as in torch < 2.5
    model = _tiny_tts()
    state = dict(model.state_dict())
    state["local_transformer.wte.weight"] = torch.zeros(64, 32)  # released checkpoints carry it
    _tiny_tts().load_state_dict(state, strict=True)


def test_codec_builds_and_renames_legacy_keys_without_the_public_pre_hook(monkeypatch):
    monkeypatch.delattr(nn.Module, "register_load_state_dict_pre_hook", raising=False)  # as in torch < 2.5
    model = tiny_codec(seed=3)
    legacy = {key.replace("ffn.0.", "linear1."): value for key, value in model.state_dict().items()}
    assert any(".linear1." in key for key in legacy)
    fresh = MossAudioTokenizerModel(model.config)
    fresh.load_state_dict(legacy, strict=True)
    codes = random_codes(2, seed=1)
    assert torch.equal(fresh.batch_decode([codes]).audio, model.batch_decode([codes]).audio)


# ------------------------------------------------------------------------------------------------ autocast probe


@pytest.mark.parametrize("device_type, expected", [("cpu", True), ("meta", False), ("npu", False)])
def test_autocast_available_without_torch_amp_probe(monkeypatch, device_type, expected):
    monkeypatch.delattr(torch.amp, "is_autocast_available", raising=False)  # as in torch < 2.4
    assert codec_compat.autocast_available(device_type) is expected  # npu: torch_npu is not loaded here


def test_codec_decodes_in_bfloat16_autocast_without_torch_amp_probe(monkeypatch):
    model = tiny_codec(seed=2)
    model.set_compute_dtype("bf16")
    codes = random_codes(3, seed=2)
    expected = model.batch_decode([codes]).audio
    monkeypatch.delattr(torch.amp, "is_autocast_available", raising=False)  # as in torch < 2.4
    audio = model.batch_decode([codes]).audio
    assert torch.isfinite(audio).all() and torch.equal(audio, expected)


# ------------------------------------------------------------------------------------------------ OutOfMemoryError


def test_out_of_memory_error_without_the_top_level_alias(monkeypatch):
    monkeypatch.delattr(torch, "OutOfMemoryError", raising=False)  # as in torch < 2.5
    spec = importlib.util.spec_from_file_location("moss_tts_nano.torch_compat_without_alias", ROOT / "torch_compat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.OutOfMemoryError is torch.cuda.OutOfMemoryError
    assert failures.is_out_of_memory_error(module.OutOfMemoryError("simulated: allocation failed"))


# ------------------------------------------------------------------------------------------------ is_compiling


def test_is_compiling_without_torch_compiler_is_compiling(monkeypatch):
    """Before torch 2.3: dynamo's own flag where dynamo was imported, else False (nothing compiles without it)."""
    assert torch_compat.is_compiling() is False
    monkeypatch.delattr(torch.compiler, "is_compiling")
    monkeypatch.setitem(sys.modules, "torch._dynamo", types.SimpleNamespace(is_compiling=lambda: True))
    assert torch_compat.is_compiling() is True
    monkeypatch.delitem(sys.modules, "torch._dynamo")
    assert torch_compat.is_compiling() is False


def test_linear_runs_f_linear_while_compiling(monkeypatch):
    """Under torch.compile the CPU fast paths stay out of the trace, on every torch: F.linear, or the graph operator
    (compiled_step registers it) that makes the eager choice when the graph runs."""
    import linear_kernels

    monkeypatch.setattr(linear_kernels, "split_matvec_linear", lambda *args: pytest.fail("fast path while compiling"))
    monkeypatch.setattr(linear_kernels, "is_compiling", lambda: True)
    monkeypatch.setattr(linear_kernels, "_GRAPH_LINEAR", None)
    x, weight = torch.randn(2, 8), torch.randn(4, 8)
    assert torch.equal(linear_kernels.linear(x, weight), F.linear(x, weight))
    calls = []
    monkeypatch.setattr(linear_kernels, "_GRAPH_LINEAR", lambda *args: calls.append(args) or F.linear(*args))
    assert torch.equal(linear_kernels.linear(x, weight), F.linear(x, weight)) and len(calls) == 1


# ------------------------------------------------------------------------------------------------ CUDA bfloat16


def _simulated_cuda(major: int, with_keyword: bool) -> types.SimpleNamespace:
    """torch.cuda whose device has compute capability ``major``; bf16 tensors work everywhere (emulation)."""
    if with_keyword:
        is_bf16_supported = lambda including_emulation=True: including_emulation or major >= 8  # noqa: E731
    else:  # torch 2.3.1: counts emulation, takes no arguments
        is_bf16_supported = lambda: True  # noqa: E731
    return types.SimpleNamespace(is_bf16_supported=is_bf16_supported, current_device=lambda: 0,
                                 get_device_properties=lambda index: types.SimpleNamespace(major=major))


@pytest.mark.parametrize("with_keyword", [True, False], ids=["torch>=2.4", "simulated torch 2.3"])
@pytest.mark.parametrize("major, expected", [(7, False), (8, True)])
def test_cuda_bf16_means_hardware_bf16_on_every_torch(monkeypatch, with_keyword, major, expected):
    monkeypatch.setattr(torch.version, "hip", None)
    assert torch_compat.cuda_bf16_supported(_simulated_cuda(major, with_keyword)) is expected


def test_simulated_pre_ampere_gpu_under_torch_2_3_defaults_to_float16(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(devices, "_module", lambda kind: _simulated_cuda(7, with_keyword=False))
    assert devices._cuda_default_dtype() is torch.float16


# ------------------------------------------------------------------------------------------------ SDPA masks


def _masked_softmax_reference(q, k, v, mask):
    scores = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
    return (scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v.double()).float()


def _late_window(queries: int, keys: int) -> torch.Tensor:
    """Each query sees only the last few keys: the kernel's first 512-key block is all masked."""
    mask = torch.zeros(queries, keys, dtype=torch.bool)
    mask[:, -8:] = True
    return mask


@pytest.mark.parametrize("simulate_torch_2_3", [False, True], ids=["installed torch", "simulated torch 2.3"])
def test_codec_sdpa_with_a_fully_masked_first_key_block_is_exact(monkeypatch, simulate_torch_2_3):
    if simulate_torch_2_3:
        monkeypatch.setattr(codec_compat, "_cpu_sdpa_nan_after_masked_key_block", lambda: True)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 8, generator=generator) for n in (4, 700, 700))
    mask = _late_window(4, 700)[None, None]
    out = codec_layers.sdpa_attention(q, k, v, mask)
    torch.testing.assert_close(out, _masked_softmax_reference(q, k, v, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("simulate_torch_2_3", [False, True], ids=["installed torch", "simulated torch 2.3"])
def test_decoder_row_behind_long_left_padding_equals_the_row_alone(monkeypatch, simulate_torch_2_3):
    """A row left-padded by more than 512 keys: torch 2.3's CPU kernel gave NaN there."""
    if simulate_torch_2_3:
        monkeypatch.setattr(torch_compat, "_cpu_sdpa_nan_after_masked_key_block", lambda: True)
    model = _tiny_tts()
    model.set_attention_implementation("sdpa")
    generator = torch.Generator().manual_seed(1)
    short = torch.randint(0, 16, (1, 6, 5), generator=generator)
    long_row = torch.randint(0, 16, (1, 606, 5), generator=generator)
    input_ids = torch.cat([long_row, torch.cat([torch.full((1, 600, 5), 16), short], dim=1)])  # (2, 606, 5)
    mask = torch.ones(2, 606, dtype=torch.bool)
    mask[1, :600] = False
    with torch.no_grad():
        together = model(input_ids, mask).last_hidden_state[1, -6:]
        alone = model(short, torch.ones(1, 6, dtype=torch.bool)).last_hidden_state[0]
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("compat", [torch_compat, codec_compat], ids=["repository", "codec"])
def test_simulated_torch_2_3_gets_a_finite_additive_mask(monkeypatch, compat):
    mask = _late_window(2, 600)
    assert compat.sdpa_mask(mask, torch.float32) is mask or compat._cpu_sdpa_nan_after_masked_key_block()
    monkeypatch.setattr(compat, "_cpu_sdpa_nan_after_masked_key_block", lambda: True)
    additive = compat.sdpa_mask(mask, torch.bfloat16)
    assert additive.dtype is torch.bfloat16 and torch.isfinite(additive).all()
    assert torch.equal(additive == 0, mask)
    assert compat.sdpa_mask(None, torch.float32) is None


# ------------------------------------------------------------------------------------------------ pickled weights


def _bin_folder(directory: pathlib.Path, model: MossTTSNanoForCausalLM) -> pathlib.Path:
    directory.mkdir()
    model.config.save_pretrained(directory)
    state = dict(model.state_dict())
    state["local_transformer.wte.weight"] = torch.zeros(64, 32)
    torch.save(state, directory / "pytorch_model.bin")
    return directory


def test_simulated_torch_2_5_reads_a_single_bin_without_torch_load(monkeypatch, tmp_path, capsys):
    for module in (torch_compat, codec_compat):
        monkeypatch.setattr(module, "torch_version", lambda: (2, 5))
    monkeypatch.setattr(torch, "load", _no_torch_load)  # the path a torch < 2.6 takes never calls it
    reference = _tiny_tts()
    folder = _bin_folder(tmp_path / "tts", reference)
    model = cli_common.load_checkpoint(folder, torch.float32)  # MossTTSNanoForCausalLM.from_pretrained
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert model.text_lm_head.weight is model.transformer.wte.weight and model.name_or_path == str(folder)
    shapes = cli_common._checkpoint_shapes(folder)  # the meta-device read
    assert shapes["transformer.wte.weight"] == (64, 32)
    assert convert_to_safetensors.main([str(folder)]) == 0 and (folder / "model.safetensors").is_file()
    assert "wrote" in capsys.readouterr().out


def test_simulated_torch_2_5_refuses_a_sharded_bin_with_the_remedy(monkeypatch, tmp_path):
    monkeypatch.setattr(torch_compat, "torch_version", lambda: (2, 5))
    folder = _bin_folder(tmp_path / "tts", _tiny_tts())
    (folder / "pytorch_model.bin").rename(folder / "pytorch_model-00001-of-00001.bin")
    (folder / "pytorch_model.bin.index.json").write_text(
        '{"weight_map": {"transformer.wte.weight": "pytorch_model-00001-of-00001.bin"}}')
    with pytest.raises(RuntimeError, match=r"sharded pickled checkpoint.*CVE-2025-32434.*model\.safetensors"):
        cli_common.load_checkpoint(folder, torch.float32)


def _no_torch_load(*args, **kwargs):
    raise AssertionError("torch.load was called")


@needs_safe_torch_load
def test_converted_checkpoint_loads_identically_where_pickles_are_refused(monkeypatch, tmp_path, capsys):
    reference = _tiny_tts()
    folder = _bin_folder(tmp_path / "tts", reference)
    assert convert_to_safetensors.main([str(folder)]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    assert not list(folder.glob(".model.*"))  # no temporary file left behind
    monkeypatch.setattr(torch_compat, "torch_version", lambda: (2, 3))  # simulated torch 2.3: only the new file
    model = cli_common.load_checkpoint(folder, torch.float32)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert model.text_lm_head.weight is model.transformer.wte.weight


def test_converter_needs_a_bin_file_and_leaves_safetensors_folders_alone(tmp_path, capsys):
    assert convert_to_safetensors.main([str(tmp_path)]) == 2
    assert "has no pytorch_model.bin" in capsys.readouterr().err
    (tmp_path / "model.safetensors").write_bytes(b"already converted")
    assert convert_to_safetensors.main([str(tmp_path)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (tmp_path / "model.safetensors").read_bytes() == b"already converted"


# ------------------------------------------------------------------------------------------------ the two copies


@pytest.mark.parametrize("name", ["add_load_state_dict_pre_hook", "sdpa_mask", "_cpu_sdpa_nan_after_masked_key_block",
                                  "torch_version", "pickled_weights_refusal", "load_pickled_weights",
                                  "pickled_only_weights"])
def test_the_codec_copy_of_a_shared_helper_is_the_same_code(name):
    assert inspect.getsource(getattr(torch_compat, name)) == inspect.getsource(getattr(codec_compat, name))
