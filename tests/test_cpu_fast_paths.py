"""MOSS_TTS_CPU_FAST_PATHS=0 makes the CPU run what an accelerator runs (real-valued RoPE, F.linear, no int8): same
greedy codes and hidden states as the CPU fast paths, and no complex (or float64) dtype anywhere in prefill and
generation."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cpu_fast_paths
import devices
import linear_kernels
from test_model_generation import batch, tiny_model

COMPLEX = (torch.complex32, torch.complex64, torch.complex128)


def use_cpu_fast_paths(monkeypatch: pytest.MonkeyPatch, enabled: bool) -> None:
    monkeypatch.setenv(cpu_fast_paths.CPU_FAST_PATHS_VARIABLE, "1" if enabled else "0")
    devices.clear_caches()  # read once per process: forget the last reading


@pytest.fixture(autouse=True)
def restore_probes():
    yield
    devices.clear_caches()


class OpRecorder(TorchDispatchMode):
    """Every aten/other op run under it, with the dtypes of its tensor outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, str, tuple[torch.dtype, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        dtypes = tuple(t.dtype for t in outputs if isinstance(t, torch.Tensor))
        self.ops.append((func.namespace, func.overloadpacket.__name__, dtypes))
        return out

    def complex_ops(self) -> list[str]:
        return [name for _, name, dtypes in self.ops if any(d in COMPLEX for d in dtypes)]

    def namespaces(self) -> set[str]:
        return {namespace for namespace, _, _ in self.ops}


def _greedy(model, input_ids, mask, use_kv_cache=True):
    return model.generate(input_ids, mask, max_new_frames=5, do_sample=False, audio_repetition_penalty=1.2,
                          use_kv_cache=use_kv_cache).audio_token_ids


def test_accelerator_path_gives_the_fast_paths_codes_and_hidden_states(monkeypatch):
    model = tiny_model()
    input_ids, mask = batch(9, 6)  # left padding in the second row
    results = {}
    for fast in (True, False):
        use_cpu_fast_paths(monkeypatch, fast)
        with torch.no_grad():
            hidden = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
        results[fast] = (hidden, _greedy(model, input_ids, mask), _greedy(model, input_ids, mask, False),
                         model.kernel_plan())
    (fast_hidden, *fast_codes, fast_plan), (hidden, *codes, plan) = results[True], results[False]
    assert (fast_plan.rope, plan.rope) == ("complex", "real")
    assert fast_plan.linear.startswith("split-matvec") and plan.linear == "F.linear"
    for expected, actual in zip(fast_hidden, hidden):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    for expected, actual in zip(fast_codes, codes):
        assert torch.equal(actual, expected)


@pytest.mark.parametrize("use_kv_cache", [True, False])
def test_no_complex_dtype_or_cpu_only_kernel_on_the_accelerator_path(monkeypatch, use_kv_cache):
    model = tiny_model()
    input_ids, mask = batch(9, 6)
    split_calls = []
    real_split = linear_kernels.split_matvec_linear
    monkeypatch.setattr(linear_kernels, "split_matvec_linear", lambda *a: split_calls.append(1) or real_split(*a))
    recorded = {}
    for fast in (True, False):
        use_cpu_fast_paths(monkeypatch, fast)
        split_calls.clear()
        with OpRecorder() as recorder:  # a full prefill and generation
            _greedy(model, input_ids, mask, use_kv_cache)
        recorded[fast] = (recorder, len(split_calls))
    fast_recorder, fast_split_calls = recorded[True]
    assert fast_recorder.complex_ops() and fast_split_calls > 0  # the recorder does see the fast paths
    recorder, split_count = recorded[False]
    assert recorder.complex_ops() == [], "complex tensors on the accelerator path"
    assert not any(torch.float64 in dtypes for _, _, dtypes in recorder.ops), "float64 runs on Ascend's AI CPU"
    assert split_count == 0 and not recorder.namespaces() & {"mkldnn", "quantized"}


def test_int8_weights_are_refused_on_the_accelerator_path(monkeypatch):
    model = tiny_model()
    use_cpu_fast_paths(monkeypatch, False)
    with pytest.raises(RuntimeError, match="MOSS_TTS_CPU_FAST_PATHS=0"):
        model.set_weight_precision("int8")
    assert model.weight_precision == "float32"


def test_the_variable_is_read_once_per_process_and_validated(monkeypatch):
    use_cpu_fast_paths(monkeypatch, False)
    assert cpu_fast_paths.cpu_fast_paths_enabled() is False
    monkeypatch.setenv(cpu_fast_paths.CPU_FAST_PATHS_VARIABLE, "1")
    assert cpu_fast_paths.cpu_fast_paths_enabled() is False  # not re-read
    devices.clear_caches()
    assert cpu_fast_paths.cpu_fast_paths_enabled() is True
    monkeypatch.setenv(cpu_fast_paths.CPU_FAST_PATHS_VARIABLE, "")
    devices.clear_caches()
    assert cpu_fast_paths.cpu_fast_paths_enabled() is True  # set but empty: the default
    monkeypatch.delenv(cpu_fast_paths.CPU_FAST_PATHS_VARIABLE)
    devices.clear_caches()
    assert cpu_fast_paths.cpu_fast_paths_enabled() is True  # unset: the default
    monkeypatch.setenv(cpu_fast_paths.CPU_FAST_PATHS_VARIABLE, "fast")
    devices.clear_caches()
    with pytest.raises(ValueError, match="MOSS_TTS_CPU_FAST_PATHS='fast'.*use 1.*or 0"):
        cpu_fast_paths.cpu_fast_paths_enabled()


@pytest.mark.parametrize("fast", [True, False])
def test_the_kernel_plan_reports_the_kernels_a_forward_runs(monkeypatch, fast):
    """What reports print (`describe()`) is what runs: complex RoPE ops exactly when the plan says "complex", the
    split matvec exactly when it names it, and no fast-path op when it says "F.linear"."""
    model = tiny_model()
    input_ids, mask = batch(9, 6)
    split_calls = []
    real_split = linear_kernels.split_matvec_linear
    monkeypatch.setattr(linear_kernels, "split_matvec_linear", lambda *a: split_calls.append(1) or real_split(*a))
    use_cpu_fast_paths(monkeypatch, fast)
    described = model.kernel_plan().describe()
    with OpRecorder() as recorder:
        _greedy(model, input_ids, mask)
    assert described["rope"].split()[0] == ("complex" if recorder.complex_ops() else "real")
    linear_kernel = described["linear"].split()[0]
    assert linear_kernel.startswith("split-matvec") == bool(split_calls)
    assert (linear_kernel == "F.linear") == (not split_calls and "mkldnn" not in recorder.namespaces())


def test_codec_encode_and_decode_run_no_complex_or_float64_op():
    """The codec has no CPU fast path to switch off: its device path is already real-valued and float32 (a guard)."""
    from test_codec_common import tiny_model as tiny_codec

    codec = tiny_codec(seed=0)
    with OpRecorder() as recorder:
        codes = codec.batch_encode([torch.randn(2, 48000)]).audio_codes
        codec.batch_decode([codes[:, 0]])
    assert recorder.ops and recorder.complex_ops() == []
    assert not any(torch.float64 in dtypes for _, _, dtypes in recorder.ops)
