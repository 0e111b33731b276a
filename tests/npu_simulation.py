"""A simulated Ascend stack for CPU tests: a ``torch_npu`` module with the two kernels this repository calls and a
``torch.npu`` namespace that describes the cards. Signatures, schemas, SoC numbers and documented constraints are
taken from the torch_npu wheels (2.1.0.post12 to 2.14.0: ``_op_plugin_docs.py``,
``csrc/aten/npu_native_functions_by_codegen.yaml``, ``include/torch_npu/csrc/core/npu/NpuVariables.h``)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import threading
import types
from typing import Optional

import pytest
import torch

import devices
import rotary

# SocVersion values (NpuVariables.h) and the names aclrtGetSocName gives those cards.
SOC = {"Ascend910A": 102, "Ascend910B": 104, "Ascend310P3": 202, "Ascend910B3": 223, "Ascend910_9391": 250}

# npu_rotary_mul's schema in the wheels: without rotary_mode in torch_npu 2.3.1 to 2.3.1.post4 and 2.4.0 to 2.4.0.post2.
ROTARY_MUL_SCHEMAS = {
    "2.3.1": "npu::npu_rotary_mul(Tensor self, Tensor r1, Tensor r2) -> Tensor",
    "2.3.1.post6": "npu::npu_rotary_mul(Tensor self, Tensor r1, Tensor r2, str rotary_mode='half') -> Tensor",
}


class SimulatedOp:
    """A torch.ops.npu op packet stand-in: callable, with ``.default._schema`` parsed from the wheel's schema text."""

    def __init__(self, function, schema: str) -> None:
        self.function = function
        self.default = types.SimpleNamespace(_schema=torch._C.parse_schema(schema))

    def __call__(self, *args, **kwargs):
        return self.function(*args, **kwargs)


def fusion_attention_kernel(calls: list, version: str = "2.3.1.post6"):
    """``npu_fusion_attention`` checking the documented inputs (BNSD, fp16/bf16, bool atten_mask True = masked out,
    shapes [B,1,Sq,Skv] or [Sq,Skv]) and the shape limits of torch_npu ``version``'s docs (2.3.1 to 2.3.1.post4, 2.4.0
    to 2.4.0.post2: every S 1-32K and a multiple of 16, D in {64, 80, 96, 120, 128, 256}; later: S 1-1M, D 1-768,
    N 1-256), raising a RuntimeError outside them as a card would; records each call's (query, key, value, atten_mask)
    in ``calls``."""
    old_docs = version.split("+")[0] in OLD_FUSION_ATTENTION_DOCS

    def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
                             atten_mask=None, scale=1.0, keep_prob=1.0, pre_tockens=2147483647,
                             next_tockens=2147483647, inner_precise=0, prefix=None, actual_seq_qlen=None,
                             actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False):
        assert input_layout == "BNSD" and head_num == query.shape[1] and keep_prob == 1.0 and sparse_mode == 0
        assert query.dtype in (torch.float16, torch.bfloat16) and query.dtype == key.dtype == value.dtype
        _check_fusion_attention_shape(query, key, old_docs)
        calls.append((query, key, value, atten_mask))
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
        if atten_mask is not None:
            batch, _, num_queries, num_keys = scores.shape
            assert atten_mask.dtype == torch.bool
            assert atten_mask.shape in ((batch, 1, num_queries, num_keys), (num_queries, num_keys))
            scores = scores.masked_fill(atten_mask, float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1), value.float()).to(query.dtype)
        return out, None, None, None, 0, 0, 0

    return npu_fusion_attention


OLD_FUSION_ATTENTION_DOCS = ("2.1.0.post8", "2.3.1", "2.3.1.post2", "2.3.1.post4", "2.4.0", "2.4.0.post2")


def _check_fusion_attention_shape(query: torch.Tensor, key: torch.Tensor, old_docs: bool) -> None:
    batch, heads, num_queries, head_dim = query.shape
    lengths = (num_queries, key.shape[2])
    if old_docs:
        fits = all(1 <= s <= 32 * 1024 and s % 16 == 0 for s in lengths) and head_dim in (64, 80, 96, 120, 128, 256)
    else:
        fits = all(1 <= s <= 1024 * 1024 for s in lengths) and 1 <= head_dim <= 768 and heads <= 256
    if not fits:
        raise RuntimeError(f"simulated: npu_fusion_attention got Sq={lengths[0]}, Skv={lengths[1]}, D={head_dim}, "
                           "outside its documented shapes (EZ9999: Inner Error)")


# The text torch_npu raises when it took the aclop npu_rotary_mul (libtorch_npu.so, every release with rotary_mode).
ACLOP_ROTARY_ERROR = "npu_rotary_mul in aclop only support rotary_mode with half, but got "


def rotary_mul_kernel(calls: list, aclop=lambda: False):
    """``npu_rotary_mul`` checking what its docs require of ``rotary_mode="interleave"``: 4-D input and r1/r2 of one
    dtype (fp16/bf16/fp32), r1/r2 laid out 11SD / 1S1D / S11D for BNSD / BSND / SBND input, B*N < 1000, D even and
    below 896, tables within [-1, 1]. Records (input, r1, r2, rotary_mode) in ``calls``."""

    def npu_rotary_mul(x, r1, r2, rotary_mode="half"):
        if aclop() and rotary_mode != "half":  # the aclop implementation: jit_compile on, or CANN without aclnn
            raise RuntimeError(ACLOP_ROTARY_ERROR + rotary_mode)
        assert rotary_mode == "interleave", "only the interleave mode is simulated"
        assert x.dim() == r1.dim() == r2.dim() == 4 and r1.shape == r2.shape
        assert x.dtype in (torch.float16, torch.bfloat16, torch.float32) and x.dtype == r1.dtype == r2.dtype
        b, n, s, d = x.shape  # named as BNSD; the 1S1D case below reads them as B, S, N, D
        layouts = {(1, 1, s, d): b * n, (1, n, 1, d): b * s, (b, 1, 1, d): n * s}  # 11SD, 1S1D, S11D -> B*N
        assert tuple(r1.shape) in layouts, f"r1 {tuple(r1.shape)} is not 11SD/1S1D/S11D for input {tuple(x.shape)}"
        assert layouts[tuple(r1.shape)] < 1000 and d % 2 == 0 and d < 896
        assert r1.abs().max() <= 1 and r2.abs().max() <= 1
        calls.append((x, r1, r2, rotary_mode))
        x1, x2 = x[..., ::2], x[..., 1::2]
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)  # the docs' rearrange "... d two -> ... (d two)"
        return (r1.float() * x.float() + r2.float() * rotated.float()).to(x.dtype)

    return npu_rotary_mul


@pytest.fixture(autouse=True)
def fresh_probes(monkeypatch: pytest.MonkeyPatch):
    """Probes and downgrade warnings start anew for each test and are forgotten after it (the simulated card goes).
    Autouse in the test modules that import it by name."""
    import attention

    monkeypatch.setattr(attention, "_DOWNGRADES_LOGGED", set())
    devices.clear_caches()
    yield
    devices.clear_caches()


def simulated_cards(names: tuple[str, ...] = ("Ascend910B3",), soc_version: Optional[int] = None, bf16: bool = True,
                    current: int = 0, with_soc_getter: bool = True, jit_compile: bool = False) -> types.SimpleNamespace:
    """A ``torch.npu`` for ``len(names)`` cards. Like torch_npu 2.1.0.post12, 2.1.0.post17, 2.3.1.post6, 2.4.0.post4,
    2.5.1 and every later release read (not 2.1.0.post8, 2.3.1 to 2.3.1.post4, 2.4.0, 2.4.0.post2), ``get_device_name``
    ignores its index (it names the current card); ``get_device_properties(i).name`` is card i's. ``set_device(i)``
    calls are recorded in ``set_device_calls`` as (thread name, i)."""
    version = SOC.get(names[0]) if soc_version is None else soc_version
    npu = types.SimpleNamespace(
        is_available=lambda: True,
        device_count=lambda: len(names),
        current_device=lambda: current,
        get_device_name=lambda index=None: names[current],
        get_device_properties=lambda index=None: types.SimpleNamespace(
            name=names[current if index is None else int(index)], total_memory=32 * 2**30),
        is_bf16_supported=lambda: bf16,
        is_jit_compile_false=lambda: not jit_compile,
        set_device_calls=[],
    )
    npu.set_device = lambda index: npu.set_device_calls.append((threading.current_thread().name, int(index)))
    if with_soc_getter:
        npu.get_soc_version = lambda: version
    return npu


def install(monkeypatch: pytest.MonkeyPatch, cards: Optional[types.SimpleNamespace] = None, *,
            rotary_schema: Optional[str] = ROTARY_MUL_SCHEMAS["2.3.1.post6"], with_fusion: bool = True,
            version: str = "2.3.1.post6", aclnn_rotary: bool = True) -> dict[str, list]:
    """Install a simulated torch_npu (and ``torch.npu``); returns the call logs {"attention": [...], "rotary": [...]}.

    ``rotary_schema=None`` leaves ``npu_rotary_mul`` out; ``with_fusion=False`` leaves ``npu_fusion_attention`` out;
    ``aclnn_rotary=False`` is a CANN without ``aclnnRotaryPositionEmbedding``: like JIT compilation on (the cards'
    ``jit_compile=True``), torch_npu then runs the aclop ``npu_rotary_mul``, which raises for the interleave mode.
    The NPU probes run their tiny calls on the CPU.
    """
    calls: dict[str, list] = {"attention": [], "rotary": []}
    module = types.ModuleType("torch_npu")
    module.__version__ = f"{version}+simulated"
    cards = simulated_cards() if cards is None else cards
    if with_fusion:
        module.npu_fusion_attention = fusion_attention_kernel(calls["attention"], version)
    if rotary_schema is not None:
        aclop = lambda: not aclnn_rotary or not cards.is_jit_compile_false()  # noqa: E731  (read at each call)
        module.npu_rotary_mul = SimulatedOp(rotary_mul_kernel(calls["rotary"], aclop), rotary_schema)
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    monkeypatch.setattr(torch, "npu", cards, raising=False)
    monkeypatch.setattr(rotary, "probe_tensor_device", lambda device: torch.device("cpu"))
    devices.clear_caches()
    return calls


def run_python(code: str) -> str:
    """Run ``code`` in a fresh interpreter at the repository root (torch_npu autoload off); return its stdout."""
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0", "PYTHONPATH": f"{root}{os.pathsep}{root / 'tests'}"}
    code = "__import__('repo_imports').install()\n" + code  # modules by their names (repo_imports.py)
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout
