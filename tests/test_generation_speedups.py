"""The generation fast paths give the reference results; the opt-in int8 weight mode stays close to float32."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from configuration_moss_tts_nano import MossTTSNanoConfig
import linear_kernels
from attention import AttentionMask
from linear_kernels import (
    SPLIT_MAX_ROWS,
    SPLIT_PARTS,
    linear,
    split_matvec_linear,
)
from rotary import RotaryEmbedding, rotate_pairs
from test_gpt2_decoder import rotate_heads
from modeling_moss_tts_nano import MossTTSNanoForCausalLM
from teacher_forcing import teacher_forced_logits

N_VQ, CODES, PAD = 4, 32, 32
INT8_MIN_COSINE = 0.999  # teacher-forced logits, int8 weights vs float32 (the documented tolerance)
needs_int8_engine = pytest.mark.skipif(
    not {"x86", "fbgemm"} & set(torch.backends.quantized.supported_engines),
    reason="this torch build has no x86/fbgemm quantized engine (int8 weight precision is x86-only)",
)


def tiny_model(seed: int = 0) -> MossTTSNanoForCausalLM:
    config = MossTTSNanoConfig(
        gpt2_config=dict(n_embd=64, n_head=4, n_layer=2, n_inner=128, vocab_size=64, n_positions=256),
        n_vq=N_VQ, audio_vocab_size=CODES, audio_pad_token_id=PAD, local_transformer_layers=1,
    )
    torch.manual_seed(seed)
    model = MossTTSNanoForCausalLM(config).eval()
    with torch.no_grad():  # lean the continue / audio_end decision so generation runs its full length
        direction = model.transformer.wte.weight[9] - model.transformer.wte.weight[7]
        model.local_transformer.ln_f.bias += 40.0 * direction / direction.pow(2).sum()  # logit gap ~40
    return model


def prompt_rows(length: int = 12, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rows = torch.full((1, length, N_VQ + 1), PAD, dtype=torch.long)
    rows[0, :, 0] = torch.randint(10, 64, (length,), generator=gen)
    rows[0, -4:-1, 0] = 8
    rows[0, -4:-1, 1:] = torch.randint(0, CODES, (3, N_VQ), generator=gen)
    rows[0, -1, 0] = 6
    return rows


@pytest.fixture()
def model() -> MossTTSNanoForCausalLM:
    return tiny_model()


# ------------------------------------------------------------------------------------------------ RoPE fast path


def test_rotate_pairs_matches_the_interleaved_formula_on_strided_input():
    x = torch.randn(2, 5, 3, 4, 16).permute(0, 3, 1, 2, 4)[..., 1, :]  # (B, H, T, D), not contiguous
    cos, sin = RotaryEmbedding(16, 10000.0).angles(torch.arange(5)[None] + 7)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    expected = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    for kernel in ("real", "complex"):  # the portable kernel and the CPU fast path
        torch.testing.assert_close(rotate_heads(x, cos, sin, kernel), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rotate_pairs(x, torch.complex(cos, sin)), expected, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------------ float32 paths


@pytest.mark.parametrize("settings", [dict(), dict(audio_repetition_penalty=1.3), dict(nq=3)])
def test_cached_greedy_codes_equal_full_recompute(model, settings):
    rows = prompt_rows()
    cached = model.generate(rows, max_new_frames=8, **settings)
    recomputed = model.generate(rows, max_new_frames=8, use_kv_cache=False, **settings)
    assert cached.audio_token_ids.shape[1] == 8
    assert torch.equal(cached.audio_token_ids, recomputed.audio_token_ids)
    assert torch.equal(cached.num_frames, recomputed.num_frames)


def test_cached_local_decoder_hidden_states_match_the_full_sequence(model):
    local = model.local_transformer
    sequence = torch.randn(2, N_VQ + 1, 64)
    attend = model.attention_functions()[1]
    positions = torch.arange(N_VQ + 1)[None]
    full, _ = local(sequence, local.rotary.rotation(positions), AttentionMask(), attend, None)
    cache = local.new_cache(2, N_VQ + 1, dtype=torch.float32, device=torch.device("cpu"), track_padding=False)
    steps = []
    for p in range(N_VQ + 1):
        rope = local.rotary.rotation(positions[:, p : p + 1])
        steps.append(local(sequence[:, p : p + 1], rope, AttentionMask(), attend, cache)[0])
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("lead", [(1,), (1, 1), (3,), (2, 1), (4, 4), (SPLIT_MAX_ROWS,)])
def test_split_matvec_linear_equals_f_linear(with_bias, lead):
    gen = torch.Generator().manual_seed(len(lead) + lead[-1])
    weight = torch.randn(8 * SPLIT_PARTS, 48, generator=gen)
    bias = torch.randn(8 * SPLIT_PARTS, generator=gen) if with_bias else None
    x = torch.randn(*lead, 48, generator=gen)
    out = split_matvec_linear(x, weight, bias)
    assert out.shape == (*lead, 8 * SPLIT_PARTS) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, weight, bias), atol=1e-5, rtol=1e-5)


def test_linear_picks_its_path_by_rows_dtype_and_layout(monkeypatch):
    calls = []
    real_split = linear_kernels.split_matvec_linear
    monkeypatch.setattr(linear_kernels, "split_matvec_linear",
                        lambda *a: calls.append(("split", a[0].shape)) or real_split(*a))
    real_ops = torch.ops.mkldnn

    class SpyOps:  # records oneDNN calls, forwards them to the real op
        def _linear_pointwise(self, *args):
            calls.append(("onednn", args[0].shape))
            return real_ops._linear_pointwise(*args)

    monkeypatch.setattr(torch.ops, "mkldnn", SpyOps())
    weight, bias = torch.randn(4 * SPLIT_PARTS, 8), torch.randn(4 * SPLIT_PARTS)
    for x in (torch.randn(1, 1, 8), torch.randn(SPLIT_MAX_ROWS, 8), torch.randn(2, SPLIT_MAX_ROWS, 8)):
        torch.testing.assert_close(linear(x, weight, bias), F.linear(x, weight, bias), atol=1e-5, rtol=1e-5)
    prompt = ("onednn", (2 * SPLIT_MAX_ROWS, 8)) if linear_kernels.onednn_linear_usable() else None
    assert calls == [("split", (1, 1, 8)), ("split", (SPLIT_MAX_ROWS, 8))] + ([prompt] if prompt else [])
    calls.clear()
    for x, w in [
        (torch.randn(1, 8), torch.randn(4 * SPLIT_PARTS + 1, 8)),  # rows not divisible into the blocks
        (torch.randn(1, 8), torch.randn(8, 4 * SPLIT_PARTS).t()),  # non-contiguous weight
        (torch.randn(SPLIT_MAX_ROWS + 3, 8, dtype=torch.float64), weight.double()),
        (torch.randn(SPLIT_MAX_ROWS + 3, 8, requires_grad=True), weight),  # training: the oneDNN op has no backward
    ]:
        out = linear(x, w)
        torch.testing.assert_close(out, F.linear(x, w))
    out.sum().backward()
    assert calls == []


def test_onednn_linear_is_only_used_where_it_was_measured(monkeypatch):
    linear_kernels.onednn_linear_usable.cache_clear()
    monkeypatch.setattr(linear_kernels.platform, "machine", lambda: "aarch64")
    try:
        assert linear_kernels.onednn_linear_usable() is False
        x, w = torch.randn(SPLIT_MAX_ROWS + 1, 8), torch.randn(12, 8)
        torch.testing.assert_close(linear(x, w), F.linear(x, w))
    finally:
        linear_kernels.onednn_linear_usable.cache_clear()


# ------------------------------------------------------------------------------------------------ int8 weights


@needs_int8_engine
def test_int8_teacher_forced_logits_stay_close_to_float32(model):
    rows = prompt_rows()
    frames = model.generate(rows, max_new_frames=6).audio_token_ids
    reference = teacher_forced_logits(model, rows, None, frames)
    model.set_weight_precision("int8")
    assert model.weight_precision == "int8"
    quantized = teacher_forced_logits(model, rows, None, frames)
    audio_cos = F.cosine_similarity(quantized.audio.flatten(0, -2), reference.audio.flatten(0, -2), dim=-1)
    text_cos = F.cosine_similarity(quantized.text.flatten(0, -2), reference.text.flatten(0, -2), dim=-1)
    assert audio_cos.min() >= INT8_MIN_COSINE and text_cos.min() >= INT8_MIN_COSINE
    assert not torch.equal(quantized.audio, reference.audio)  # the int8 path really ran


@needs_int8_engine
def test_kernel_plan_names_the_int8_kernel_while_int8_weights_run(model):
    """Reports read the plan: with int8 weights it names fbgemm, and float32 again names the float32 kernel."""
    float32_linear = model.kernel_plan().linear
    model.set_weight_precision("int8")
    assert model.kernel_plan().linear == "fbgemm"
    assert model.kernel_plan().describe()["linear"] == "fbgemm (cpu fast path)"
    model.set_weight_precision("float32")
    assert model.kernel_plan().linear == float32_linear != "fbgemm"


@needs_int8_engine
@pytest.mark.parametrize("do_sample", [False, True])
def test_int8_generates_valid_codes(model, do_sample):
    model.set_weight_precision("int8")
    generator = torch.Generator().manual_seed(0)
    codes = model.generate(prompt_rows(), max_new_frames=6, do_sample=do_sample, generator=generator).audio_token_ids
    assert codes.shape == (1, 6, N_VQ)
    assert bool(((codes >= 0) & (codes < CODES)).all())


@needs_int8_engine
def test_float32_after_int8_is_exact_and_state_dict_is_untouched(model):
    rows = prompt_rows()
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before = model.generate(rows, max_new_frames=6)
    model.set_weight_precision("int8")
    assert set(model.state_dict()) == set(before_state)
    assert all(torch.equal(v, before_state[k]) for k, v in model.state_dict().items())
    model.set_weight_precision("float32")
    assert model.weight_precision == "float32"
    assert torch.equal(model.generate(rows, max_new_frames=6).audio_token_ids, before.audio_token_ids)


@needs_int8_engine
def test_casting_an_int8_model_returns_it_to_float32(model, caplog):
    model.set_weight_precision("int8")
    model.to(torch.float32)  # still CPU float32: the packed copy is rebuilt
    assert model.weight_precision == "int8"
    with caplog.at_level(logging.WARNING):
        model.to(torch.bfloat16)
    assert model.weight_precision == "float32"
    assert "switches it back to float32" in caplog.text


@needs_int8_engine
def test_first_int8_forwards_from_several_threads_equal_serial_ones_and_build_nothing(monkeypatch):
    """set_weight_precision builds the int8 state whole; forwards only read it, so threads running the first
    forwards at once (one and several rows: both int8 kernels) compute what one thread computes."""
    layer = linear_kernels.PrecisionLinear(64, 96)
    layer.set_weight_precision("int8")
    builds = []
    real = linear_kernels._pack_int8_rows
    monkeypatch.setattr(linear_kernels, "_pack_int8_rows", lambda weight: builds.append(1) or real(weight))
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(rows, 64, generator=generator) for rows in (1, 3, 1, 5, 2, 1, 4, 3)]
    barrier = threading.Barrier(len(inputs))

    def first_forward(x):
        barrier.wait(timeout=60)
        with torch.no_grad():
            return layer(x)

    with ThreadPoolExecutor(len(inputs)) as pool:
        together = list(pool.map(first_forward, inputs))
    with torch.no_grad():
        assert all(torch.equal(out, layer(x)) for x, out in zip(inputs, together))
    assert builds == [] and layer.weight_precision == "int8"


@needs_int8_engine
def test_the_float32_retry_model_of_an_int8_model_keeps_no_int8_state(model):
    """The numerical retry runs plain float32: its layers hold no packed weight (nor its row sums), and its
    logits are the float32 model's, while the caller's model stays int8."""
    from shared_resources import float32_retry_model

    rows = prompt_rows()
    frames = model.generate(rows, max_new_frames=4).audio_token_ids
    reference = teacher_forced_logits(model, rows, None, frames)
    model.set_weight_precision("int8")
    retry = float32_retry_model(model, torch.device("cpu"))
    layers = [m for m in retry.modules() if isinstance(m, linear_kernels.PrecisionLinear)]
    assert layers and all(m.weight_precision == "float32" and m._packed_rows is None for m in layers)
    torch.testing.assert_close(teacher_forced_logits(retry, rows, None, frames).audio, reference.audio,
                               atol=1e-4, rtol=1e-4)
    assert model.weight_precision == "int8"


def test_unknown_weight_precision_is_a_value_error(model):
    expected = r"precision='int4' is not a known weight precision; valid: \('float32', 'int8'\)"
    with pytest.raises(ValueError, match=expected):
        model.set_weight_precision("int4")


def test_int8_needs_a_float32_cpu_model(model):
    model.to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="int8 weight precision needs a float32 CPU model"):
        model.set_weight_precision("int8")
