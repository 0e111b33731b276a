"""End-to-end synthesis behind ``MossTTSNanoForCausalLM.inference`` / ``inference_stream``.

text (+ reference audio) -> codec encode -> prompt rows -> generation -> codec decode -> 48 kHz stereo waveform
-> file. Voice-clone text is split into chunks within a token budget, joined with short pauses. Generation steps a
private `engine_core.EngineCore` in the calling thread (a shared one with ``engine=``): the core runs the chunks
(non-streamed voice-clone chunks side by side in slots sized from free device memory), re-runs a request that
fails numerically in float32 and shrinks its row budget on out-of-memory errors.

Every call owns its state: KV caches, its codec decode session, its random generator (``seed=`` / ``generator=``).
The model, tokenizer and codec are only read, so one ``Synthesizer`` (or one model's ``inference`` /
``inference_stream``) serves any number of threads and interleaved streams. The float32 retry runs a float32 copy
kept beside the model (``shared_resources.float32_retry_model``), never the caller's model cast in place. A call
ends by releasing its thread's idle OpenMP team (``openmp_runtime``), so threads that are done with synthesis (a
server's pool threads) do not slow the ones still at work.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from . import devices
from .audio_io import (
    TARGET_SAMPLE_RATE,
    load_prompt_audio,
    prepare_prompt_waveform,
    write_audio_atomic,
)
from .codec_output import (  # noqa: F401  (SAMPLES_PER_FRAME, decode_frames: imported from here by others)
    SAMPLES_PER_FRAME,
    decode_frames,
    decode_generated,
    join_with_pauses,
    pause_waveform,
)
from .engine_core import EngineCore
from .openmp_runtime import release_idle_team
from .prompting import build_continuation_rows, build_voice_clone_rows
from .scheduler import AudioPlan, Request
from .sampling import SamplingParams
from .shared_resources import (
    RESOURCE_KEYS,
    Resources,
    cached_resources,
    load_resources,
    place_model,
)
from .synthesis_request import (  # noqa: F401  (METHOD_DEFAULTS: tests read it from here)
    METHOD_DEFAULTS,
    SynthesisRequest,
    build_request,
)
from .text_chunking import chunk_separators, split_text_into_chunks

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- resources


class Synthesizer:
    """Text to speech with one model and the resources it needs (tokenizer, codec, prompt template), loaded once.

    Safe to share between threads and between interleaved streams: each call owns its state (KV caches, its codec
    decode session, its random generator); the model, tokenizer and codec are only read. ``model.inference`` /
    ``inference_stream`` go through one of these per set of resource arguments (``synthesizer_for``).

    Args:
        model: a loaded ``MossTTSNanoForCausalLM`` on its device.
        text_tokenizer, text_tokenizer_path, audio_tokenizer, audio_tokenizer_path, local_files_only: as for
            ``MossTTSNanoForCausalLM.inference``.
        resources: already loaded resources for ``model`` (instead of the arguments above).
    """

    def __init__(self, model: Any, *, resources: Resources | None = None, **resource_kwargs: Any) -> None:
        unknown = sorted(set(resource_kwargs) - set(RESOURCE_KEYS))
        if unknown:
            raise TypeError(f"Synthesizer() got unexpected keyword arguments {unknown}; valid: {list(RESOURCE_KEYS)}")
        self.model = model
        self.resources = resources if resources is not None else load_resources(model, **resource_kwargs)

    @property
    def codec(self) -> Any:
        return self.resources.codec

    @property
    def tokenizer(self) -> Any:
        return self.resources.tokenizer

    def inference(self, text: str, output_audio_path: str | os.PathLike | None = None, **kwargs: Any) -> dict:
        """``MossTTSNanoForCausalLM.inference`` with this object's resources (no resource keywords)."""
        return run_inference(self.model, text, output_audio_path, synthesizer=self, **kwargs)

    def inference_stream(self, text: str, output_audio_path: str | os.PathLike | None = None,
                         **kwargs: Any) -> Iterator[dict]:
        """``MossTTSNanoForCausalLM.inference_stream`` with this object's resources (no resource keywords)."""
        return run_inference_stream(self.model, text, output_audio_path, synthesizer=self, **kwargs)


def synthesizer_for(model: Any, **resource_kwargs: Any) -> Synthesizer:
    """The ``Synthesizer`` behind ``model.inference(**resource_kwargs)``: resources loaded on first use, then reused.

    Thread-safe: concurrent first calls load once (under a lock); the last few resource sets per model are kept.
    """
    return Synthesizer(model, resources=cached_resources(model, **resource_kwargs))


def encode_prompt_audio(codec: Any, waveform: torch.Tensor) -> torch.LongTensor:
    """Codec-encode a ``[2, N]`` 48 kHz waveform into ``[T_ref, n_vq]`` prompt codes (valid frames only)."""
    device = next(codec.parameters()).device
    out = codec.batch_encode([waveform.to(device=device, dtype=torch.float32)])
    length = int(out.audio_codes_lengths[0])
    if length == 0:
        raise ValueError("prompt audio is shorter than one codec frame (80 ms) after resampling")
    return out.audio_codes[:, 0, :length].transpose(0, 1).contiguous()  # (T_ref, n_vq)


# ---------------------------------------------------------------------------------------------------- generation


@dataclass
class Generated:
    """What generation produced for a call's text chunks."""

    codes: list[torch.Tensor] = field(default_factory=list)  # per chunk: [frames, n_vq] on the CPU
    truncated: list[int] = field(default_factory=list)  # chunks that reached max_new_frames without audio_end
    chunk_batch: int = 1  # voice-clone chunks per generate call, after any out-of-memory halving
    float32_retry: bool = False

    def add(self, codes: torch.Tensor, finished: bool) -> None:
        if not finished:
            self.truncated.append(len(self.codes))
        self.codes.append(codes)


@dataclass
class Context:
    """What a continuation chunk continues: the text spoken in ``codes`` and those codes (None: no audio)."""

    text: str
    codes: torch.Tensor | None


def continuation_rows(plan: "Plan", index: int, context: Context) -> torch.Tensor:
    """Rows of continuation chunk ``index``: ``context.text + separator + chunk`` after ``context.codes``."""
    resources = plan.resources
    text = context.text + plan.separators[index] + plan.chunks[index]
    return build_continuation_rows(resources.template, resources.ids, resources.encode_text(text), context.codes,
                                   plan.request.nq)


def next_context(plan: "Plan", index: int, codes: torch.Tensor, context: Context) -> Context:
    """The next chunk continues this chunk's audio, or the same context when this chunk produced no frame."""
    return Context(plan.chunks[index], codes) if codes.shape[0] else context


# ---------------------------------------------------------------------------------------------------- pipeline


def prepare_prompt(request: SynthesisRequest, resources: Resources) -> torch.Tensor | None:
    """Read / check the prompt audio and encode it into ``[T_ref, n_vq]`` codes (None without prompt audio).

    ``prompt_audio_codes`` (codes the caller already encoded) are used as they are (the row builders check them).
    """
    if request.prompt_audio_codes is not None:
        codes = torch.as_tensor(request.prompt_audio_codes)
        if codes.dim() != 2 or codes.shape[1] != resources.ids.n_vq or codes.is_floating_point():
            raise ValueError(f"prompt_audio_codes must be an integer tensor [T_ref, {resources.ids.n_vq}], "
                             f"got {codes.dtype} {tuple(codes.shape)}")
        return codes.long().cpu()
    if request.prompt_audio is not None:
        wav = torch.as_tensor(request.prompt_audio, dtype=torch.float32).detach().cpu()
        wav = wav.unsqueeze(0) if wav.dim() == 1 else wav
        if wav.dim() != 2:
            raise ValueError(f"prompt_audio must be [channels, samples] or [samples], got shape {tuple(wav.shape)}")
        wav = prepare_prompt_waveform(wav.numpy(), request.prompt_audio_sample_rate, downmix=request.downmix)
    elif request.prompt_audio_path is not None:
        wav = load_prompt_audio(request.prompt_audio_path, downmix=request.downmix)
    else:
        return None
    return encode_prompt_audio(resources.codec, wav)


def plan_chunks(request: SynthesisRequest, resources: Resources) -> tuple[list[str], list[str]]:
    """Return ``(text chunks, separator before each chunk)``: the text split within the token budget.

    A text that fits one chunk is kept as it is: voice clone speaks it stripped (docs/model.md, Long text), continuation
    exactly as given (its effective text is a plain concatenation). A longer continuation text is
    normalised and chunked like voice-clone text; its first chunk keeps one space after prompt_text when the text
    started with whitespace.
    """
    chunks = split_text_into_chunks(
        request.text, lambda text: len(resources.encode_text(text)), request.voice_clone_max_text_tokens
    )
    if request.mode == "voice_clone":
        return chunks, chunk_separators(request.text, chunks)
    if len(chunks) == 1:
        return [request.text], [""]
    separators = chunk_separators(request.text, chunks)
    separators[0] = " " if request.prompt_text and request.text[:1].isspace() else ""
    return chunks, separators


def voice_clone_rows(plan: "Plan") -> list[torch.Tensor]:
    resources, request = plan.resources, plan.request
    enc = resources.encode_text
    return [build_voice_clone_rows(resources.template, resources.ids, enc(chunk), plan.prompt_codes, request.nq)
            for chunk in plan.chunks]


def split_call_arguments(model: Any, kwargs: dict) -> tuple[dict, Callable | None]:
    """Take the resource and device keywords out of ``kwargs``; ``device`` goes to ``place_model``.

    ``audio_tokenizer_pretrained_name_or_path`` (upstream's name) is accepted for ``audio_tokenizer_path``.
    """
    if "audio_tokenizer_pretrained_name_or_path" in kwargs:
        kwargs.setdefault("audio_tokenizer_path", kwargs.pop("audio_tokenizer_pretrained_name_or_path"))
    device = kwargs.pop("device", None)
    if device is not None:
        place_model(model, devices.resolve_device(device))
    resource_kwargs = {k: kwargs.pop(k) for k in RESOURCE_KEYS if k in kwargs}
    return resource_kwargs, kwargs.pop("progress", None)


@dataclass
class Plan:
    """A validated call: its request, resources, prompt codes, text chunks, the separator before each, and its own
    random generator."""

    request: SynthesisRequest
    resources: Resources
    prompt_codes: torch.Tensor | None
    chunks: list[str]
    separators: list[str]
    progress: Callable | None
    generator: torch.Generator | None = None

    @property
    def nq(self) -> int:
        return self.request.nq or self.resources.ids.n_vq

    @property
    def first_context(self) -> Context:
        """What the first continuation chunk continues: the caller's prompt (text and audio), if any."""
        return Context(self.request.prompt_text or "", self.prompt_codes)


def prepare_call(model: Any, text: str, kwargs: dict, synthesizer: Synthesizer | None = None) -> Plan:
    """Everything before generation, shared by the streaming and non-streaming entry points.

    Raises:
        ValueError: resource keywords given to a ``Synthesizer`` call (it owns its resources), or bad arguments.
    """
    resource_kwargs, progress = split_call_arguments(model, kwargs)
    request = build_request(text, **kwargs)
    if synthesizer is None:
        synthesizer = synthesizer_for(model, **resource_kwargs)
    elif resource_kwargs:
        raise ValueError(f"{sorted(resource_kwargs)} cannot be passed to a Synthesizer's calls: it owns its "
                         "resources; create another Synthesizer for other ones")
    resources = synthesizer.resources
    generator = request.call_generator(next(model.parameters()).device)
    prompt_codes = prepare_prompt(request, resources)
    chunks, separators = plan_chunks(request, resources)
    return Plan(request, resources, prompt_codes, chunks, separators, progress, generator)


def finish_result(plan: Plan, generated: Generated, waveform: torch.Tensor, output_audio_path: Any,
                  **extra: Any) -> dict:
    """The result dict of both entry points; writes the file (atomically) when a path is given."""
    voice_clone = plan.request.mode == "voice_clone"
    result = {
        "audio_path": None,
        "sample_rate": TARGET_SAMPLE_RATE,
        "audio_token_ids": generated.codes,  # one [frames, n_vq] tensor per text chunk, whatever their number
        "waveform": waveform,
        "reference_audio_token_ids": plan.prompt_codes,
        "text_chunks": plan.chunks,
        "voice_clone_text_chunks": plan.chunks if voice_clone else None,
        "truncated_chunks": generated.truncated,
        "frames": sum(int(c.shape[0]) for c in generated.codes),
        "voice_clone_chunk_batch_size": generated.chunk_batch,
        "voice_clone_codec_batch_size": (plan.request.voice_clone_codec_batch_size or len(generated.codes))
        if voice_clone else 1,
        "float32_fallback": generated.float32_retry,
        **extra,
    }
    if output_audio_path is not None:
        result["audio_path"] = str(write_audio_atomic(output_audio_path, waveform, TARGET_SAMPLE_RATE))
    return result


def sampling_params(request: SynthesisRequest) -> SamplingParams:
    return SamplingParams(max_new_frames=request.max_new_frames, nq=request.nq,
                          **{k: v for k, v in request.generation.items() if k != "use_kv_cache"})


def chunk_source(plan: Plan) -> Callable[[int, list], torch.Tensor]:
    """The rows of text chunk ``index`` given the codes of the chunks before it (continuation continues them)."""
    if plan.request.mode == "voice_clone":
        rows = voice_clone_rows(plan)
        return lambda index, codes: rows[index]

    def continuation(index: int, codes: list) -> torch.Tensor:
        context = plan.first_context
        for done, chunk_codes in enumerate(codes):
            context = next_context(plan, done, chunk_codes, context)
        return continuation_rows(plan, index, context)

    return continuation


def core_request(plan: Plan, stream: bool, request_id: str | None = None) -> Request:
    """The engine-core request of a call: its chunks, settings, generator and audio output (streamed or end-only)."""
    request = plan.request
    continuation = request.mode != "voice_clone"
    audio = AudioPlan(continuation=continuation, prompt_codes=plan.prompt_codes if continuation else None,
                      pauses=[pause_waveform(chunk) for chunk in plan.chunks],
                      codec_batch_size=request.voice_clone_codec_batch_size, stream=stream)
    return Request(request_id or uuid.uuid4().hex[:12], sampling_params(request), plan.generator, len(plan.chunks),
                   chunk_source(plan), plan.nq, audio)


def check_position_limit(model: Any, rows: torch.Tensor, max_new_frames: int) -> None:
    limit = model.config.max_position_embeddings
    if rows.shape[0] + max_new_frames > limit:
        raise ValueError(f"max_new_frames={max_new_frames} plus the prompt length exceeds "
                         f"max_position_embeddings={limit}")


def run_to_end(core: EngineCore, requests: list[Request], progress: Callable | None = None) -> Iterator[dict]:
    """Step ``core`` until ``requests`` finish; yield their events; raise the first failure."""
    finished = 0
    try:
        while not all(r.done for r in requests):
            for output in core.step():
                yield from output.events
                if output.finished:
                    if output.error is not None:
                        raise output.error
                    finished += 1
                    if progress is not None and len(requests) > 1:
                        progress(f"generated {finished}/{len(requests)} text chunks")
    finally:
        core.close()  # leaving early closes the codec streams


def run_inference(model: Any, text: str, output_audio_path: str | os.PathLike | None = None, *,
                  synthesizer: Synthesizer | None = None, **kwargs: Any) -> dict:
    """Synthesize ``text``; see ``MossTTSNanoForCausalLM.inference`` for the arguments."""
    engine = kwargs.pop("engine", None)
    if engine is not None:
        return submit_to_engine(model, engine, text, output_audio_path, kwargs, stream=False).result()
    try:
        return _run_inference(model, text, output_audio_path, synthesizer, kwargs)
    finally:  # the call's thread may idle now (a server's pool thread): its team would slow the others' teams
        release_idle_team()


def _run_inference(model: Any, text: str, output_audio_path: Any, synthesizer: Synthesizer | None,
                   kwargs: dict) -> dict:
    plan = prepare_call(model, text, kwargs, synthesizer)
    request, device = plan.request, next(model.parameters()).device
    use_kv_cache = request.generation.get("use_kv_cache", True)
    if request.mode == "voice_clone":  # end-only: the chunks side by side in slots, decoded once at the end
        rows = voice_clone_rows(plan)
        for item in rows:
            check_position_limit(model, item, request.max_new_frames)
        slots = devices.chunk_batch_size(len(rows), device, request.voice_clone_max_memory_per_sample_gb,
                                         request.voice_clone_chunk_batch_size)
        core = EngineCore(model, slots=slots, use_kv_cache=use_kv_cache)
        params = sampling_params(request)
        parts = [Request(str(i), params, plan.generator, 1, lambda index, codes, item=item: item, plan.nq)
                 for i, item in enumerate(rows)]
        for part in parts:
            core.add(part)
        for _ in run_to_end(core, parts, plan.progress):
            pass
        generated = Generated(chunk_batch=core.scheduler.budget, float32_retry=any(p.float32 for p in parts))
        for part in parts:
            generated.add(part.codes[0], finished=not part.truncated)
        waves = decode_generated(plan.resources.codec, generated.codes, False, None, plan.nq,
                                 request.voice_clone_codec_batch_size)
        return finish_result(plan, generated, join_with_pauses(waves, plan.chunks), output_audio_path)
    core = EngineCore(model, plan.resources.codec, slots=1, use_kv_cache=use_kv_cache)
    call = core_request(plan, stream=False)
    core.add(call)
    for _ in run_to_end(core, [call]):
        pass
    return finish_result(plan, generated_of(call), call.waveform, output_audio_path)


def generated_of(request: Request) -> Generated:
    generated = Generated(float32_retry=request.float32)
    for index, codes in enumerate(request.codes):
        generated.add(codes, finished=index not in request.truncated)
    return generated


def run_inference_stream(
    model: Any, text: str, output_audio_path: str | os.PathLike | None = None, *,
    synthesizer: Synthesizer | None = None, **kwargs: Any
) -> Iterator[dict]:
    """Streaming synthesis; see ``MossTTSNanoForCausalLM.inference_stream``."""
    engine = kwargs.pop("engine", None)
    if engine is not None:
        handle = submit_to_engine(model, engine, text, output_audio_path, kwargs)
        try:
            yield from handle.events()
        finally:
            handle.cancel()  # nothing when it finished; frees its slot at once when the caller left early
        return
    try:
        yield from _run_inference_stream(model, text, output_audio_path, synthesizer, kwargs)
    finally:  # as in run_inference; when the stream ends or its consumer leaves
        release_idle_team()


def _run_inference_stream(model: Any, text: str, output_audio_path: Any, synthesizer: Synthesizer | None,
                          kwargs: dict) -> Iterator[dict]:
    plan = prepare_call(model, text, kwargs, synthesizer)
    started = time.perf_counter()
    core = EngineCore(model, plan.resources.codec, slots=1,
                      use_kv_cache=plan.request.generation.get("use_kv_cache", True))
    call = core_request(plan, stream=True)
    core.add(call)
    first_audio: float | None = None
    parts: list[torch.Tensor] = []
    for event in run_to_end(core, [call]):
        if event["type"] == "audio" and first_audio is None:
            first_audio = time.perf_counter() - started
        parts.append(event["waveform"])
        yield event
    waveform = torch.cat(parts, dim=-1) if parts else torch.zeros(2, 0)
    yield finish_result(plan, generated_of(call), waveform, output_audio_path, type="result",
                        voice_clone_codec_batch_size=1, first_audio_latency_s=first_audio)


def submit_to_engine(model: Any, engine: Any, text: str, output_audio_path: Any, kwargs: dict,
                     stream: bool = True) -> Any:
    """Submit one call to a running ``engine.SynthesisEngine`` of ``model`` (``engine=``): its text chunks run there
    in turn, each frame shared with the engine's other requests.

    Raises:
        ValueError: an engine of another model, or a call argument the engine refuses (resources belong to it).
    """
    if getattr(engine, "model", None) is not model:
        raise ValueError(f"engine={engine!r} does not serve this model; pass the SynthesisEngine built on it")
    return engine.submit(text, output_audio_path=output_audio_path, stream=stream, **kwargs)
