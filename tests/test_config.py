"""MossTTSNanoConfig: released defaults, validation messages, serialisation round trips."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig, GPT2Config

from configuration_moss_tts_nano import ATTENTION_NAMES, MossTTSNanoConfig
from conftest import ROOT, shared_path


def _tiny(**overrides):
    values = dict(gpt2_config=dict(n_embd=16, n_head=2, n_layer=1, n_inner=32, vocab_size=64, n_positions=128),
                  n_vq=4, audio_vocab_size=8, audio_pad_token_id=8)
    values.update(overrides)
    return MossTTSNanoConfig(**values)


def test_class_defaults_are_the_released_architecture():
    released = json.loads(shared_path("spec", "config_tts_100m.json").read_text())
    config = MossTTSNanoConfig()
    for key in ("n_vq", "audio_vocab_size", "audio_codebook_sizes", "audio_pad_token_id", "pad_token_id",
                "im_start_token_id", "im_end_token_id", "audio_start_token_id", "audio_end_token_id",
                "audio_user_slot_token_id", "audio_assistant_slot_token_id", "local_transformer_layers",
                "hidden_size", "vocab_size", "max_position_embeddings", "tokenizer_class", "tokenizer_use_fast",
                "audio_tokenizer_type", "audio_tokenizer_sample_rate", "model_architecture"):
        assert getattr(config, key) == released[key], key
    for key in ("n_layer", "n_head", "n_embd", "n_inner", "vocab_size", "n_positions", "activation_function",
                "layer_norm_epsilon", "position_embedding_type", "rope_base", "scale_attn_weights",
                "scale_attn_by_inverse_layer_idx", "attn_pdrop", "resid_pdrop", "embd_pdrop"):
        assert getattr(config.gpt2_config, key) == released["gpt2_config"][key], key
    assert config.tie_word_embeddings is True
    assert config.attn_implementation == "auto" and config.local_transformer_attn_implementation == "auto"


def test_released_and_golden_configs_load():
    released = MossTTSNanoConfig(**json.loads(shared_path("spec", "config_tts_100m.json").read_text()))
    assert isinstance(released.gpt2_config, GPT2Config) and released.gpt2_config.n_layer == 12
    assert released.attn_implementation == "flash_attention_2"
    golden = MossTTSNanoConfig.from_pretrained(shared_path("golden", "tts_tiny"))
    assert (golden.hidden_size, golden.gpt2_config.n_head, golden.max_position_embeddings) == (64, 4, 4096)
    assert golden.attn_implementation == "sdpa"


def test_repository_config_is_the_released_architecture_with_portable_attention():
    ours = json.loads((ROOT / "config.json").read_text())
    released = json.loads(shared_path("spec", "config_tts_100m.json").read_text())
    assert ours["attn_implementation"] in ("sdpa", "auto")
    assert ours["local_transformer_attn_implementation"] in ("sdpa", "auto")
    differing = {key for key in released if ours.get(key) != released[key]}
    assert differing == {"attn_implementation", "local_transformer_attn_implementation"}
    assert ours["auto_map"]["AutoModelForCausalLM"] == "modeling_moss_tts_nano.MossTTSNanoForCausalLM"
    config = AutoConfig.from_pretrained(ROOT, trust_remote_code=True)
    assert type(config).__name__ == "MossTTSNanoConfig" and config.n_vq == 16


def test_save_and_load_round_trip(tmp_path):
    config = _tiny(attn_implementation="eager", local_transformer_attn_implementation="flash_attention_2")
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert isinstance(saved["gpt2_config"], dict) and saved["gpt2_config"]["n_embd"] == 16
    assert saved["attn_implementation"] == "eager"
    loaded = MossTTSNanoConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    # The file's attention request survives under every transformers version; an explicit argument wins.
    assert (loaded.attn_implementation, loaded.local_transformer_attn_implementation) == ("eager", "flash_attention_2")
    explicit = MossTTSNanoConfig.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert explicit.attn_implementation == "sdpa"


def test_none_attention_means_auto():
    config = _tiny(attn_implementation=None, local_transformer_attn_implementation=None)
    assert (config.attn_implementation, config.local_transformer_attn_implementation) == ("auto", "auto")


def test_gpt2_config_object_and_partial_dict():
    config = _tiny(gpt2_config=GPT2Config(n_embd=8, n_head=2, n_layer=1, vocab_size=32, position_embedding_type="rope"))
    assert config.hidden_size == 8 and config.vocab_size == 32
    partial = MossTTSNanoConfig(gpt2_config={"n_layer": 2})
    assert partial.gpt2_config.n_layer == 2 and partial.gpt2_config.n_embd == 768  # the rest: released values


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(audio_codebook_sizes=[8, 8, 8]), "audio_codebook_sizes has 3 entries but n_vq=4"),
        (dict(audio_codebook_sizes=[8, 0, 8, 8]), r"audio_codebook_sizes=\[8, 0, 8, 8\] must all be positive"),
        (dict(audio_codebook_sizes=[8, 9, 8, 8], audio_pad_token_id=9), "audio_vocab_size=8 is smaller"),
        (dict(audio_pad_token_id=5), "audio_pad_token_id=5 lies inside a codebook"),
        (dict(n_vq=0), "n_vq=0 must be a positive integer"),
        (dict(local_transformer_layers=0), "local_transformer_layers=0"),
        (dict(attn_implementation="flash3"), r"attn_implementation='flash3'.*valid:"),
        (dict(local_transformer_attn_implementation="x"), "local_transformer_attn_implementation='x'"),
        (dict(hidden_size=99), "hidden_size=99 contradicts gpt2_config.n_embd=16"),
        (dict(audio_end_token_id=64), r"audio_end_token_id=64 must be a token id within \[0, 64\)"),
        (dict(model_architecture="other"), "model_architecture='other'"),
        (dict(tie_word_embeddings=False), "tie_word_embeddings=False is not supported"),
        (dict(gpt2_config=dict(n_embd=18, n_head=4)), "n_embd=18 must be divisible by n_head=4"),
        (dict(gpt2_config=dict(n_embd=18, n_head=6)), "head size 3 .* must be even"),
        (dict(gpt2_config=dict(n_embd=16, n_head=2, position_embedding_type="absolute")),
         "position_embedding_type='absolute'"),
        (dict(gpt2_config=[1, 2]), "gpt2_config must be a dict or a GPT2Config"),
    ],
)
def test_validation_errors_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        _tiny(**overrides)


def test_every_attention_name_is_accepted_and_others_are_not():
    for name in ATTENTION_NAMES:
        assert MossTTSNanoConfig(attn_implementation=name).attn_implementation == name
    with pytest.raises(ValueError, match="flash_attention_3"):
        MossTTSNanoConfig(attn_implementation="flash_attention_3")
