"""Loading like a Hugging Face model: Auto classes with remote code, checkpoint formats, key list, ties, RoPE."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from configuration_moss_tts_nano import MossTTSNanoConfig
from conftest import ROOT, shared_path
from modeling_moss_tts_nano import MossTTSNanoForCausalLM

TINY = dict(gpt2_config=dict(n_embd=32, n_head=4, n_layer=2, n_inner=64, vocab_size=64, n_positions=256),
            n_vq=4, audio_vocab_size=16, audio_pad_token_id=16)


def tiny_config(**overrides):
    return MossTTSNanoConfig(**{**TINY, **overrides})


def sample_inputs():
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.full((2, 7, 5), 16, dtype=torch.long)
    input_ids[..., 0] = torch.randint(10, 64, (2, 7), generator=gen)
    input_ids[:, 3:5, 1:] = torch.randint(0, 16, (2, 2, 4), generator=gen)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, :2] = False
    return input_ids, mask


def hidden(model):
    with torch.no_grad():
        return model(*sample_inputs()).last_hidden_state


def remote_code_dir(directory, config=None):
    """A checkpoint folder as released: every top-level .py of the repository plus config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    for source in ROOT.glob("*.py"):
        shutil.copy(source, directory / source.name)
    if config is not None:
        config.save_pretrained(directory)
    return directory


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_warnings():
    handler = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return MossTTSNanoForCausalLM(tiny_config()).eval()


# ------------------------------------------------------------------------------------------------ released keys


def test_released_architecture_keys_shapes_and_ties_on_meta():
    spec = json.loads(shared_path("spec", "state_dict_tts_100m.json").read_text())
    config = AutoConfig.from_pretrained(ROOT, trust_remote_code=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    shapes = {key: list(value.shape) for key, value in model.state_dict().items()}
    assert shapes == spec["keys"] and len(shapes) == spec["num_keys"] == 194
    assert sum(p.numel() for p in model.parameters()) == 117_311_232  # parameters() counts tied pairs once
    assert model.text_lm_head.weight is model.transformer.wte.weight
    for head, embedding in zip(model.audio_lm_heads, model.audio_embeddings):
        assert head.weight is embedding.weight
    assert not list(model.buffers())  # RoPE frequencies are computed, never stored


# ------------------------------------------------------------------------------------------------ formats


def _write_bin(model, directory):
    state = dict(model.state_dict())
    state["local_transformer.wte.weight"] = torch.zeros(64, 32)  # released checkpoints may carry it
    torch.save(state, directory / "pytorch_model.bin")


@pytest.mark.parametrize("layout", ["bin", "safetensors", "sharded"])  # bin: safe_checkpoint.py before torch 2.6
def test_checkpoint_formats_load_through_the_auto_classes(tmp_path, reference, layout, transformers_warnings):
    directory = remote_code_dir(tmp_path / f"ckpt_{layout}")
    if layout == "bin":
        reference.config.save_pretrained(directory)
        _write_bin(reference, directory)
    else:
        reference.save_pretrained(directory, max_shard_size="20KB" if layout == "sharded" else "5GB")
    if layout == "sharded":
        assert (directory / "model.safetensors.index.json").is_file()
    expected = hidden(reference)
    for auto in (AutoModel, AutoModelForCausalLM):
        model = auto.from_pretrained(directory, trust_remote_code=True).eval()
        assert type(model).__name__ == "MossTTSNanoForCausalLM"
        assert model.text_lm_head.weight is model.transformer.wte.weight
        assert model.audio_lm_heads[2].weight is model.audio_embeddings[2].weight
        result = hidden(model)
        assert torch.isfinite(result).all()
        torch.testing.assert_close(result, expected, atol=0, rtol=0)
    noise = [m for m in transformers_warnings if "local_transformer" in m or "newly initialized" in m]
    assert noise == []


def test_save_pretrained_drops_tied_aliases(tmp_path, reference):
    assert reference.text_lm_head.weight is reference.transformer.wte.weight  # tied at construction too
    assert reference.audio_lm_heads[3].weight is reference.audio_embeddings[3].weight
    reference.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    state = reference.state_dict()
    assert len(saved) == len(state) - 1 - reference.config.n_vq  # 194 - 17 = 177 for the released model
    assert "text_lm_head.weight" not in saved and "transformer.wte.weight" in saved


def test_load_state_dict_ignores_the_local_token_embedding(reference):
    state = dict(reference.state_dict())
    state["local_transformer.wte.weight"] = torch.zeros(64, 32)
    model = MossTTSNanoForCausalLM(tiny_config())
    model.load_state_dict(state, strict=True)
    torch.testing.assert_close(hidden(model.eval()), hidden(reference), atol=0, rtol=0)


def test_round_trip_through_auto_classes(tmp_path, reference):
    first = remote_code_dir(tmp_path / "first", reference.config)
    reference.save_pretrained(first)
    loaded = AutoModelForCausalLM.from_pretrained(first, trust_remote_code=True)
    second = tmp_path / "second"
    loaded.save_pretrained(second)
    assert (second / "modeling_moss_tts_nano.py").is_file()  # remote code travels with the checkpoint
    again = AutoModel.from_pretrained(second, trust_remote_code=True)
    torch.testing.assert_close(hidden(again.eval()), hidden(reference), atol=0, rtol=0)
    config = AutoConfig.from_pretrained(second, trust_remote_code=True)
    assert config.to_dict()["gpt2_config"]["n_embd"] == 32


def test_rope_is_valid_after_from_pretrained(tmp_path):
    directory = shared_path("golden", "tts_tiny")
    loaded = MossTTSNanoForCausalLM.from_pretrained(directory).eval()
    direct = MossTTSNanoForCausalLM(MossTTSNanoConfig.from_pretrained(directory)).eval()
    direct.load_state_dict(load_file(directory / "model.safetensors"), strict=False)
    direct.tie_weights()
    a, b = hidden_full(loaded), hidden_full(direct)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def hidden_full(model):
    input_ids = torch.full((1, 40, 17), 1024, dtype=torch.long)
    input_ids[..., 0] = torch.arange(40) + 100
    with torch.no_grad():
        return model(input_ids).last_hidden_state


# ------------------------------------------------------------------------------------------------ attention config


def test_flash_config_builds_on_cpu():
    config = tiny_config(attn_implementation="flash_attention_2", local_transformer_attn_implementation="flash_attention_2")
    model = MossTTSNanoForCausalLM(config)
    assert model.get_attention_implementation() == ("flash_attention_2", "flash_attention_2")
    assert model.resolved_attention_implementation() == ("sdpa", "sdpa")
    assert model.generate(*sample_inputs(), max_new_frames=2).audio_token_ids.shape[0] == 2


def test_flash_checkpoint_loads_on_cpu_through_auto_classes(tmp_path, reference):
    directory = remote_code_dir(tmp_path / "flash")
    reference.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(attn_implementation="flash_attention_2", local_transformer_attn_implementation="flash_attention_2")
    (directory / "config.json").write_text(json.dumps(config))
    for auto in (AutoModel, AutoModelForCausalLM):
        model = auto.from_pretrained(directory, trust_remote_code=True)
        assert model.get_attention_implementation() == ("flash_attention_2", "flash_attention_2")
        assert model.resolved_attention_implementation() == ("sdpa", "sdpa")
        torch.testing.assert_close(hidden(model.eval()), hidden(reference), atol=1e-6, rtol=0)
    explicit = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, attn_implementation="eager")
    assert explicit.get_attention_implementation() == ("eager", "flash_attention_2")  # the argument is global only


def test_direct_class_from_pretrained_with_attention_argument():
    model = MossTTSNanoForCausalLM.from_pretrained(shared_path("golden", "tts_tiny"), attn_implementation="eager")
    assert model.get_attention_implementation() == ("eager", "sdpa")
    with pytest.raises(ValueError, match="'fast'.*valid"):
        MossTTSNanoForCausalLM.from_pretrained(shared_path("golden", "tts_tiny"), attn_implementation="fast")


# ------------------------------------------------------------------------------------------------ forward API


def test_forward_outputs_and_cache(reference):
    input_ids, mask = sample_inputs()
    with torch.no_grad():
        full = reference(input_ids, mask, output_hidden_states=True)
        assert full.past_key_values is None and len(full.hidden_states) == 3
        assert full.hidden_states[-1] is full.last_hidden_state and full[0] is full.last_hidden_state
        head = reference(input_ids[:, :4], mask[:, :4], use_cache=True)
        tail = reference(input_ids[:, 4:], mask, past_key_values=head.past_key_values)  # full-length mask
    assert tail.past_key_values is head.past_key_values and tail.past_key_values.length == 7
    torch.testing.assert_close(torch.cat([head.last_hidden_state, tail.last_hidden_state], 1), full.last_hidden_state,
                               atol=1e-5, rtol=1e-5)
    as_tuple = reference(input_ids, mask, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    with pytest.raises(ValueError, match="past_key_values is a tuple"):
        reference(input_ids, mask, past_key_values=((1, 2),))
