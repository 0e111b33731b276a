"""Prompt rows for MOSS-TTS-Nano: template ids, text and audio rows, voice-clone / continuation layouts, batching.

A model input is a tensor of rows `[T, n_vq + 1]` (int64): column 0 holds a text-token id (or an audio slot id),
columns 1..n_vq the codes of codebooks 0..n_vq-1, or `audio_pad` where there is no code (docs/model.md).
Everything here is pure: no model, no device choice, no tokenizer object (an `encode` callable is passed in).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .sampling import resolve_nq

MODES = ("voice_clone", "continuation")

USER_TEXT = "user\n"
REFERENCE_HEADER_TEXT = "<user_inst>\n- Reference(s):\n"
AFTER_REFERENCE_TEXT = (
    "\n- Instruction:\nNone\n- Tokens:\nNone\n- Quality:\nNone\n- Sound Event:\nNone\n- Ambient Sound:\nNone\n"
    "- Language:\nNone\n- Text:\n"
)
CLOSE_INSTRUCTION_TEXT = "\n</user_inst>"
NEWLINE_TEXT = "\n"
ASSISTANT_TEXT = "assistant\n"
NONE_TEXT = "None"

# MossTTSNanoConfig attribute for each PromptTokenIds field.
_CONFIG_ATTRIBUTES = {
    "pad": "pad_token_id",
    "im_start": "im_start_token_id",
    "im_end": "im_end_token_id",
    "audio_start": "audio_start_token_id",
    "audio_end": "audio_end_token_id",
    "audio_user_slot": "audio_user_slot_token_id",
    "audio_assistant_slot": "audio_assistant_slot_token_id",
    "n_vq": "n_vq",
    "audio_pad": "audio_pad_token_id",
    "audio_codebook_sizes": "audio_codebook_sizes",
}


@dataclass(frozen=True)
class PromptTokenIds:
    """The special ids the prompt layout uses (released values by default).

    Raises:
        ValueError: when n_vq < 1, the codebook sizes do not match n_vq or are not positive, or audio_pad lies
            inside a codebook.
    """

    pad: int = 3
    im_start: int = 4
    im_end: int = 5
    audio_start: int = 6
    audio_end: int = 7
    audio_user_slot: int = 8
    audio_assistant_slot: int = 9
    n_vq: int = 16
    audio_pad: int = 1024
    audio_codebook_sizes: tuple[int, ...] = (1024,) * 16

    def __post_init__(self) -> None:
        object.__setattr__(self, "audio_codebook_sizes", tuple(int(size) for size in self.audio_codebook_sizes))
        if self.n_vq < 1:
            raise ValueError(f"n_vq={self.n_vq} must be at least 1")
        if len(self.audio_codebook_sizes) != self.n_vq:
            raise ValueError(
                f"audio_codebook_sizes has {len(self.audio_codebook_sizes)} entries but n_vq={self.n_vq}: "
                "one size per codebook is required"
            )
        if any(size <= 0 for size in self.audio_codebook_sizes):
            raise ValueError(f"audio_codebook_sizes={list(self.audio_codebook_sizes)} must all be positive")
        if self.audio_pad < max(self.audio_codebook_sizes):
            raise ValueError(
                f"audio_pad={self.audio_pad} lies inside a codebook (largest size {max(self.audio_codebook_sizes)}): "
                "the pad code must be >= every codebook size"
            )

    @classmethod
    def from_config(cls, config: Any) -> "PromptTokenIds":
        """Read the ids from a `MossTTSNanoConfig` (or any object / mapping with the same attribute names).

        Args:
            config: the model config.

        Returns:
            The ids of that config.

        Raises:
            ValueError: when an attribute is missing or the values are inconsistent.
        """
        values = {}
        for field_name, attribute in _CONFIG_ATTRIBUTES.items():
            value = config.get(attribute) if isinstance(config, dict) else getattr(config, attribute, None)
            if value is None:
                raise ValueError(f"config has no {attribute!r}: it is needed for the prompt layout")
            values[field_name] = tuple(value) if field_name == "audio_codebook_sizes" else int(value)
        return cls(**values)


@dataclass(frozen=True)
class PromptTemplate:
    """Token ids of the fixed prompt pieces (docs/model.md, Prompts), built once per tokenizer."""

    user_prefix: tuple[int, ...]
    after_reference: tuple[int, ...]
    assistant_prefix: tuple[int, ...]
    none_text: tuple[int, ...]


def _as_int_list(values: Sequence[int], name: str) -> list[int]:
    try:
        return [operator.index(value) for value in values]
    except TypeError as error:
        raise ValueError(f"{name} must be a sequence of integer token ids ({error})") from None


def build_prompt_template(encode: Callable[[str], list[int]], ids: PromptTokenIds) -> PromptTemplate:
    """Tokenise each template piece separately and assemble the fixed prompt pieces.

    Args:
        encode: text -> ids WITHOUT special tokens (e.g. `lambda s: tok.encode(s, add_special_tokens=False)`).
        ids: the special ids.

    Returns:
        The template.
    """

    def enc(text: str) -> tuple[int, ...]:
        return tuple(_as_int_list(encode(text), f"encode({text!r})"))

    return PromptTemplate(
        user_prefix=(ids.im_start,) + enc(USER_TEXT) + enc(REFERENCE_HEADER_TEXT),
        after_reference=enc(AFTER_REFERENCE_TEXT),
        assistant_prefix=enc(CLOSE_INSTRUCTION_TEXT)
        + (ids.im_end,)
        + enc(NEWLINE_TEXT)
        + (ids.im_start,)
        + enc(ASSISTANT_TEXT),
        none_text=enc(NONE_TEXT),
    )


def text_rows(token_ids: Sequence[int], ids: PromptTokenIds) -> torch.LongTensor:
    """Rows `[id, audio_pad x n_vq]` for each token id.

    Args:
        token_ids: text-token ids (non-negative).
        ids: the special ids.

    Returns:
        `[T, n_vq + 1]` int64.

    Raises:
        ValueError: for a token id that is not a non-negative integer.
    """
    column = torch.tensor(_as_int_list(token_ids, "token_ids"), dtype=torch.long)
    if column.numel() and int(column.min()) < 0:
        raise ValueError(f"token_ids contains {int(column.min())}: text-token ids must be >= 0")
    rows = torch.full((column.numel(), ids.n_vq + 1), ids.audio_pad, dtype=torch.long)  # (T, n_vq + 1)
    rows[:, 0] = column
    return rows


def audio_rows(codes: Any, slot_id: int, ids: PromptTokenIds, nq: int | None = None) -> torch.LongTensor:
    """Rows `[slot_id, c0..c_{n_vq-1}]`, one per frame; channels >= nq become `audio_pad`.

    Args:
        codes: `[T, n_vq]` integer codes (torch tensor, numpy array or nested lists); `audio_pad` means "no code".
        slot_id: column-0 id (`ids.audio_user_slot` for references, `ids.audio_assistant_slot` for prompts).
        ids: the special ids.
        nq: codebooks in use (1..n_vq), None for all.

    Returns:
        `[T, n_vq + 1]` int64.

    Raises:
        ValueError: on a wrong shape, non-integer codes, or a code outside [0, size) that is not audio_pad.
    """
    nq = resolve_nq(nq, ids.n_vq)
    codes = _as_code_tensor(codes, ids)
    _check_code_ranges(codes, ids)
    rows = torch.empty((codes.shape[0], ids.n_vq + 1), dtype=torch.long)  # (T, n_vq + 1)
    rows[:, 0] = int(slot_id)
    rows[:, 1:] = codes
    rows[:, 1 + nq :] = ids.audio_pad
    return rows


def _as_code_tensor(codes: Any, ids: PromptTokenIds) -> torch.Tensor:
    if isinstance(codes, torch.Tensor):
        tensor = codes
    else:
        try:
            tensor = torch.as_tensor(_to_plain(codes, ids))
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"codes could not be read as an integer array [frames, {ids.n_vq}]: {error}") from error
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise ValueError(f"codes has dtype {tensor.dtype}: audio codes must be integers")
    if tensor.dim() != 2 or tensor.shape[1] != ids.n_vq:
        raise ValueError(
            f"codes has shape {tuple(tensor.shape)}: expected [frames, {ids.n_vq}] (one column per codebook)"
        )
    return tensor.detach().to(device="cpu", dtype=torch.long)


def _to_plain(codes: Any, ids: PromptTokenIds) -> Any:
    # numpy arrays and lists both convert through torch.as_tensor; an empty list means "no frames".
    if isinstance(codes, (list, tuple)) and len(codes) == 0:
        return torch.empty((0, ids.n_vq), dtype=torch.long)
    return codes


def _check_code_ranges(codes: torch.Tensor, ids: PromptTokenIds) -> None:
    for channel, size in enumerate(ids.audio_codebook_sizes):
        column = codes[:, channel]
        bad = ((column < 0) | (column >= size)) & (column != ids.audio_pad)
        if bool(bad.any()):
            frame = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"codes[{frame}, {channel}] = {int(column[frame])} is out of range for channel {channel}: "
                f"allowed codes are 0..{size - 1} or {ids.audio_pad} (audio_pad)"
            )


def infer_mode(mode: str | None, *, has_prompt_audio: bool, has_prompt_text: bool) -> str:
    """The mode of a request: `mode` when given, else voice_clone for prompt audio without a transcript, else
    continuation (no prompt at all, or prompt text with or without audio; `validate_mode` judges the rest).

    The one decision used by `inference`, `inference_stream`, infer_npu.py and verify_npu.py.
    """
    if mode is not None:
        return mode
    return "voice_clone" if has_prompt_audio and not has_prompt_text else "continuation"


def validate_mode(mode: str, *, has_prompt_audio: bool, has_prompt_text: bool) -> None:
    """Check the docs/model.md, Prompts mode rules.

    Args:
        mode: "voice_clone" or "continuation".
        has_prompt_audio: whether prompt (reference) audio is given.
        has_prompt_text: whether a prompt transcript is given.

    Raises:
        ValueError: naming the rule that failed.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not supported: choose one of {', '.join(MODES)}")
    if mode == "voice_clone":
        if not has_prompt_audio:
            raise ValueError("mode='voice_clone' needs prompt audio (the reference voice); none was given")
        if has_prompt_text:
            raise ValueError(
                "mode='voice_clone' takes no prompt text: the reference audio is used without a transcript "
                "(use mode='continuation' to continue prompt audio with its transcript)"
            )
    elif has_prompt_audio != has_prompt_text:
        given, missing = ("prompt audio", "prompt text") if has_prompt_audio else ("prompt text", "prompt audio")
        raise ValueError(
            f"mode='continuation' takes either no prompt at all or both prompt text and prompt audio: "
            f"{given} was given without {missing}"
        )


def _check_text_ids(text_ids: Sequence[int]) -> list[int]:
    text_ids = _as_int_list(text_ids, "text_ids")
    if not text_ids:
        raise ValueError("text_ids is empty: the text to speak must tokenise to at least one token")
    return text_ids


def _check_prompt_codes(prompt_codes: Any, ids: PromptTokenIds, nq: int | None) -> torch.LongTensor:
    nq = resolve_nq(nq, ids.n_vq)
    try:
        rows = audio_rows(prompt_codes, 0, ids, nq)
    except ValueError as error:
        raise ValueError(f"prompt_codes: {error}") from None
    if rows.shape[0] == 0:
        raise ValueError("prompt_codes has 0 frames: prompt audio must give at least one frame of codes")
    return rows


def build_voice_clone_rows(
    template: PromptTemplate,
    ids: PromptTokenIds,
    text_ids: Sequence[int],
    prompt_codes: Any,
    nq: int | None = None,
) -> torch.LongTensor:
    """Rows for voice cloning from reference audio without a transcript.

    Layout: text rows of `user_prefix + [audio_start]`, one `[audio_user_slot, codes]` row per reference frame,
    then text rows of `[audio_end] + after_reference + text_ids + assistant_prefix + [audio_start]`.

    Args:
        template: the prompt template.
        ids: the special ids.
        text_ids: tokens of the text to speak (non-empty).
        prompt_codes: `[T_ref, n_vq]` reference codes (at least one frame).
        nq: codebooks in use (1..n_vq), None for all.

    Returns:
        `[T, n_vq + 1]` int64.

    Raises:
        ValueError: for empty text_ids, bad codes or an invalid nq.
    """
    text_ids = _check_text_ids(text_ids)
    reference = _check_prompt_codes(prompt_codes, ids, nq)
    reference[:, 0] = ids.audio_user_slot
    head = text_rows(template.user_prefix + (ids.audio_start,), ids)
    tail = [ids.audio_end, *template.after_reference, *text_ids, *template.assistant_prefix, ids.audio_start]
    return torch.cat([head, reference, text_rows(tail, ids)], dim=0)


def build_continuation_rows(
    template: PromptTemplate,
    ids: PromptTokenIds,
    text_ids: Sequence[int],
    prompt_codes: Any = None,
    nq: int | None = None,
) -> torch.LongTensor:
    """Rows for plain TTS (no prompt) or for continuing prompt audio.

    Layout: text rows of `user_prefix + none_text + after_reference + text_ids + assistant_prefix + [audio_start]`,
    then (only with prompt audio) one `[audio_assistant_slot, codes]` row per prompt frame.

    Args:
        template: the prompt template.
        ids: the special ids.
        text_ids: tokens of the effective text `prompt_text + text` (the caller concatenates the strings first).
        prompt_codes: `[T_prompt, n_vq]` codes of the prompt audio, or None.
        nq: codebooks in use (1..n_vq), None for all.

    Returns:
        `[T, n_vq + 1]` int64.

    Raises:
        ValueError: for empty text_ids, bad codes or an invalid nq.
    """
    text_ids = _check_text_ids(text_ids)
    nq = resolve_nq(nq, ids.n_vq)
    head = [
        *template.user_prefix,
        *template.none_text,
        *template.after_reference,
        *text_ids,
        *template.assistant_prefix,
        ids.audio_start,
    ]
    parts = [text_rows(head, ids)]
    if prompt_codes is not None:
        prompt = _check_prompt_codes(prompt_codes, ids, nq)
        prompt[:, 0] = ids.audio_assistant_slot
        parts.append(prompt)
    return torch.cat(parts, dim=0)


def left_pad_batch(
    rows: Sequence[torch.LongTensor], ids: PromptTokenIds
) -> tuple[torch.LongTensor, torch.BoolTensor]:
    """Stack row tensors of different lengths, padding on the left with `[pad, audio_pad x n_vq]` rows.

    Args:
        rows: one `[T_i, n_vq + 1]` integer tensor per item (T_i >= 1).
        ids: the special ids.

    Returns:
        (`[B, T_max, n_vq + 1]` int64 rows, `[B, T_max]` bool mask that is False on padding).

    Raises:
        ValueError: for an empty batch, a non-tensor, a wrong shape or an empty item.
    """
    if len(rows) == 0:
        raise ValueError("rows is empty: left_pad_batch needs at least one item")
    width = ids.n_vq + 1
    for index, item in enumerate(rows):
        if not isinstance(item, torch.Tensor) or item.dim() != 2 or item.shape[1] != width or item.shape[0] == 0:
            shape = tuple(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__
            raise ValueError(f"rows[{index}] is {shape}: expected a tensor [T >= 1, {width}] (n_vq + 1 columns)")
        if item.is_floating_point() or item.dtype == torch.bool:
            raise ValueError(f"rows[{index}] has dtype {item.dtype}: rows must hold integer ids")
    longest = max(item.shape[0] for item in rows)
    device = rows[0].device
    batch = torch.full((len(rows), longest, width), ids.audio_pad, dtype=torch.long, device=device)
    batch[:, :, 0] = ids.pad
    mask = torch.zeros((len(rows), longest), dtype=torch.bool, device=device)  # (B, T_max)
    for index, item in enumerate(rows):
        start = longest - item.shape[0]
        batch[index, start:] = item.to(device=device, dtype=torch.long)
        mask[index, start:] = True
    return batch, mask


def build_prompt_batch(
    encode: Callable[[str], list[int]],
    ids: PromptTokenIds,
    text: str | Sequence[str],
    mode: str,
    prompt_text: str | None = None,
    prompt_audio_codes: Any = None,
    nq: int | None = None,
) -> tuple[torch.LongTensor, torch.BoolTensor]:
    """Prompt rows of one text, or a left-padded batch of several texts that share one prompt.

    Args:
        encode: text -> token ids (no special tokens).
        ids: the special ids.
        text: the text to speak, or a non-empty list of texts.
        mode: "voice_clone" (prompt audio, no prompt text) or "continuation" (no prompt, or both).
        prompt_text: transcript of the prompt audio (continuation only).
        prompt_audio_codes: `[T_ref, n_vq]` codes of the prompt audio, or None.
        nq: codebooks in use (1..n_vq); prompt codes of higher channels become `audio_pad`.

    Returns:
        (`[B, T_max, n_vq + 1]` int64 rows, `[B, T_max]` bool mask that is False on padding).

    Raises:
        ValueError: for a mode rule violation, empty text, or malformed codes.
    """
    validate_mode(mode, has_prompt_audio=prompt_audio_codes is not None, has_prompt_text=bool(prompt_text))
    texts = [text] if isinstance(text, str) else list(text)
    if not texts or not all(isinstance(item, str) for item in texts):
        raise ValueError(f"text={text!r} must be a string or a non-empty list of strings")
    template = build_prompt_template(encode, ids)
    if mode == "voice_clone":
        rows = [build_voice_clone_rows(template, ids, encode(item), prompt_audio_codes, nq) for item in texts]
    else:
        rows = [build_continuation_rows(template, ids, encode((prompt_text or "") + item), prompt_audio_codes, nq)
                for item in texts]
    return left_pad_batch(rows, ids)
