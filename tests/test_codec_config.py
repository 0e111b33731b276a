"""MossAudioTokenizerConfig: the released file, aliases, derived values and validation messages."""

from __future__ import annotations

import copy

import pytest

from audio_tokenizer.configuration_moss_audio_tokenizer import MossAudioTokenizerConfig, mirror_stack
from test_codec_common import released_config_dict


def test_released_config():
    config = MossAudioTokenizerConfig(**released_config_dict())
    assert config.model_type == "moss-audio-tokenizer"
    assert (config.sampling_rate, config.sample_rate, config.downsample_rate) == (48000, 48000, 3840)
    assert (config.frame_rate, config.num_quantizers, config.codebook_size) == (12.5, 16, 1024)
    assert (config.number_channels, config.interleave_factor) == (2, 2)
    assert (config.attention_implementation, config.compute_dtype, config.quantizer_type) == ("sdpa", "fp32", "rlfq")
    assert config.transformer_contexts() == ([1600, 1200, 800, 500], [500, 800, 1200, 1600])


def test_defaults_are_the_released_layout():
    released = MossAudioTokenizerConfig(**released_config_dict())
    default = MossAudioTokenizerConfig()
    assert default.encoder_kwargs == released.encoder_kwargs
    assert default.decoder_kwargs == released.decoder_kwargs
    assert default.quantizer_kwargs == released.quantizer_kwargs


def test_reversed_decoder_kwargs_reproduce_the_decoder():
    data = released_config_dict()
    decoder = data.pop("decoder_kwargs")
    assert mirror_stack(data["reversed_decoder_kwargs"]) == decoder
    assert MossAudioTokenizerConfig(**data).decoder_kwargs == decoder


def test_round_trip_through_dict():
    config = MossAudioTokenizerConfig(**released_config_dict())
    data = config.to_dict()
    assert data["sample_rate"] == data["sampling_rate"] == 48000
    again = MossAudioTokenizerConfig(**data)
    assert again.to_dict() == data


def test_auto_map_is_written_as_class_references():
    config = MossAudioTokenizerConfig(**released_config_dict())
    # transformers' custom_object_save writes a (slow, fast) pair for any class named "*Tokenizer*".
    config.auto_map["AutoConfig"] = ("configuration_moss_audio_tokenizer.MossAudioTokenizerConfig", None)
    assert config.to_dict()["auto_map"]["AutoConfig"] == "configuration_moss_audio_tokenizer.MossAudioTokenizerConfig"


def test_legacy_aliases():
    config = MossAudioTokenizerConfig(channels_numbers=1, attention_backend="flash_attention_2",
                                      codec_compute_dtype="bf16", encoder_kwargs=_mono_encoder())
    assert (config.number_channels, config.attention_implementation, config.compute_dtype) == (
        1, "flash_attention_2", "bf16")
    kept = MossAudioTokenizerConfig(compute_dtype="fp16", codec_compute_dtype="bf16")
    assert kept.compute_dtype == "fp16"  # the alias only fills a field still at its default
    assert MossAudioTokenizerConfig(sample_rate=48000, version="1").sampling_rate == 48000


def _mono_encoder() -> list[dict]:
    encoder = MossAudioTokenizerConfig().encoder_kwargs
    encoder[-1] = {"module_type": "PatchedPretransform", "patch_size": 2}
    encoder[-2] = dict(encoder[-2], output_dimension=384)
    return encoder


def test_missing_context_uses_the_fallback_duration():
    data = released_config_dict()
    del data["encoder_kwargs"][1]["context_duration"]
    data["causal_transformer_context_duration"] = 5.0
    config = MossAudioTokenizerConfig(**data)
    assert config.encoder_kwargs[1]["context_duration"] == 5.0
    assert config.transformer_contexts()[0][0] == 2000


def _with(path: tuple, value) -> dict:
    data = released_config_dict()
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return data


@pytest.mark.parametrize("data, message", [
    (_with(("attention_implementation",), "eager"), "attention_implementation='eager'.*sdpa, flash_attention_2"),
    (_with(("compute_dtype",), "fp8"), "compute_dtype='fp8'.*fp32, bf16, fp16"),
    (_with(("encoder_kwargs", 1, "num_heads"), 3), "divisible by num_heads=3"),
    (_with(("encoder_kwargs", 1, "norm"), "rms_norm"), "encoder_kwargs\\[1\\].norm='rms_norm'"),
    (_with(("encoder_kwargs", 1, "causal"), False), "causal=False"),
    (_with(("encoder_kwargs", 1, "gating"), "silu"), "gating='silu'"),
    (_with(("encoder_kwargs", 1, "context_duration"), -1), "context_duration=-1"),
    (_with(("encoder_kwargs", 1, "input_dimension"), 200), "input_dimension=200"),
    (_with(("encoder_kwargs", 0, "patch_size"), 0), "patch_size=0"),
    (_with(("encoder_kwargs", 0, "module_type"), "Conv"), "module_type"),
    (_with(("decoder_kwargs", 8, "patch_size"), 120), "decoder_kwargs"),
    (_with(("quantizer_kwargs", "quantizer_type"), "rvq"), "quantizer_type='rvq'"),
    (_with(("quantizer_kwargs", "input_dim"), 512), "quantizer_kwargs.input_dim is 512"),
    (_with(("quantizer_kwargs", "num_quantizers"), 0), "num_quantizers=0"),
    (_with(("downsample_rate",), 1920), "patch sizes multiply to 7680"),
    (_with(("encoder_kwargs",), []), "non-empty list"),
])
def test_validation_errors(data, message):
    with pytest.raises(ValueError, match=message):
        MossAudioTokenizerConfig(**data)


def test_rejected_values_leave_inputs_untouched():
    data = released_config_dict()
    snapshot = copy.deepcopy(data)
    MossAudioTokenizerConfig(**data)
    assert data == snapshot


def test_the_frame_rate_the_scripts_use_is_the_released_codecs():
    """infer_npu.py and benchmarks/ convert frames to seconds with codec_output.FRAMES_PER_SECOND (one source)."""
    from codec_output import FRAMES_PER_SECOND, SAMPLES_PER_FRAME

    config = MossAudioTokenizerConfig(**released_config_dict())
    assert FRAMES_PER_SECOND == config.frame_rate
    assert SAMPLES_PER_FRAME == config.sampling_rate / config.frame_rate
