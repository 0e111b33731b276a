"""Continuous batching: many synthesis requests, from any thread, share each generation step and each codec decode.

`SynthesisEngine` is one worker thread around a shared `engine_core.EngineCore`: `submit` validates a request in
the calling thread and hands it to the worker, which adds it to the core, applies cancellations and steps the core
(admission into free slots at every frame, one batched frame step for every running request, the codec output),
handing each request's events to its `RequestHandle`. A request's text chunks run one after another in its slot, as
`inference_stream` runs them (voice clone: a pause between chunks; continuation: one stream). A streamed request's
audio is decoded in windows chosen by its own frame count, a non-streamed one (`stream=False`, what
`inference(engine=...)` uses) once at its end, so its bytes depend only on its
codes.

Batch invariance is opt-in (`batch_invariant=True`): then a request's codes are bit-identical to running it alone
(greedy, or sampled with the same seed) on a CPU where oneDNN passes its probe, whatever joins or leaves (see
`model_runner`). By default each step uses the fastest products for its row count: greedy codes still agree with
solo runs in practice, sampled codes can diverge after a near tie. On CUDA/NPU a row's last bits can depend on its
neighbours either way (cuBLAS and the Ascend kernels pick kernels by shape).

Beyond the upstream engine interface, all additive: `submit` also takes `output_audio_path` (written by
the consuming thread when the result arrives) and `stream`; `use_kv_cache`, `voice_clone_chunk_batch_size`,
`voice_clone_max_memory_per_sample_gb` and `voice_clone_codec_batch_size` are accepted and have no effect (the
engine always caches and schedules slots itself); resource keywords belong to the constructor.
"""

from __future__ import annotations

if not __package__:  # imported by file name from a clone's root: become a package member (see repo_imports.py)
    __import__("repo_imports").adopt(globals())

import itertools
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np
import torch

from . import devices
from .engine_core import EngineCore, RequestOutput
from .openmp_runtime import release_idle_team
from .pipeline import Plan, check_position_limit, core_request, finish_result, generated_of, plan_chunks, prepare_prompt
from .scheduler import EngineClosed, EngineFull, Request, RequestCancelled
from .shared_resources import RESOURCE_KEYS, cached_resources
from .synthesis_request import build_request

logger = logging.getLogger(__name__)

_RESOURCE_KEYS = (*RESOURCE_KEYS, "audio_tokenizer_pretrained_name_or_path")
_NO_EFFECT_KEYS = ("use_kv_cache", "voice_clone_chunk_batch_size", "voice_clone_max_memory_per_sample_gb",
                   "voice_clone_codec_batch_size", "progress")
_FINISHED = object()


@dataclass(eq=False)
class _Job:
    """One submitted request: its core request, plan, where its events go, and the audio it produced."""

    request: Request
    plan: Plan
    output_audio_path: Any
    submitted_at: float
    events: "queue.Queue[Any]" = field(default_factory=queue.Queue)
    parts: list = field(default_factory=list)
    first_audio_s: Optional[float] = None
    done: bool = False

    @property
    def id(self) -> str:
        return self.request.id

    def deliver(self, output: RequestOutput) -> None:
        """Hand a step's events to the consumer; finish on the last one."""
        for event in output.events:
            if event["type"] == "audio" and self.first_audio_s is None:
                self.first_audio_s = time.perf_counter() - self.submitted_at
            self.parts.append(event["waveform"])
            self.events.put(event)
        if output.finished:
            self.finish(output.error if output.error is not None else _FINISHED)

    def finish(self, outcome: Any) -> None:
        if not self.done:
            self.done = True
            self.events.put(outcome)


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
        request = job.request
        if request.streamed:  # joined in NumPy: a torch copy this large would give the consumer's thread an OpenMP
            # team, which slows the worker's step (see `_in_a_passing_thread`)
            waveform = torch.from_numpy(np.concatenate([part.numpy() for part in job.parts], axis=-1)) \
                if job.parts else torch.zeros(2, 0)
        else:
            waveform = request.waveform if request.waveform is not None else torch.zeros(2, 0)
        return finish_result(job.plan, generated_of(request), waveform, job.output_audio_path, type="result",
                             voice_clone_codec_batch_size=1, first_audio_latency_s=job.first_audio_s)


class SynthesisEngine:
    """Serve many synthesis requests with one model: they share each decode step (continuous batching).

    Args:
        model: a loaded `MossTTSNanoForCausalLM` on its device, in eval mode.
        text_tokenizer, text_tokenizer_path, audio_tokenizer, audio_tokenizer_path, local_files_only: as for
            `inference()`.
        max_batch_size: requests generating at once (KV-cache slots), >= 1.
        max_queue: requests waiting for a slot; `submit` beyond it raises `EngineFull`.
        batch_invariant: a request's output does not depend on what runs beside it (opt-in; see the module).

    Raises:
        ValueError: for a bad size or resource location.
    """

    def __init__(self, model: Any, *, text_tokenizer: Any = None, text_tokenizer_path: Any = None,
                 audio_tokenizer: Any = None, audio_tokenizer_path: Any = None, local_files_only: bool = False,
                 max_batch_size: int = 8, max_queue: int = 64, batch_invariant: bool = False) -> None:
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
        self._cond = threading.Condition()
        self._inbox: list[tuple[str, Any]] = []  # ("add", job) / ("abort", job), applied by the worker
        self._jobs: dict[str, _Job] = {}
        self._core: Optional[EngineCore] = None
        self._closing = False
        self._thread: Optional[threading.Thread] = None
        self._ids = itertools.count()

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
            core = self._core
            running = sum(not r.done for r in core.scheduler.running) if core is not None else 0
            return {"active": running, "queued": self._queued(), "max_batch_size": self.max_batch_size,
                    "max_queue": self.max_queue}

    def submit(self, text: str, **kwargs: Any) -> RequestHandle:
        """Validate and queue one request (the keywords of `inference_stream`, plus `prompt_audio_codes`, and
        `stream`: False decodes its audio once at the end, and its events are then the result only).

        Prompt audio is read and encoded here, in the calling thread. The calling thread's idle OpenMP team (from
        its earlier torch work, e.g. loading the model) is then released, so that it does not slow the worker's
        team (`openmp_runtime`); its next parallel torch op builds a new one.

        Raises:
            ValueError: invalid text, prompt, mode or sampling value (the messages of `inference`).
            EngineFull: `max_queue` requests already wait.
            EngineClosed: `shutdown` has begun.
        """
        self._check_open()
        job = self._prepare(text, dict(kwargs))
        release_idle_team()  # this thread now waits on the worker: its idle team would slow it
        with self._cond:
            if self._closing:
                raise EngineClosed("the engine is shutting down; no new requests")
            queued = self._queued()
            if queued >= self.max_queue:
                raise EngineFull(f"{queued} requests already wait (max_queue={self.max_queue}); retry later")
            self._jobs[job.id] = job
            self._inbox.append(("add", job))
            self._cond.notify_all()
        return RequestHandle(self, job)

    def shutdown(self, cancel_running: bool = False, timeout: float = 10.0) -> None:
        """Take no new requests, then finish (or cancel) the running and waiting ones and stop the worker.

        Idempotent. Waits up to `timeout` seconds for the worker to stop.
        """
        with self._cond:
            self._closing = True
            if cancel_running:
                self._inbox.extend(("abort", job) for job in self._jobs.values() if not job.done)
            self._cond.notify_all()
        if self._thread is None:
            self.start()  # nothing else would run (or cancel) the waiting requests
        self._thread.join(timeout)

    # -------------------------------------------------------------------------------------------- submission

    def _queued(self) -> int:
        """Under the lock: requests that wait for a slot."""
        waiting = len(self._core.scheduler.waiting) if self._core is not None else 0
        return waiting + sum(kind == "add" for kind, _ in self._inbox)

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
        stream = bool(kwargs.pop("stream", True))
        request = build_request(text, **kwargs)
        generator = request.call_generator(device)
        encodes = device.type == "cpu" and request.prompt_audio_codes is None \
            and (request.prompt_audio is not None or request.prompt_audio_path is not None)
        prompt_codes = _in_a_passing_thread(prepare_prompt, request, self.resources) if encodes \
            else prepare_prompt(request, self.resources)
        plan = Plan(request, self.resources, prompt_codes, *plan_chunks(request, self.resources), None, generator)
        core_req = core_request(plan, stream, f"{next(self._ids)}-{uuid.uuid4().hex[:12]}")
        check_position_limit(self.model, core_req.chunk_rows(0, []), request.max_new_frames)
        return _Job(core_req, plan, output_audio_path, time.perf_counter())

    def _cancel(self, job: _Job) -> None:
        """A waiting request leaves at once; a running one at the worker's next step."""
        with self._cond:
            if job.done:
                return
            if ("add", job) in self._inbox:
                self._inbox.remove(("add", job))
                job.finish(RequestCancelled(f"request {job.id} was cancelled"))
                self._jobs.pop(job.id, None)
            elif job.request.slot is None and self._core is not None:
                output = self._core.abort(job.id)  # the worker admits only under the lock
                if output is not None:
                    job.finish(output.error)
                    self._jobs.pop(job.id, None)
            else:
                self._inbox.append(("abort", job))
            self._cond.notify_all()

    # -------------------------------------------------------------------------------------------- the worker

    def _new_core(self) -> EngineCore:
        return EngineCore(self.model, self.resources.codec, slots=self.max_batch_size,
                          batch_invariant=self.batch_invariant, shared=True)

    # Why inference mode: the worker only reads the model. Outside it, an op on a parameter that requires grad takes
    # that parameter's autograd lock and then the GIL, while a caller's thread indexing the same parameter holds the
    # GIL and waits for that lock: a deadlock (seen with torch 2.13: index_select in `frame_constants` here against
    # `weight[i]` in the test's thread).
    @torch.inference_mode()
    def _work(self) -> None:
        devices.use_device_in_this_thread(next(self.model.parameters()).device)  # the worker's own thread
        core = self._new_core()
        with self._cond:
            self._core = core
        while True:
            with self._cond:
                while not self._inbox and not core.has_work and not self._closing:
                    self._cond.wait()
                inbox, self._inbox = self._inbox, []
                if self._closing and not inbox and not core.has_work:
                    break
                for kind, job in inbox:  # under the lock: `_queued` reads the core's queue
                    if kind == "add":
                        core.add(job.request)
                    else:
                        output = core.abort(job.id)
                        if output is not None:
                            self._deliver(output)
                core.admit()
            if core.has_work:
                try:
                    outputs = core.step(admit=False)
                except Exception as exc:  # the worker must live on: fail the running requests, serve the next ones
                    logger.exception("engine step failed")
                    for request in list(core.scheduler.running):
                        self._deliver(RequestOutput(request, finished=True, error=exc))
                        core.scheduler.finish(request)
                    core.close()
                    with self._cond:
                        waiting, core = list(core.scheduler.waiting), self._new_core()
                        self._core = core
                        for request in waiting:
                            core.add(request)
                    continue
                for output in outputs:
                    self._deliver(output)
                if not core.has_work:  # idle now: a team kept while idle slows the other threads' teams
                    release_idle_team()
        core.close()

    def _deliver(self, output: RequestOutput) -> None:
        job = self._jobs.get(output.request.id)
        if job is None:
            return
        job.deliver(output)
        if output.finished:
            with self._cond:
                self._jobs.pop(job.id, None)


def _in_a_passing_thread(function: Any, *args: Any) -> Any:
    """`function(*args)` in a thread that ends with it (the caller waits), on a CPU.

    Why: encoding prompt audio is large enough for torch to run it on an OpenMP team of the calling thread, and GNU
    OpenMP (torch's Linux wheels) keeps that team while the thread lives. A server's request threads live long, and
    once the process holds more pooled threads than CPUs every team spins shorter: the worker's frame step ran
    about 30% slower (docs/performance.md, "OpenMP teams"). A team made here ends with this thread."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = function(*args)
        except BaseException as error:  # noqa: BLE001  (raised again in the caller's thread)
            outcome["error"] = error

    thread = threading.Thread(target=run, name="moss-tts-prompt", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _same_device(requested: torch.device, device: torch.device) -> bool:
    return requested.type == device.type and requested.index in (None, device.index)


__all__ = ["SynthesisEngine", "RequestHandle", "EngineFull", "EngineClosed", "RequestCancelled"]
