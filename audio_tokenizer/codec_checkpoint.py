"""Checkpoint key names: legacy spellings accepted on load and mapped to the released ones."""

from __future__ import annotations

import os
import re
from typing import MutableMapping

from safetensors import safe_open
from safetensors.torch import load_file

from .torch_compat import load_pickled_weights

# (pattern, replacement) applied with re.sub, first match wins. Released names are never matched.
LEGACY_KEY_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"\.self_attn\.in_proj_weight$", ".self_attn.in_proj.weight"),
    (r"\.self_attn\.in_projs\.0\.weight$", ".self_attn.in_proj.weight"),
    (r"\.self_attn\.out_projs\.0\.weight$", ".self_attn.out_proj.weight"),
    (r"\.linear1\.(weight|bias)$", r".ffn.0.\1"),
    (r"\.linear2\.(weight|bias)$", r".ffn.2.\1"),
    (r"^(quantizer\..*)\.weight_g$", r"\1.parametrizations.weight.original0"),
    (r"^(quantizer\..*)\.weight_v$", r"\1.parametrizations.weight.original1"),
)
_COMPILED = tuple((re.compile(pattern), replacement) for pattern, replacement in LEGACY_KEY_PATTERNS)


def rename_legacy_key(key: str) -> str:
    """Return the released name of ``key`` (unchanged when it is not a legacy spelling)."""
    for pattern, replacement in _COMPILED:
        new_key, count = pattern.subn(replacement, key)
        if count:
            return new_key
    return key


def has_legacy_keys(keys) -> bool:
    """True when any key is a legacy spelling."""
    return any(rename_legacy_key(key) != key for key in keys)


def remap_legacy_keys_in_place(state_dict: MutableMapping, prefix: str = "") -> None:
    """Rename legacy keys under ``prefix`` in ``state_dict`` (a ``load_state_dict`` pre-hook helper).

    Raises:
        ValueError: when a legacy key and its released spelling are both present.
    """
    for key in [k for k in state_dict if k.startswith(prefix)]:
        new_key = prefix + rename_legacy_key(key[len(prefix):])
        if new_key == key:
            continue
        if new_key in state_dict:
            raise ValueError(f"checkpoint holds both {key!r} and {new_key!r}; keep only one of them")
        state_dict[new_key] = state_dict.pop(key)


def read_checkpoint_keys(directory) -> list[str] | None:
    """Key names of ``model.safetensors`` (or ``pytorch_model.bin``) in a local directory, None when absent."""
    safetensors_path = os.path.join(directory, "model.safetensors")
    if os.path.isfile(safetensors_path):
        with safe_open(safetensors_path, framework="pt") as handle:
            return list(handle.keys())
    bin_path = os.path.join(directory, "pytorch_model.bin")
    if os.path.isfile(bin_path):
        return list(load_pickled_weights(bin_path, map_location="meta").keys())
    return None


def load_checkpoint_state_dict(directory) -> dict:
    """Load ``model.safetensors`` or ``pytorch_model.bin`` (``weights_only=True``) from a local directory.

    Raises:
        ValueError: when the directory holds neither file.
    """
    safetensors_path = os.path.join(directory, "model.safetensors")
    if os.path.isfile(safetensors_path):
        return load_file(safetensors_path)
    bin_path = os.path.join(directory, "pytorch_model.bin")
    if os.path.isfile(bin_path):
        return load_pickled_weights(bin_path, map_location="cpu")
    raise ValueError(f"{directory!r} holds neither model.safetensors nor pytorch_model.bin")
