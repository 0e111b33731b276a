"""What every call shares, loaded once and then only read: a model's tokenizer / codec resources, the float32 model
of the numerical retry, and the model's device.

Each is made at most once per model (under a lock, so concurrent first calls wait for one load), kept weakly beside
the model (it goes when the model goes), and never changed by a call: calls keep their own state (pipeline.py).
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from . import devices
from .codec_loading import load_codec, resolve_codec_directory, session_codec
from .prompting import PromptTokenIds, build_prompt_template
from .tokenization_moss_tts_nano import MossTTSNanoSentencePieceTokenizer

logger = logging.getLogger(__name__)

RESOURCE_KEYS = (
    "text_tokenizer",
    "text_tokenizer_path",
    "audio_tokenizer",
    "audio_tokenizer_path",
    "local_files_only",
)


# ---------------------------------------------------------------------------------------------------- resources


@dataclass
class Resources:
    """What a synthesis needs besides the model: read-only once loaded, shared by every call of a Synthesizer.

    ``codec`` has independent decode sessions (``codec_loading.session_codec``): each streaming call opens its own.
    """

    tokenizer: Any
    codec: Any
    ids: PromptTokenIds
    template: Any

    def encode_text(self, text: str) -> list[int]:
        return _encoder(self.tokenizer)(text)


def _encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    """Tokenise without special tokens, as every prompt piece is (docs/model.md, Prompts)."""
    return lambda text: list(tokenizer.encode(text, add_special_tokens=False))


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
    """Load the text tokenizer and codec for ``model`` (every time: ``cached_resources`` keeps them).

    A codec object that is not this repository's class is run through it over its own weights (``session_codec``).
    The codec is moved to the model's device if it is elsewhere.

    Raises:
        ValueError: a tokenizer or codec location that holds no files, or a codec of another layout.
        RuntimeError: a codec hub id that cannot be fetched.
    """
    model_dir = model_directory(model)
    tokenizer = text_tokenizer or _load_tokenizer(text_tokenizer_path or model_dir)
    codec = audio_tokenizer
    if codec is None:
        configured = getattr(model.config, "audio_tokenizer_pretrained_name_or_path", None)
        codec_dir = resolve_codec_directory(audio_tokenizer_path, model_dir, configured, local_files_only)
        codec = load_codec(codec_dir, model_dir)
    codec = session_codec(codec, model_dir)
    device = next(model.parameters()).device
    if next(codec.parameters()).device != device:
        codec.to(device)
    ids = PromptTokenIds.from_config(model.config)
    return Resources(tokenizer, codec, ids, build_prompt_template(_encoder(tokenizer), ids))


def _load_tokenizer(directory: str | os.PathLike | None) -> Any:
    if directory is None or not (Path(directory) / "tokenizer.model").is_file():
        raise ValueError(
            f"no text tokenizer found (looked for tokenizer.model in {directory or 'the model directory'}); "
            "pass text_tokenizer_path / the checkpoint directory that holds tokenizer.model"
        )
    return MossTTSNanoSentencePieceTokenizer.from_pretrained(str(directory))


# Resources that cached_resources loaded, per model (weakly: they go with the model) and per resource arguments.
# Each entry keeps the caller's tokenizer / codec objects alive, so their id() in the key cannot be reused.
_RESOURCES: "weakref.WeakKeyDictionary[Any, OrderedDict]" = weakref.WeakKeyDictionary()
_RESOURCES_LOCK = threading.Lock()
_RESOURCE_SETS_PER_MODEL = 4


def cached_resources(model: Any, **resource_kwargs: Any) -> Resources:
    """``load_resources(model, **resource_kwargs)`` on first use, then the same object (thread-safe; the last few
    resource sets per model are kept)."""
    key = tuple((k, id(v) if k in ("text_tokenizer", "audio_tokenizer") else str(v))
                for k, v in sorted(resource_kwargs.items()))
    with _RESOURCES_LOCK:
        cache = _RESOURCES.setdefault(model, OrderedDict())
        entry = cache.get(key)
        if entry is None:
            resources = load_resources(model, **resource_kwargs)
            entry = cache[key] = (resource_kwargs.get("text_tokenizer"), resource_kwargs.get("audio_tokenizer"),
                                  resources)
            while len(cache) > _RESOURCE_SETS_PER_MODEL:
                cache.popitem(last=False)
        cache.move_to_end(key)
    return entry[2]


# ---------------------------------------------------------------------------------------------------- float32 retry


# The float32 retry's models, per model (weakly: they go with it), with the weights they were made from.
_FLOAT32_MODELS: "weakref.WeakKeyDictionary[Any, tuple[tuple, Any]]" = weakref.WeakKeyDictionary()
_FLOAT32_LOCK = threading.Lock()


def float32_retry_model(model: Any, device: torch.device) -> Any:
    """The model the float32 retry runs: ``model``'s weights in float32, with ``device``'s fallback attention backend.

    Why not cast ``model`` in place (upstream does): calls running on it at the same time would fail. Made on the
    first retry (under a lock; concurrent retries share it), kept beside ``model`` while it lives, and made again when
    its weights were replaced, moved or edited. A float32 model shares its parameter tensors with it (only the
    attention setting differs, and int8 weight precision is left out); other dtypes cost one float32 copy of the
    weights, kept for later retries.
    """
    weights = tuple((p.device, p.dtype, p.data_ptr(), None if p.is_inference() else p._version)
                    for p in model.parameters())
    with _FLOAT32_LOCK:
        cached = _FLOAT32_MODELS.get(model)
        if cached is None or cached[0] != weights:
            cached = _FLOAT32_MODELS[model] = (weights, _float32_copy(model, device))
    return cached[1]


def _float32_copy(model: Any, device: torch.device) -> Any:
    memo: dict[int, Any] = {}
    with torch.inference_mode(False), torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            if tensor.is_floating_point() and tensor.dtype != torch.float32:
                cast = tensor.detach().to(torch.float32)
                memo[id(tensor)] = torch.nn.Parameter(cast, requires_grad=False) if isinstance(
                    tensor, torch.nn.Parameter) else cast
            else:
                memo[id(tensor)] = tensor  # shared, not copied (ties stay tied: one entry per tensor object)
        for module in model.modules():
            if getattr(module, "_packed_rows", None) is not None:
                memo[id(module._packed_rows)] = None  # derived int8 weights: the retry runs plain float32
        retry = copy.deepcopy(model, memo)
    retry.set_attention_implementation(devices.fallback_attention_implementation(device))
    return retry.eval()


# ---------------------------------------------------------------------------------------------------- placement


_PLACE_LOCK = threading.Lock()


def place_model(model: Any, device: torch.device) -> None:
    """Upstream's ``device=`` keyword: nothing when the model is already on ``device`` (the serving case).

    Otherwise the model is moved there, once, with a warning: a move changes the shared model, and a call running
    on it at the same time (another thread, an open stream) would fail. Servers place the model before serving.
    """
    with _PLACE_LOCK:
        current = next(model.parameters()).device
        if current == device:
            return
        logger.warning("inference(device=%s) moves the model from %s to %s; move it once before serving: a call "
                       "running on it meanwhile would fail", device, current, device)
        model.to(device)
