"""Issue 18, items 1-6: what the torch_npu wheels say would fail on a real card, on a simulated torch_npu
(npu_simulation.py): the aclop npu_rotary_mul, npu_fusion_attention's documented shapes, a zero exponential draw,
float64 casts on the device, the current device of threads, and the wheels' facts behind the comments."""

from __future__ import annotations

import logging
import sys
import threading

import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import GPT2Config

import devices
import engine
import kernel_probes
import attention
import npu_probes
import npu_simulation
from npu_simulation import fresh_probes  # noqa: F401 (an autouse fixture: fresh probes per test)
import rotary
import teacher_forcing
import verification_metrics
from attention import ATTENTION_FUNCTIONS, build_attention_mask
from gpt2_decoder import GPT2Decoder, resolve_kernel_plan
from sampling import select_tokens


# ---------------------------------------------------------------------------------------------------------------
# 1. npu_rotary_mul's interleave mode: the aclop fallback raises for every call


def _plan(heads=12, head_dim=64, dtype=torch.float16):
    return resolve_kernel_plan(("npu_fusion_attention", "npu_fusion_attention"), "npu:0", dtype, heads, head_dim)


def _rotate_with(plan, dtype=torch.float16):
    embedding = rotary.RotaryEmbedding(64, 10000.0)
    qk = torch.randn(2, 5, 2, 12, 64).to(dtype)
    return embedding.rotation(torch.arange(5)[None] + 3, plan.rope, dtype)(qk)


@pytest.mark.parametrize("setting", ["jit_compile on", "CANN without aclnnRotaryPositionEmbedding"])
def test_simulated_aclop_rotary_mul_plans_the_real_kernel_and_says_why(monkeypatch, setting):
    jit = setting == "jit_compile on"
    npu_simulation.install(monkeypatch, npu_simulation.simulated_cards(jit_compile=jit), aclnn_rotary=jit)
    plan = _plan()
    assert plan.rope == "real"
    expected = "JIT compilation is on" if jit else npu_simulation.ACLOP_ROTARY_ERROR + "interleave"
    assert expected in plan.reasons["rope"]
    out = _rotate_with(plan)  # generation's RoPE runs; with "npu_rotary_mul" planned every call would raise
    assert out.shape == (2, 5, 2, 12, 64) and torch.isfinite(out).all()


def test_simulated_aclnn_rotary_mul_passes_the_probe_with_one_tiny_call(monkeypatch):
    calls = npu_simulation.install(monkeypatch)["rotary"]
    plan = _plan(dtype=torch.bfloat16)
    assert plan.rope == "npu_rotary_mul" and "probe call" in plan.reasons["rope"]
    assert len(calls) == 1 and calls[0][0].shape == (1, 3, 24, 64) and calls[0][0].dtype == torch.bfloat16


def test_simulated_rotary_mul_with_other_semantics_fails_the_probe(monkeypatch):
    npu_simulation.install(monkeypatch)
    torch_npu = sys.modules["torch_npu"]
    half_mode = npu_simulation.SimulatedOp(lambda x, r1, r2, rotary_mode="half": r1 * x, str(
        torch_npu.npu_rotary_mul.default._schema))  # ignores the rotation part: a kernel that does something else
    monkeypatch.setattr(torch_npu, "npu_rotary_mul", half_mode)
    devices.clear_caches()
    plan = _plan()
    assert plan.rope == "real" and "differs from the real-valued kernel" in plan.reasons["rope"]


def test_simulated_torch_npu_without_the_jit_probe_is_not_trusted(monkeypatch):
    cards = npu_simulation.simulated_cards()
    del cards.is_jit_compile_false
    npu_simulation.install(monkeypatch, cards)
    plan = _plan()
    assert plan.rope == "real" and "is_jit_compile_false is missing" in plan.reasons["rope"]


# ---------------------------------------------------------------------------------------------------------------
# 2. npu_fusion_attention: only the shapes the installed release documents


def _decoder(head_dim=64, heads=2, layers=2):
    torch.manual_seed(0)
    config = GPT2Config(n_embd=heads * head_dim, n_head=heads, n_layer=layers, n_inner=64, vocab_size=50,
                        rope_base=10000.0, activation_function="gelu_new")
    return GPT2Decoder(config, layers).eval().half()


def _prefill_and_decode(decoder, prefill: int, steps: int):
    """Attention outputs of a prefill of `prefill` rows and `steps` one-row decode steps, with a KV cache."""
    width = decoder.rotary.head_dim * 2
    x = torch.randn(1, prefill + steps, width, generator=torch.Generator().manual_seed(1)).half()
    cache = decoder.new_cache(1, prefill + steps, dtype=torch.float16, device=torch.device("cpu"))
    outs = []
    for start, end in [(0, prefill)] + [(p, p + 1) for p in range(prefill, prefill + steps)]:
        key_valid, positions = cache.extend_mask(torch.ones(1, end - start, dtype=torch.bool))
        rope, attn_mask = decoder.rotary.rotation(positions), build_attention_mask(key_valid, end - start)
        out, _ = decoder(x[:, start:end], rope, attn_mask, ATTENTION_FUNCTIONS["npu_fusion_attention"], cache)
        outs.append(out)
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("version", ["2.3.1.post2", "2.4.0"])
def test_simulated_sequence_16_release_fuses_only_documented_shapes(monkeypatch, caplog, version):
    calls = npu_simulation.install(monkeypatch, version=version)["attention"]
    decoder = _decoder()
    with caplog.at_level(logging.INFO, logger=npu_probes.logger.name):
        fused = _prefill_and_decode(decoder, prefill=16, steps=3)  # the kernel raises for any other shape
    assert [tuple(call[0].shape) for call in calls] == [(1, 2, 16, 64)] * 2  # the prefill of each layer only
    npu_simulation.install(monkeypatch, version=version, with_fusion=False)
    torch.testing.assert_close(fused, _prefill_and_decode(decoder, 16, 3), atol=2e-3, rtol=2e-3)
    logged = [r.getMessage() for r in caplog.records if "multiple of 16" in r.getMessage()]
    assert len(logged) == 1  # once per shape class, not per call


def test_simulated_sequence_16_release_refuses_an_undocumented_head_dim(monkeypatch):
    calls = npu_simulation.install(monkeypatch, version="2.3.1")["attention"]
    _prefill_and_decode(_decoder(head_dim=32), prefill=16, steps=1)
    assert calls == []  # head_dim 32 is not one of 64, 80, 96, 120, 128, 256


def test_simulated_later_release_fuses_decode_steps_too(monkeypatch):
    calls = npu_simulation.install(monkeypatch, version="2.5.1")["attention"]
    _prefill_and_decode(_decoder(head_dim=32), prefill=7, steps=2)
    assert [call[0].shape[2] for call in calls] == [7, 7, 1, 1, 1, 1]


@pytest.mark.parametrize(("version", "sixteen"), [
    ("2.1.0.post8", True), ("2.1.0.post10", True), ("2.1.0.post12", False), ("2.3.1", True), ("2.3.1.post4", True),
    ("2.3.1.post6", False), ("2.4.0.post2", True), ("2.4.0.post4", False), ("2.5.1", False), ("2.14.0", False),
    ("2.5.1+cpu", False), ("unknown", True), (None, True),
])
def test_fusion_attention_limits_follow_the_release_docs(version, sixteen):
    limits = npu_probes.limits_for_release(version)
    assert (limits.sequence_multiple == 16) == sixteen
    assert (limits.problem(1, 12, 1, 37, 64) is None) == (not sixteen)  # a decode step
    assert limits.problem(1, 12, 32, 48, 64) is None
    assert limits.problem(1, 12, 32, 48, 772) is not None  # head_dim beyond every release's docs
    for shape in ((1, 12, 1, 37, 64), (1, 12, 32, 48, 64), (1, 12, 32, 48, 772), (3, 300, 16, 16, 64)):
        assert all(limits.shape_class(*shape)) == (limits.problem(*shape) is None), shape


def test_kernel_plan_names_the_fused_attention_shapes(monkeypatch):
    npu_simulation.install(monkeypatch, version="2.3.1.post4")
    plan = _plan()
    assert plan.attention == ("npu_fusion_attention", "npu_fusion_attention")
    assert "multiples of 16" in plan.reasons["attention"] and "2.3.1" in plan.reasons["attention"]


# ---------------------------------------------------------------------------------------------------------------
# 3. A zero exponential draw never picks a zero-probability token


def test_a_zero_exponential_draw_never_picks_an_impossible_token(monkeypatch):
    """An accelerator's float32 exponential is -log(u) with u in (0, 1]: u = 1.0 gives exactly 0."""
    def forced_draw(self, lambd=1.0, *, generator=None):
        return self.fill_(0.0).index_fill_(-1, torch.tensor([2]), 1.0)  # every draw 0 except token 2's

    scores = torch.tensor([[float("-inf"), 0.0, 1.0, float("-inf")], [2.0, float("-inf"), 0.0, 0.5]])
    monkeypatch.setattr(torch.Tensor, "exponential_", forced_draw)
    picked = select_tokens(scores, do_sample=True, generator=torch.Generator().manual_seed(0))
    probabilities = torch.softmax(scores, dim=-1)
    assert (probabilities.gather(1, picked[:, None]) > 0).all(), picked  # before the guard: NaN at 0 won argmax
    assert picked.tolist() == [1, 0]  # a zero draw wins the race among possible tokens: the first such index


# ---------------------------------------------------------------------------------------------------------------
# 4. Verification widens on the host, never on the device


class _MetaAsAccelerator(TorchFunctionMode):
    """The meta device plays the accelerator: a copy to the CPU gives zeros of the source dtype, and every float64
    tensor created on the "device" (a `.to("cpu", torch.float64)` widens there first) is recorded."""

    def __init__(self):
        super().__init__()
        self.device_float64 = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if source is not None and source.is_meta and func in (torch.Tensor.to, torch.Tensor.cpu):
            device, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs) if func is torch.Tensor.to else (
                torch.device("cpu"), None, None, None)
            if device is not None and device.type == "cpu":
                if dtype is not None and dtype != source.dtype:
                    self.device_float64.append(f"{func.__name__} widened to {dtype} before the copy")
                return torch.zeros(source.shape, dtype=dtype or source.dtype)
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and out.is_meta and out.dtype == torch.float64:
            self.device_float64.append(func.__name__)
        return out


def test_verification_metrics_copy_to_the_host_before_widening():
    reference, other = torch.empty(3, 4, dtype=torch.float16, device="meta"), torch.empty(3, 4, device="meta")
    mode = _MetaAsAccelerator()
    with mode:
        cosine = verification_metrics.cosine_similarity(reference, other)
        difference = verification_metrics.max_abs_difference(reference, other)
        logits = teacher_forcing.TeacherForcedLogits(reference[None, :, :2], reference[None, :, None], (4,)).to("cpu")
    assert mode.device_float64 == []
    assert cosine == 1.0 and difference == 0.0 and logits.text.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------
# 5. The current device of a thread


def test_simulated_second_card_is_made_current_only_in_threads_the_caller_owns(monkeypatch):
    cards = npu_simulation.simulated_cards(("Ascend910B3", "Ascend910B3"))
    npu_simulation.install(monkeypatch, cards)
    assert devices.resolve_dtype("bf16", "npu:1") == torch.bfloat16 and kernel_probes.npu_fused_kernel_problem() is None
    assert _plan().rope == "npu_rotary_mul"  # the kernel plan and its probe call
    assert cards.set_device_calls == []  # library calls never change the caller's current device
    devices.use_device_in_this_thread("npu:1")
    devices.use_device_in_this_thread(torch.device("cpu"))
    devices.use_device_in_this_thread("cpu")
    devices.use_device_in_this_thread("npu")  # unindexed: the current device already
    assert cards.set_device_calls == [(threading.current_thread().name, 1)]


def test_the_engine_worker_thread_makes_the_model_device_current(monkeypatch, tmp_path):
    from pipeline_assets import TinyAssets

    assets = TinyAssets(tmp_path)
    seen = []
    monkeypatch.setattr(devices, "use_device_in_this_thread",
                        lambda device: seen.append((threading.current_thread().name, torch.device(device))))
    with engine.SynthesisEngine(assets.model, **assets.resources(), max_batch_size=1):
        pass
    assert seen == [("moss-tts-engine", torch.device("cpu"))]  # the worker thread, not the caller's


# ---------------------------------------------------------------------------------------------------------------
# 6. The simulated stack agrees with the wheels


def test_simulated_get_device_name_ignores_its_index_like_later_releases():
    cards = npu_simulation.simulated_cards(("Ascend910B3", "Ascend910B4"), current=0)
    assert cards.get_device_name(1) == "Ascend910B3"  # torch_npu 2.1.0.post12, 2.3.1.post6, 2.4.0.post4, 2.5.1 on
    assert cards.get_device_properties(1).name == "Ascend910B4"


def test_infer_npu_prints_the_planned_kernels_and_why(monkeypatch):
    import infer_npu
    from pipeline_assets import tiny_tts

    npu_simulation.install(monkeypatch, npu_simulation.simulated_cards(jit_compile=True))
    model = tiny_tts()
    line = infer_npu.kernel_reasons(model)  # the CPU model: the CPU's plan
    assert line.startswith("kernels: rope=") and "attention=sdpa/sdpa (requested " in line
    plan = _plan()  # what the same line says for an NPU whose torch_npu runs the aclop npu_rotary_mul
    monkeypatch.setattr(model, "kernel_plan", lambda: plan)
    assert "rope=real (JIT compilation is on" in infer_npu.kernel_reasons(model)
