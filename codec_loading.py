"""Find and load the audio codec (MOSS-Audio-Tokenizer-Nano) with this repository's codec code.

Whatever the weights' origin (a local directory, a hub download, the checkpoint's own ``audio_tokenizer/``
folder), they are loaded through ``audio_tokenizer/`` of this repository, never through remote code shipped
with the weights, so the released codec weights get the device-agnostic implementation.

Resolution order for the codec directory:
1. the path or hub id the caller gives (``audio_tokenizer_path`` / ``--audio-tokenizer-path``);
2. ``<model directory>/audio_tokenizer`` when it holds weights;
3. ``config.audio_tokenizer_pretrained_name_or_path``: a hub id (downloaded with huggingface_hub unless offline),
   or a relative path that must stay inside the model directory (a config never points outside it).

A codec object the caller passes in is used as is when it is this repository's class. Any other class with the
released checkpoint layout (upstream's remote-code ``MossAudioTokenizerModel``, as ``AutoModel.from_pretrained(...,
trust_remote_code=True)`` loads it from the hub) keeps one streaming state per object, so two requests streaming
through it would mix their histories. ``session_codec`` therefore runs this repository's codec over that object's
own parameter tensors (the same ``Parameter`` objects, not copies): every request gets its own decode session, and
the caller's object is never put into streaming mode.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import torch

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PACKAGE_NAME = "moss_tts_nano_audio_tokenizer"
_CODEC, _CODEC_FLAG = "the audio codec", "audio_tokenizer_path / --audio-tokenizer-path"


def has_weights(directory: Path) -> bool:
    return directory.is_dir() and any((directory / name).is_file() for name in WEIGHT_FILES)


def _code_directories(model_dir: Path | None) -> list[Path]:
    here = Path(__file__).resolve().parent
    candidates = [here / "audio_tokenizer"]
    if model_dir is not None:
        candidates.append(Path(model_dir).resolve() / "audio_tokenizer")
    return candidates


def codec_code_module(model_dir: Path | None = None) -> ModuleType:
    """Import ``audio_tokenizer/modeling_moss_audio_tokenizer.py`` of this repository as a package module.

    Raises:
        RuntimeError: the codec code is not beside this file nor in the model directory.
    """
    if f"{_PACKAGE_NAME}.modeling_moss_audio_tokenizer" in sys.modules:
        return sys.modules[f"{_PACKAGE_NAME}.modeling_moss_audio_tokenizer"]
    for code_dir in _code_directories(model_dir):
        if (code_dir / "modeling_moss_audio_tokenizer.py").is_file():
            init = code_dir / "__init__.py"
            spec = importlib.util.spec_from_file_location(
                _PACKAGE_NAME, init if init.is_file() else None, submodule_search_locations=[str(code_dir)]
            )
            package = importlib.util.module_from_spec(spec)
            sys.modules[_PACKAGE_NAME] = package
            if init.is_file():
                spec.loader.exec_module(package)
            return importlib.import_module(f"{_PACKAGE_NAME}.modeling_moss_audio_tokenizer")
    searched = ", ".join(str(p) for p in _code_directories(model_dir))
    raise RuntimeError(
        f"the codec code (audio_tokenizer/modeling_moss_audio_tokenizer.py) was not found in: {searched}. "
        "Keep the repository's audio_tokenizer/ folder beside modeling_moss_tts_nano.py or in the model directory"
    )


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _offline(local_files_only: bool) -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return local_files_only or any(v.strip().lower() in {"1", "true", "yes", "on"} for v in flags)


def is_hub_id(name: str) -> bool:
    """True for an ``org/name`` repository id (as opposed to a local path)."""
    return bool(_HUB_ID.match(name))


def fetch_snapshot(repo_id: str, local_files_only: bool, what: str, flag: str) -> Path:
    """Download (or find in the local cache) a hub repository; offline mode and ``local_files_only`` are respected.

    Args:
        repo_id: ``org/name``.
        local_files_only: only use the local cache (also when HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set).
        what: what the repository is, for the error message ("the audio codec").
        flag: the option that takes a local directory instead, for the error message.

    Raises:
        RuntimeError: the repository is neither cached nor downloadable, saying how to provide a local copy.
    """
    from huggingface_hub import snapshot_download

    offline = _offline(local_files_only)
    try:
        return Path(snapshot_download(repo_id, local_files_only=offline))
    except Exception as exc:
        how = "offline mode is on" if offline else f"the download failed ({type(exc).__name__}: {exc})"
        local = repo_id.split("/")[-1]
        raise RuntimeError(
            f"{what} '{repo_id}' is not available locally and {how}. Download it on a connected machine "
            f"(huggingface-cli download {repo_id} --local-dir ./{local}) and pass its directory as {flag}"
        ) from exc


def resolve_codec_directory(
    explicit: str | os.PathLike | None,
    model_dir: str | os.PathLike | None,
    configured: str | None,
    local_files_only: bool = False,
) -> Path:
    """Return a local directory holding codec weights (see the module docstring for the order).

    Raises:
        ValueError: an explicit path that holds no weights, or a configured path leaving the model directory.
        RuntimeError: a hub id that cannot be fetched (offline or no network).
    """
    model_dir = Path(model_dir) if model_dir else None
    if explicit:
        path = Path(explicit).expanduser()
        if path.exists():
            if not has_weights(path):
                raise ValueError(
                    f"audio_tokenizer_path '{path}' holds no codec weights (expected one of {', '.join(WEIGHT_FILES)})"
                )
            return path
        if _HUB_ID.match(str(explicit)):
            return fetch_snapshot(str(explicit), local_files_only, _CODEC, _CODEC_FLAG)
        raise ValueError(f"audio_tokenizer_path '{explicit}' is neither an existing directory nor a hub id (org/name)")
    if model_dir is not None and has_weights(model_dir / "audio_tokenizer"):
        return model_dir / "audio_tokenizer"
    if not configured:
        raise ValueError("no audio codec given: pass audio_tokenizer_path / --audio-tokenizer-path")
    if model_dir is not None and not Path(configured).is_absolute():
        local = model_dir / configured
        if local.exists():
            if not _inside(local, model_dir):
                raise ValueError(f"config's audio codec path '{configured}' leaves the model directory; refusing it")
            if has_weights(local):
                return local
    if Path(configured).is_absolute() or configured.startswith("."):
        raise ValueError(
            f"config.audio_tokenizer_pretrained_name_or_path '{configured}' is a path outside the model directory; "
            "pass the codec directory explicitly with audio_tokenizer_path / --audio-tokenizer-path"
        )
    if not _HUB_ID.match(configured):
        raise ValueError(f"config.audio_tokenizer_pretrained_name_or_path '{configured}' is not a hub id (org/name)")
    return fetch_snapshot(configured, local_files_only, _CODEC, _CODEC_FLAG)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' multi-line load reports; failures are reworded into one line by the caller."""
    from transformers.utils import logging as hf_logging

    previous, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()


def load_codec(directory: str | os.PathLike, model_dir: str | os.PathLike | None = None):
    """Load codec weights from ``directory`` with this repository's ``MossAudioTokenizerModel`` (eval mode, CPU)."""
    module = codec_code_module(Path(model_dir) if model_dir else None)
    with quiet_transformers():
        codec, info = module.MossAudioTokenizerModel.from_pretrained(str(directory), output_loading_info=True)
    check_loading_info(info, Path(directory))
    return codec.eval()


def session_codec(codec: Any, model_dir: str | os.PathLike | None = None) -> Any:
    """A codec with independent decode sessions that runs on ``codec``'s weights (``codec`` itself when it has them).

    Another class (upstream's) is replaced by this repository's ``MossAudioTokenizerModel``, built on the meta
    device from ``codec.config`` and bound to ``codec``'s parameter and buffer objects: nothing is copied, and moving
    or editing ``codec`` afterwards is seen by both. Only ``codec.config`` and ``codec.state_dict(keep_vars=True)``
    are read.

    Raises:
        ValueError: ``codec`` has no config, or its tensors do not match the layout its config describes.
    """
    if getattr(type(codec), "independent_decode_sessions", False):
        return codec
    config = getattr(codec, "config", None)
    if config is None or not hasattr(codec, "state_dict"):
        raise ValueError(f"audio_tokenizer of type {type(codec).__name__} is not a MOSS-Audio-Tokenizer model "
                         "(it has no config / state_dict); pass the codec loaded with AutoModel.from_pretrained "
                         "or audio_tokenizer_path")
    module = codec_code_module(Path(model_dir) if model_dir else None)
    ours = module.MossAudioTokenizerConfig.from_dict(config.to_dict())
    with torch.device("meta"), quiet_transformers():
        bound = module.MossAudioTokenizerModel(ours)
    tensors = dict(codec.state_dict(keep_vars=True))
    module.remap_legacy_keys_in_place(tensors)
    _bind_tensors(bound, tensors, type(codec).__name__)
    bound.refresh_weight_norm()
    return bound.train(codec.training)


def _bind_tensors(target: Any, tensors: dict, source_name: str) -> None:
    """Put ``tensors`` (name -> Parameter / buffer) into ``target``'s modules in place of its meta tensors."""
    problems = []
    for name, tensor in tensors.items():
        owner_name, _, leaf = name.rpartition(".")
        try:
            owner = target.get_submodule(owner_name)
        except AttributeError:
            owner = None
        slots = None if owner is None else owner._parameters if leaf in owner._parameters else owner._buffers
        if slots is None or leaf not in slots or slots[leaf] is None:
            problems.append(f"unexpected {name}")
        elif tuple(slots[leaf].shape) != tuple(tensor.shape):
            problems.append(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(slots[leaf].shape)}")
        elif slots is owner._parameters and not isinstance(tensor, torch.nn.Parameter):
            slots[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
        else:
            slots[leaf] = tensor
    problems += [f"missing {name}" for name, t in (*target.named_parameters(), *target.named_buffers()) if t.is_meta]
    if problems:
        shown = "; ".join(problems[:3]) + (f" and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise ValueError(f"audio_tokenizer of type {source_name} does not have the MOSS-Audio-Tokenizer checkpoint "
                         f"layout its config describes ({shown})")


def check_loading_info(info: dict, directory: Path) -> None:
    """Refuse a checkpoint that left weights uninitialised (transformers would only warn, then run garbage).

    Raises:
        ValueError: naming the directory and the first missing keys.
    """
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ValueError(
            f"checkpoint in '{directory}' lacks {len(missing)} weight(s) the architecture in its config.json needs "
            f"({shown}); it is incomplete or belongs to another model"
        )
