"""Same numbers as upstream: the golden tts_tiny fixture (float32, CPU), docs/model.md, on the CPU fast paths and on the
accelerator path (MOSS_TTS_CPU_FAST_PATHS=0, the `cpu_path` fixture)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import shared_path
from modeling_moss_tts_nano import MossTTSNanoForCausalLM


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(shared_path("golden", "tts_tiny", "golden.npz")))


@pytest.fixture(scope="module")
def model():
    return MossTTSNanoForCausalLM.from_pretrained(shared_path("golden", "tts_tiny")).eval()


def _tensors(golden, prefix):
    return torch.from_numpy(golden[f"{prefix}_input_ids"]), torch.from_numpy(golden[f"{prefix}_attention_mask"])


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_forward_hidden_states(model, golden, backend, cpu_path):
    model.set_attention_implementation(backend)
    assert model.kernel_plan().rope == ("complex" if cpu_path else "real")
    input_ids, mask = _tensors(golden, "batch")
    with torch.no_grad():
        hidden = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    expected = torch.from_numpy(golden[f"batch_hidden_{backend}"])
    torch.testing.assert_close(hidden, expected, atol=1e-5, rtol=0)
    assert (hidden[~mask] == 0).all()


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("kv", [0, 1])
def test_greedy_codes(model, golden, backend, kv, cpu_path):
    model.set_attention_implementation(backend)
    input_ids, mask = _tensors(golden, "batch")
    out = model.generate(input_ids, mask, max_new_frames=12, do_sample=False, audio_repetition_penalty=1.2,
                         use_kv_cache=bool(kv))
    assert torch.equal(out.audio_token_ids, torch.from_numpy(golden[f"greedy_{backend}_kv{kv}"]))
    assert out.num_frames.tolist() == [12, 12] and not out.finished_mask.any()
    assert torch.equal(out.prompt_input_ids, input_ids)


def test_greedy_nq8(model, golden, cpu_path):
    model.set_attention_implementation("sdpa")
    input_ids, mask = _tensors(golden, "batch")
    out = model.generate(input_ids, mask, max_new_frames=12, audio_repetition_penalty=1.2, nq=8)
    assert torch.equal(out.audio_token_ids, torch.from_numpy(golden["greedy_nq8"]))
    assert (out.audio_token_ids[..., 8:] == 1024).all()


@pytest.mark.parametrize("use_kv_cache", [True, False])
def test_greedy_continuation_without_penalty(model, golden, use_kv_cache, cpu_path):
    model.set_attention_implementation("sdpa")
    input_ids, mask = _tensors(golden, "cont")
    out = model.generate(input_ids, mask, max_new_frames=12, use_kv_cache=use_kv_cache)
    assert torch.equal(out.audio_token_ids, torch.from_numpy(golden["greedy_cont_rp1"]))


@pytest.fixture(scope="module")
def tokenizer():
    from tokenization_moss_tts_nano import MossTTSNanoSentencePieceTokenizer

    return MossTTSNanoSentencePieceTokenizer(vocab_file=str(shared_path("data", "tokenizer.model")))


def test_build_inference_input_ids_reproduces_the_golden_rows(model, golden, tokenizer):
    texts = ["Hello world.", "今天天气真好，我们一起去公园散步吧。"]
    codes = golden["prompt_audio_codes"]
    cases = {
        "vc0": dict(text=texts[0], mode="voice_clone", prompt_audio_codes=codes),
        "vc1": dict(text=texts[1], mode="voice_clone", prompt_audio_codes=codes),
        "cont": dict(text=texts[1], mode="continuation"),
        "contp": dict(text=" world.", mode="continuation", prompt_text="Hello", prompt_audio_codes=codes[:10]),
        "batch": dict(text=texts, mode="voice_clone", prompt_audio_codes=codes),
    }
    for prefix, kwargs in cases.items():
        input_ids, mask = model.build_inference_input_ids(tokenizer, **kwargs)
        expected_ids, expected_mask = _tensors(golden, prefix)
        assert torch.equal(input_ids, expected_ids), prefix
        assert torch.equal(mask, expected_mask), prefix


def test_build_inference_input_ids_mode_rules(model, tokenizer, golden):
    with pytest.raises(ValueError, match="voice_clone"):
        model.build_inference_input_ids(tokenizer, "Hi.", mode="voice_clone")
    with pytest.raises(ValueError, match="continuation"):
        model.build_inference_input_ids(tokenizer, "Hi.", mode="continuation", prompt_text="Hello")
    with pytest.raises(ValueError, match="text="):
        model.build_inference_input_ids(tokenizer, [], mode="continuation")
    input_ids, _ = model.build_inference_input_ids(tokenizer, "Hi.", mode="voice_clone",
                                                   prompt_audio_codes=golden["prompt_audio_codes"], nq=4)
    reference = input_ids[0, :, 0] == 8
    assert (input_ids[0, reference, 5:] == 1024).all() and (input_ids[0, reference, 1:5] != 1024).all()
