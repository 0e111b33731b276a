"""The local frame captured as a CUDA graph or an NPU graph (torch.npu.NPUGraph), per batch bucket and sampling key.

The same frame as compiled_step.py (`_local_frame`: the local codebook loop with its sampling), recorded once per key
and replayed each step: inputs are copied into static buffers (the step's rows padded to the bucket), the races are
drawn beforehand into static buffers from each row's own generator (no generator inside a capture: neither CUDA's
default capture nor any torch_npu release registers one), the local KV cache is the key's own and written in place,
and the outputs are static tensors copied out after the replay. A capture failure switches the model back to the
eager step, once, with the reason (`compiled_step.status`).

`graph_api(device)` names the device's graph API (`torch.cuda` or `torch.npu`), or says why there is none;
tests pass a simulated one (tests/test_step_capture.py).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .compiled_step import CompiledFrame, _local_frame

WARMUP_RUNS = 2  # eager runs on a side stream before a capture (lazy initialisation stays out of the graph)


def graph_api(device: torch.device) -> tuple[Optional[Any], Optional[str]]:
    """(the module with Graph/graph/Stream/stream/current_stream, None) or (None, why there is none)."""
    if device.type == "cuda":
        if not hasattr(torch.cuda, "CUDAGraph"):
            return None, f"torch {torch.__version__} has no torch.cuda.CUDAGraph"
        return _Namespace(torch.cuda, "CUDAGraph"), None
    if device.type == "npu":
        npu = getattr(torch, "npu", None)
        if npu is None or not hasattr(npu, "NPUGraph") or not hasattr(npu, "graph"):
            version = getattr(npu, "__version__", None) or "installed"
            return None, (f"torch_npu {version} has no torch.npu.NPUGraph (graph capture comes with torch_npu "
                          "2.5.1; docs/npu_api_notes.md)")
        return _Namespace(npu, "NPUGraph"), None
    return None, f"no graph capture on {device.type}"


class _Namespace:
    """The graph calls of torch.cuda / torch.npu under one set of names."""

    def __init__(self, module: Any, graph_class: str) -> None:
        self.Graph = getattr(module, graph_class)
        self.graph, self.Stream, self.stream = module.graph, module.Stream, module.stream
        self.current_stream = module.current_stream


class CapturedFrame(CompiledFrame):
    """One key's captured local frame: static inputs, races and outputs around one recorded graph."""

    def __init__(self, owner: Any, size: int, sampler: Any, attend: Any, number: int, api: Any) -> None:
        super().__init__(owner, size, sampler, attend, number, compile_graph=False)
        model = owner.model
        weight = model.transformer.wte.weight
        self.api = api
        self.h = torch.zeros(size, weight.shape[1], dtype=weight.dtype, device=weight.device)
        self.force = torch.zeros(size, dtype=torch.bool, device=weight.device)
        self.seen = self.teacher = None
        if sampler.tracks_repetition:
            self.seen = torch.zeros(self.nq, size, self.races[1].shape[1], dtype=torch.bool, device=weight.device)
        self.penalty: Any = None
        self.outputs: Optional[tuple] = None
        self.captured: Any = None

    def _static_penalty(self, penalty: Any) -> Any:
        if not isinstance(penalty, torch.Tensor):
            return penalty
        if self.penalty is None:
            self.penalty = torch.ones(self.size, 1, dtype=penalty.dtype, device=penalty.device)
        self.penalty[: penalty.shape[0]] = penalty
        return self.penalty

    def _call(self, h: torch.Tensor, seen: Optional[torch.Tensor], force: torch.Tensor, penalty: Any,
              teacher: Optional[torch.Tensor] = None) -> tuple:
        self.h.copy_(h)
        self.force.copy_(force)
        if seen is not None:
            self.seen.copy_(seen)
        if teacher is not None:  # a teacher-forcing key: its fed codes are a static input too
            if self.teacher is None:
                self.teacher = torch.zeros_like(teacher)
            self.teacher.copy_(teacher)
        penalty = self._static_penalty(penalty)
        if self.captured is None:
            self._capture(penalty)
        self.captured.replay()
        return tuple(None if t is None else t.clone() for t in self.outputs)

    def _capture(self, penalty: Any) -> None:
        api = self.api
        inputs = (self, self.h, tuple(self.races), self.seen, self.force, penalty, self.teacher)
        side = api.Stream()
        side.wait_stream(api.current_stream())
        with api.stream(side):
            for _ in range(WARMUP_RUNS):
                self.local.reset()
                _local_frame(*inputs)
        api.current_stream().wait_stream(side)
        graph = api.Graph()
        self.local.reset()
        with api.graph(graph):
            self.outputs = _local_frame(*inputs)
        self.captured = graph
