"""The checks of what a caller hands `MossTTSNanoForCausalLM`: rows, padding masks, caches, generation limits.

Rows are (B, T, n_vq + 1): column 0 a text-token id, columns 1..n_vq audio codes or the pad code (docs/model.md).
Every check raises a ValueError that names the argument, the value and what is allowed; the model calls these once
per call, before any tensor reaches a decoder.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .configuration_moss_tts_nano import MossTTSNanoConfig
from .kv_cache import KVCache
from .sampling import SamplingParams


def check_input_ids(config: MossTTSNanoConfig, input_ids: Any, name: str = "input_ids") -> torch.Tensor:
    """Validate rows (B, T, n_vq + 1): integer ids, text ids in the vocabulary, codes in range or the pad code.

    Returns:
        the rows as int64.

    Raises:
        ValueError: naming the argument, the value and what is allowed.
    """
    width = config.n_vq + 1
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 3 or input_ids.shape[-1] != width:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"{name} is {shape}: expected a tensor [B, T, {width}] (n_vq + 1 columns per row)")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise ValueError(f"{name} has dtype {input_ids.dtype}: rows must hold integer ids")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"{name} is {tuple(input_ids.shape)}: at least one row per batch item is required")
    text = input_ids[..., 0]
    bad_text = (text < 0) | (text >= config.vocab_size)
    if bool(bad_text.any()):
        raise ValueError(f"{name}[..., 0] holds text id {int(text[bad_text][0])}: allowed 0..{config.vocab_size - 1}")
    check_codes(config, input_ids[..., 1:], name)
    return input_ids.long()


def check_codes(config: MossTTSNanoConfig, codes: torch.Tensor, name: str) -> None:
    """Every code (B, T, n_vq) within its codebook, or the pad code.

    Raises:
        ValueError: naming the column, the codebook, the first bad code and the allowed range.
    """
    pad = config.audio_pad_token_id
    sizes = torch.tensor(config.audio_codebook_sizes, device=codes.device)
    bad = (codes != pad) & ((codes < 0) | (codes >= sizes))  # (B, T, n_vq)
    if bool(bad.any()):
        channel = int(bad.flatten(0, -2).any(0).nonzero()[0])
        value = int(codes[..., channel][bad[..., channel]][0])
        size = config.audio_codebook_sizes[channel]
        raise ValueError(
            f"{name}[..., {channel + 1}] (codebook {channel}) holds code {value}: allowed 0..{size - 1} "
            f"or {pad} (audio_pad_token_id)"
        )


def check_attention_mask(
    attention_mask: Any, batch: int, length: int, name: str = "attention_mask"
) -> Optional[torch.Tensor]:
    """Return `attention_mask` (B, T) as bool; None means every row is real.

    Raises:
        ValueError: when the shape is not (batch, length).
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (batch, length):
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise ValueError(f"{name} is {shape}: expected shape ({batch}, {length}) matching input_ids [B, T]")
    return attention_mask.bool()


def check_forward_inputs(
    config: MossTTSNanoConfig, input_ids: Any, attention_mask: Any, past_key_values: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows and a full bool mask (B, T) of a `forward` call, after every check.

    `attention_mask` may be (B, T) for the new rows or (B, past + T) covering the cache too (its last T columns are
    used); None means no padding.

    Raises:
        ValueError: for malformed rows, codes out of range, a mask of the wrong shape or a foreign cache.
    """
    input_ids = check_input_ids(config, input_ids)
    batch, length = input_ids.shape[:2]
    if past_key_values is not None and not isinstance(past_key_values, KVCache):
        raise ValueError(f"past_key_values is a {type(past_key_values).__name__}: pass the KVCache returned by forward")
    past = past_key_values.length if past_key_values is not None else 0
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] == past + length:
        attention_mask = attention_mask[:, past:]
    mask = check_attention_mask(attention_mask, batch, length)
    if mask is None:
        mask = torch.ones(batch, length, dtype=torch.bool, device=input_ids.device)
    return input_ids, mask


def check_generation_inputs(
    config: MossTTSNanoConfig, input_ids: Any, attention_mask: Any, params: SamplingParams, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows and a full bool mask of a `generate` call, on `device`, after every check.

    Raises:
        ValueError: for invalid rows or mask, `nq` outside 1..n_vq, right padding, or a prompt that leaves no room
            for `max_new_frames` within `max_position_embeddings`.
    """
    params.resolve_nq(config.n_vq)
    input_ids = check_input_ids(config, input_ids).to(device)
    batch, length = input_ids.shape[:2]
    mask = check_attention_mask(attention_mask, batch, length)
    mask = torch.ones(batch, length, dtype=torch.bool, device=device) if mask is None else mask.to(device)
    if not bool(mask[:, -1].all()):
        rows = (~mask[:, -1]).nonzero().flatten().tolist()
        raise ValueError(
            f"attention_mask: rows {rows} end with padding; prompts must be left-padded (last position real)"
        )
    limit = config.max_position_embeddings
    if int(mask.sum(-1).max()) + params.max_new_frames > limit:
        raise ValueError(
            f"max_new_frames={params.max_new_frames} plus the prompt length exceeds max_position_embeddings={limit}"
        )
    return input_ids, mask
