"""The local frame captured as a CUDA graph or an NPU graph (torch.npu.NPUGraph), per batch bucket and sampling key.

The same frame as compiled_step.py (`_local_frame`: the local codebook loop with its sampling), recorded once per key
and replayed each step: inputs are copied into static buffers (the step's rows padded to the bucket), the races are
drawn beforehand into static buffers from each row's own generator (no generator inside a capture: neither CUDA's
default capture nor any torch_npu release registers one), the local KV cache is the key's own and written in place,
and the outputs are static tensors copied out after the replay. A capture failure switches the model back to the
eager step, once, with the reason (`compiled_step.status`).

The global decode (`DecodeCaptures`, one runner's slot KV cache): the decode of B rows whose slots form one run
first..first+B-1, recorded once per (first, B, cache buffers) and replayed. Fixed shapes: each row attends to its
slot's whole capacity with a key mask built inside the graph from its position (a static buffer), so the growing
length never changes a shape; its key and value are written in place at that position. Attention there is SDPA with
that mask (flash-attn's padded path needs a host synchronisation). Slots that are not one run, or a cache that has
grown (new buffers), decode eager or record again. A failed recording leaves the decode eager, once, with the
reason (`compiled_step.status`); the local frames stay captured.

`graph_api(device)` names the device's graph API (`torch.cuda` or `torch.npu`), or says why there is none;
tests pass a simulated one (tests/test_step_capture.py).
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch

from .attention import AttentionMask, sdpa_attention
from .compiled_step import CompiledFrame, _local_frame
from .kv_cache import write_rows
from .model_runner import _NO_MASK, decode_key_mask

logger = logging.getLogger(__name__)

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
        inputs = (self, self.h, tuple(self.races), self.seen, self.force, penalty, self.teacher)

        def frame() -> tuple:
            self.local.reset()
            return _local_frame(*inputs)

        self.outputs, self.captured = _record(self.api, frame)


def _record(api: Any, body: Any) -> tuple[Any, Any]:
    """`body`'s outputs and its recorded graph: WARMUP_RUNS eager runs on a side stream (lazy initialisation stays
    out of the graph), then one recording."""
    side = api.Stream()
    side.wait_stream(api.current_stream())
    with api.stream(side):
        for _ in range(WARMUP_RUNS):
            body()
    api.current_stream().wait_stream(side)
    graph = api.Graph()
    with api.graph(graph):
        outputs = body()
    return outputs, graph


class DecodeCaptures:
    """One runner's captured global decodes (see the module docstring), keyed by (first slot, rows, cache buffers)."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner  # the model's StepGraphs: its graph API, and `decode_problem` once recording failed
        self.graphs: dict[tuple, CapturedDecode] = {}

    def decode(self, slot_global: Any, slots: Sequence[int], embeds: torch.Tensor) -> Optional[torch.Tensor]:
        """The decode of `embeds` (B, 1, H) for `slots`, (B, H), with the slots' lengths advanced; None: run eager
        (slots not one run, capture off, or this recording failed: then off for the model, once)."""
        first, cache = slots[0], slot_global.cache
        if self.owner.problem is not None or self.owner.decode_problem is not None \
                or list(slots) != list(range(first, first + len(slots))):
            return None
        key = (first, len(slots), cache.keys[0].data_ptr(), cache.capacity)
        graph = self.graphs.get(key)
        if graph is None:
            self.graphs = {k: g for k, g in self.graphs.items() if k[2:] == key[2:]}  # older buffers: drop theirs
            graph = self.graphs[key] = CapturedDecode(slot_global, first, len(slots), self.owner.api)
        lengths = [cache.lengths[s] for s in slots]
        recorded = graph.captured is not None
        try:
            out = graph.replay(embeds, lengths)
        except Exception as error:  # noqa: BLE001  (a recording failure: eager decode from now on, once)
            if recorded:  # a replay error is the step's own failure
                raise
            self.graphs.pop(key)
            self.owner.decode_problem = f"{type(error).__name__}: {' '.join(str(error).split())}"[:300]
            logger.warning("recording the global decode failed (%s); it runs eager from now on",
                           self.owner.decode_problem)
            return None
        for slot, length in zip(slots, lengths):
            cache.lengths[slot] = length + 1
        return out


class CapturedDecode:
    """The global decode of `batch` rows in slots first..first+batch-1 of a slot KV cache, as one recorded graph."""

    def __init__(self, slot_global: Any, first: int, batch: int, api: Any) -> None:
        model, cache = slot_global.model, slot_global.cache
        weight = model.transformer.wte.weight
        device = weight.device
        self.model, self.cache, self.api = model, cache, api
        self.first, self.batch = first, batch
        self.embeds = torch.zeros(batch, 1, weight.shape[1], dtype=weight.dtype, device=device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)  # each row's position (its length)
        self.rows = torch.arange(first, first + batch, device=device)
        self.out: Optional[torch.Tensor] = None
        self.captured: Any = None

    def replay(self, embeds: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """Copy the step's inputs into the static buffers, record on first use, replay; the outputs (B, H)."""
        self.embeds.copy_(embeds)
        self.positions.copy_(torch.tensor(lengths))
        if self.captured is None:
            self.out, self.captured = _record(self.api, self._decode)
        self.captured.replay()
        return self.out.clone()

    def _decode(self) -> torch.Tensor:
        model = self.model
        rope = model.rotation(model.transformer, self.positions[:, None])
        mask = decode_key_mask(self.positions, self.cache.capacity)  # each row: its keys so far and its own
        out, _ = model.transformer(self.embeds, rope, _NO_MASK, self._attention(mask), self)
        return out[:, 0]

    # the cache view GPT2Decoder.forward writes through (`update`) and advances (`length`, unused here)
    length = 0

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return write_rows(self.cache.keys[layer], self.cache.values[layer], self.rows, self.positions, key, value)

    def _attention(self, mask: AttentionMask) -> Any:
        first, last = self.first, self.first + self.batch

        def slot_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, unused: AttentionMask,
                           scale: float) -> torch.Tensor:
            return sdpa_attention(q, keys[first:last], values[first:last], mask, scale)

        return slot_attention
