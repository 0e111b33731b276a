"""Frame-by-frame generation for MOSS-TTS-Nano (TTS_SPEC §6).

The local runner (one codebook position per step) and one frame sampler; the global decoder's slots, the batched
frame step and the loop are the engine core's (model_runner.py, engine_core.py), which every call steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from .attention import AttentionFunction, AttentionMask

from .linear_kernels import linear
from .sampling import RowSampler, apply_repetition_penalty


@dataclass
class GenerationOutput:
    """Result of `generate`.

    Attributes:
        audio_token_ids: (B, frames, n_vq) codes; rows that finished hold the pad code from then on, and channels
            >= nq always do.
        prompt_input_ids: (B, T, n_vq + 1) the prompt rows.
        prompt_attention_mask: (B, T) bool.
        finished_mask: (B,) True for rows that chose audio_end (False if they ran out of frames).
        num_frames: (B,) real frames per row (a row's codes are `audio_token_ids[b, :num_frames[b]]`).
    """

    audio_token_ids: torch.LongTensor
    prompt_input_ids: torch.LongTensor
    prompt_attention_mask: torch.BoolTensor
    finished_mask: torch.BoolTensor
    num_frames: torch.LongTensor


# ---------------------------------------------------------------------------------------------------------------
# Local decoder


class LocalRunner:
    """The local decoder over one frame's positions [h, wte(text id), emb_0(c_0), ..., emb_{nq-1}(c_{nq-1})].

    `step` feeds one position at a time: with a fixed (B, heads, nq + 1, head_dim) KV cache (`use_kv_cache`), or by
    re-running the whole prefix (the reference path). `run` feeds whole teacher-forced sequences at once
    (verification). All share the positions 0..nq and the decoder call.
    """

    def __init__(self, model: Any, batch: int, nq: int, attend: AttentionFunction, use_kv_cache: bool = True) -> None:
        local = model.local_transformer
        weight = model.transformer.wte.weight
        self.model, self.local, self.attend = model, local, attend
        self.positions = torch.arange(nq + 1, device=weight.device).expand(batch, nq + 1)  # (B, nq + 1)
        self.cache = None
        if use_kv_cache:
            self.cache = local.new_cache(batch, nq + 1, dtype=weight.dtype, device=weight.device, track_padding=False)
            self.rope = [model.rotation(local, self.positions[:, p : p + 1]) for p in range(nq + 1)]  # one per position
        self.inputs: list[torch.Tensor] = []

    def reset(self) -> None:
        if self.cache is not None:
            self.cache.reset()
        self.inputs = []

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """The output (B, H) at the next position for its input x (B, H)."""
        if self.cache is None:
            self.inputs.append(x[:, None])
            return self.run(torch.cat(self.inputs, dim=1))[:, -1]
        out, _ = self.local(x[:, None], self.rope[self.cache.length], _NO_MASK, self.attend, self.cache)
        return out[:, 0]

    def run(self, sequence: torch.Tensor) -> torch.Tensor:
        """Outputs (B, L, H) for whole sequences (B, L, H) from position 0, without a cache."""
        rope = self.model.rotation(self.local, self.positions[:, : sequence.shape[1]])
        return self.local(sequence, rope, _NO_MASK, self.attend, None)[0]


_NO_MASK = AttentionMask()


def text_logits(out: torch.Tensor, consts: "FrameConstants") -> torch.Tensor:
    """(.., 2) logits of the [continue, audio_end] candidates from local position 0 outputs (.., H)."""
    return linear(out, consts.candidate_weights)


def audio_logits(model: Any, out: torch.Tensor, channel: int) -> torch.Tensor:
    """(.., audio_vocab_size) logits of codebook `channel` from the local outputs (.., H) at position channel + 1
    (codes are below the codebook size, which can be smaller)."""
    head = model.audio_lm_heads[channel]
    return linear(out, head.weight, head.bias)


# ---------------------------------------------------------------------------------------------------------------
# One frame


@dataclass
class FrameConstants:
    candidate_ids: torch.Tensor  # (2,) [continue slot, audio_end]
    candidate_weights: torch.Tensor  # (2, H) rows of the tied text head
    continue_embedding: torch.Tensor  # (H,) wte(continue slot)
    codebook_sizes: list[int]


@dataclass
class Frame:
    codes: torch.Tensor  # (B, nq): a row's channels at or above its own nq hold 0
    continues: torch.Tensor  # (B,) bool
    next_embeds: torch.Tensor  # (B, 1, H) embedding of the row [continue slot, codes]
    text_finite: torch.Tensor  # (B,) bool
    audio_finite: torch.Tensor  # (B,) bool


def frame_constants(model: Any) -> FrameConstants:
    config = model.config
    weight = model.text_lm_head.weight
    ids = torch.tensor([config.audio_assistant_slot_token_id, config.audio_end_token_id], device=weight.device)
    return FrameConstants(
        candidate_ids=ids,
        candidate_weights=weight.index_select(0, ids),
        continue_embedding=model.transformer.wte.weight[config.audio_assistant_slot_token_id],
        codebook_sizes=list(config.audio_codebook_sizes),
    )


def sample_frame(model: Any, h: torch.Tensor, local: LocalRunner, sampler: RowSampler, seen: Optional[torch.Tensor],
                 active: torch.Tensor, consts: FrameConstants, force_continue: Union[bool, torch.Tensor] = False
                 ) -> Frame:
    """Local position 0 decides continue / audio_end from two text logits; positions 1..nq give the codes.

    `seen` (nq, B, V) bool holds the codes each row generated so far per channel (repetition penalty), updated here.
    `force_continue` (every row, or a (B,) bool mask of rows; within min_new_frames): the decision is still drawn
    (the random stream stays the same) but replaced by "continue", and the codes follow it.
    """
    local.reset()
    text = text_logits(local.step(h), consts)  # (B, 2): only the two candidates
    choice = sampler.text(text)
    if isinstance(force_continue, torch.Tensor):
        choice = choice.masked_fill(force_continue, 0)
    elif force_continue:
        choice = torch.zeros_like(choice)
    x = model.transformer.wte(consts.candidate_ids[choice])  # (B, H)
    embeds = consts.continue_embedding
    codes, finite = [], []
    for channel in range(sampler.nq):
        logits = audio_logits(model, local.step(x), channel)  # (B, audio_vocab_size)
        if consts.codebook_sizes[channel] < logits.shape[-1]:
            logits = logits[:, : consts.codebook_sizes[channel]]
        uses = sampler.uses(channel)
        uses = None if uses is None else torch.tensor(uses, device=h.device)
        finite.append(logits if uses is None else logits.masked_fill(~uses[:, None], 0.0))
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen[channel], sampler.penalty(h.device))
        code = sampler.audio(logits, channel)
        if seen is not None:
            seen[channel].scatter_(1, code[:, None], True)
        x = model.audio_embeddings[channel](code)
        # same order as embed_rows: wte(slot) + emb_0 + emb_1 + ... (a row stops adding at its own nq)
        embeds = embeds + x if uses is None else torch.where(uses[:, None], embeds + x, embeds)
        codes.append(code)
    return Frame(
        codes=torch.stack(codes, dim=1),
        continues=active & (choice == 0),
        next_embeds=embeds[:, None],
        text_finite=torch.isfinite(text).all(dim=-1),
        audio_finite=torch.isfinite(torch.cat(finite, dim=-1)).all(dim=-1),  # one check per frame, not per channel
    )


def non_finite_message(kind: str, step: int, dtype: torch.dtype) -> str:
    return (f"Non-finite {kind} logits at generation step {step} (model dtype {str(dtype).split('.')[-1]}): "
            "retry in float32 or with another attention backend")
