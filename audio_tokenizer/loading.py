"""Load the codec from a folder path without ``trust_remote_code`` (used by the TTS side).

Only the standard library is imported at module level, so ``import audio_tokenizer`` stays cheap.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any

_PACKAGE = __name__.rpartition(".")[0]


def import_codec_package(directory: str | os.PathLike) -> ModuleType:
    """Import the codec package that lives in ``directory`` (it must hold ``__init__.py`` and the codec modules).

    The package gets a private name derived from the absolute path, so several codec folders can coexist and a
    folder inside the Hugging Face module cache works as well as one in a checkout.

    Raises:
        ValueError: ``directory`` holds no codec package.
    """
    directory = os.path.abspath(os.fspath(directory))
    init_file = os.path.join(directory, "__init__.py")
    if not os.path.isfile(os.path.join(directory, "modeling_moss_audio_tokenizer.py")) or not os.path.isfile(
            init_file):
        raise ValueError(f"directory={directory!r} holds no codec package (__init__.py and "
                         "modeling_moss_audio_tokenizer.py)")
    name = "_moss_audio_tokenizer_" + hashlib.sha1(directory.encode()).hexdigest()[:12]
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, init_file, submodule_search_locations=[directory])
        package = importlib.util.module_from_spec(spec)
        sys.modules[name] = package
        try:
            spec.loader.exec_module(package)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def load_codec_from_directory(directory: str | os.PathLike, device: Any = None, dtype: Any = None,
                              compute_dtype: str | None = None, attention_implementation: str | None = None,
                              code_directory: str | os.PathLike | None = None):
    """Load ``MossAudioTokenizerModel`` weights and config from ``directory``, in eval mode.

    Args:
        directory: folder with ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``).
        device: where to put the model (``"npu"``, ``"cuda:0"``, ``torch.device``...); None keeps it on the CPU.
        dtype: parameter dtype (default float32; the quantizer stays float32 in any case).
        compute_dtype: "fp32", "bf16" or "fp16" autocast for the encoder/decoder (default: the config's).
        attention_implementation: "sdpa" or "flash_attention_2" (default: the config's).
        code_directory: folder with the codec code; default this package (or ``directory`` if it holds the code).

    Returns:
        the loaded ``MossAudioTokenizerModel``.

    Raises:
        ValueError: missing files or unsupported settings.
    """
    modeling = _modeling_module(directory, code_directory)
    kwargs = {} if dtype is None else {"dtype": dtype}
    model = modeling.MossAudioTokenizerModel.from_pretrained(os.fspath(directory), **kwargs)
    if compute_dtype is not None:
        model.set_compute_dtype(compute_dtype)
    if attention_implementation is not None:
        model.set_attention_implementation(attention_implementation)
    if device is not None:
        model = model.to(device)
    return model.eval()


def _modeling_module(directory, code_directory) -> ModuleType:
    if code_directory is not None:
        package = import_codec_package(code_directory)
        return importlib.import_module(package.__name__ + ".modeling_moss_audio_tokenizer")
    if _PACKAGE:
        return importlib.import_module(_PACKAGE + ".modeling_moss_audio_tokenizer")
    package = import_codec_package(directory)
    return importlib.import_module(package.__name__ + ".modeling_moss_audio_tokenizer")
