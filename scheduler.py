"""The scheduler of the engine core: requests, their chunk state machine, slots, admission and the memory budget.

A request is one call: one or more text chunks, each a sequence of prompt rows generated frame by frame in a slot.
Voice-clone chunks are independent (each its own codec stream and a pause after it); continuation chunks continue
one stream, each chunk's prompt built from the previous chunk's codes (`Request.chunk_rows` is called when the
chunk starts). Admission is first come, first served from a bounded queue into free slots, at most `budget` rows
at once. On an accelerator the budget starts from free device memory; an out-of-memory error during a step halves
it and the step runs again in blocks of that size (nothing lost, nothing emitted twice).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .sampling import SamplingParams


class EngineFull(RuntimeError):
    """`max_queue` requests already wait for a slot; retry later."""


class EngineClosed(RuntimeError):
    """The engine is shutting down or shut down and takes no new requests."""


class RequestCancelled(RuntimeError):
    """The request was cancelled before it finished."""


@dataclass
class AudioPlan:
    """How a request's codes become audio: streamed in windows (`stream`) or decoded once at its end.

    Attributes:
        continuation: one continuous stream for all chunks (else a stream and a pause per voice-clone chunk).
        prompt_codes: continuation's prompt codes, decoded first and their audio dropped (None: none).
        pauses: the silence after each chunk (voice clone; the last one is not used).
        codec_batch_size: chunks per one-shot decode call (end-only voice clone; None: all).
    """

    continuation: bool
    prompt_codes: Optional[torch.Tensor] = None
    pauses: list = field(default_factory=list)
    codec_batch_size: Optional[int] = None
    stream: bool = True


@dataclass(eq=False)
class Request:
    """One request inside the core: its settings, chunk source and state.

    `chunk_rows(index, previous codes)` gives chunk `index`'s prompt rows (T, n_vq + 1) when the chunk starts.
    `audio` None: frames only (`model.generate`), no codec output.
    """

    id: str
    params: SamplingParams
    generator: Optional[torch.Generator]
    num_chunks: int
    chunk_rows: Callable[[int, list], torch.Tensor]
    nq: int
    audio: Optional[AudioPlan] = None
    priority: int = 0
    # state
    slot: Optional[int] = None
    started: bool = False  # its first chunk has begun (a restart begins again)
    chunk: int = 0
    steps: int = 0
    prompt: Optional[torch.Tensor] = None  # the current chunk's rows while its prefill is due
    frames: list = field(default_factory=list)  # the current chunk's frames, (n_vq,) CPU each
    codes: list = field(default_factory=list)  # per finished chunk: (frames, n_vq) CPU
    truncated: list = field(default_factory=list)  # chunks that reached max_new_frames
    float32: bool = False  # runs on the float32 runner (after a numerical failure)
    emitted: bool = False  # audio reached the caller (a float32 re-run is no longer possible)
    cancelled: bool = False
    done: bool = False
    waveform: Optional[torch.Tensor] = None  # end-only: the decoded result
    start_state: Optional[torch.Tensor] = None  # the generator's state at submission (float32 re-run)
    first_error: Optional[BaseException] = None

    def __post_init__(self) -> None:
        if self.generator is not None:
            self.start_state = self.generator.get_state()

    @property
    def streamed(self) -> bool:
        return self.audio is not None and self.audio.stream

    def start_chunk(self) -> torch.Tensor:
        """The current chunk's prompt rows; its frame state starts empty."""
        self.prompt = self.chunk_rows(self.chunk, self.codes)
        self.steps, self.frames, self.started = 0, [], True
        return self.prompt

    def record(self, codes: torch.Tensor, continues: bool) -> bool:
        """Record one step's outcome; return whether the chunk ended (audio_end or max_new_frames)."""
        self.steps += 1
        if continues:
            self.frames.append(codes)
        if continues and self.steps >= self.params.max_new_frames:
            self.truncated.append(self.chunk)
            return True
        return not continues

    def end_chunk(self, n_vq: int) -> bool:
        """Store the finished chunk's codes; return whether it was the last chunk (else the next one is due)."""
        self.codes.append(torch.stack(self.frames) if self.frames else torch.zeros(0, n_vq, dtype=torch.long))
        self.frames = []
        self.chunk += 1
        return self.chunk >= self.num_chunks

    def restart(self) -> None:
        """From its start again (the float32 re-run): chunks, codes and generator state as at submission."""
        if self.generator is not None and self.start_state is not None:
            self.generator.set_state(self.start_state)
        self.chunk, self.steps, self.frames, self.codes, self.truncated = 0, 0, [], [], []
        self.prompt, self.started = None, False


class Scheduler:
    """Slots, the waiting queue, admission and the row budget (see the module docstring).

    Args:
        slots: sequences generating at once (KV-cache slots).
        max_queue: requests waiting for a slot; `add` beyond it raises `EngineFull` (None: no limit).
        budget: rows per step at most (None: `slots`); an accelerator passes what its free memory allows.
    """

    def __init__(self, slots: int, max_queue: Optional[int] = None, budget: Optional[int] = None) -> None:
        self.slots, self.max_queue = slots, max_queue
        self.budget = max(1, min(slots, budget or slots))
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        if self.max_queue is not None and len(self.waiting) >= self.max_queue:
            raise EngineFull(f"{len(self.waiting)} requests already wait (max_queue={self.max_queue}); retry later")
        self.waiting.append(request)

    def abort(self, request_id: str) -> Optional[Request]:
        """Remove a waiting request, or mark a running one to leave at the next step; return it (None: unknown)."""
        for request in self.waiting:
            if request.id == request_id:
                self.waiting.remove(request)
                request.cancelled = True
                return request
        for request in self.running:
            if request.id == request_id:
                request.cancelled = True
                return request
        return None

    def schedule(self) -> list[Request]:
        """Admit waiting requests into free slots (first come, first served, within the budget); the running ones."""
        used = {request.slot for request in self.running}
        free = [slot for slot in range(self.slots) if slot not in used]
        while free and self.waiting and len(self.running) < self.budget:
            request = self.waiting.popleft()
            request.slot = free.pop(0)
            self.running.append(request)
        return list(self.running)

    def finish(self, request: Request) -> None:
        """The request leaves its slot."""
        if request in self.running:
            self.running.remove(request)
        request.done = True

    def requeue(self, request: Request) -> None:
        """Back to the head of the queue (its slot freed): it starts again when admitted."""
        if request in self.running:
            self.running.remove(request)
        request.slot = None
        self.waiting.appendleft(request)

    def shrink(self, rows: int) -> int:
        """An out-of-memory error in a step of `rows` rows: halve the budget (>= 1); return it."""
        self.budget = max(1, min(self.budget, rows) // 2)
        return self.budget

    def blocks(self, requests: list[Request]) -> list[list[Request]]:
        """`requests` in blocks of at most `budget` rows."""
        return [requests[i : i + self.budget] for i in range(0, len(requests), self.budget)]

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
