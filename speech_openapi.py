"""The OpenAPI description of the speech route: its request body (with the server's limits as schema bounds),
every response (the audio types, the SSE stream, the error JSON for 400/401/413/415/429/500/503) and, with an API
key, the bearer security scheme, so generated clients and fuzzers can use /openapi.json."""

from __future__ import annotations

import copy
from typing import Any

from .audio_formats import MAX_SPEED, MIN_SPEED, RESPONSE_FORMATS
from .speech_request import RequestLimits, SpeechRequest
from .sampling import SamplingParams
from .value_bounds import SAMPLING_BOUNDS, SEED_LIMIT, Bound

ERROR_SCHEMA = {
    "type": "object", "required": ["error"], "additionalProperties": False,
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"], "additionalProperties": False,
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}
_USAGE = {"type": "object", "required": ["input_tokens", "output_tokens", "total_tokens"],
          "properties": {name: {"type": "integer", "minimum": 0}
                         for name in ("input_tokens", "output_tokens", "total_tokens")}}
# One server-sent event: its data is JSON, OpenAI's speech.audio.delta (base64 audio) or speech.audio.done (usage).
SSE_EVENT_SCHEMA = {
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string", "contentMediaType": "application/json", "contentSchema": {"oneOf": [
        {"type": "object", "required": ["type", "audio"],
         "properties": {"type": {"const": "speech.audio.delta"}, "audio": {"type": "string",
                                                                         "contentEncoding": "base64"}}},
        {"type": "object", "required": ["type", "usage"],
         "properties": {"type": {"const": "speech.audio.done"}, "usage": _USAGE}}]}}},
}
ERROR_STATUSES = {
    400: "Invalid request (field, length, format, voice, reference audio, audio budget, Host header)",
    401: "Missing or wrong API key (--api-key): code invalid_api_key",
    408: "The request did not arrive within the read deadline",
    413: "Request body over --max-body-mb",
    415: "Content-Type is not application/json",
    429: "The request queue is full; see Retry-After",
    500: "Internal error; the server log holds the traceback",
    503: "The model is loading or the server is shutting down",
}


# One request per response format and feature, for readers, generated clients and the fuzz run's explicit phase.
REQUEST_EXAMPLES = {
    **{f"{fmt}": {"value": {"model": "tts-1", "input": "Hello there.", "voice": "default", "response_format": fmt}}
       for fmt in RESPONSE_FORMATS},
    "sse": {"value": {"input": "Hello there.", "response_format": "pcm", "stream_format": "sse"}},
    "speed": {"value": {"input": "Hello there.", "response_format": "wav", "speed": 2.5, "stream": False}},
    "voice_object": {"value": {"input": "Hello there.", "voice": {"id": "default"}, "instructions": "Calmly."}},
}


def _non_null(prop: dict) -> dict:
    """The branch of an Optional field's schema that is not null (where its bounds belong)."""
    for branch in prop.get("anyOf", []):
        if branch.get("type") != "null":
            return branch
    return prop


def request_schema(limits: RequestLimits, defaults: dict | None = None) -> dict:
    """The request body's schema; ``defaults`` are the server's generation defaults (a request's missing fields)."""
    schema = copy.deepcopy(SpeechRequest.model_json_schema(ref_template="#/components/schemas/{model}"))
    schema.pop("$defs", None)
    props = schema["properties"]
    props["input"].update(minLength=1, maxLength=limits.max_input_chars)
    props["voice"] = {"anyOf": [{"type": "string"}, {"$ref": "#/components/schemas/VoiceId"}, {"type": "null"}]}
    props["response_format"]["enum"] = list(RESPONSE_FORMATS)
    props["speed"].update(minimum=MIN_SPEED, maximum=MAX_SPEED)
    for name, bound in SAMPLING_BOUNDS.items():
        if not bound.sampling_only:
            _non_null(props[name]).update(_range(bound))
    _non_null(props["max_new_frames"])["maximum"] = limits.max_new_frames
    _non_null(props["seed"]).update(minimum=0, maximum=SEED_LIMIT - 1)
    _non_null(props["mode"])["enum"] = ["continuation", "voice_clone"]
    _non_null(props["model"])["pattern"] = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"
    schema["allOf"] = [_when_sampling(props, defaults or {})]
    return schema


def _range(bound: Bound) -> dict:
    """A setting's range as JSON Schema keywords."""
    keywords: dict[str, Any] = {}
    if bound.low is not None:
        keywords["exclusiveMinimum" if bound.low_open else "minimum"] = bound.low
    if bound.high is not None:
        keywords["maximum"] = bound.high
    return keywords


def _when_sampling(props: dict, defaults: dict) -> dict:
    """The ranges that hold only when sampling (the temperatures), as ``if`` the request samples ``then`` them.

    A request samples when its do_sample is true, or absent / null while the server samples by default. A server
    default that breaks such a range (possible when it decodes greedily by default) makes the field required then.
    """
    sampling_default = defaults.get("do_sample", SamplingParams.do_sample)
    chosen = {"required": ["do_sample"], "properties": {"do_sample": {"const": not sampling_default}}}
    sampling = {"not": chosen} if sampling_default else chosen
    then: dict[str, Any] = {"properties": {}}
    for name, bound in SAMPLING_BOUNDS.items():
        if not bound.sampling_only:
            continue
        ranged = {**_non_null(props[name]), **_range(bound)}
        if name in defaults and bound.range_problem(defaults[name]):
            then["properties"][name] = ranged
            then.setdefault("required", []).append(name)
        else:
            then["properties"][name] = {"anyOf": [ranged, {"type": "null"}]}
    return {"if": sampling, "then": then}


def speech_route_docs(limits: RequestLimits, defaults: dict | None = None) -> dict[str, Any]:
    """Keyword arguments of the route decorator: summary, request body and responses."""
    audio = {fmt.media_type: {"schema": {"type": "string", "format": "binary"}} for fmt in RESPONSE_FORMATS.values()}
    audio["text/event-stream"] = {"schema": SSE_EVENT_SCHEMA}
    responses: dict[int | str, Any] = {200: {"description": "The audio in response_format (chunked as generated "
                                                           "unless stream is false or the format is flac); SSE "
                                                           "events with stream_format sse", "content": audio}}
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for status, description in ERROR_STATUSES.items():
        responses[status] = {"description": description, "content": error}
    responses[429]["headers"] = {"Retry-After": {"schema": {"type": "string"}, "description": "seconds"}}
    extra = {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/SpeechRequest"}, "examples": REQUEST_EXAMPLES}}},
        "x-request-schema": request_schema(limits, defaults)}
    return {"summary": "Generate speech (OpenAI's audio.speech.create)", "responses": responses,
            "openapi_extra": extra}


def install_openapi(app: Any, bearer: bool) -> None:
    """Add the component schemas (request, voice object, error) and, with an API key, the security scheme."""

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version="1.0.0", routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        operation = schema["paths"]["/v1/audio/speech"]["post"]
        components["SpeechRequest"] = operation.pop("x-request-schema")
        components["VoiceId"] = {"type": "object", "required": ["id"], "additionalProperties": False,
                                 "properties": {"id": {"type": "string"}}}
        components["ErrorResponse"] = ERROR_SCHEMA
        if bearer:
            schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, item in schema["paths"].items():
                if path != "/health":
                    for op in item.values():
                        op["security"] = [{"bearer": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
