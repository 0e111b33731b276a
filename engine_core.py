"""The engine core: one synchronous execution core for every call (`add`, `abort`, `step`), no threads inside.

`model.generate` / `generate_stream` / `inference` / `inference_stream` step a private core in the calling thread;
`engine.SynthesisEngine` is a worker thread around a shared one. The core owns a `Scheduler` (slots, admission, the
chunk state machine, the memory budget), a `ModelRunner` (one batched frame step) and the codec output
(`CodecStreams` for streamed requests, one-shot decoding at the end for the others).

A numerical failure (non-finite logits) re-runs that request alone on a float32 runner (`float32_retry_model`),
from its start with its generator re-seeded, while the others go on; a streamed request only before its first
audio. An out-of-memory error during a step halves the row budget and runs the step again in smaller blocks.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

from . import failures
from . import devices
from .codec_output import TARGET_SAMPLE_RATE, CodecStreams, decode_generated, join_with_pauses
from .generation import GenerationOutput, non_finite_message
from .model_runner import ModelRunner, RowInput
from .openmp_runtime import release_idle_team
from .sampling import SamplingParams
from .scheduler import Request, RequestCancelled, Scheduler

logger = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    """What one step produced for one request: events ("frame", "audio", "pause" dicts), and whether it finished
    (then `error` is None on success)."""

    request: Request
    events: list = field(default_factory=list)
    finished: bool = False
    error: Optional[BaseException] = None


class EngineCore:
    """One execution core (see the module docstring).

    Args:
        model: the model (only read).
        codec: the audio codec (None: frames only).
        slots: sequences generating at once.
        max_queue: requests waiting (None: no limit).
        batch_invariant: a request's results do not depend on what runs beside it (see `ModelRunner`).
        use_kv_cache: False runs the recompute reference path.
        shared: a core that serves several callers (runs its steps inside `batched_products`).
        memory_per_sample_gb: device memory one sequence may need; on an accelerator the row budget starts from free
            memory divided by it.
        retry_float32: re-run a request that fails numerically in float32 (False: it fails with "Non-finite ...").
        compile: the compiled frame step (`compiled_step`): True, False, or None (the model's setting).
    """

    def __init__(self, model: Any, codec: Any = None, *, slots: int = 1, max_queue: Optional[int] = None,
                 batch_invariant: bool = False, use_kv_cache: bool = True, shared: bool = False,
                 memory_per_sample_gb: float = 1.0, retry_float32: bool = True,
                 compile: Optional[bool] = None) -> None:
        self.model, self.codec, self.retry_float32 = model, codec, retry_float32
        device = model.transformer.wte.weight.device
        budget = devices.chunk_batch_size(slots, device, memory_per_sample_gb, slots)
        self.scheduler = Scheduler(slots, max_queue, budget)
        self._runner_args = dict(use_kv_cache=use_kv_cache, batch_invariant=batch_invariant,
                                 batched_products_mode=shared, compile=compile)
        self.runner = ModelRunner(model, slots, **self._runner_args)
        self._float32_runner: Optional[ModelRunner] = None
        self.streams = CodecStreams(codec, slots) if codec is not None else None
        self._stream_ids = itertools.count()
        self._stream_of: dict[str, Any] = {}
        self.n_vq = model.config.n_vq

    # ------------------------------------------------------------------------------------------------ API

    def add(self, request: Request) -> None:
        """Queue a request (raises `scheduler.EngineFull` beyond `max_queue`)."""
        self.scheduler.add(request)

    def abort(self, request_id: str) -> Optional[RequestOutput]:
        """Cancel a request: a waiting one leaves at once (its output is returned), a running one at the next step."""
        request = self.scheduler.abort(request_id)
        if request is not None and request.slot is None:
            request.done = True
            return RequestOutput(request, finished=True, error=_cancelled(request))
        return None

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def close(self) -> None:
        if self.streams is not None:
            self.streams.close_all()

    def admit(self) -> None:
        """Give free slots to waiting requests now (`step` does it first unless told not to)."""
        self.scheduler.schedule()

    def step(self, admit: bool = True) -> list[RequestOutput]:
        """Admit (unless `admit` is False), run one frame for every running request, decode ready windows; the
        outputs of this step."""
        outputs: dict[str, RequestOutput] = {}
        running = []
        for request in (self.scheduler.schedule() if admit else list(self.scheduler.running)):
            if request.cancelled:
                self._finish(request, outputs, _cancelled(request))
            elif request.started or self._begin_chunk(request, outputs):
                running.append(request)
        for float32 in (False, True):
            group = [request for request in running if request.float32 == float32]
            for block in self.scheduler.blocks(group):
                block = [r for r in block if not r.done and r.slot is not None]  # a failed block requeues others
                if block:
                    self._run_block(block, outputs)
        return list(outputs.values())

    # ------------------------------------------------------------------------------------------------ steps

    def _runner(self, request: Request) -> ModelRunner:
        if not request.float32:
            return self.runner
        if self._float32_runner is None:
            # imported here: shared_resources needs the tokenizer/codec stack, which frame generation never does
            from .shared_resources import float32_retry_model
            model = float32_retry_model(self.model, self.model.transformer.wte.weight.device)
            self._float32_runner = ModelRunner(model, self.scheduler.slots, **self._runner_args)
        return self._float32_runner

    def _run_block(self, block: list[Request], outputs: dict) -> None:
        runner = self._runner(block[0])
        rows = [RowInput(r.slot, r.prompt.to(runner.device) if r.prompt is not None else None, r.params,
                         r.generator, r.steps < r.params.min_new_frames) for r in block]
        saved = runner.checkpoint([r.slot for r in block])
        states = [None if r.generator is None else r.generator.get_state() for r in block]
        try:
            result = runner.step(rows)
        except Exception as exc:
            runner.restore(saved)
            for request, state in zip(block, states):
                if state is not None:
                    request.generator.set_state(state)
            if not failures.is_out_of_memory_error(exc):
                self._fail_block(block, exc, outputs)
                return
            if len(block) == 1:
                self._finish(block[0], outputs, RuntimeError(
                    "out of device memory while generating a single text chunk; lower --max-new-frames or "
                    "voice_clone_max_text_tokens, use float16/bfloat16, or free device memory"))
                return
            budget = self.scheduler.shrink(len(block))
            logger.warning("out of device memory; running at most %d rows per step from now on", budget)
            remaining = list(block)
            while remaining:  # in blocks of the budget as it stands (a smaller block may shrink it again)
                part, remaining = remaining[: self.scheduler.budget], remaining[self.scheduler.budget :]
                self._run_block(part, outputs)
            return
        self._apply(block, result, outputs)

    def _apply(self, block: list[Request], result: Any, outputs: dict) -> None:
        ready, ending = [], []
        for i, request in enumerate(block):
            if not (result.text_finite[i] and result.audio_finite[i]):
                self._numerical_failure(request, "text" if not result.text_finite[i] else "audio", outputs)
                continue
            request.prompt = None
            codes, continues = result.codes[i], bool(result.continues[i])
            ended = request.record(codes, continues)
            if request.audio is None:
                _output(outputs, request).events.append(
                    {"type": "frame", "audio_token_ids": codes, "continues": continues, "chunk_index": request.chunk})
            elif request.streamed and continues and self.streams.push(self._stream_of[request.id], codes):
                ready.append(request)
            if ended:
                ending.append(request)
        self._decode(ready + [r for r in ending if r not in ready and r.streamed], outputs)
        for request in ending:
            self._end_chunk(request, outputs)

    def _fail_block(self, block: list[Request], exc: BaseException, outputs: dict) -> None:
        """A step failed (not out of memory): its requests fail; the others go on with fresh runners (their caches
        may be half-updated)."""
        for request in block:
            self._finish(request, outputs, exc)
        others = [r for r in self.scheduler.running if not r.done]
        self.runner = ModelRunner(self.model, self.scheduler.slots, **self._runner_args)
        self._float32_runner = None
        for request in others:
            if request.emitted:  # its audio went out: it cannot start again
                self._finish(request, outputs, exc)
                continue
            self._close_stream(request)
            self.scheduler.requeue(request)
            request.restart()

    def _numerical_failure(self, request: Request, kind: str, outputs: dict) -> None:
        message = non_finite_message(kind, request.steps, self._runner(request).model.dtype)
        if request.float32:
            device = self.model.transformer.wte.weight.device
            self._finish(request, outputs, RuntimeError(
                f"generation failed numerically in the model's dtype ({request.first_error}) and again in float32 "
                f"with the '{devices.fallback_attention_implementation(device)}' attention backend ({message}); "
                "check the weights and the device (python verify_npu.py)"))
            return
        if request.emitted or not self.retry_float32:
            self._finish(request, outputs, RuntimeError(message))
            return
        logger.warning("generation was numerically unstable (%s); running the request again in float32", message)
        self._runner(request).release(request.slot)
        self._close_stream(request)
        request.restart()
        request.first_error, request.float32 = message, True
        self._begin_chunk(request, outputs)

    # ------------------------------------------------------------------------------------------------ chunks

    def _begin_chunk(self, request: Request, outputs: dict) -> bool:
        """Start the request's current chunk in its slot; False when its prompt does not fit (the request failed)."""
        rows = request.start_chunk()
        limit = self.model.config.max_position_embeddings
        if rows.shape[0] + request.params.max_new_frames > limit:
            self._finish(request, outputs, ValueError(
                f"max_new_frames={request.params.max_new_frames} plus the prompt length of text chunk "
                f"{request.chunk} ({rows.shape[0]} rows) exceeds max_position_embeddings={limit}"))
            return False
        self._runner(request).begin(request.slot, rows.shape[0] + request.params.max_new_frames)
        plan = request.audio
        if plan is not None and plan.stream and request.id not in self._stream_of:
            stream = self._stream_of[request.id] = (request.id, request.chunk, next(self._stream_ids))
            prime = plan.prompt_codes if plan.continuation else None
            self.streams.open(stream, prime, request.nq)
        return True

    def _end_chunk(self, request: Request, outputs: dict) -> None:
        """Store the chunk's codes; start the next chunk or finish the request (voice clone: a pause between
        chunks, each with its own stream; continuation: one stream)."""
        index = request.chunk
        last = request.end_chunk(self.n_vq)
        plan = request.audio
        if plan is not None and plan.stream and (not plan.continuation or last):
            self._close_stream(request)
        if last:
            if plan is not None and not plan.stream:
                waves = decode_generated(self.codec, request.codes, plan.continuation, plan.prompt_codes,
                                         request.nq, plan.codec_batch_size)
                request.waveform = waves[0] if plan.continuation else join_with_pauses(waves, plan.pauses)
            self._finish(request, outputs, None)
            return
        if plan is not None and plan.stream and not plan.continuation:
            _output(outputs, request).events.append(_audio_event(plan.pauses[index], index, "pause"))
        self._begin_chunk(request, outputs)

    def _finish(self, request: Request, outputs: dict, error: Optional[BaseException]) -> None:
        if request.slot is not None:
            self._runner(request).release(request.slot)
        self._close_stream(request)
        self.scheduler.finish(request)
        output = _output(outputs, request)
        output.finished, output.error = True, error

    # ------------------------------------------------------------------------------------------------ codec

    def _decode(self, requests: list[Request], outputs: dict) -> None:
        streams = [self._stream_of[r.id] for r in requests]
        if not streams:
            return
        audio = self.streams.flush(streams, {self._stream_of[r.id]: r.nq for r in requests})
        for request in requests:
            wave = audio.get(self._stream_of[request.id])
            if wave is not None:
                request.emitted = True
                _output(outputs, request).events.append(_audio_event(wave, request.chunk))

    def _close_stream(self, request: Request) -> None:
        stream = self._stream_of.pop(request.id, None)
        if stream is not None and self.streams is not None:
            self.streams.close(stream)


def generate_frames(model: Any, input_ids: torch.Tensor, mask: torch.Tensor, params: SamplingParams, *,
                    use_kv_cache: bool = True, generator: Optional[torch.Generator] = None) -> Iterator[dict]:
    """Stream frames for validated, left-padded prompt rows (see `MossTTSNanoForCausalLM.generate_stream`): each row
    a request of a private core, its padding stripped; a step's frame holds the pad code for rows that ended. At its
    end (or when its consumer leaves) the calling thread's idle OpenMP team is released, as after `inference`."""
    try:
        yield from _frames(model, input_ids, mask, params, use_kv_cache, generator)
    finally:
        release_idle_team()


def _frames(model: Any, input_ids: torch.Tensor, mask: torch.Tensor, params: SamplingParams, use_kv_cache: bool,
            generator: Optional[torch.Generator]) -> Iterator[dict]:
    config = model.config
    batch, device = input_ids.shape[0], input_ids.device
    pad = config.audio_pad_token_id
    core = EngineCore(model, slots=batch, use_kv_cache=use_kv_cache, retry_float32=False)
    nq = params.resolve_nq(config.n_vq)
    for row in range(batch):
        rows = input_ids[row, mask[row]]  # (T_b, n_vq + 1) without the left padding
        core.add(Request(str(row), params, generator, 1, lambda index, codes, rows=rows: rows, nq))
    active = torch.ones(batch, dtype=torch.bool)
    num_frames = torch.zeros(batch, dtype=torch.long)
    frames: list[torch.Tensor] = []
    for step in range(params.max_new_frames):
        frame = torch.full((batch, config.n_vq), pad, dtype=torch.long)
        for output in core.step():
            if output.error is not None:
                raise output.error
            row = int(output.request.id)
            for event in output.events:
                if event["continues"]:
                    frame[row] = event["audio_token_ids"]
                else:
                    active[row] = False
        if not active.any():
            break
        num_frames += active
        frames.append(frame.to(device))
        yield {"type": "frame", "step_index": step, "audio_token_ids": frames[-1], "active_mask": active.to(device),
               "finished_mask": ~active.to(device)}
    audio = torch.stack(frames, dim=1) if frames else torch.full((batch, 0, config.n_vq), pad, device=device)
    yield {"type": "final", "generation": GenerationOutput(
        audio_token_ids=audio, prompt_input_ids=input_ids, prompt_attention_mask=mask,
        finished_mask=~active.to(device), num_frames=num_frames.to(device),
    )}


def _output(outputs: dict, request: Request) -> RequestOutput:
    if request.id not in outputs:
        outputs[request.id] = RequestOutput(request)
    return outputs[request.id]


def _audio_event(wave: torch.Tensor, chunk_index: int, kind: str = "audio") -> dict:
    return {"type": kind, "waveform": wave, "sample_rate": TARGET_SAMPLE_RATE, "chunk_index": chunk_index}


def _cancelled(request: Request) -> RequestCancelled:
    return RequestCancelled(f"request {request.id} was cancelled")
