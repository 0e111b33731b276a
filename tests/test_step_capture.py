"""Graph capture of the local frame (step_capture.py) with a simulated device graph API on the CPU: the capture
records the frame's operations once and each replay re-runs them on the same tensors (as a CUDA / NPU graph replays
its kernels on the same addresses), so inputs must reach the frame through the static buffers. Greedy and seeded
sampled codes equal eager, one capture per bucket, and a missing API or a capture error falls back to eager once,
with the reason."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import compiled_step
import step_capture
from model_runner import ModelRunner, RowInput
from test_compiled_step import GREEDY, SAMPLED, _codes
from pipeline_assets import tiny_tts


class _Recorder(TorchDispatchMode):
    def __init__(self, graph: "SimulatedGraph") -> None:
        super().__init__()
        self.graph = graph

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.graph.ops.append((func, args, kwargs or {}, out))
        return out


class SimulatedGraph:
    """Records the aten operations run inside `graph(...)`; `replay` re-runs them into the recorded outputs."""

    captures = 0

    def __init__(self) -> None:
        self.ops: list = []
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        for func, args, kwargs, recorded in self.ops:
            fresh = func(*args, **kwargs)
            for old, new in zip(tree_flatten(recorded)[0], tree_flatten(fresh)[0]):
                if isinstance(old, torch.Tensor) and old.data_ptr() != new.data_ptr():
                    old.copy_(new)


class _Stream:
    def wait_stream(self, other: "_Stream") -> None:
        pass


class SimulatedAPI:
    Graph = SimulatedGraph
    Stream = _Stream

    @staticmethod
    @contextlib.contextmanager
    def graph(graph: SimulatedGraph):
        SimulatedGraph.captures += 1
        with _Recorder(graph):
            yield

    @staticmethod
    def stream(stream: _Stream):
        return contextlib.nullcontext()

    @staticmethod
    def current_stream() -> _Stream:
        return _Stream()


def _recording_problem() -> str | None:
    """Why this torch cannot record operations on inference tensors with a dispatch mode (torch 2.3), else None."""
    try:
        with torch.inference_mode(), _Recorder(SimulatedGraph()):
            torch.ones(2).add_(1).view(1, 2)
    except RuntimeError as error:
        return f"torch {torch.__version__}: the simulated capture cannot record inference tensors ({error})"
    return None


@pytest.fixture(scope="module")
def model():
    return tiny_tts(push=0.0)


@pytest.fixture
def simulated(model, monkeypatch):
    if _recording_problem():
        pytest.skip(_recording_problem())
    monkeypatch.setattr(step_capture, "graph_api", lambda device: (SimulatedAPI, None))
    SimulatedGraph.captures = 0
    compiled_step.disable(model)
    yield
    compiled_step.disable(model)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded-sampled"])
def test_simulated_capture_replays_eager_codes_once_per_bucket(model, simulated, params):
    compiled_step.enable(model, backend="capture")
    eager = _codes(model, False, 3, params)
    captured = _codes(model, None, 3, params)
    four = _codes(model, None, 4, params, frames=2)  # same bucket, same key: no new capture
    assert torch.equal(captured, eager) and torch.equal(four, _codes(model, False, 4, params, frames=2))
    frames = [f for f in compiled_step.graphs_for(model).frames.values()]
    assert len(frames) == 1 and frames[0].captured.replays == 5 + 2  # the capture runs nothing: its call replays too
    # one local frame for the bucket, and one global decode per runner (its cache): 3 rows, then 4 rows
    assert SimulatedGraph.captures == 1 + 2


def test_simulated_capture_teacher_forces_through_its_static_code_buffer(model, simulated):
    """Teacher forcing through a captured frame: the fed codes reach the graph through a static buffer (a replay with
    other codes gives those codes' logits), within verify_npu's float32 tolerance of eager teacher forcing."""
    from teacher_forcing import teacher_forced_logits
    from test_compiled_step import _within_float32_tolerance

    generator = torch.Generator().manual_seed(3)
    rows = torch.full((1, 5, model.config.n_vq + 1), model.config.audio_pad_token_id)
    rows[..., 0] = torch.randint(10, 1000, (1, 5), generator=generator)
    frames = torch.randint(0, 1024, (1, 3, model.config.n_vq), generator=generator)
    changed = frames.clone()
    changed[:, :, 0] = (changed[:, :, 0] + 1) % 1024
    compiled_step.enable(model, backend="capture")
    for codes in (frames, changed):
        captured = teacher_forced_logits(model, rows, None, codes, nq=2)
        assert captured.step == "captured (cpu graph, 1 graphs)"
        _within_float32_tolerance(teacher_forced_logits(model, rows, None, codes, nq=2, compile=False), captured)
    assert SimulatedGraph.captures == 1
    first = teacher_forced_logits(model, rows, None, frames, nq=2)  # a replay with the first codes again
    assert not torch.allclose(captured.audio[:, 0, 1], first.audio[:, 0, 1])  # codebook 1 sees code 0


def test_simulated_capture_without_the_api_runs_eager_with_the_reason(model, monkeypatch):
    monkeypatch.setattr(step_capture, "graph_api", lambda device: (None, "torch_npu 2.4.0 has no torch.npu.NPUGraph"))
    compiled_step.enable(model, backend="capture")
    try:
        assert torch.equal(_codes(model, None, 2, GREEDY, frames=2), _codes(model, False, 2, GREEDY, frames=2))
        assert compiled_step.status(model) == "eager (compile fell back: torch_npu 2.4.0 has no torch.npu.NPUGraph)"
    finally:
        compiled_step.disable(model)


def test_simulated_capture_error_falls_back_to_eager_once(model, simulated, monkeypatch):
    def refuse(graph):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(SimulatedAPI, "graph", staticmethod(refuse))
    compiled_step.enable(model, backend="capture")
    assert torch.equal(_codes(model, None, 2, GREEDY, frames=2), _codes(model, False, 2, GREEDY, frames=2))
    assert "stream is capturing" in compiled_step.status(model)


def test_graph_api_names_the_release_that_has_npu_graphs():
    api, reason = step_capture.graph_api(torch.device("cpu"))
    assert api is None and reason == "no graph capture on cpu"


def _runner_codes(runner, slots, params, frames=5, prompts=None, rows=40):
    """Codes (frames, B, n_vq) of `runner` stepping `slots` (prompt at the first frame, seeded per slot)."""
    generators = {slot: torch.Generator().manual_seed(slot) for slot in slots}
    prompts = prompts or {slot: torch.randint(0, 20, (4 + slot, runner.model.config.n_vq + 1),
                                              generator=torch.Generator().manual_seed(slot)) for slot in slots}
    for slot in slots:
        runner.begin(slot, rows)
    return torch.stack([runner.step([RowInput(slot, prompts[slot] if frame == 0 else None, params,
                                              generators[slot], frame < 2) for slot in slots]).codes
                        for frame in range(frames)])


def test_simulated_capture_records_the_decode_once_per_run_of_slots(model, simulated):
    """The global decode is recorded once for a run of slots and replayed every later step: the same greedy codes
    as eager, and the same cache rows (the recorded decode writes each row's key and value at its position)."""
    eager = ModelRunner(model, 4, compile=False)
    expected = _runner_codes(eager, [1, 2], GREEDY)
    compiled_step.enable(model, backend="capture")
    runner = ModelRunner(model, 4)
    assert torch.equal(_runner_codes(runner, [1, 2], GREEDY), expected)
    (key, decode), = runner.global_.captures.graphs.items()
    assert key[:2] == (1, 2) and decode.captured.replays == 4  # frames 1..4 are decode steps
    cache, reference = runner.global_.cache, eager.global_.cache
    assert cache.lengths == reference.lengths
    for mine, theirs in zip(cache.keys + cache.values, reference.keys + reference.values):
        for slot in (1, 2):
            length = cache.lengths[slot]
            torch.testing.assert_close(mine[slot, :, :length], theirs[slot, :, :length], rtol=1e-5, atol=1e-6)


def test_simulated_capture_decodes_slots_that_are_not_one_run_eager(model, simulated):
    expected = _runner_codes(ModelRunner(model, 4, compile=False), [0, 2], GREEDY)
    compiled_step.enable(model, backend="capture")
    runner = ModelRunner(model, 4)
    assert torch.equal(_runner_codes(runner, [0, 2], GREEDY), expected)
    assert runner.global_.captures.graphs == {}


def test_simulated_capture_records_the_decode_again_when_the_cache_grows(model, simulated):
    compiled_step.enable(model, backend="capture")
    runner = ModelRunner(model, 2)
    _runner_codes(runner, [0], GREEDY, frames=3)
    first = set(runner.global_.captures.graphs)
    capacity = runner.global_.cache.capacity
    codes = _runner_codes(runner, [0], GREEDY, frames=3, rows=capacity + 1)  # a longer request: new cache buffers
    assert runner.global_.cache.capacity > capacity
    keys = set(runner.global_.captures.graphs)
    assert len(keys) == 1 and keys != first and next(iter(keys))[3] == runner.global_.cache.capacity
    assert torch.equal(codes, _runner_codes(ModelRunner(model, 2, compile=False), [0], GREEDY, frames=3,
                                            rows=capacity + 1))


def test_simulated_decode_recording_error_leaves_the_decode_eager_once_with_the_reason(model, simulated,
                                                                                       monkeypatch):
    def refuse(self):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(step_capture.CapturedDecode, "_decode", refuse)
    compiled_step.enable(model, backend="capture")
    runner = ModelRunner(model, 2)
    assert torch.equal(_runner_codes(runner, [0], GREEDY, frames=4),
                       _runner_codes(ModelRunner(model, 2, compile=False), [0], GREEDY, frames=4))
    status = compiled_step.status(model)
    assert status.startswith("captured (cpu graph, 1 graphs; global decode eager: RuntimeError: ")
    assert "stream is capturing" in status and runner.global_.captures.graphs == {}
    assert SimulatedGraph.captures == 1  # the local frame is still captured; the decode was never tried again
