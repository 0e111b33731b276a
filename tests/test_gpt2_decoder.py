"""Attention backends, their resolution, RoPE, the KV cache and the decoder stack (gpt2_decoder.py)."""

from __future__ import annotations

import logging
import math
import sys
import types

import pytest
import torch
from transformers import GPT2Config

import devices
import attention
import rotary as rotary_module
import npu_simulation
from configuration_moss_tts_nano import ATTENTION_NAMES
from attention import (
    ATTENTION_FUNCTIONS,
    ATTENTION_IMPLEMENTATIONS,
    AttentionMask,
    build_attention_mask,
    resolve_attention_implementation,
)
from gpt2_decoder import GPT2Decoder
from kv_cache import positions_from_mask
from rotary import make_rotation

# The backends that run their own code on a CPU. flash_attention_2 and npu_fusion_attention need their kernels
# (CUDA / Ascend): here they are tested for what they really do on a CPU (resolution, delegation to sdpa) and,
# with simulated kernels, for how they call those kernels (tests named "simulated").
CPU_BACKENDS = ("eager", "sdpa")
KERNEL_BACKENDS = tuple(name for name in ATTENTION_FUNCTIONS if name not in CPU_BACKENDS)


def _qkv(batch=2, heads=3, queries=5, keys=5, dim=8, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, queries, dim, generator=gen).to(dtype)
    k = torch.randn(batch, heads, keys, dim, generator=gen).to(dtype)
    v = torch.randn(batch, heads, keys, dim, generator=gen).to(dtype)
    return q, k, v


def _left_padded(batch_lengths, total):
    mask = torch.zeros(len(batch_lengths), total, dtype=torch.bool)
    for row, length in enumerate(batch_lengths):
        mask[row, total - length :] = True
    return mask


def _naive_attention(q, k, v, key_valid, scale):
    """Per-row loop, causal aligned to the newest key, over valid keys only; padded queries -> 0."""
    batch, heads, num_q, dim = q.shape
    num_k = k.shape[2]
    out = torch.zeros(batch, num_q, heads * dim)
    for b in range(batch):
        for i in range(num_q):
            absolute = num_k - num_q + i
            if key_valid is not None and not key_valid[b, absolute]:
                continue
            allowed = torch.arange(num_k) <= absolute
            if key_valid is not None:
                allowed &= key_valid[b]
            scores = torch.einsum("hd,hkd->hk", q[b, :, i].float(), k[b].float()) * scale  # (H, T_k)
            probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
            out[b, i] = torch.einsum("hk,hkd->hd", probs, v[b].float()).reshape(-1)
    return out


def rotate_heads(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kernel: str = "real") -> torch.Tensor:
    """x (B, H, T, D) rotated by the model's own `Rotation` (which takes q and k as (B, T, 2, H, D))."""
    qk = x.transpose(1, 2).unsqueeze(2).expand(-1, -1, 2, -1, -1)
    return make_rotation(kernel, cos, sin, x.dtype)(qk)[:, :, 0].transpose(1, 2)


# ------------------------------------------------------------------------------------------------ simulated kernels


def _reference_single(q, k, v, scale, causal):
    """One sequence in flash layout: q (T_q, H, D), k/v (T_k, H, D)."""
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    if causal:
        allowed = torch.arange(k.shape[0])[None, :] <= torch.arange(q.shape[0])[:, None] + (k.shape[0] - q.shape[0])
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v.float()).to(q.dtype)


@pytest.fixture
def simulated_flash_attn(monkeypatch):
    calls = []
    module = types.ModuleType("flash_attn")

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
        calls.append("dense")
        return torch.stack([_reference_single(q[b], k[b], v[b], softmax_scale, causal) for b in range(q.shape[0])])

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
        calls.append("varlen")
        assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
        outs = []
        for b in range(len(cu_seqlens_q) - 1):
            qs = q[cu_seqlens_q[b] : cu_seqlens_q[b + 1]]
            ks, vs = (t[cu_seqlens_k[b] : cu_seqlens_k[b + 1]] for t in (k, v))
            assert qs.shape[0] <= max_seqlen_q and ks.shape[0] <= max_seqlen_k
            if qs.shape[0]:
                outs.append(_reference_single(qs, ks, vs, softmax_scale, causal))
        return torch.cat(outs) if outs else q.new_zeros(0, *q.shape[1:])

    module.flash_attn_func = flash_attn_func
    module.flash_attn_varlen_func = flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    return calls


@pytest.fixture
def simulated_torch_npu(monkeypatch):
    """torch_npu on one Atlas A2 card (Ascend910B3); yields the atten_mask of each fused-attention call."""
    calls = npu_simulation.install(monkeypatch)
    masks = _MaskLog(calls["attention"])
    yield masks
    devices.clear_caches()


class _MaskLog:
    """The atten_mask argument of each simulated npu_fusion_attention call, indexable like a list."""

    def __init__(self, calls):
        self.calls = calls

    def __getitem__(self, index):
        return self.calls[index][3]

    def __len__(self):
        return len(self.calls)


# ------------------------------------------------------------------------------------------------ backends vs eager


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", ["square_padded", "decode_padded", "square_unpadded", "decode_unpadded", "chunk"])
def test_backend_matches_eager_and_naive(backend, case):
    shapes = {"square_padded": (5, 5), "decode_padded": (1, 7), "square_unpadded": (6, 6),
              "decode_unpadded": (1, 4), "chunk": (3, 7)}
    num_q, num_k = shapes[case]
    q, k, v = _qkv(queries=num_q, keys=num_k)
    key_valid = _left_padded([num_k, num_k - 2], num_k) if case.endswith("_padded") or case == "chunk" else None
    mask = build_attention_mask(key_valid, num_q)
    scale = 1 / math.sqrt(q.shape[-1])
    out = ATTENTION_FUNCTIONS[backend](q, k, v, mask, scale)
    reference = ATTENTION_FUNCTIONS["eager"](q, k, v, mask, scale)
    keep = torch.ones(2, num_q, 1, dtype=torch.bool) if mask.query_valid is None else mask.query_valid[..., None]
    assert out.shape == (2, num_q, q.shape[1] * q.shape[-1])
    torch.testing.assert_close(out * keep, reference * keep, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out * keep, _naive_attention(q, k, v, key_valid, scale), atol=1e-5, rtol=1e-5)


def _fully_masked_case():
    q, k, v = _qkv(queries=4, keys=4)
    key_valid = torch.tensor([[False, False, True, True], [False, False, False, True]])
    return q, k, v, build_attention_mask(key_valid, 4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fully_masked_query_rows_stay_finite(backend):
    q, k, v, mask = _fully_masked_case()
    out = ATTENTION_FUNCTIONS[backend](q, k, v, mask, 0.5)
    assert torch.isfinite(out).all()


def test_simulated_flash_attention_dense_and_varlen_match_eager(simulated_flash_attn):
    scale = 0.35
    for key_valid, num_q, expected in ((None, 6, "dense"), (_left_padded([6, 3], 6), 6, "varlen"),
                                       (_left_padded([7, 2], 7), 1, "varlen")):
        num_k = 6 if key_valid is None else key_valid.shape[1]
        q, k, v = _qkv(queries=num_q, keys=num_k, dtype=torch.bfloat16)
        mask = build_attention_mask(key_valid, num_q)
        out = ATTENTION_FUNCTIONS["flash_attention_2"](q, k, v, mask, scale)
        assert simulated_flash_attn[-1] == expected
        reference = _naive_attention(q, k, v, key_valid, scale)
        torch.testing.assert_close(out.float(), reference, atol=2e-2, rtol=2e-2)
        if mask.query_valid is not None:  # padded queries are exactly zero
            assert (out[~mask.query_valid] == 0).all()


def test_simulated_flash_attention_float32_uses_sdpa(simulated_flash_attn):
    q, k, v = _qkv()
    out = ATTENTION_FUNCTIONS["flash_attention_2"](q, k, v, AttentionMask(), 0.3)
    assert simulated_flash_attn == []
    torch.testing.assert_close(out, ATTENTION_FUNCTIONS["eager"](q, k, v, AttentionMask(), 0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_simulated_npu_fusion_attention_inverts_the_mask(simulated_torch_npu, dtype):
    key_valid = _left_padded([5, 3], 5)
    q, k, v = _qkv(queries=5, keys=5, dtype=dtype)
    mask = build_attention_mask(key_valid, 5)
    out = ATTENTION_FUNCTIONS["npu_fusion_attention"](q, k, v, mask, 0.4)
    dropped = simulated_torch_npu[-1]
    assert torch.equal(dropped, ~mask.dense.expand(2, 1, 5, 5))
    torch.testing.assert_close(out.float() * mask.query_valid[..., None],
                               _naive_attention(q, k, v, key_valid, 0.4), atol=2e-2, rtol=2e-2)


def test_simulated_npu_fusion_attention_unpadded_and_float32(simulated_torch_npu):
    q, k, v = _qkv(queries=4, keys=4, dtype=torch.float16)
    out = ATTENTION_FUNCTIONS["npu_fusion_attention"](q, k, v, AttentionMask(), 0.4)
    causal_dropped = ~torch.ones(4, 4, dtype=torch.bool).tril()  # causal, inverted, in the documented [Sq, Skv] shape
    assert torch.equal(simulated_torch_npu[-1], causal_dropped)
    torch.testing.assert_close(out.float(), _naive_attention(q, k, v, None, 0.4), atol=2e-2, rtol=2e-2)
    ATTENTION_FUNCTIONS["npu_fusion_attention"](*_qkv(queries=1, keys=4, dtype=torch.float16), AttentionMask(), 0.4)
    assert simulated_torch_npu[-1] is None  # one query sees every key: no mask at all
    count = len(simulated_torch_npu)
    ATTENTION_FUNCTIONS["npu_fusion_attention"](*_qkv(), AttentionMask(), 0.4)  # float32 -> SDPA inside
    assert len(simulated_torch_npu) == count


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_backends_without_their_kernel_run_sdpa(backend, dtype, monkeypatch):
    monkeypatch.setattr(attention, "_flash_attn_module", lambda: None)  # as on a machine without flash-attn
    monkeypatch.setattr(attention, "npu_fusion_attention_fn", lambda: None)  # ... and without torch_npu
    calls = []
    real = attention.sdpa_attention

    def recording(*args):
        calls.append(args[0].dtype)
        return real(*args)

    monkeypatch.setattr(attention, "sdpa_attention", recording)
    q, k, v = _qkv(dtype=dtype)
    mask = build_attention_mask(_left_padded([5, 3], 5), 5)
    out = ATTENTION_FUNCTIONS[backend](q, k, v, mask, 0.3)
    assert calls == [dtype]  # delegated to sdpa, once, in the model's dtype
    assert torch.equal(out, real(q, k, v, mask, 0.3))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_backends_requested_on_cpu_resolve_to_sdpa(backend, dtype, monkeypatch):
    monkeypatch.setattr(attention, "_DOWNGRADES_LOGGED", set())
    assert resolve_attention_implementation(backend, "cpu", dtype) == "sdpa"
    assert resolve_attention_implementation(backend, torch.device("cpu"), dtype) == "sdpa"


# ------------------------------------------------------------------------------------------------ resolution


def test_attention_names_agree_with_the_config():
    assert ATTENTION_IMPLEMENTATIONS == ATTENTION_NAMES
    assert set(ATTENTION_IMPLEMENTATIONS) == set(ATTENTION_FUNCTIONS) | {"auto"}


@pytest.mark.parametrize("device", ["cpu", "cuda", "npu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_auto_and_explicit_names_resolve(device, dtype):
    assert resolve_attention_implementation("auto", device, dtype) == "sdpa"
    assert resolve_attention_implementation("eager", device, dtype) == "eager"
    assert resolve_attention_implementation("sdpa", device, dtype) == "sdpa"


def test_unknown_attention_name_lists_valid_names():
    with pytest.raises(ValueError, match="'flash3'.*valid:.*'sdpa'.*'flash_attention_2'"):
        resolve_attention_implementation("flash3", "cpu", torch.float32)


def test_flash_on_cpu_falls_back_to_sdpa_with_one_warning(caplog, monkeypatch):
    monkeypatch.setattr(attention, "_DOWNGRADES_LOGGED", set())
    with caplog.at_level(logging.WARNING, logger=attention.logger.name):
        for _ in range(3):
            assert resolve_attention_implementation("flash_attention_2", "cpu", torch.float32) == "sdpa"
    assert len([r for r in caplog.records if "flash_attention_2" in r.getMessage()]) == 1


def test_flash_on_cuda_when_usable(monkeypatch):
    monkeypatch.setattr(attention, "is_flash_attn_usable", lambda device, dtype: dtype == torch.bfloat16)
    assert resolve_attention_implementation("flash_attention_2", "cuda", torch.bfloat16) == "flash_attention_2"
    assert resolve_attention_implementation("flash_attention_2", "cuda", torch.float32) == "sdpa"


def test_simulated_npu_resolution(simulated_torch_npu):
    assert resolve_attention_implementation("flash_attention_2", "npu", torch.float16) == "npu_fusion_attention"
    assert resolve_attention_implementation("npu_fusion_attention", "npu:1", torch.bfloat16) == "npu_fusion_attention"
    assert resolve_attention_implementation("flash_attention_2", "npu", torch.float32) == "sdpa"
    assert resolve_attention_implementation("npu_fusion_attention", "cpu", torch.float16) == "sdpa"


def test_npu_without_torch_npu_falls_back_to_sdpa(monkeypatch):
    monkeypatch.setattr(attention, "npu_fusion_attention_fn", lambda: None)
    assert resolve_attention_implementation("flash_attention_2", "npu", torch.float16) == "sdpa"


# ------------------------------------------------------------------------------------------------ RoPE


def test_rope_rotates_interleaved_pairs_in_float32():
    rotary = rotary_module.RotaryEmbedding(head_dim=8, base=10000.0)
    positions = torch.tensor([[0, 1, 5]])
    cos, sin = rotary.angles(positions)
    assert cos.dtype == torch.float32 and cos.shape == (1, 1, 3, 4)
    x = torch.randn(1, 2, 3, 8)
    out = rotate_heads(x, cos, sin)
    for t, p in enumerate([0, 1, 5]):
        for j in range(4):
            angle = p * 10000.0 ** (-2 * j / 8)
            x0, x1 = x[..., t, 2 * j], x[..., t, 2 * j + 1]
            torch.testing.assert_close(out[..., t, 2 * j], x0 * math.cos(angle) - x1 * math.sin(angle))
            torch.testing.assert_close(out[..., t, 2 * j + 1], x1 * math.cos(angle) + x0 * math.sin(angle))


def test_rope_angles_exact_for_large_positions_in_bfloat16_models():
    rotary = rotary_module.RotaryEmbedding(head_dim=4, base=10000.0)
    cos, _ = rotary.angles(torch.tensor([[1000, 1001]]))
    assert cos[0, 0, 0, 0] != cos[0, 0, 1, 0]  # float32 angles: neighbouring positions above 256 stay distinct
    x = torch.randn(1, 1, 2, 4, dtype=torch.bfloat16)
    assert rotate_heads(x, *rotary.angles(torch.tensor([[3, 4]]))).dtype == torch.bfloat16


def test_positions_from_left_padded_mask():
    mask = torch.tensor([[False, False, True, True, True], [True, True, True, True, True]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


# ------------------------------------------------------------------------------------------------ decoder + cache


def _decoder(layers=2):
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_head=4, n_layer=layers, n_inner=48, vocab_size=50, rope_base=10000.0,
                        activation_function="gelu_new")
    decoder = GPT2Decoder(config, layers).eval()
    with torch.no_grad():
        for module in decoder.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.bias.normal_(0, 0.1)
    return decoder


def _full(decoder, x, mask, backend):
    attn_mask = build_attention_mask(mask, x.shape[1])
    return decoder(x, decoder.rotary.rotation(positions_from_mask(mask)), attn_mask, ATTENTION_FUNCTIONS[backend])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cached_decoding_matches_full_recompute(backend):
    decoder = _decoder()
    x = torch.randn(2, 9, 32)
    mask = _left_padded([9, 5], 9)
    mask[1, 7] = False  # a masked row inside the sequence (a finished generation row)
    full, _ = _full(decoder, x, mask, "eager")
    cache = decoder.new_cache(2, 4, dtype=torch.float32, device=torch.device("cpu"))  # grows twice
    outs = []
    for start, end in ((0, 6), (6, 7), (7, 8), (8, 9)):
        key_valid, positions = cache.extend_mask(mask[:, start:end])
        attn_mask = build_attention_mask(key_valid, end - start)
        out, _ = decoder(x[:, start:end], decoder.rotary.rotation(positions), attn_mask, ATTENTION_FUNCTIONS[backend],
                         cache)
        outs.append(out)
    assert cache.length == 9 and cache.capacity >= 9
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)


def test_padded_rows_are_exactly_zero_everywhere():
    decoder = _decoder()
    mask = _left_padded([6, 2], 6)
    out, states = decoder(torch.randn(2, 6, 32), decoder.rotary.rotation(positions_from_mask(mask)),
                          build_attention_mask(mask, 6), ATTENTION_FUNCTIONS["sdpa"], collect_hidden=True)
    assert len(states) == 3 and states[-1] is out
    for hidden in states:
        assert (hidden[~mask] == 0).all() and (hidden[mask] != 0).any()


def test_unknown_activation_is_rejected():
    config = GPT2Config(n_embd=8, n_head=2, n_layer=1, activation_function="swishy")
    with pytest.raises(ValueError, match="activation_function='swishy'"):
        GPT2Decoder(config, 1)
