"""End-to-end synthesis behind ``MossTTSNanoForCausalLM.inference`` / ``inference_stream``.

text (+ reference audio) -> codec encode -> prompt rows -> generation -> codec decode -> 48 kHz stereo waveform
-> file. Voice-clone text is split into chunks within a token budget; chunks are generated in batches sized
from free device memory and joined with short pauses. Generation that fails numerically is retried once in
float32 with the device's fallback attention backend; a batch that runs out of memory is retried smaller.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

try:
    from . import devices
    from .audio_io import (
        TARGET_SAMPLE_RATE,
        load_prompt_audio,
        prepare_prompt_waveform,
        write_audio_atomic,
    )
    from .codec_loading import load_codec, resolve_codec_directory
    from .prompting import (
        PromptTokenIds,
        build_continuation_rows,
        build_prompt_template,
        build_voice_clone_rows,
        infer_mode,
        left_pad_batch,
        validate_mode,
    )
    from .sampling import SamplingParams
    from .text_chunking import chunk_separators, normalize_text, pause_seconds_after, split_text_into_chunks
    from .tokenization_moss_tts_nano import MossTTSNanoSentencePieceTokenizer
except ImportError:  # not part of a package: imported from the repository root or run as a script
    if __package__:  # inside a package (remote code): a real missing dependency, reported as itself
        raise
    import devices
    from audio_io import (
        TARGET_SAMPLE_RATE,
        load_prompt_audio,
        prepare_prompt_waveform,
        write_audio_atomic,
    )
    from codec_loading import load_codec, resolve_codec_directory
    from prompting import (
        PromptTokenIds,
        build_continuation_rows,
        build_prompt_template,
        build_voice_clone_rows,
        infer_mode,
        left_pad_batch,
        validate_mode,
    )
    from sampling import SamplingParams
    from text_chunking import chunk_separators, normalize_text, pause_seconds_after, split_text_into_chunks
    from tokenization_moss_tts_nano import MossTTSNanoSentencePieceTokenizer

logger = logging.getLogger(__name__)

SAMPLES_PER_FRAME = 3840
STREAM_WINDOWS = ((0.25, 1), (0.5, 2), (1.0, 4))  # (audio seconds ahead of wall clock below which, window frames)
STREAM_MAX_WINDOW = 8
# Behind the wall clock (generation slower than real time, playback already waiting): decoding frame by frame
# would not bring the audio in time, and costs the codec more per frame than 4-frame windows.
STREAM_BEHIND_WINDOW = 4

# Upstream's method defaults (drop-in compatibility), taken from SamplingParams; the scripts pass the official CLI
# values instead.
METHOD_DEFAULTS: dict[str, Any] = {
    **{f.name: f.default for f in fields(SamplingParams) if f.name != "nq"},
    "use_kv_cache": True,
}
SAMPLING_KEYS = tuple(k for k in METHOD_DEFAULTS if k != "max_new_frames")


@dataclass
class Resources:
    """What a synthesis needs besides the model, loaded once and cached on the model."""

    tokenizer: Any
    codec: Any
    ids: PromptTokenIds
    template: Any

    def encode_text(self, text: str) -> list[int]:
        return _encoder(self.tokenizer)(text)


def _encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    """Tokenise without special tokens, as every prompt piece is (spec §5)."""
    return lambda text: list(tokenizer.encode(text, add_special_tokens=False))


@dataclass
class SynthesisRequest:
    """One call's inputs, validated once."""

    text: str
    mode: str | None = None  # None: inferred from the prompt (prompting.infer_mode)
    prompt_text: str | None = None
    prompt_audio_path: str | None = None
    prompt_audio: torch.Tensor | None = None
    prompt_audio_sample_rate: int = TARGET_SAMPLE_RATE
    prompt_audio_codes: torch.Tensor | None = None
    nq: int | None = None
    max_new_frames: int = METHOD_DEFAULTS["max_new_frames"]
    generation: dict[str, Any] = field(default_factory=dict)
    voice_clone_max_text_tokens: int = 50
    voice_clone_max_memory_per_sample_gb: float = 1.0
    voice_clone_chunk_batch_size: int | None = None
    voice_clone_codec_batch_size: int | None = None
    downmix: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise ValueError(f"text must be a string, got {type(self.text).__name__}")
        normalize_text(self.text)  # validation only: raises on empty / whitespace / control-only text
        has_audio = any(getattr(self, name) is not None
                        for name in ("prompt_audio_path", "prompt_audio", "prompt_audio_codes"))
        self.mode = infer_mode(self.mode, has_prompt_audio=has_audio, has_prompt_text=bool(self.prompt_text))
        validate_mode(self.mode, has_prompt_audio=has_audio, has_prompt_text=bool(self.prompt_text))
        # the generator's own validation, run before any audio is read or encoded
        sampling = {k: v for k, v in self.generation.items() if k != "use_kv_cache"}
        SamplingParams(max_new_frames=self.max_new_frames, nq=self.nq, **sampling)
        if self.voice_clone_max_text_tokens < 1:
            raise ValueError(
                f"voice_clone_max_text_tokens must be >= 1, got {self.voice_clone_max_text_tokens!r}"
            )
        if self.voice_clone_max_memory_per_sample_gb <= 0:
            raise ValueError(
                "voice_clone_max_memory_per_sample_gb must be > 0, "
                f"got {self.voice_clone_max_memory_per_sample_gb!r}"
            )
        for name in ("voice_clone_chunk_batch_size", "voice_clone_codec_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value!r}")


def build_request(text: str, **kwargs: Any) -> SynthesisRequest:
    """Split keyword arguments into request fields and generation settings (unknown names raise TypeError)."""
    generation = {k: kwargs.pop(k, METHOD_DEFAULTS[k]) for k in SAMPLING_KEYS}
    kwargs.setdefault("max_new_frames", METHOD_DEFAULTS["max_new_frames"])
    return SynthesisRequest(text=text, generation=generation, **kwargs)


# ---------------------------------------------------------------------------------------------------- resources


def model_directory(model: Any) -> Path | None:
    name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    return Path(name) if name and Path(name).is_dir() else None


def load_resources(
    model: Any,
    text_tokenizer: Any = None,
    text_tokenizer_path: str | os.PathLike | None = None,
    audio_tokenizer: Any = None,
    audio_tokenizer_path: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Resources:
    """Find the text tokenizer and codec for ``model`` (cached on the model after the first call).

    Raises:
        ValueError: a tokenizer or codec location that holds no files.
        RuntimeError: a codec hub id that cannot be fetched.
    """
    key = (id(text_tokenizer), str(text_tokenizer_path), id(audio_tokenizer), str(audio_tokenizer_path))
    cached = getattr(model, "_moss_resources", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    model_dir = model_directory(model)
    tokenizer = text_tokenizer or _load_tokenizer(text_tokenizer_path or model_dir)
    codec = audio_tokenizer
    if codec is None:
        configured = getattr(model.config, "audio_tokenizer_pretrained_name_or_path", None)
        codec_dir = resolve_codec_directory(audio_tokenizer_path, model_dir, configured, local_files_only)
        codec = load_codec(codec_dir, model_dir)
    codec.to(next(model.parameters()).device)
    ids = PromptTokenIds.from_config(model.config)
    resources = Resources(tokenizer, codec, ids, build_prompt_template(_encoder(tokenizer), ids))
    model._moss_resources = (key, resources)
    return resources


def _load_tokenizer(directory: str | os.PathLike | None) -> Any:
    if directory is None or not (Path(directory) / "tokenizer.model").is_file():
        raise ValueError(
            f"no text tokenizer found (looked for tokenizer.model in {directory or 'the model directory'}); "
            "pass text_tokenizer_path / the checkpoint directory that holds tokenizer.model"
        )
    return MossTTSNanoSentencePieceTokenizer.from_pretrained(str(directory))


def encode_prompt_audio(codec: Any, waveform: torch.Tensor) -> torch.LongTensor:
    """Codec-encode a ``[2, N]`` 48 kHz waveform into ``[T_ref, n_vq]`` prompt codes (valid frames only)."""
    device = next(codec.parameters()).device
    out = codec.batch_encode([waveform.to(device=device, dtype=torch.float32)])
    length = int(out.audio_codes_lengths[0])
    if length == 0:
        raise ValueError("prompt audio is shorter than one codec frame (80 ms) after resampling")
    return out.audio_codes[:, 0, :length].transpose(0, 1).contiguous()  # (T_ref, n_vq)


def decode_frames(codec: Any, codes: list[torch.Tensor], nq: int, batch_size: int | None = None) -> list[torch.Tensor]:
    """Decode per-row ``[N_i, >=nq]`` codes into ``[2, 3840 * N_i]`` float32 waveforms (CPU)."""
    waves: list[torch.Tensor] = [torch.zeros(2, 0) for _ in codes]
    todo = [i for i, c in enumerate(codes) if c.shape[0] > 0]
    step = max(1, batch_size or len(todo) or 1)
    device = next(codec.parameters()).device
    for start in range(0, len(todo), step):
        rows = todo[start : start + step]
        batch = [codes[i][:, :nq].transpose(0, 1).to(device) for i in rows]  # (nq, N_i)
        out = codec.batch_decode(batch, num_quantizers=nq)
        for j, i in enumerate(rows):
            waves[i] = out.audio[j, :, : int(out.audio_lengths[j])].float().cpu()
    return waves


# ---------------------------------------------------------------------------------------------------- generation


@contextlib.contextmanager
def float32_fallback(model: Any, device: torch.device) -> Iterator[None]:
    """Run the model in float32 with the device's fallback attention backend, then restore it."""
    dtype = next(model.parameters()).dtype
    previous = model.get_attention_implementation()
    model.to(torch.float32)
    model.set_attention_implementation(devices.fallback_attention_implementation(device))
    try:
        yield
    finally:
        model.set_attention_implementation(*previous)
        model.to(dtype)


def _generation_kwargs(request: SynthesisRequest) -> dict[str, Any]:
    return dict(request.generation, max_new_frames=request.max_new_frames, nq=request.nq)


def _warn_retry(first: BaseException) -> None:
    logger.warning("generation was numerically unstable (%s); retrying once in float32", str(first).splitlines()[0])


def _failed_twice(first: BaseException, second: BaseException, device: torch.device) -> RuntimeError:
    return RuntimeError(
        f"generation failed numerically in the model's dtype ({str(first).splitlines()[0]}) and again in "
        f"float32 with the '{devices.fallback_attention_implementation(device)}' attention backend "
        f"({str(second).splitlines()[0]}); check the weights and the device (python verify_npu.py)"
    )


def generate_robust(
    model: Any, input_ids: torch.Tensor, mask: torch.Tensor, request: SynthesisRequest
) -> tuple[Any, bool]:
    """``model.generate`` with one float32 / fallback-backend retry on numerical failure.

    Returns:
        ``(generation output, whether the float32 retry was needed)``.
    """
    kwargs = _generation_kwargs(request)
    try:
        return model.generate(input_ids=input_ids, attention_mask=mask, **kwargs), False
    except RuntimeError as exc:
        if not devices.is_stability_error(exc):
            raise
        first = exc
    _warn_retry(first)
    with float32_fallback(model, input_ids.device):
        try:
            return model.generate(input_ids=input_ids, attention_mask=mask, **kwargs), True
        except RuntimeError as exc:
            if not devices.is_stability_error(exc):
                raise
            raise _failed_twice(first, exc, input_ids.device) from exc


def stream_robust(
    model: Any, input_ids: torch.Tensor, mask: torch.Tensor, request: SynthesisRequest, emitted: Callable[[], bool]
) -> Iterator[dict]:
    """``model.generate_stream`` with one float32 / fallback-backend retry on numerical failure, as long as
    ``emitted()`` says no audio of this generation reached the caller yet (audio already yielded cannot be taken
    back). A retry is announced by a ``{"type": "retry"}`` event: frames before it are to be discarded.
    """
    kwargs = _generation_kwargs(request)
    try:
        yield from model.generate_stream(input_ids=input_ids, attention_mask=mask, **kwargs)
        return
    except RuntimeError as exc:
        if not devices.is_stability_error(exc) or emitted():
            raise
        first = exc
    _warn_retry(first)
    yield {"type": "retry"}
    with float32_fallback(model, input_ids.device):
        try:
            yield from model.generate_stream(input_ids=input_ids, attention_mask=mask, **kwargs)
        except RuntimeError as exc:
            if not devices.is_stability_error(exc):
                raise
            raise _failed_twice(first, exc, input_ids.device) from exc


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


def generate_chunks(
    model: Any, rows: list[torch.Tensor], request: SynthesisRequest, resources: Resources, progress: Callable | None
) -> Generated:
    """Generate every voice-clone chunk's rows, batched from free memory, halving the batch on out-of-memory errors."""
    device = next(model.parameters()).device
    generated = Generated()
    batch = devices.chunk_batch_size(
        len(rows), device, request.voice_clone_max_memory_per_sample_gb, request.voice_clone_chunk_batch_size
    )
    while len(generated.codes) < len(rows):
        part = rows[len(generated.codes) : len(generated.codes) + batch]
        input_ids, mask = left_pad_batch(part, resources.ids)
        try:
            out, fallback = generate_robust(model, input_ids.to(device), mask.to(device), request)
        except Exception as exc:
            if not devices.is_out_of_memory_error(exc):
                raise
            if batch == 1:
                raise RuntimeError(
                    "out of device memory while generating a single text chunk; lower --max-new-frames or "
                    "voice_clone_max_text_tokens, use float16/bfloat16, or free device memory"
                ) from exc
            batch = max(1, batch // 2)
            logger.warning("out of device memory; retrying with a chunk batch of %d", batch)
            continue
        generated.float32_retry = generated.float32_retry or fallback
        for codes, frames, finished in zip(out.audio_token_ids, out.num_frames.tolist(), out.finished_mask.tolist()):
            generated.add(codes[:frames].cpu(), finished)
        if progress is not None and len(rows) > 1:
            progress(f"generated {len(generated.codes)}/{len(rows)} text chunks")
    generated.chunk_batch = batch
    return generated


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


def generate_continuation(model: Any, plan: "Plan") -> Generated:
    """Generate continuation chunks one after another, each continuing the previous chunk's text and audio."""
    device = next(model.parameters()).device
    generated, context = Generated(), plan.first_context
    for index in range(len(plan.chunks)):
        input_ids, mask = left_pad_batch([continuation_rows(plan, index, context)], plan.resources.ids)
        out, fallback = generate_robust(model, input_ids.to(device), mask.to(device), plan.request)
        generated.float32_retry = generated.float32_retry or fallback
        codes = out.audio_token_ids[0, : int(out.num_frames[0])].cpu()
        generated.add(codes, bool(out.finished_mask[0]))
        context = next_context(plan, index, codes, context)
        if plan.progress is not None and len(plan.chunks) > 1:
            plan.progress(f"generated {index + 1}/{len(plan.chunks)} text chunks")
    return generated


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

    A text that fits one chunk is kept as it is: voice clone speaks it stripped (TTS_SPEC §8), continuation
    exactly as given (its effective text is a plain concatenation, TTS_SPEC §5). A longer continuation text is
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


def join_with_pauses(waves: list[torch.Tensor], chunks: list[str]) -> torch.Tensor:
    """Concatenate chunk waveforms with the pause after each chunk but the last."""
    parts: list[torch.Tensor] = []
    for i, (wave, chunk) in enumerate(zip(waves, chunks)):
        parts.append(wave)
        if i + 1 < len(waves):
            parts.append(pause_waveform(chunk))
    return torch.cat(parts, dim=-1) if parts else torch.zeros(2, 0)


def pause_waveform(chunk: str) -> torch.Tensor:
    return torch.zeros(2, int(round(pause_seconds_after(chunk) * TARGET_SAMPLE_RATE)))


def decode_generated(
    codec: Any, codes: list[torch.Tensor], request: SynthesisRequest, prompt_codes: torch.Tensor | None, nq: int
) -> list[torch.Tensor]:
    """Decode each voice-clone chunk's codes. Continuation is one continuous waveform: prompt codes (if any) and
    every chunk's codes are decoded together and the prompt's audio is dropped."""
    if request.mode == "continuation":
        prompt = prompt_codes.cpu() if prompt_codes is not None else torch.zeros(0, codes[0].shape[1], dtype=torch.long)
        wave = decode_frames(codec, [torch.cat([prompt, *codes], dim=0)], nq)[0]
        return [wave[:, prompt.shape[0] * SAMPLES_PER_FRAME :]]
    return decode_frames(codec, codes, nq, request.voice_clone_codec_batch_size)


def split_call_arguments(model: Any, kwargs: dict) -> tuple[dict, Callable | None]:
    """Take the resource and device keywords out of ``kwargs``; move the model when ``device`` is given.

    ``audio_tokenizer_pretrained_name_or_path`` (upstream's name) is accepted for ``audio_tokenizer_path``.
    """
    if "audio_tokenizer_pretrained_name_or_path" in kwargs:
        kwargs.setdefault("audio_tokenizer_path", kwargs.pop("audio_tokenizer_pretrained_name_or_path"))
    device = kwargs.pop("device", None)
    if device is not None:
        model.to(devices.resolve_device(device))
    resource_kwargs = {k: kwargs.pop(k) for k in _RESOURCE_KEYS if k in kwargs}
    return resource_kwargs, kwargs.pop("progress", None)


@dataclass
class Plan:
    """A validated call: its request, resources, prompt codes, text chunks and the separator before each."""

    request: SynthesisRequest
    resources: Resources
    prompt_codes: torch.Tensor | None
    chunks: list[str]
    separators: list[str]
    progress: Callable | None

    @property
    def nq(self) -> int:
        return self.request.nq or self.resources.ids.n_vq

    @property
    def first_context(self) -> Context:
        """What the first continuation chunk continues: the caller's prompt (text and audio), if any."""
        return Context(self.request.prompt_text or "", self.prompt_codes)


def prepare_call(model: Any, text: str, kwargs: dict) -> Plan:
    """Everything before generation, shared by the streaming and non-streaming entry points."""
    resource_kwargs, progress = split_call_arguments(model, kwargs)
    request = build_request(text, **kwargs)
    resources = load_resources(model, **resource_kwargs)
    if request.seed is not None:
        devices.seed_everything(request.seed, next(model.parameters()).device)
    prompt_codes = prepare_prompt(request, resources)
    chunks, separators = plan_chunks(request, resources)
    return Plan(request, resources, prompt_codes, chunks, separators, progress)


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


def run_inference(model: Any, text: str, output_audio_path: str | os.PathLike | None = None, **kwargs: Any) -> dict:
    """Synthesize ``text``; see ``MossTTSNanoForCausalLM.inference`` for the arguments."""
    plan = prepare_call(model, text, kwargs)
    if plan.request.mode == "voice_clone":
        generated = generate_chunks(model, voice_clone_rows(plan), plan.request, plan.resources, plan.progress)
    else:
        generated = generate_continuation(model, plan)
    waves = decode_generated(plan.resources.codec, generated.codes, plan.request, plan.prompt_codes, plan.nq)
    return finish_result(plan, generated, join_with_pauses(waves, plan.chunks), output_audio_path)


_RESOURCE_KEYS = (
    "text_tokenizer",
    "text_tokenizer_path",
    "audio_tokenizer",
    "audio_tokenizer_path",
    "local_files_only",
)


# ---------------------------------------------------------------------------------------------------- streaming


class StreamDecoder:
    """Decode frames as they arrive with the codec's streaming session, in windows sized by the lead over real time.

    The first frame is decoded alone (first audio as early as possible). While little audio is ahead of the wall
    clock, frames are decoded one or two at a time (low latency); once audio is comfortably ahead, in windows of up
    to 8 frames (less per-call overhead). Behind the wall clock (generation slower than real time), in 4-frame
    windows: the codec's per-call overhead then matters more than latency (measured effect: README, Performance).
    """

    def __init__(self, codec: Any, nq: int) -> None:
        self.codec, self.nq = codec, nq
        self.pending: list[torch.Tensor] = []
        self.started = False
        self.emitted_seconds = 0.0
        self.first_audio_at: float | None = None

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        device = next(self.codec.parameters()).device
        first = {} if self.started else {"max_batch_size": 1, "reset_stream": True}
        self.started = True
        out = self.codec.batch_decode(
            [codes[:, : self.nq].transpose(0, 1).to(device)], num_quantizers=self.nq, streaming=True, **first
        )
        return out.audio[0, :, : int(out.audio_lengths[0])].float().cpu()

    def prime(self, codes: torch.Tensor) -> None:
        """Feed prompt codes whose audio is not wanted (continuation with prompt audio)."""
        self._decode(codes)

    def window(self) -> int:
        if self.first_audio_at is None:
            return 1
        ahead = self.emitted_seconds - (time.perf_counter() - self.first_audio_at)
        if ahead < 0:
            return STREAM_BEHIND_WINDOW
        for limit, frames in STREAM_WINDOWS:
            if ahead < limit:
                return frames
        return STREAM_MAX_WINDOW

    def push(self, frame: torch.Tensor) -> torch.Tensor | None:
        """Queue one ``[1, n_vq]`` CPU frame; return decoded audio once the current window is full."""
        self.pending.append(frame)
        return self.flush() if len(self.pending) >= self.window() else None

    def flush(self) -> torch.Tensor | None:
        if not self.pending:
            return None
        wave = self._decode(torch.cat(self.pending, dim=0))
        self.pending = []
        if self.first_audio_at is None:
            self.first_audio_at = time.perf_counter()
        self.emitted_seconds += wave.shape[-1] / TARGET_SAMPLE_RATE
        return wave

    def close(self) -> None:
        self.codec._reset_batch_decode_streaming_state()


def _audio_event(wave: torch.Tensor, chunk_index: int, kind: str = "audio") -> dict:
    return {"type": kind, "waveform": wave, "sample_rate": TARGET_SAMPLE_RATE, "chunk_index": chunk_index}


def _stream_chunk(
    model: Any, rows: torch.Tensor, plan: Plan, decoder: StreamDecoder, generated: Generated
) -> Iterator[torch.Tensor]:
    """Generate one chunk and yield its audio as it is decoded; its codes (and whether it reached the frame limit)
    go to ``generated``. A numerical failure before the chunk's first audio is retried once in float32."""
    device = next(model.parameters()).device
    ids = plan.resources.ids
    input_ids, mask = left_pad_batch([rows], ids)
    frames: list[torch.Tensor] = []
    finished, emitted = True, False
    for event in stream_robust(model, input_ids.to(device), mask.to(device), plan.request, lambda: emitted):
        if event["type"] == "retry":  # nothing of this chunk was decoded yet: start it again
            frames.clear()
            decoder.pending.clear()
            generated.float32_retry = True
        elif event["type"] == "final":
            finished = bool(event["generation"].finished_mask[0])
        elif not bool((event["audio_token_ids"][0, : plan.nq] == ids.audio_pad).all()):  # all pad: the row ended
            frame = event["audio_token_ids"][0].reshape(1, -1).cpu()
            frames.append(frame)
            wave = decoder.push(frame)
            if wave is not None:
                emitted = True
                yield wave
    wave = decoder.flush()
    if wave is not None:
        yield wave
    generated.add(torch.cat(frames, dim=0) if frames else torch.zeros(0, ids.n_vq, dtype=torch.long), finished)


def _voice_clone_waves(model: Any, plan: Plan, generated: Generated) -> Iterator[tuple[int, torch.Tensor, str]]:
    """(chunk index, waveform, "audio" or "pause") per chunk; each chunk has its own codec decode session."""
    for index, (chunk, rows) in enumerate(zip(plan.chunks, voice_clone_rows(plan))):
        decoder = StreamDecoder(plan.resources.codec, plan.nq)
        try:
            for wave in _stream_chunk(model, rows, plan, decoder, generated):
                yield index, wave, "audio"
        finally:
            decoder.close()
        if index + 1 < len(plan.chunks):
            yield index, pause_waveform(chunk), "pause"


def _continuation_waves(model: Any, plan: Plan, generated: Generated) -> Iterator[tuple[int, torch.Tensor, str]]:
    """(chunk index, waveform, "audio"): one decode session for the call, continuation is one continuous waveform."""
    decoder = StreamDecoder(plan.resources.codec, plan.nq)
    context = plan.first_context
    try:
        if plan.prompt_codes is not None:
            decoder.prime(plan.prompt_codes)
        for index in range(len(plan.chunks)):
            for wave in _stream_chunk(model, continuation_rows(plan, index, context), plan, decoder, generated):
                yield index, wave, "audio"
            context = next_context(plan, index, generated.codes[-1], context)
    finally:
        decoder.close()


def run_inference_stream(
    model: Any, text: str, output_audio_path: str | os.PathLike | None = None, **kwargs: Any
) -> Iterator[dict]:
    """Streaming synthesis; see ``MossTTSNanoForCausalLM.inference_stream``."""
    plan = prepare_call(model, text, kwargs)
    started = time.perf_counter()
    first_audio: float | None = None
    parts: list[torch.Tensor] = []
    generated = Generated()
    waves = _voice_clone_waves if plan.request.mode == "voice_clone" else _continuation_waves
    with contextlib.closing(waves(model, plan, generated)) as stream:  # closing the call closes the decode session
        for index, wave, kind in stream:
            if kind == "audio" and first_audio is None:
                first_audio = time.perf_counter() - started
            parts.append(wave)
            yield _audio_event(wave, index, kind)
    waveform = torch.cat(parts, dim=-1) if parts else torch.zeros(2, 0)
    yield finish_result(plan, generated, waveform, output_audio_path, type="result",
                        voice_clone_codec_batch_size=1, first_audio_latency_s=first_audio)
