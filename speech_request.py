"""A speech request: its fields (OpenAI's plus upstream's inference keywords), the error answer, the checks made
before any work, and the keyword arguments the engine receives."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Union

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from .audio_formats import MAX_SPEED, MIN_SPEED, OUTPUT_LAYOUTS, RESPONSE_FORMATS, AudioLayout
from .audio_io import TARGET_SAMPLE_RATE
from .engine import EngineClosed, EngineFull, RequestCancelled
from .pipeline import SAMPLES_PER_FRAME
from .prompting import infer_mode
from .sampling import SamplingParams
from .text_chunking import split_text_into_chunks
from .value_bounds import SAMPLING_BOUNDS, sampling_problem, seed_error
from .voices import Voice, decode_ref_audio, resolve_voice

DEFAULT_MAX_BODY_BYTES = 25 * 1024 * 1024
DEFAULT_MAX_INPUT_CHARS = 4096  # OpenAI's limit
DEFAULT_MAX_AUDIO_SECONDS = 900.0
DEFAULT_RESPONSE_FORMAT = "mp3"  # OpenAI's default
FRAME_SECONDS = SAMPLES_PER_FRAME / TARGET_SAMPLE_RATE
# A model name safe to echo in a header (OpenAI's ids: tts-1, tts-1-hd, gpt-4o-mini-tts, ...).
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
# Request fields passed to the engine under the same name (upstream's inference keywords).
ENGINE_FIELDS = ("mode", "prompt_text", "seed", "max_new_frames", "do_sample", "text_temperature", "text_top_p",
                 "text_top_k", "audio_temperature", "audio_top_p", "audio_top_k", "audio_repetition_penalty")
# Where an engine ValueError's message points (first match wins; longer names first so text_top_p beats text).
_PARAM_HINTS = tuple(sorted(ENGINE_FIELDS, key=len, reverse=True)) + (
    ("prompt audio", "ref_audio"), ("prompt_audio", "ref_audio"), ("text", "input"))


class VoiceId(BaseModel):
    """OpenAI's voice object: ``{"id": "NAME"}``."""

    model_config = ConfigDict(strict=True, extra="forbid")

    id: str


class SpeechRequest(BaseModel):
    """OpenAI's speech request plus upstream's inference keywords. Strict types: ``"1"`` is not a number."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    model: Optional[str] = None
    input: str
    voice: Optional[Union[str, VoiceId]] = None
    instructions: Optional[str] = None
    response_format: str = DEFAULT_RESPONSE_FORMAT
    speed: float = 1.0
    stream_format: Literal["audio", "sse"] = "audio"
    stream: Optional[bool] = None
    mode: Optional[str] = None
    prompt_text: Optional[str] = None
    ref_audio: Optional[str] = None
    seed: Optional[int] = None
    max_new_frames: Optional[int] = None
    do_sample: Optional[bool] = None
    text_temperature: Optional[float] = None
    text_top_p: Optional[float] = None
    text_top_k: Optional[int] = None
    audio_temperature: Optional[float] = None
    audio_top_p: Optional[float] = None
    audio_top_k: Optional[int] = None
    audio_repetition_penalty: Optional[float] = None

    @property
    def voice_name(self) -> str | None:
        return self.voice.id if isinstance(self.voice, VoiceId) else self.voice

    @property
    def streamed(self) -> bool:
        """Sent as generated: the default where the format allows it (FLAC's header needs the total length)."""
        return self.stream is not False and (self.stream_format == "sse" or
                                             RESPONSE_FORMATS[self.response_format].streamable)


@dataclass(frozen=True)
class RequestLimits:
    """What the server accepts from one request (its flags)."""

    max_input_chars: int = DEFAULT_MAX_INPUT_CHARS
    max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS
    layout: AudioLayout = OUTPUT_LAYOUTS["48k-stereo"]

    @property
    def max_new_frames(self) -> int:
        return max(1, int(self.max_audio_seconds / FRAME_SECONDS + 1e-9))


# ---------------------------------------------------------------------------------------------------- errors


class ApiError(Exception):
    """A failure answered with OpenAI's error JSON."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = dict(headers or {})

    def response(self, headers: dict | None = None) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers={**self.headers, **(headers or {})})


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def param_for(message: str) -> str | None:
    """The request field an engine validation message is about, when it names one."""
    for hint in _PARAM_HINTS:
        name, param = hint if isinstance(hint, tuple) else (hint, hint)
        if name in message:
            return param
    return None


def failure_to_api_error(exc: BaseException, stopping: bool) -> ApiError:
    """Map a request's failure (from submit or from generation) to its status and error JSON."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, EngineFull):
        return ApiError(429, "the request queue is full; retry later", kind="rate_limit_error", code="queue_full",
                        headers={"Retry-After": "1"})
    if isinstance(exc, (EngineClosed, RequestCancelled)) and stopping:
        return ApiError(503, "the server is shutting down", kind="server_error", code="shutting_down")
    if isinstance(exc, ValueError):
        message = first_line(exc)
        return ApiError(400, message, param=param_for(message))
    return ApiError(500, f"internal error {type(exc).__name__}; see the server log", kind="server_error",
                    code="internal_error")


# ---------------------------------------------------------------------------------------------------- checks


def parse_request(body: bytes) -> SpeechRequest:
    try:
        return SpeechRequest.model_validate_json(body)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        if error["type"] == "json_invalid":
            raise ApiError(400, f"malformed JSON body: {error['ctx']['error']}") from None
        loc = [str(part) for part in error["loc"]]
        if loc and loc[0] == "voice":  # a union: report the field, not pydantic's branch names
            loc = ["voice"]
            error = {**error, "msg": 'Input should be a string or an object {"id": "NAME"}'}
        param = ".".join(loc) or None
        if error["type"] == "extra_forbidden":
            allowed = ", ".join(SpeechRequest.model_fields)
            raise ApiError(400, f"unknown field '{param}'; allowed: {allowed}", param) from None
        where = f"{param}: " if param else "request body: "
        raise ApiError(400, where + error["msg"], param) from None


def check_request(req: SpeechRequest, limits: RequestLimits) -> None:
    """The checks that need no model: length, format, speed, model name (before any work)."""
    if len(req.input) > limits.max_input_chars:
        raise ApiError(400, f"input is {len(req.input)} characters; the limit is {limits.max_input_chars} "
                            "(--max-input-chars)", "input", code="input_too_long")
    if req.response_format not in RESPONSE_FORMATS:
        raise ApiError(400, f"response_format '{req.response_format}' is not supported; choose one of "
                            f"{', '.join(RESPONSE_FORMATS)}", "response_format")
    if not MIN_SPEED <= req.speed <= MAX_SPEED:
        raise ApiError(400, f"speed must be in [{MIN_SPEED}, {MAX_SPEED}], got {req.speed:g}", "speed")
    if req.model is not None and not MODEL_NAME.match(req.model):
        raise ApiError(400, f"model must match {MODEL_NAME.pattern} (it is echoed in the X-Model header)", "model")
    if req.stream and req.stream_format == "audio" and not RESPONSE_FORMATS[req.response_format].streamable:
        raise ApiError(400, f"response_format '{req.response_format}' cannot be streamed (its header holds the "
                            "length); ask for stream: false, another format, or stream_format 'sse'", "stream")


def check_ranges(values: dict[str, Any]) -> None:
    """The library's ranges for the generation settings (``SamplingParams``'s table), checked on the values the engine
    will receive (the server's defaults and the request's own), so a bad value fails here, before any work."""
    do_sample = values.get("do_sample", SamplingParams.do_sample)  # as the engine fills it in
    for name in SAMPLING_BOUNDS:
        problem = sampling_problem(name, values[name], do_sample) if name in values else None
        if problem:
            raise ApiError(400, problem, name)
    problem = seed_error(values["seed"]) if values.get("seed") is not None else None
    if problem:
        raise ApiError(400, f"seed {problem}", "seed")


def check_audio_budget(text: str, kwargs: dict, limits: RequestLimits, count_tokens: Callable[[str], int]) -> None:
    """400 when the request could generate more than ``max_audio_seconds``: ``max_new_frames`` bounds each text
    chunk, so the bound is chunks x max_new_frames frames (the chunking the engine will do)."""
    frames = kwargs.get("max_new_frames")
    if frames is None:
        return
    if frames > limits.max_new_frames:
        chunks = 1
    else:
        budget = int(kwargs.get("voice_clone_max_text_tokens", 75))
        chunks = len(split_text_into_chunks(text, count_tokens, budget)) if text.strip() else 1
    seconds = chunks * frames * FRAME_SECONDS
    if seconds > limits.max_audio_seconds:
        raise ApiError(400, f"the request may generate up to {seconds:g} s of audio ({chunks} text chunk(s) x "
                            f"max_new_frames={frames}); the limit is {limits.max_audio_seconds:g} s "
                            "(--max-audio-seconds): lower max_new_frames or split the input",
                       "max_new_frames", code="audio_too_long")


def engine_arguments(req: SpeechRequest, defaults: dict, voices: dict[str, Voice], limits: RequestLimits,
                     count_tokens: Callable[[str], int]) -> dict[str, Any]:
    """The keyword arguments of ``engine.submit`` for a request (server defaults, then the request's values); the
    audio budget is checked before the reference audio is decoded."""
    given = {name: getattr(req, name) for name in ENGINE_FIELDS if getattr(req, name) is not None}
    kwargs = {**defaults, **given}
    check_ranges(kwargs)
    check_audio_budget(req.input, kwargs, limits, count_tokens)
    try:
        voice = resolve_voice(req.voice_name, voices)
    except ValueError as exc:
        raise ApiError(400, str(exc), "voice") from None
    if voice is not None and req.ref_audio is not None:
        raise ApiError(400, f"give either voice '{voice.name}' or ref_audio, not both", "ref_audio")
    if voice is not None:
        kwargs["prompt_audio_codes"] = voice.codes
        if voice.prompt_text and req.prompt_text is None:
            kwargs["prompt_text"] = voice.prompt_text
    elif req.ref_audio is not None:
        try:
            kwargs["prompt_audio"] = decode_ref_audio(req.ref_audio)
        except ValueError as exc:
            raise ApiError(400, first_line(exc), "ref_audio") from None
        kwargs["prompt_audio_sample_rate"] = TARGET_SAMPLE_RATE
    kwargs["mode"] = infer_mode(kwargs.get("mode"), has_prompt_text=bool(kwargs.get("prompt_text")),
                                has_prompt_audio="prompt_audio_codes" in kwargs or "prompt_audio" in kwargs)
    return kwargs
