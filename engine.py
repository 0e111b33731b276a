"""Continuous batching: many synthesis requests, from any thread, share each generation step and each codec decode.

One worker thread runs frames. At every frame boundary it admits waiting requests into free slots (at most
`max_batch_size` run at once; at most `max_queue` wait) and drops cancelled ones. Then the global decoder runs the
new rows of every running request (a newcomer's prompt rows, one row per continuing request: `SlotGlobal`), one
local codebook loop covers them all (`sample_frame`, each row with its own sampling settings, repetition-penalty
state and random generator: `RowSampler`), and the codec decodes every stream whose decode window is full (one
multi-slot decode session, or on a CPU a session per stream: `_CodecStreams`). A request's text chunks run one after
another in its slot, as `inference_stream` runs them (voice clone: a pause between chunks; continuation: one stream).

Each request gets its solo output whatever runs beside it: the steps run inside `batched_products()`, in
products of at most `row_invariant_limit()` rows, a newcomer's prompt in a forward of its own, and attention runs
per request with the shapes of a solo run. So on a CPU where oneDNN passes its probe a request's codes are
bit-identical to running it alone on an engine (greedy, or sampled with the same seed), whatever joins or leaves.
int8 weight precision quantizes each row's activations with the row's own range there, which keeps it exact too. On
CUDA/NPU a row's last bits can depend on its neighbours (cuBLAS and the Ascend kernels pick kernels by shape), so
sampled codes can diverge after a near tie.

Deviations from the contract (ENGINE_CONTRACT.md), all additive: `submit` also takes `output_audio_path` (written by
the consuming thread when the result arrives); `use_kv_cache`, `voice_clone_chunk_batch_size`,
`voice_clone_max_memory_per_sample_gb` and `voice_clone_codec_batch_size` are accepted and have no effect (the
engine always caches and schedules slots itself); resource keywords belong to the constructor.
"""

from __future__ import annotations

import collections
import itertools
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

try:
    from . import devices
    from .generation import LocalRunner, SlotGlobal, frame_constants, non_finite_message, sample_frame
    from .gpt2_decoder import batched_products, row_invariant_limit
    from .pipeline import (
        STREAM_BEHIND_WINDOW,
        STREAM_MAX_WINDOW,
        STREAM_WINDOWS,
        TARGET_SAMPLE_RATE,
        Generated,
        Plan,
        build_request,
        continuation_rows,
        finish_result,
        pause_waveform,
        next_context,
        plan_chunks,
        prepare_prompt,
        voice_clone_rows,
    )
    from .sampling import RowSampler, SamplingParams
    from .shared_resources import RESOURCE_KEYS, cached_resources
except ImportError:  # not part of a package: imported from the repository root or run as a script
    if __package__:  # inside a package (remote code): a real missing dependency, reported as itself
        raise
    import devices
    from generation import LocalRunner, SlotGlobal, frame_constants, non_finite_message, sample_frame
    from gpt2_decoder import batched_products, row_invariant_limit
    from pipeline import (
        STREAM_BEHIND_WINDOW,
        STREAM_MAX_WINDOW,
        STREAM_WINDOWS,
        TARGET_SAMPLE_RATE,
        Generated,
        Plan,
        build_request,
        continuation_rows,
        finish_result,
        pause_waveform,
        next_context,
        plan_chunks,
        prepare_prompt,
        voice_clone_rows,
    )
    from sampling import RowSampler, SamplingParams
    from shared_resources import RESOURCE_KEYS, cached_resources


class EngineFull(RuntimeError):
    """`max_queue` requests already wait for a slot; retry later."""


class EngineClosed(RuntimeError):
    """The engine is shutting down or shut down and takes no new requests."""


class RequestCancelled(RuntimeError):
    """The request was cancelled before it finished."""


_RESOURCE_KEYS = (*RESOURCE_KEYS, "audio_tokenizer_pretrained_name_or_path")
_NO_EFFECT_KEYS = ("use_kv_cache", "voice_clone_chunk_batch_size", "voice_clone_max_memory_per_sample_gb",
                   "voice_clone_codec_batch_size", "progress")
_FINISHED = object()


# ---------------------------------------------------------------------------------------------------- requests


class _Window:
    """pipeline.StreamDecoder's decode-window policy for one stream: the first frame alone, then windows sized by
    how far the decoded audio is ahead of the wall clock."""

    def __init__(self) -> None:
        self.first_audio_at: Optional[float] = None
        self.emitted_seconds = 0.0

    def frames(self, now: float) -> int:
        if self.first_audio_at is None:
            return 1
        ahead = self.emitted_seconds - (now - self.first_audio_at)
        if ahead < 0:
            return STREAM_BEHIND_WINDOW
        return next((frames for limit, frames in STREAM_WINDOWS if ahead < limit), STREAM_MAX_WINDOW)

    def emitted(self, samples: int, now: float) -> None:
        self.first_audio_at = now if self.first_audio_at is None else self.first_audio_at
        self.emitted_seconds += samples / TARGET_SAMPLE_RATE


@dataclass(eq=False)
class _Job:
    """One request inside the engine: its plan, settings, and the state of its current chunk."""

    id: str
    plan: Plan
    params: SamplingParams
    generator: Optional[torch.Generator]
    output_audio_path: Any
    submitted_at: float
    events: "queue.Queue[Any]" = field(default_factory=queue.Queue)
    cancelled: bool = False
    done: bool = False
    slot: Optional[int] = None
    chunk: int = 0
    steps: int = 0
    next_embeds: Optional[torch.Tensor] = None  # (1, H) the row to feed next; None: the chunk's prompt
    frames: list = field(default_factory=list)  # this chunk's frames, (n_vq,) CPU each
    pending: list = field(default_factory=list)  # frames not yet decoded
    window: _Window = field(default_factory=_Window)
    stream: Any = None  # the codec stream id of this chunk
    generated: Generated = field(default_factory=Generated)  # codes per finished chunk
    parts: list = field(default_factory=list)  # waveform pieces (audio and pauses)
    truncated: set = field(default_factory=set)  # chunks that reached max_new_frames
    first_audio_s: Optional[float] = None
    rows: Optional[list] = None  # voice clone: every chunk's prompt rows
    prompt: Optional[torch.Tensor] = None  # the current chunk's prompt rows, on the model's device
    context: Any = None  # continuation: what the next chunk continues (pipeline.Context)

    @property
    def nq(self) -> int:
        return self.plan.nq

    @property
    def voice_clone(self) -> bool:
        return self.plan.request.mode == "voice_clone"

    def chunk_rows(self) -> torch.Tensor:
        """The prompt rows of the current chunk: as inference_stream builds them."""
        if self.voice_clone:
            return self.rows[self.chunk]
        return continuation_rows(self.plan, self.chunk, self.context)

    def end_chunk(self, codes: torch.Tensor) -> None:
        """Record the finished chunk's codes (and what the next continuation chunk continues)."""
        self.generated.add(codes, finished=self.chunk not in self.truncated)
        if not self.voice_clone:
            self.context = next_context(self.plan, self.chunk, codes, self.context)

    def put_audio(self, wave: torch.Tensor, kind: str = "audio") -> None:
        self.parts.append(wave)
        if kind == "audio" and self.first_audio_s is None:
            self.first_audio_s = time.perf_counter() - self.submitted_at
        self.events.put({"type": kind, "waveform": wave, "sample_rate": TARGET_SAMPLE_RATE,
                         "chunk_index": self.chunk})


class RequestHandle:
    """A submitted request: its events as they are produced, its result, and cancellation from any thread."""

    def __init__(self, engine: "SynthesisEngine", job: _Job) -> None:
        self._engine, self._job = engine, job
        self._result: Optional[dict] = None

    @property
    def id(self) -> str:
        return self._job.id

    @property
    def done(self) -> bool:
        return self._job.done

    def cancel(self) -> None:
        """Cancel (idempotent): a waiting request is removed at once, a running one leaves at the next frame."""
        self._engine._cancel(self._job)

    def events(self, timeout: Optional[float] = None) -> Iterator[dict]:
        """Yield the request's events: audio / pause chunks, then the result (inference_stream's events).

        Args:
            timeout: seconds to wait for each next event (None: no limit).

        Raises:
            RequestCancelled: the request was cancelled.
            TimeoutError: no event within `timeout`.
            Exception: the request's own failure (other requests go on).
        """
        while self._result is None:
            try:
                item = self._job.events.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"no event from request {self.id} within {timeout} s") from None
            if isinstance(item, BaseException):
                self._job.events.put(item)  # every later call raises it too
                raise item
            if item is _FINISHED:
                self._result = self._build_result()
                yield self._result
                return
            yield item

    def result(self, timeout: Optional[float] = None) -> dict:
        """Consume the events and return the final result dict (raises like `events`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for event in self.events(timeout=timeout):
            if event["type"] == "result":
                return event
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        return self._result

    def _build_result(self) -> dict:
        job = self._job
        waveform = torch.cat(job.parts, dim=-1) if job.parts else torch.zeros(2, 0)
        return finish_result(job.plan, job.generated, waveform, job.output_audio_path, type="result",
                             voice_clone_codec_batch_size=1, first_audio_latency_s=job.first_audio_s)


# ---------------------------------------------------------------------------------------------------- the engine


class SynthesisEngine:
    """Serve many synthesis requests with one model: they share each decode step (continuous batching).

    Args:
        model: a loaded `MossTTSNanoForCausalLM` on its device, in eval mode.
        text_tokenizer, text_tokenizer_path, audio_tokenizer, audio_tokenizer_path, local_files_only: as for
            `inference()`.
        max_batch_size: requests generating at once (KV-cache slots), >= 1.
        max_queue: requests waiting for a slot; `submit` beyond it raises `EngineFull`.
        batch_invariant: run the steps in `batched_products(row_invariant=True)` (default), so that a request's
            output does not depend on what runs beside it. False: a lone request's products take the faster one-row
            path (on a CPU, see README, Performance), so its last bits, and after a near tie its sampled codes, can
            differ from the same request beside others.

    Raises:
        ValueError: for a bad size or resource location.
    """

    def __init__(self, model: Any, *, text_tokenizer: Any = None, text_tokenizer_path: Any = None,
                 audio_tokenizer: Any = None, audio_tokenizer_path: Any = None, local_files_only: bool = False,
                 max_batch_size: int = 8, max_queue: int = 64, batch_invariant: bool = True) -> None:
        for name, value, low in (("max_batch_size", max_batch_size, 1), ("max_queue", max_queue, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}")
        self.model = model
        self.resources = cached_resources(  # shared with model.inference() calls with the same arguments
            model, **{key: value for key, value in (
                ("text_tokenizer", text_tokenizer), ("text_tokenizer_path", text_tokenizer_path),
                ("audio_tokenizer", audio_tokenizer), ("audio_tokenizer_path", audio_tokenizer_path),
                ("local_files_only", local_files_only or None)) if value is not None})
        self.max_batch_size, self.max_queue, self.batch_invariant = max_batch_size, max_queue, bool(batch_invariant)
        row_invariant_limit()  # probed once per process: here rather than in the first request's latency
        self._cond = threading.Condition()
        self._queue: collections.deque[_Job] = collections.deque()
        self._active: list[_Job] = []
        self._closing = False
        self._thread: Optional[threading.Thread] = None
        self._ids = itertools.count()
        self._runner: Optional[_FrameRunner] = None

    def __enter__(self) -> "SynthesisEngine":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown(cancel_running=exc_info[0] is not None)

    def start(self) -> "SynthesisEngine":
        """Start the worker thread (idempotent)."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="moss-tts-engine", daemon=True)
                self._thread.start()
        return self

    def stats(self) -> dict:
        with self._cond:
            active = sum(not job.done for job in self._active)  # a finished job leaves the list after its frame
            return {"active": active, "queued": len(self._queue), "max_batch_size": self.max_batch_size,
                    "max_queue": self.max_queue}

    def submit(self, text: str, **kwargs: Any) -> RequestHandle:
        """Validate and queue one request (the keywords of `inference_stream`, plus `prompt_audio_codes`).

        Prompt audio is read and encoded here, in the calling thread.

        Raises:
            ValueError: invalid text, prompt, mode or sampling value (the messages of `inference`).
            EngineFull: `max_queue` requests already wait.
            EngineClosed: `shutdown` has begun.
        """
        self._check_open()
        job = self._prepare(text, dict(kwargs))
        with self._cond:
            if self._closing:
                raise EngineClosed("the engine is shutting down; no new requests")
            if len(self._queue) >= self.max_queue:
                raise EngineFull(f"{len(self._queue)} requests already wait (max_queue={self.max_queue}); retry later")
            self._queue.append(job)
            self._cond.notify_all()
        return RequestHandle(self, job)

    def shutdown(self, cancel_running: bool = False, timeout: float = 10.0) -> None:
        """Take no new requests, then finish (or cancel) the running and waiting ones and stop the worker.

        Idempotent. Waits up to `timeout` seconds for the worker to stop.
        """
        with self._cond:
            self._closing = True
            if cancel_running:
                while self._queue:
                    _finish_cancelled(self._queue.popleft())
                for job in self._active:
                    job.cancelled = True
            self._cond.notify_all()
        if self._thread is None and not cancel_running:
            self.start()  # nothing else would run the waiting requests
        if self._thread is not None:
            self._thread.join(timeout)

    # -------------------------------------------------------------------------------------------- submission

    def _check_open(self) -> None:
        if self._closing:
            raise EngineClosed("the engine is shutting down; no new requests")

    def _prepare(self, text: str, kwargs: dict) -> _Job:
        for key in _RESOURCE_KEYS:
            if key in kwargs:
                raise ValueError(f"{key} is set once for the engine: pass it to SynthesisEngine(...), not submit()")
        device = next(self.model.parameters()).device
        requested = kwargs.pop("device", None)
        if requested is not None and not _same_device(devices.resolve_device(requested), device):
            raise ValueError(f"device={requested!r}: this engine's model is on {device}")
        for key in _NO_EFFECT_KEYS:
            kwargs.pop(key, None)
        output_audio_path = kwargs.pop("output_audio_path", None)
        request = build_request(text, **kwargs)
        generator = request.call_generator(device)
        prompt_codes = prepare_prompt(request, self.resources)
        plan = Plan(request, self.resources, prompt_codes, *plan_chunks(request, self.resources), None, generator)
        params = SamplingParams(max_new_frames=request.max_new_frames, nq=request.nq,
                                **{k: v for k, v in request.generation.items() if k != "use_kv_cache"})
        rows = voice_clone_rows(plan) if request.mode == "voice_clone" else None
        first = rows[0] if rows else continuation_rows(plan, 0, plan.first_context)
        limit = self.model.config.max_position_embeddings
        if first.shape[0] + request.max_new_frames > limit:
            raise ValueError(f"max_new_frames={request.max_new_frames} plus the prompt length exceeds "
                             f"max_position_embeddings={limit}")
        job_id = f"{next(self._ids)}-{uuid.uuid4().hex[:12]}"
        return _Job(job_id, plan, params, generator, output_audio_path, time.perf_counter(), rows=rows,
                    context=plan.first_context)

    def _cancel(self, job: _Job) -> None:
        with self._cond:
            if job.done:
                return
            if job in self._queue:
                self._queue.remove(job)
                _finish_cancelled(job)
            else:
                job.cancelled = True
            self._cond.notify_all()

    # -------------------------------------------------------------------------------------------- the worker

    def _work(self) -> None:
        devices.use_device_in_this_thread(next(self.model.parameters()).device)  # the worker's own thread
        while True:
            with self._cond:
                while not self._active and not self._queue and not self._closing:
                    self._cond.wait()
                finished = [job for job in self._active if job.cancelled]
                self._admit()
                jobs = list(self._active)
            runner = self._frame_runner()
            for job in finished:
                runner.leave(job)
                _finish_cancelled(job)
            if not jobs:
                if self._closing and not self._queue:
                    break
                continue
            try:
                runner.frame(jobs)
            except Exception as exc:  # the worker must live on: fail the requests of this frame, serve the next ones
                for job in jobs:
                    _finish(job, exc)
                self._runner = None  # its caches and codec sessions may be half-updated: the next frame starts afresh
            with self._cond:
                self._active = [job for job in self._active if not job.done]
        if self._runner is not None:
            self._runner.close()

    def _admit(self) -> None:
        """Under the lock: drop cancelled running jobs, give free slots to waiting ones (first come, first served)."""
        self._active = [job for job in self._active if not job.cancelled]
        used = {job.slot for job in self._active}
        free = [slot for slot in range(self.max_batch_size) if slot not in used]
        while free and self._queue:
            job = self._queue.popleft()
            job.slot = free.pop(0)
            self._active.append(job)

    def _frame_runner(self) -> "_FrameRunner":
        if self._runner is None:
            self._runner = _FrameRunner(self.model, self.resources.codec, self.max_batch_size, self.batch_invariant)
        return self._runner


def _finish(job: _Job, outcome: Any) -> None:
    if not job.done:
        job.done = True
        job.events.put(outcome)


def _finish_cancelled(job: _Job) -> None:
    _finish(job, RequestCancelled(f"request {job.id} was cancelled"))


# ---------------------------------------------------------------------------------------------------- one frame


class _FrameRunner:
    """The worker's model and codec state: the slot KV cache, repetition-penalty state and the decode session."""

    def __init__(self, model: Any, codec: Any, slots: int, batch_invariant: bool) -> None:
        self.model, self.codec, self.slots, self.batch_invariant = model, codec, slots, batch_invariant
        config = model.config
        weight = model.transformer.wte.weight
        self.device = weight.device
        self.consts = frame_constants(model)
        attend_global, self.attend_local = model.attention_functions()
        self.global_runner = SlotGlobal(model, slots, 0, attend_global)
        vocab = max(config.audio_codebook_sizes)
        self.seen = torch.zeros(config.n_vq, slots, vocab, dtype=torch.bool, device=self.device)
        self.codec_streams = _CodecStreams(codec, slots, shared=not _separate_codec_sessions(codec))
        self.stream_ids = itertools.count()

    def close(self) -> None:
        self.codec_streams.close_all()

    @torch.inference_mode()
    def frame(self, jobs: list[_Job]) -> None:
        """One frame for every job: generate, hand out finished chunks, decode ready windows, emit events."""
        with batched_products(row_invariant=self.batch_invariant) as limit:
            for job in jobs:
                if job.next_embeds is None:
                    self._start_chunk(job)
            # Rows go through products of at most `limit` rows (the range of one oneDNN kernel, see
            # batched_products); usually all of them at once.
            block = max(1, limit) if limit else len(jobs)
            flags, codes = [], []
            for first in range(0, len(jobs), block):
                block_flags, block_codes = self._generate(jobs[first : first + block])
                flags += block_flags
                codes += block_codes
        now = time.perf_counter()
        ending = []
        for job, (text_ok, audio_ok, continues), codes in zip(jobs, flags, codes):
            if not (text_ok and audio_ok):
                self.leave(job)
                _finish(job, RuntimeError(non_finite_message("text" if not text_ok else "audio", job.steps,
                                                             self.model.dtype)))
                continue
            job.steps += 1
            if continues:
                job.frames.append(codes)
                job.pending.append(codes)
            if not continues or job.steps >= job.params.max_new_frames:
                if continues:
                    job.truncated.add(job.chunk)
                ending.append(job)
        live = [job for job in jobs if not job.done]
        self._decode([job for job in live if job.pending and (
            job in ending or len(job.pending) >= job.window.frames(now))])
        for job in ending:
            if not job.done:
                self._end_chunk(job)

    def _global_step(self, jobs: list[_Job]) -> torch.Tensor:
        """The global decoder's output (B, H) for every job: a newcomer's prompt rows, or its next row.

        Batch-invariant: each prompt in a forward of its own (a product of the prompt's rows, exactly as alone,
        whatever oneDNN's kernel for that row count), the continuing rows together. Otherwise all in one forward.
        """
        prompts = {job.slot: self.model.embed_rows(job.prompt[None])[0] for job in jobs if job.steps == 0}
        items = [(job.slot, prompts[job.slot] if job.slot in prompts else job.next_embeds) for job in jobs]
        if not self.batch_invariant or not prompts:
            return self.global_runner.run(items)
        out = {}
        for slot, rows in prompts.items():
            out[slot] = self.global_runner.run([(slot, rows)])[0]
        steps = [item for item in items if item[0] not in prompts]
        if steps:
            out.update(zip((slot for slot, _ in steps), self.global_runner.run(steps)))
        return torch.stack([out[job.slot] for job in jobs])

    def _generate(self, jobs: list[_Job]) -> tuple[list, list]:
        model, slots = self.model, [job.slot for job in jobs]
        h = self._global_step(jobs)  # (B, H)
        sampler = RowSampler([job.params for job in jobs], [job.generator for job in jobs], model.config.n_vq)
        local = LocalRunner(model, len(jobs), sampler.nq, self.attend_local)
        index = torch.tensor(slots, device=self.device)
        seen = self.seen[: sampler.nq, index] if sampler.tracks_repetition else None  # (nq, B, V) copy
        active = torch.ones(len(jobs), dtype=torch.bool, device=self.device)
        forced = [job.steps < job.params.min_new_frames for job in jobs]
        force = torch.tensor(forced, device=self.device) if any(forced) else False
        frame = sample_frame(model, h, local, sampler, seen, active, self.consts, force_continue=force)
        if seen is not None:
            self.seen[: sampler.nq, index] = seen
        for i, job in enumerate(jobs):
            job.next_embeds = frame.next_embeds[i]
        flags = torch.stack((frame.text_finite, frame.audio_finite, frame.continues), dim=1).tolist()
        pad = model.config.audio_pad_token_id
        codes = torch.full((len(jobs), model.config.n_vq), pad, dtype=torch.long)
        cpu_codes = frame.codes.cpu()
        for i, job in enumerate(jobs):
            codes[i, : job.nq] = cpu_codes[i, : job.nq]
        return flags, list(codes)

    def _start_chunk(self, job: _Job) -> None:
        rows = job.prompt = job.chunk_rows().to(self.device)
        cache = self.global_runner.cache
        cache.release(job.slot)
        cache.reserve(_round_up(rows.shape[0] + job.params.max_new_frames, 64))
        self.seen[:, job.slot] = False
        job.steps, job.frames, job.pending = 0, [], []
        job.next_embeds = torch.empty(0)  # placeholder: steps == 0 feeds the prompt
        if job.stream is None:
            job.window = _Window()
            self._open_stream(job)

    def _end_chunk(self, job: _Job) -> None:
        """Hand out the chunk's codes; start the next chunk or finish the request.

        As inference_stream: voice-clone chunks each have their own codec stream and a pause after them;
        continuation chunks continue one stream (one continuous waveform).
        """
        empty = torch.zeros(0, self.model.config.n_vq, dtype=torch.long)
        job.end_chunk(torch.stack(job.frames) if job.frames else empty)
        last = job.chunk + 1 == len(job.plan.chunks)
        if job.voice_clone or last:
            self._close_stream(job)
        if last:
            self.leave(job)
            _finish(job, _FINISHED)
            return
        if job.voice_clone:
            job.put_audio(pause_waveform(job.plan.chunks[job.chunk]), kind="pause")
        job.chunk += 1
        job.next_embeds = None

    def leave(self, job: _Job) -> None:
        """Free the job's slot and codec stream (at once: the next frame can give the slot to another request)."""
        self._close_stream(job)
        if job.slot is not None:
            self.global_runner.cache.release(job.slot)

    # ------------------------------------------------------------------------------------------------ codec

    def _open_stream(self, job: _Job) -> None:
        job.stream = (job.id, job.chunk, next(self.stream_ids))
        self.codec_streams.open(job.stream)
        prompt = job.plan.prompt_codes
        if not job.voice_clone and prompt is not None:  # decoded and dropped, as StreamDecoder.prime
            self.codec_streams.decode({job.stream: prompt[:, : job.nq]}, job.nq)

    def _close_stream(self, job: _Job) -> None:
        stream, job.stream = job.stream, None
        if stream is not None:
            self.codec_streams.close(stream)

    def _decode(self, jobs: list[_Job]) -> None:
        """Decode the pending frames of `jobs` (see `_CodecStreams.decode`), one group per codebook count."""
        for nq in sorted({job.nq for job in jobs}):
            group = [job for job in jobs if job.nq == nq]
            audio = self.codec_streams.decode({job.stream: torch.stack(job.pending)[:, :nq] for job in group}, nq)
            now = time.perf_counter()
            for job in group:
                wave = audio[job.stream]
                job.pending = []
                job.window.emitted(wave.shape[-1], now)
                job.put_audio(wave)


class _CodecStreams:
    """The engine's codec decode streams, in one of two layouts chosen once (`shared`):

    - shared: one multi-slot decode session for every stream, and one batched step per call. Best where a step's
      cost hardly depends on its rows (accelerators, launch-bound), or where the codec allows one session only.
    - one session per stream, a step per stream with frames. Best on a CPU: there the codec's cost grows with the
      rows it computes, and a multi-slot session computes every slot at every step, advancing or not.
    """

    def __init__(self, codec: Any, slots: int, shared: bool) -> None:
        self.codec, self.slots, self.shared = codec, slots, shared
        self.sessions: dict[Any, Any] = {}  # stream id -> its session (the shared one, or its own)
        self._shared: Any = None
        self.device = next(codec.parameters()).device

    def open(self, stream: Any) -> None:
        if not self.shared:
            self.sessions[stream] = self.codec.create_decode_session(1)
        else:
            if self._shared is None or self._shared.closed:
                self._shared = self.codec.create_decode_session(self.slots)
            self.sessions[stream] = self._shared
        self.sessions[stream].append(stream)

    def close(self, stream: Any) -> None:
        session = self.sessions.pop(stream, None)
        if session is None or session.closed:  # a failed decode closes its session
            return
        session.remove(stream)
        if not session.active_request_ids:  # release the state (the shared session reopens on demand)
            session.close()

    def close_all(self) -> None:
        for stream in list(self.sessions):
            self.close(stream)

    def decode(self, codes: dict, nq: int) -> dict:
        """`codes` maps stream id -> (n, nq) new frames; returns stream id -> (2, 3840 n) CPU float32 audio."""
        if not self.shared:
            return {stream: self._step(self.sessions[stream], {stream: new}, nq)[stream]
                    for stream, new in codes.items()}
        return self._step(self._shared, codes, nq)

    def _step(self, session: Any, codes: dict, nq: int) -> dict:
        """One session step for `codes`; the session's other streams get no frames."""
        ids = list(session.active_request_ids)
        length = max(c.shape[0] for c in codes.values())
        batch = torch.zeros(nq, len(ids), length, dtype=torch.long)
        lengths = []
        for row, stream in enumerate(ids):
            new = codes.get(stream)
            lengths.append(0 if new is None else new.shape[0])
            if new is not None:
                batch[:, row, : new.shape[0]] = new.transpose(0, 1)
        _, audio, audio_lengths = session.step(ids, batch.to(self.device), lengths)
        return {stream: audio[row, :, : int(audio_lengths[row])].float().cpu()
                for row, stream in enumerate(ids) if stream in codes}


def _same_device(requested: torch.device, device: torch.device) -> bool:
    return requested.type == device.type and requested.index in (None, device.index)


def _separate_codec_sessions(codec: Any) -> bool:
    """One decode session per stream: on a CPU, when the codec can hold several sessions open at once."""
    return next(codec.parameters()).device.type == "cpu" and bool(getattr(codec, "independent_decode_sessions", False))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


__all__ = ["SynthesisEngine", "RequestHandle", "EngineFull", "EngineClosed", "RequestCancelled"]
