"""Codec checkpoints: released key list, AutoModel remote code, save/load round trips, legacy key names."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel

from audio_tokenizer.codec_checkpoint import rename_legacy_key
from audio_tokenizer.configuration_moss_audio_tokenizer import MossAudioTokenizerConfig
from audio_tokenizer.modeling_moss_audio_tokenizer import MossAudioTokenizerModel
from conftest import shared_path
from test_codec_common import (  # noqa: F401 (single_thread is an autouse fixture)
    ROOT,
    copy_codec_code,
    max_rel,
    random_codes,
    released_config_dict,
    tiny_model,
    single_thread,
)

LEGACY_NAMES = (("self_attn.in_proj.weight", "self_attn.in_proj_weight"), ("ffn.0.", "linear1."),
                ("ffn.2.", "linear2."), ("parametrizations.weight.original0", "weight_g"),
                ("parametrizations.weight.original1", "weight_v"))


def _legacy(state: dict) -> dict:
    renamed = {}
    for key, value in state.items():
        for new, old in LEGACY_NAMES:
            key = key.replace(new, old)
        renamed[key] = value
    return renamed


def _saved_keys(path) -> list[str]:
    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


def test_released_architecture_on_meta_device():
    spec = json.loads(shared_path("spec", "state_dict_codec_nano.json").read_text())
    config = MossAudioTokenizerConfig(**released_config_dict())
    with torch.device("meta"):
        model = MossAudioTokenizerModel(config)
    shapes = {key: list(value.shape) for key, value in model.state_dict().items()}
    assert shapes == spec["keys"] and len(shapes) == spec["num_keys"] == 374
    assert sum(p.numel() for p in model.parameters()) == 21_969_664
    assert not list(model.buffers())
    assert sum(v.numel() for k, v in model.state_dict().items() if k.startswith("quantizer.")) == 1_067_776


def test_auto_model_from_remote_code_folder_matches_golden(tmp_path):
    golden = shared_path("golden", "codec_tiny")
    copy_codec_code(tmp_path)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(golden / name, tmp_path / name)
    config = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(config).__name__ == "MossAudioTokenizerConfig" and config.frame_rate == 12.5
    model = AutoModel.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(model).__name__ == "MossAudioTokenizerModel" and model.dtype == torch.float32
    data = np.load(golden / "golden.npz")
    codes = torch.from_numpy(data["codes"])
    encoded = model.batch_encode([torch.from_numpy(data["waveform"])])
    assert torch.equal(encoded.audio_codes[:, 0, :16], codes)
    decoded = model.batch_decode([codes]).audio[0]
    assert max_rel(decoded, data["decoded"], float(abs(data["decoded"]).max())) <= 1e-5


def test_save_pretrained_round_trip_through_auto_model(tmp_path):
    model = tiny_model(seed=3)
    source, target = tmp_path / "source", tmp_path / "target"
    model.save_pretrained(source)  # writes auto_map and copies the code: a complete remote-code folder
    expected_code = {p.name for p in (ROOT / "audio_tokenizer").glob("*.py")} - {"__init__.py"}
    assert expected_code <= {p.name for p in source.glob("*.py")}
    keys = _saved_keys(source / "model.safetensors")
    assert "quantizer.input_proj.parametrizations.weight.original0" in keys and len(keys) == 214
    loaded = AutoModel.from_pretrained(source, trust_remote_code=True)
    codes = random_codes(4, seed=4)
    expected = model.batch_decode([codes]).audio
    assert torch.equal(loaded.batch_decode([codes]).audio, expected)
    loaded.save_pretrained(target)
    saved = json.loads((target / "config.json").read_text())
    assert saved["auto_map"] == {"AutoConfig": "configuration_moss_audio_tokenizer.MossAudioTokenizerConfig",
                                 "AutoModel": "modeling_moss_audio_tokenizer.MossAudioTokenizerModel"}
    assert saved["sample_rate"] == 48000 and (target / "modeling_moss_audio_tokenizer.py").exists()
    again = AutoModel.from_pretrained(target, trust_remote_code=True)
    assert torch.equal(again.batch_decode([codes]).audio, expected)
    original = model.state_dict()
    assert all(torch.equal(value, original[key]) for key, value in again.state_dict().items())


@pytest.mark.parametrize("torch_release", ["installed", "simulated 2.5"])
def test_pytorch_model_bin_is_loaded(tmp_path, monkeypatch, torch_release):
    """A pickled codec checkpoint loads: before torch 2.6 (simulated: the codec's torch_compat says 2.5) through
    safe_checkpoint.py, never calling torch.load."""
    if torch_release == "simulated 2.5":
        import audio_tokenizer.torch_compat as codec_compat

        def no_torch_load(*args, **kwargs):
            raise AssertionError("torch.load was called")

        monkeypatch.setattr(codec_compat, "torch_version", lambda: (2, 5))
        monkeypatch.setattr(torch, "load", no_torch_load)
    model = tiny_model(seed=5)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    loaded = MossAudioTokenizerModel.from_pretrained(tmp_path)
    codes = random_codes(3, seed=6)
    assert torch.equal(loaded.batch_decode([codes]).audio, model.batch_decode([codes]).audio)


def test_legacy_key_names(tmp_path):
    model = tiny_model(seed=7)
    legacy = _legacy(model.state_dict())
    assert sum(key.endswith("weight_g") for key in legacy) == 34 and any(".linear1." in key for key in legacy)
    direct = MossAudioTokenizerModel(model.config)
    direct.load_state_dict(legacy, strict=True)
    model.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in legacy.items()}, str(tmp_path / "model.safetensors"))
    loaded = MossAudioTokenizerModel.from_pretrained(tmp_path)
    codes = random_codes(3, seed=8)
    expected = model.batch_decode([codes]).audio
    assert torch.equal(direct.batch_decode([codes]).audio, expected)
    assert torch.equal(loaded.batch_decode([codes]).audio, expected)
    resaved = tmp_path / "resaved"
    loaded.save_pretrained(resaved)
    assert set(_saved_keys(resaved / "model.safetensors")) == set(model.state_dict())


def test_legacy_attention_projection_spellings():
    assert rename_legacy_key("encoder.1.transformer.layers.0.self_attn.in_projs.0.weight") == (
        "encoder.1.transformer.layers.0.self_attn.in_proj.weight")
    assert rename_legacy_key("decoder.3.transformer.layers.1.self_attn.out_projs.0.weight") == (
        "decoder.3.transformer.layers.1.self_attn.out_proj.weight")
    assert rename_legacy_key("quantizer.output_proj.weight_v") == (
        "quantizer.output_proj.parametrizations.weight.original1")
    assert rename_legacy_key("encoder.1.input_proj.weight") == "encoder.1.input_proj.weight"


def test_legacy_and_released_spelling_together_is_an_error():
    model = tiny_model()
    state = model.state_dict()
    state["quantizer.input_proj.weight_g"] = state["quantizer.input_proj.parametrizations.weight.original0"]
    with pytest.raises(ValueError, match="both"):
        MossAudioTokenizerModel(model.config).load_state_dict(state)


def test_weight_norm_cache_follows_parameter_changes():
    model = tiny_model(seed=9)
    codes = random_codes(3, seed=10)
    before = model.batch_decode([codes]).audio
    other = tiny_model(seed=11)
    model.load_state_dict(other.state_dict())
    assert torch.equal(model.batch_decode([codes]).audio, other.batch_decode([codes]).audio)
    with torch.no_grad():
        model.quantizer.output_proj.parametrizations.weight.original0.mul_(2.0)
    assert not torch.equal(model.batch_decode([codes]).audio, other.batch_decode([codes]).audio)
    assert not torch.equal(before, other.batch_decode([codes]).audio)


def test_weight_norm_matches_torch_parametrization():
    model = tiny_model(seed=12)
    module = model.quantizer.input_proj
    conv = torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv1d(32, 16, 1))
    conv.load_state_dict(module.state_dict())
    weight, bias = module.effective_parameters()
    assert torch.equal(weight, conv.weight.detach().squeeze(-1)) and torch.equal(bias, conv.bias.detach())


def test_importing_the_package_is_light():
    code = "import sys, audio_tokenizer; print('torch' in sys.modules, 'transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_no_hard_optional_imports_in_remote_code():
    for path in (ROOT / "audio_tokenizer").glob("*.py"):
        text = path.read_text()
        for name in ("torch_npu", "flash_attn"):
            assert f"import {name}" not in text and f"from {name}" not in text, path


def test_reduced_precision_load_keeps_the_quantizer_in_float32(tmp_path):
    model = tiny_model(seed=15)
    model.save_pretrained(tmp_path)
    loaded = MossAudioTokenizerModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.decoder[1].input_proj.weight.dtype == torch.bfloat16
    assert {p.dtype for p in loaded.quantizer.parameters()} == {torch.float32}
    audio = loaded.batch_decode([random_codes(3, seed=16)]).audio
    assert audio.dtype == torch.float32 and bool(torch.isfinite(audio).all())
    assert loaded.batch_encode([torch.zeros(2, 3840)]).audio_codes.shape == (16, 1, 1)
