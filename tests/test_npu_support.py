"""Kernels chosen by what the Ascend card supports, on a simulated torch_npu (see npu_simulation.py): the SoC gate of
the fused kernels, bfloat16, torch_npu's real out-of-memory and fault messages, card names, the fused attention's mask
and inputs, and npu_rotary_mul's selection and call layout."""

from __future__ import annotations

import json
import logging
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GPT2Config

import failures
import devices
import attention
import kernel_probes
import kv_cache
import npu_simulation
from npu_simulation import fresh_probes  # noqa: F401 (an autouse fixture: fresh probes per test)
from npu_simulation import run_python
import rotary
from attention import ATTENTION_FUNCTIONS, build_attention_mask, resolve_attention_implementation
from gpt2_decoder import GPT2Decoder
from rotary import make_rotation, resolve_rotary_kernel


def _cards(name, **kwargs):
    return npu_simulation.simulated_cards((name,), **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# The SoC gate of npu_fusion_attention


@pytest.mark.parametrize("name", ["Ascend910B3", "Ascend910_9391"])
@pytest.mark.parametrize("with_soc_getter", [True, False])
def test_simulated_atlas_a2_a3_soc_gets_the_fused_kernel(monkeypatch, name, with_soc_getter):
    npu_simulation.install(monkeypatch, _cards(name, with_soc_getter=with_soc_getter))
    assert kernel_probes.npu_fused_kernel_problem() is None
    for requested in ("npu_fusion_attention", "flash_attention_2"):
        assert resolve_attention_implementation(requested, "npu:0", torch.float16) == "npu_fusion_attention"


@pytest.mark.parametrize("name", ["Ascend910A", "Ascend910B", "Ascend310P3"])  # "Ascend910B" is a first-gen 910
@pytest.mark.parametrize("with_soc_getter", [True, False])
def test_simulated_older_soc_falls_back_to_sdpa_with_one_warning(monkeypatch, caplog, name, with_soc_getter):
    calls = npu_simulation.install(monkeypatch, _cards(name, with_soc_getter=with_soc_getter))
    with caplog.at_level(logging.WARNING, logger=attention.logger.name):
        for _ in range(3):
            assert resolve_attention_implementation("npu_fusion_attention", "npu:0", torch.float16) == "sdpa"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and name in warnings[0] and "Atlas A2/A3" in warnings[0] and "sdpa" in warnings[0]
    assert kernel_probes.npu_fusion_attention_fn() is None
    # The backend itself, called anyway (an explicit request on that card), runs SDPA instead of failing.
    q, k, v = (torch.randn(1, 2, 3, 4, dtype=torch.float16) for _ in range(3))
    mask = build_attention_mask(None, 3)
    out = ATTENTION_FUNCTIONS["npu_fusion_attention"](q, k, v, mask, 0.5)
    torch.testing.assert_close(out, ATTENTION_FUNCTIONS["sdpa"](q, k, v, mask, 0.5))
    assert calls["attention"] == []


# ---------------------------------------------------------------------------------------------------------------
# bfloat16


def test_simulated_npu_without_bfloat16_refuses_it_and_names_float16(monkeypatch):
    npu_simulation.install(monkeypatch, _cards("Ascend910A", bf16=False))
    with pytest.raises(ValueError, match=r"dtype='bfloat16'.*Ascend910A.*use float16"):
        devices.resolve_dtype("bfloat16", "npu:0")
    assert devices.resolve_dtype("float16", "npu:0") is torch.float16
    assert devices.resolve_dtype("auto", "npu") is torch.float16


def test_simulated_npu_with_bfloat16_accepts_it(monkeypatch):
    npu_simulation.install(monkeypatch, _cards("Ascend910B3", bf16=True))
    assert devices.resolve_dtype("bf16", "npu:0") is torch.bfloat16


# ---------------------------------------------------------------------------------------------------------------
# torch_npu's real messages (formats of NPUException.h, descriptions of NPUErrorCodes.h, allocator text of
# libtorch_npu.so; the symbolic ACL_ERROR_RT_* names are never printed)

_PTA = "[ERROR] 2025-01-01-00:00:00 (PID:4242, Device:0, RankID:-1) ERR00100 PTA call acl api failed"


def _acl_error(call: str, code: int, description: str) -> RuntimeError:
    return RuntimeError(f"{call}:torch_npu/csrc/core/npu/NPUCachingAllocator.cpp:1123 NPU function error: {call}, "
                        f"error code is {code}\n{_PTA}\n[Error]: {description}\n"
                        "        Rectify the fault based on the error information in the ascend log.\n")


NPU_OUT_OF_MEMORY = [
    _acl_error("aclrtMallocAlign32(&block, size, aclrtMemMallocPolicy::ACL_MEM_MALLOC_HUGE_FIRST)", 207001,
               "Failed to apply for memory."),
    _acl_error("aclrtMalloc(&ptr, size, ACL_MEM_MALLOC_HUGE_FIRST)", 207018, "The memory on the device is exhausted. "),
    RuntimeError("NPU out of memory. Tried to allocate 2.00 GiB (NPU 0; 60.96 GiB total capacity; 58.10 GiB already "
                 "allocated; 58.10 GiB current active; 1.20 GiB free; 59.00 GiB reserved in total by PyTorch)"),
    RuntimeError("NPU out of memory. NPUWorkspaceAllocator tried to allocate 512.00 MiB(NPU 0; 60.96 GiB total "
                 "capacity; 1.20 GiB free)"),
]
NPU_NUMERICAL_FAULTS = [
    _acl_error("c10_npu::acl::AclrtSynchronizeStreamWithTimeout(stream)", 507015, "The aicore execution is abnormal. "),
    _acl_error("c10_npu::acl::AclrtSynchronizeStreamWithTimeout(stream)", 507035,
               "The vector core execution is abnormal. "),
    _acl_error("aclnnIndexSelect", 207003, "The operation of the aicore operator overflows."),
    _acl_error("c10_npu::acl::AclrtSynchronizeStreamWithTimeout(stream)", 507042,
               "The aicore trap read out-of-bounds exception. "),
    _acl_error("c10_npu::acl::AclrtSynchronizeStreamWithTimeout(stream)", 507045,
               "Vector core trap write out-of-bounds exception. "),
]
NPU_HARD_FAULTS = [
    _acl_error("c10_npu::acl::AclrtSynchronizeStreamWithTimeout(stream)", 507014, "The aicore execution times out. "),
    _acl_error("c10_npu::acl::AclrtSynchronizeStreamWithTimeout(stream)", 507034, "Vector core execution timed out. "),
    _acl_error("aclrtMemcpy", 507013, "System Direct Memory Access (DMA) hardware execution error. "),
    RuntimeError("Run:torch_npu/csrc/framework/OpParamMaker.cpp:123 NPU function error: HBM MULTI BIT ECC ERROR."
                 "time is 1700000000, error code is 507054"),
    RuntimeError("Run:torch_npu/csrc/framework/OpParamMaker.cpp:123 NPU function error: FORCE STOP., error code is "
                 "107022"),
]


@pytest.mark.parametrize("error", NPU_OUT_OF_MEMORY, ids=lambda e: str(e)[:40])
def test_npu_out_of_memory_messages_are_recognised(error):
    assert failures.is_out_of_memory_error(error)
    assert not failures.is_stability_error(error)


@pytest.mark.parametrize("error", NPU_NUMERICAL_FAULTS, ids=lambda e: str(e).split("error code is ")[1][:6])
def test_npu_numerical_faults_are_stability_errors(error):
    assert failures.is_stability_error(error)
    assert not failures.is_out_of_memory_error(error)


@pytest.mark.parametrize("error", NPU_HARD_FAULTS, ids=lambda e: str(e).split("error code is ")[1][:6])
def test_npu_hard_faults_are_neither(error):
    assert not failures.is_stability_error(error)
    assert not failures.is_out_of_memory_error(error)


def test_npu_out_of_memory_message_halves_the_row_budget(tmp_path, monkeypatch):
    import model_runner
    from pipeline_assets import TinyAssets

    assets = TinyAssets(tmp_path)
    calls = []
    real = model_runner.ModelRunner.step

    def flaky(self, rows):
        calls.append(len(rows))
        if len(rows) > 1:
            raise NPU_OUT_OF_MEMORY[0]
        return real(self, rows)

    monkeypatch.setattr(model_runner.ModelRunner, "step", flaky)
    text = "One two three four five six. Seven eight nine ten eleven twelve. Thirteen fourteen."
    result = assets.model.inference(text, prompt_audio=assets.prompt_audio, max_new_frames=2, do_sample=False,
                                    voice_clone_max_text_tokens=30, voice_clone_chunk_batch_size=4,
                                    **assets.resources())
    assert calls[0] > 1 and calls[1] == calls[0] // 2 and calls[-1] == 1
    assert len(result["audio_token_ids"]) == len(result["voice_clone_text_chunks"])
    assert result["voice_clone_chunk_batch_size"] == 1


# ---------------------------------------------------------------------------------------------------------------
# Card names


def test_simulated_two_card_npu_describes_the_requested_card():
    # torch.device("npu") parses only after the privateuse1 backend is renamed (torch_npu does it on import, and it
    # cannot be undone), so this runs in its own interpreter.
    output = run_python(
        "import json, pytest, torch\n"
        "import environment, npu_simulation\n"
        "torch.utils.rename_privateuse1_backend('npu')\n"
        "npu_simulation.install(pytest.MonkeyPatch(), npu_simulation.simulated_cards(('Ascend910B3', 'Ascend910B4')))\n"
        "print(json.dumps([environment.describe_environment(d)['device_name'] for d in ('npu:1', 'npu:0', 'npu')]))\n"
    )
    assert json.loads(output.strip().splitlines()[-1]) == ["Ascend910B4", "Ascend910B3", "Ascend910B3"]


# ---------------------------------------------------------------------------------------------------------------
# The fused attention's inputs: one mask per forward, no copies


def _decoder(layers=3, width=32, heads=4):
    torch.manual_seed(0)
    config = GPT2Config(n_embd=width, n_head=heads, n_layer=layers, n_inner=2 * width, vocab_size=50,
                        rope_base=10000.0, activation_function="gelu_new")
    return GPT2Decoder(config, layers).eval().half()


class _OpLog(TorchDispatchMode):
    """Every aten op run outside the simulated kernel (the kernel pauses it)."""

    def __init__(self):
        super().__init__()
        self.ops, self.paused = [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _fused_attention_forwards(monkeypatch, layers: int) -> list[tuple[list, list, object]]:
    """(kernel calls, aten ops outside the kernel, cache) of a padded prefill and one generation step."""
    calls = npu_simulation.install(monkeypatch)["attention"]
    torch_npu = sys.modules["torch_npu"]
    kernel, log = torch_npu.npu_fusion_attention, _OpLog()

    def paused(*args, **kwargs):  # the simulated kernel's own ops are not the backend's
        log.paused = True
        try:
            return kernel(*args, **kwargs)
        finally:
            log.paused = False

    monkeypatch.setattr(torch_npu, "npu_fusion_attention", paused)
    decoder = _decoder(layers)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, :3] = False  # left padding
    x = torch.randn(2, 7, 32, dtype=torch.float16)
    cache = decoder.new_cache(2, 8, dtype=torch.float16, device=torch.device("cpu"))
    forwards = []
    for start, end in ((0, 6), (6, 7)):  # a prefill, then one generation step
        key_valid, positions = cache.extend_mask(mask[:, start:end])
        rope, attn_mask = decoder.rotary.rotation(positions), build_attention_mask(key_valid, end - start)
        with log:
            decoder(x[:, start:end], rope, attn_mask, ATTENTION_FUNCTIONS["npu_fusion_attention"], cache)
        forwards.append((list(calls), list(log.ops), cache))
        del calls[:], log.ops[:]
    return forwards


def test_simulated_fused_attention_gets_one_mask_per_forward_and_uncopied_inputs(monkeypatch):
    one_layer = _fused_attention_forwards(monkeypatch, layers=1)
    for (calls, ops, cache), (_, ops_of_one_layer, _) in zip(_fused_attention_forwards(monkeypatch, 3), one_layer):
        assert len(calls) == 3
        assert len({id(call[3]) for call in calls}) == 1, "one mask per forward, shared by every layer"
        inversions = [op for op in ops if op in ("bitwise_not", "logical_not")]
        assert len(inversions) == len([op for op in ops_of_one_layer if op in ("bitwise_not", "logical_not")]), \
            "no per-layer mask inversion"
        for layer, (query, key, value, _) in enumerate(calls):  # views, no per-layer copies
            assert query._base is not None, "the queries go in as a view of the rotated projection"
            assert key.untyped_storage().data_ptr() == cache.keys[layer].untyped_storage().data_ptr()
            assert value.untyped_storage().data_ptr() == cache.values[layer].untyped_storage().data_ptr()


# ---------------------------------------------------------------------------------------------------------------
# npu_rotary_mul: selection and call layout


@pytest.mark.parametrize(("cards", "schema", "expected"), [
    (("Ascend910B3",), "2.3.1.post6", "npu_rotary_mul"),
    (("Ascend910_9391",), "2.3.1.post6", "npu_rotary_mul"),
    (("Ascend910B3",), "2.3.1", "real"),  # no rotary_mode: rotate-half only
    (("Ascend910A",), "2.3.1.post6", "real"),  # interleave mode documented for Atlas A2/A3 only
    (("Ascend310P3",), "2.3.1.post6", "real"),
    (("Ascend910B3",), None, "real"),  # no npu_rotary_mul at all
])
def test_simulated_npu_rotary_kernel_selection(monkeypatch, cards, schema, expected):
    rotary_schema = None if schema is None else npu_simulation.ROTARY_MUL_SCHEMAS[schema]
    npu_simulation.install(monkeypatch, npu_simulation.simulated_cards(cards), rotary_schema=rotary_schema)
    assert resolve_rotary_kernel("npu:0", num_heads=12, head_dim=64) == expected
    assert resolve_rotary_kernel(torch.device("cpu"), num_heads=12, head_dim=64) == "complex"
    assert resolve_rotary_kernel("cuda", num_heads=12, head_dim=64) == "real"


def test_simulated_npu_rotary_kernel_needs_a_shape_it_documents(monkeypatch):
    npu_simulation.install(monkeypatch)
    assert resolve_rotary_kernel("npu", num_heads=500, head_dim=64) == "real"  # B * N < 1000 with N = 2 * heads
    assert resolve_rotary_kernel("npu", num_heads=4, head_dim=896) == "real"  # D < 896


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("table_batch", [2, 1])
def test_simulated_npu_rotary_mul_layout_and_result(monkeypatch, dtype, table_batch):
    calls = npu_simulation.install(monkeypatch)["rotary"]
    embedding = rotary.RotaryEmbedding(16, 10000.0)
    positions = torch.tensor([[0, 0, 1, 2], [0, 1, 2, 3]])[:table_batch] + 5
    qkv = torch.randn(2, 4, 3, 3, 16).to(dtype)  # (B, T, 3, heads, D), like the fused projection
    fused = embedding.rotation(positions, "npu_rotary_mul", dtype)
    real = embedding.rotation(positions, "real", dtype)
    out = fused(qkv[:, :, :2])
    assert out.shape == (2, 4, 2, 3, 16) and out.dtype == dtype
    x, r1, r2, mode = calls[-1]
    assert mode == "interleave" and x.shape == (1, 8, 6, 16) and r1.shape == r2.shape == (1, 8, 1, 16)  # BSND, 1S1D
    assert r1.dtype == dtype
    tolerance = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.float(), real(qkv[:, :, :2]).float(), atol=tolerance * 8, rtol=tolerance)


def test_simulated_npu_rotary_mul_decoder_matches_the_real_kernel(monkeypatch):
    npu_simulation.install(monkeypatch)
    decoder = _decoder().float()
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :2] = False
    positions = kv_cache.positions_from_mask(mask)
    x = torch.randn(2, 6, 32)
    outs = {}
    for kernel in ("npu_rotary_mul", "real", "complex"):
        rope = make_rotation(kernel, *decoder.rotary.angles(positions), torch.float32)
        outs[kernel], _ = decoder(x, rope, build_attention_mask(mask, 6), ATTENTION_FUNCTIONS["sdpa"])
    torch.testing.assert_close(outs["npu_rotary_mul"], outs["real"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["complex"], outs["real"], atol=1e-5, rtol=1e-5)
