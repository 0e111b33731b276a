"""The frame step's fixed-shape part as a graph: the local codebook loop with its sampling, compiled per batch bucket.

A frame's local part (position 0 decides continue / audio_end, positions 1..nq give the codes, each with a layer
stack, a head and sampling) is some hundreds of small operations with fixed shapes for a given row count. Here it
runs as one `torch.compile` graph (inductor on CPU) per key (batch bucket, nq, the rows' sampling settings), so the
per-operation overhead goes:

- Batch buckets: a step of B rows runs in the graph of the next power of two (padding rows compute and are dropped),
  so 1..8 streams need at most 4 graphs. Each key gets a code object of its own (dynamo caches per code object), so
  keys never evict each other and a key compiles once: no recompilation during generation.
- Random draws: a row's races (exponential variates, see `sampling.select_tokens`) are drawn before the graph, from
  the row's own generator, in the order and shapes eager draws them, so a seeded sampled run draws what eager draws;
  the graph itself has no generator and no host synchronisation.
- The local KV cache is the graph's own (one per key, written in place); a lock serialises its callers.
- Teacher forcing (`teacher_forced_local`, verification): the same frame function with the given codes in place of
  the sampled ones returns the text and audio logits, so the logits of the compiled step can be compared with eager's.
- Products: the local decoder's Linear layers run eager's kernel choice as one opaque operator inside the graph
  (`linear_kernels.register_graph_linear`): inductor's own one-row product is slower than eager's split matvec.

Opt-in (`enable(model)`, `--compile` on the CLIs, `EngineCore(compile=True)`): the first step of each key compiles
(seconds; inductor's cache on disk makes a second start faster). Where it cannot run (no C++ compiler for inductor,
torch older than MIN_TORCH, a compile error) the eager step is used, chosen once, and `status(model)` says why.
On a CPU the global one-row step stays eager: as one inductor graph with its growing key length as a dynamic size it
measured 1.00-1.02x eager on a 2-core CPU (`benchmarks/global_step_graph.py`, docs/performance.md). Graph capture on
an accelerator records it too, at fixed shapes (the slot capacity with a key mask; `step_capture.DecodeCaptures`).
"""

from __future__ import annotations

import logging
import shutil
import threading
import types
import weakref
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from .generation import Frame, FrameConstants, LocalRunner, audio_logits, frame_constants, text_logits
from .linear_kernels import graph_products_registered, register_graph_linear
from .sampling import RowSampler, SamplingParams, apply_repetition_penalty, filter_top_k_top_p
from .torch_compat import torch_version

logger = logging.getLogger(__name__)

MIN_TORCH = (2, 3)
BACKENDS = ("inductor", "eager", "aot_eager", "capture")  # capture: a CUDA / NPU graph (step_capture.py)
_STATE: "weakref.WeakKeyDictionary[Any, StepGraphs]" = weakref.WeakKeyDictionary()
_STATE_LOCK = threading.Lock()


def compile_problem(backend: str = "inductor") -> Optional[str]:
    """Why the step cannot be compiled here (None: it can)."""
    if torch_version() < MIN_TORCH:
        return f"torch {torch.__version__} is older than {'.'.join(map(str, MIN_TORCH))} (upgrade torch to compile)"
    if not hasattr(torch, "compile"):
        return "this torch build has no torch.compile"
    if backend == "inductor" and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        return "inductor needs a C++ compiler (install g++) to compile the CPU step"
    return None


def enable(model: Any, backend: str = "auto") -> "StepGraphs":
    """Compile `model`'s frame steps by default from now on (runners built afterwards with compile=None use them);
    returns its graphs. "auto": inductor on a CPU, graph capture on CUDA and NPU."""
    if backend == "auto":
        backend = _auto_backend(model)
    _check_backend(backend)
    graphs = graphs_for(model, create=True, backend=backend)
    graphs.default = True
    return graphs


def disable(model: Any, keep_graphs: bool = False) -> None:
    """Back to the eager step by default; the compiled graphs are dropped, or kept for a later `enable` with the
    same backend (`keep_graphs`: a benchmark alternating the two steps compiles once)."""
    with _STATE_LOCK:
        if not keep_graphs:
            _STATE.pop(model, None)
        elif model in _STATE:
            _STATE[model].default = False


def enabled(model: Any) -> bool:
    graphs = _STATE.get(model)
    return graphs is not None and graphs.default


def graphs_for(model: Any, create: bool = False, backend: Optional[str] = None) -> Optional["StepGraphs"]:
    """The model's compiled-step cache, or None; `create` makes one (with `backend`, default inductor), and a
    `backend` other than the cache's replaces it."""
    if backend is not None:
        _check_backend(backend)
    with _STATE_LOCK:
        graphs = _STATE.get(model)
        if create and (graphs is None or backend not in (None, graphs.backend)):
            backend = backend or _auto_backend(model)
            graphs = _STATE[model] = StepGraphs(model, backend)
        return graphs


def _auto_backend(model: Any) -> str:
    return "inductor" if model.transformer.wte.weight.device.type == "cpu" else "capture"


def _check_backend(backend: Any) -> None:
    if not callable(backend) and backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not a known compile backend; valid: {BACKENDS} or a callable")


def status(model: Any) -> str:
    """One line for reports: "eager", "compiled (backend)", or "eager (compile fell back: reason)"."""
    graphs = graphs_for(model)
    if graphs is None or not graphs.default:
        return "eager"
    if graphs.problem is not None:
        return f"eager (compile fell back: {graphs.problem})"
    if graphs.skipped is not None:
        return f"eager ({graphs.skipped})"
    count = sum(f is not None for f in graphs.frames.values())
    if graphs.backend == "capture":
        decode = f"; global decode eager: {graphs.decode_problem}" if graphs.decode_problem else ""
        return f"captured ({graphs.model.transformer.wte.weight.device.type} graph, {count} graphs{decode})"
    name = graphs.backend if isinstance(graphs.backend, str) else getattr(graphs.backend, "__name__", "custom")
    return f"compiled ({name}, {count} graphs)"


def bucket(rows: int) -> int:
    """The batch bucket of `rows` rows: the next power of two."""
    return 1 << max(rows - 1, 0).bit_length()


@dataclass(frozen=True)
class _Choice:
    """One sampling group's settings for one selection (text or a codebook), and its rows (None: every row)."""

    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    rows: Optional[tuple[int, ...]]


class StepGraphs:
    """A model's compiled local frames, one per (bucket, nq, sampling key); see the module docstring."""

    def __init__(self, model: Any, backend: str) -> None:
        self.model, self.backend, self.default = model, backend, False
        self.api = None
        if backend == "capture":
            self.api, self.problem = _graph_api(model.transformer.wte.weight.device)
        else:
            self.problem = compile_problem(backend)
            if self.problem is None:
                _register_products()
        if self.problem is not None:
            logger.warning("frame step compilation is off: %s; the eager step runs", self.problem)
        self.frames: dict[tuple, Optional[CompiledFrame]] = {}  # None: this key runs eager (`skipped` says why)
        self.skipped: Optional[str] = None
        self.decode_problem: Optional[str] = None  # capture: why the global decode runs eager (step_capture.py)
        self._lock = threading.Lock()

    def frame(self, batch: int, sampler: RowSampler, attend: Any) -> Optional["CompiledFrame"]:
        """The compiled frame for this step's rows, or None when compilation is off (then run eager)."""
        if self.problem is not None:
            return None
        size = bucket(batch)
        return self._frame((size, sampler.nq, _sampling_key(sampler, size), attend), size, sampler, attend)

    def teacher_frame(self, batch: int, nq: int, attend: Any) -> Optional["CompiledFrame"]:
        """The compiled frame that teacher-forces `batch` rows with `nq` codebooks, or None (then run eager)."""
        if self.problem is not None:
            return None
        size = bucket(batch)
        teacher = SamplingParams(do_sample=False, audio_repetition_penalty=1.0, nq=nq)  # no draws, no penalty
        sampler = RowSampler.uniform(teacher, size, None, self.model.config.n_vq)
        return self._frame(("teacher", size, nq, attend), size, sampler, attend)

    def _frame(self, key: tuple, size: int, sampler: RowSampler, attend: Any) -> Optional["CompiledFrame"]:
        with self._lock:
            if key not in self.frames:
                self.skipped = _model_problem(self.model)
                self.frames[key] = None if self.skipped else self._new_frame(size, sampler, attend)
            return self.frames[key]

    def _new_frame(self, size: int, sampler: RowSampler, attend: Any) -> "CompiledFrame":
        if self.backend == "capture":
            return _captured_frame(self, size, sampler, attend, len(self.frames), self.api)
        return CompiledFrame(self, size, sampler, attend, len(self.frames))

    def fail(self, error: BaseException) -> None:
        """A compile error: every later step runs eager (chosen once)."""
        self.problem = f"{type(error).__name__}: {' '.join(str(error).split())}"[:300]
        logger.warning("frame step compilation failed (%s); the eager step runs from now on", self.problem)


def _register_products() -> None:
    try:
        register_graph_linear()
    except Exception as error:  # noqa: BLE001  (the graph then traces F.linear: slower products, same results)
        logger.warning("the compiled step's product operator is unavailable (%s: %s); the graph traces F.linear",
                       type(error).__name__, error)


def _graph_api(device: torch.device) -> tuple:
    from .step_capture import graph_api  # imported when first used: step_capture builds on this module

    return graph_api(device)


def _captured_frame(*args: Any) -> "CompiledFrame":
    from .step_capture import CapturedFrame

    return CapturedFrame(*args)


def _model_problem(model: Any) -> Optional[str]:
    """Why this model's weights run eager even with compilation on (None: they compile)."""
    precision = getattr(model, "weight_precision", "float32")
    if precision != "float32" and not graph_products_registered():
        return (f"weight precision {precision}: the graph's product operator (moss_tts_nano::linear) is not "
                "registered, and the graph would trace the float32 weights, so the eager step runs")
    return None


def _sampling_key(sampler: RowSampler, size: int) -> tuple:
    """The sampling settings of every selection (a group of every row covers the padding rows too: they are
    dropped), and each row's nq with the padding rows' as the largest, so that B rows and their bucket share a key."""
    selections = []
    for channel in [None] + list(range(sampler.nq)):
        kind = "text" if channel is None else "audio"
        choices = []
        for params, rows, _ in sampler.groups:
            if channel is not None and params.resolve_nq(sampler.n_vq) <= channel:
                continue
            choices.append(_Choice(params.do_sample, getattr(params, f"{kind}_temperature"),
                                   getattr(params, f"{kind}_top_k"), getattr(params, f"{kind}_top_p"),
                                   None if rows is None else tuple(rows)))
        selections.append(tuple(choices))
    penalties = sampler.penalty(torch.device("cpu"))
    penalty = penalties if not isinstance(penalties, torch.Tensor) else "per-row"
    row_nq = tuple(sampler.row_nq) + (sampler.nq,) * (size - sampler.batch)
    return tuple(selections), row_nq, sampler.tracks_repetition, penalty


class CompiledFrame:
    """One key's compiled local frame: its static local KV cache, masks, race buffers and graph."""

    def __init__(self, owner: StepGraphs, size: int, sampler: RowSampler, attend: Any, number: int,
                 compile_graph: bool = True) -> None:
        model = owner.model
        self.owner, self.size, self.nq, self.batch = owner, size, sampler.nq, sampler.batch
        self.key = _sampling_key(sampler, size)
        device = model.transformer.wte.weight.device
        self.consts: FrameConstants = frame_constants(model)
        self.local = LocalRunner(model, size, sampler.nq, attend, use_kv_cache=True)
        self.selections = [[(c, None if c.rows is None else _row_mask(c.rows, size, device)) for c in choices]
                           for choices in self.key[0]]
        row_nq = self.key[1]
        self.uses = [None if all(n > c for n in row_nq) else
                     _row_mask([i for i, n in enumerate(row_nq) if n > c], size, device)
                     for c in range(sampler.nq)]
        widths = [min(self.consts.codebook_sizes[c], model.audio_lm_heads[c].weight.shape[0]) for c in range(self.nq)]
        self.races = [torch.ones(size, width, dtype=torch.float32, device=device) for width in [2] + widths]
        self.lock = threading.Lock()
        self.ready = False  # compiled (its first call succeeded)
        if not compile_graph:
            return
        # a code object of its own: dynamo caches compiled code per code object (see the module docstring)
        code = _local_frame.__code__.replace(co_name=f"local_frame_{number}")
        function = types.FunctionType(code, _local_frame.__globals__, code.co_name)
        self.graph = torch.compile(function, backend=owner.backend, dynamic=False)

    def draw(self, sampler: RowSampler) -> None:
        """This frame's races into the static buffers, per group and row generator, in eager's order and shapes."""
        for index, choices in enumerate(self.key[0]):
            channel = None if index == 0 else index - 1
            for choice, (params, rows, generators) in zip(choices, _groups_for(sampler, channel)):
                if not choice.do_sample:
                    continue
                target = self.races[index]
                shape = (sampler.batch if rows is None else len(rows), target.shape[1])
                if generators is None or isinstance(generators, torch.Generator):
                    race = torch.empty(shape, dtype=torch.float32, device=target.device).exponential_(
                        1.0, generator=generators)
                else:
                    race = torch.cat([torch.empty((1, shape[1]), dtype=torch.float32, device=target.device)
                                      .exponential_(1.0, generator=g) for g in generators])
                if rows is None:
                    target[: sampler.batch] = race
                else:
                    target[torch.tensor(rows, device=target.device)] = race

    def run(self, h: torch.Tensor, sampler: RowSampler, seen: Optional[torch.Tensor],
            force: torch.Tensor) -> Optional[tuple[Frame, Optional[torch.Tensor]]]:
        """The frame of h (B, H); `seen` (nq, B, V) and `force` (B,) bool as `generation.sample_frame` takes them.
        Returns the frame (B rows) and the updated `seen` (or None), or None when the first call (the compile)
        failed: then compilation is off for the model (`StepGraphs.fail`) and the caller runs eager."""
        batch, pad = h.shape[0], self.size - h.shape[0]
        if pad:
            h = torch.cat((h, h.new_zeros(pad, h.shape[1])))
            force = torch.cat((force, force.new_zeros(pad)))
            if seen is not None:
                seen = torch.cat((seen, seen.new_zeros(seen.shape[0], pad, seen.shape[2])), dim=1)
        penalty = sampler.penalty(h.device)
        if isinstance(penalty, torch.Tensor) and pad:
            penalty = torch.cat((penalty, penalty.new_ones(pad, 1)))
        with self.lock:
            self.draw(sampler)
            out = self._first_or_call(h, seen, force, penalty, None)
        if out is None:
            return None
        codes, continues, embeds, text_ok, audio_ok, seen = (t[:batch] if t is not None and i != 5 else t
                                                             for i, t in enumerate(out))
        if seen is not None:
            seen = seen[:, :batch]
        return Frame(codes, continues, embeds, text_ok, audio_ok), seen

    def teacher_forced(self, h: torch.Tensor, codes: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """This frame with `codes` (B, nq) fed back instead of sampled ones (a frame built by
        `StepGraphs.teacher_frame`): (text (B, 2), audio (B, nq, V)) logits, or None when the first call failed."""
        batch, pad = h.shape[0], self.size - h.shape[0]
        if pad:
            h = torch.cat((h, h.new_zeros(pad, h.shape[1])))
            codes = torch.cat((codes, codes.new_zeros(pad, codes.shape[1])))
        force = torch.ones(self.size, dtype=torch.bool, device=h.device)  # every fed frame continued
        with self.lock:
            out = self._first_or_call(h, None, force, 1.0, codes)
        return None if out is None else (out[-2][:batch], out[-1][:batch])

    def _first_or_call(self, h: torch.Tensor, seen: Optional[torch.Tensor], force: torch.Tensor, penalty: Any,
                       teacher: Optional[torch.Tensor]) -> Optional[tuple]:
        """The graph's outputs; None when its first call (the compile or capture) fails: then compilation is off for
        the model (`StepGraphs.fail`, once) and the caller runs eager. Called under `self.lock`."""
        self.local.reset()
        if self.ready:
            return self._call(h, seen, force, penalty, teacher)
        try:
            out = self._call(h, seen, force, penalty, teacher)
        except Exception as error:  # noqa: BLE001  (any compile/capture failure: eager from now on, once)
            self.owner.fail(error)
            return None
        self.ready = True
        return out

    def _call(self, h: torch.Tensor, seen: Optional[torch.Tensor], force: torch.Tensor, penalty: Any,
              teacher: Optional[torch.Tensor]) -> tuple:
        return self.graph(self, h, tuple(self.races), seen, force, penalty, teacher)


def _groups_for(sampler: RowSampler, channel: Optional[int]) -> list:
    return [group for group in sampler.groups
            if channel is None or group[0].resolve_nq(sampler.n_vq) > channel]


def _row_mask(rows: Sequence[int], size: int, device: torch.device) -> torch.Tensor:
    mask = torch.zeros(size, dtype=torch.bool, device=device)
    mask[list(rows)] = True
    return mask


def _select(scores: torch.Tensor, selections: list, race: torch.Tensor) -> torch.Tensor:
    """`RowSampler._select` on every row at once (filters work row by row), with the races drawn beforehand."""
    out = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    for choice, mask in selections:
        if choice.do_sample:
            probs = torch.softmax(filter_top_k_top_p(scores.float() / choice.temperature, choice.top_k,
                                                     choice.top_p), dim=-1)
            pick = (probs / race.clamp_min(torch.finfo(race.dtype).tiny)).argmax(dim=-1)
        else:
            pick = scores.argmax(dim=-1)
        out = pick if mask is None else torch.where(mask, pick, out)
    return out


def _local_frame(frame: CompiledFrame, h: torch.Tensor, races: tuple, seen: Optional[torch.Tensor],
                 force: torch.Tensor, penalty: Any, teacher: Optional[torch.Tensor] = None) -> tuple:
    """`generation.sample_frame` for a compiled key (same operations in the same order, no host synchronisation).
    With `teacher` (size, nq) codes: those codes are fed back instead of the sampled ones, and the text logits and
    the raw audio logits (size, nq, V) are returned too (teacher forcing; a graph of its own)."""
    model, consts, local = frame.owner.model, frame.consts, frame.local
    text = text_logits(local.step(h), consts)
    choice = _select(text, frame.selections[0], races[0]).masked_fill(force, 0)
    x = model.transformer.wte(consts.candidate_ids[choice])
    embeds = consts.continue_embedding
    codes, finite, raw = [], [], []
    if seen is not None:
        seen = seen.clone()
    for channel in range(frame.nq):
        logits = audio_logits(model, local.step(x), channel)
        raw.append(logits)
        logits = logits[:, : races[channel + 1].shape[1]]
        uses = frame.uses[channel]
        finite.append(logits if uses is None else logits.masked_fill(~uses[:, None], 0.0))
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen[channel], penalty)
        code = _select(logits, frame.selections[channel + 1], races[channel + 1]) if teacher is None \
            else teacher[:, channel]
        if seen is not None:
            seen[channel].scatter_(1, code[:, None], True)
        x = model.audio_embeddings[channel](code)
        embeds = embeds + x if uses is None else torch.where(uses[:, None], embeds + x, embeds)
        codes.append(code)
    out = (torch.stack(codes, dim=1), choice == 0, embeds[:, None], torch.isfinite(text).all(dim=-1),
           torch.isfinite(torch.cat(finite, dim=-1)).all(dim=-1), seen)
    return out if teacher is None else out + (text, torch.stack(raw, dim=1))


def teacher_forced_local(graphs: StepGraphs, h: torch.Tensor, codes: torch.Tensor, nq: int,
                         attend: Any) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """The local part of teacher forcing through `graphs`' compiled frame, one frame at a time (the row counts and
    kernels of generation's step): h (B, F, H) states, codes (B, F, >= nq) the fed codes. Returns (text (B, F, 2),
    audio (B, F, nq, V)) logits, or None when compilation is off or falls back (then run eager)."""
    frame = graphs.teacher_frame(h.shape[0], nq, attend)
    if frame is None:
        return None
    text, audio = [], []
    for index in range(h.shape[1]):
        out = frame.teacher_forced(h[:, index].contiguous(), codes[:, index, :nq].contiguous())  # strides as in a step
        if out is None:
            return None
        text.append(out[0])
        audio.append(out[1])
    return torch.stack(text, dim=1), torch.stack(audio, dim=1)
