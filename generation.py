"""Frame-by-frame generation for MOSS-TTS-Nano (TTS_SPEC §6).

A handful of small pieces: a global runner (prefill, then one row per step), a local runner (one codebook position
per step), one frame sampler, and the streaming loop that `generate` is built on. The cached runners use fixed-shape
preallocated KV caches with explicit positions; the recompute runners are the straightforward reference path
(`use_kv_cache=False`) and must give the same frames. `SlotGlobal` is the global runner of the continuous-batching
engine (engine.py), which shares the local runner and the frame sampler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

import torch

try:
    from .gpt2_decoder import AttentionFunction, AttentionMask, Segment, SlotKVCache, linear
    from .sampling import RowSampler, SamplingParams, apply_repetition_penalty
except ImportError:  # not part of a package: imported from the repository root or run as a script
    if __package__:  # inside a package (remote code): a real missing dependency, reported as itself
        raise
    from gpt2_decoder import AttentionFunction, AttentionMask, Segment, SlotKVCache, linear
    from sampling import RowSampler, SamplingParams, apply_repetition_penalty


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
# Global decoder runners


class _CachedGlobal:
    """Global decoder with a preallocated KV cache: one prefill, then one row per step."""

    def __init__(self, model: Any, input_ids: torch.Tensor, mask: torch.Tensor, capacity: int,
                 attend: AttentionFunction) -> None:
        weight = model.transformer.wte.weight
        self.model, self.attend = model, attend
        self.input_ids, self.mask = input_ids, mask
        self.cache = model.transformer.new_cache(input_ids.shape[0], capacity, dtype=weight.dtype, device=weight.device)

    def prefill(self) -> torch.Tensor:
        hidden, _ = self.model.run_global(self.model.embed_rows(self.input_ids), self.mask, self.cache, self.attend)
        return hidden[:, -1]  # (B, H)

    def step(self, rows: torch.Tensor, embeds: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.model.run_global(embeds, valid, self.cache, self.attend)
        return hidden[:, -1]


class _RecomputeGlobal:
    """Reference path: re-embed and re-run every row at every step."""

    def __init__(self, model: Any, input_ids: torch.Tensor, mask: torch.Tensor, capacity: int,
                 attend: AttentionFunction) -> None:
        self.model, self.attend = model, attend
        self.rows, self.masks = [input_ids], [mask]

    def prefill(self) -> torch.Tensor:
        return self._run()

    def step(self, rows: torch.Tensor, embeds: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        self.rows.append(rows)
        self.masks.append(valid)
        return self._run()

    def _run(self) -> torch.Tensor:
        input_ids, mask = torch.cat(self.rows, dim=1), torch.cat(self.masks, dim=1)
        hidden, _ = self.model.run_global(self.model.embed_rows(input_ids), mask, None, self.attend)
        return hidden[:, -1]


# ---------------------------------------------------------------------------------------------------------------
# Packed global decoder (continuous batching)


class SlotGlobal:
    """The global decoder of the continuous-batching engine: sequences in the slots of a `SlotKVCache`, and one packed
    forward per frame over the new rows of every running sequence (a newcomer's prompt rows, one row per continuing
    sequence), with each sequence's attention and RoPE positions its own (see `PackedRows`)."""

    def __init__(self, model: Any, slots: int, capacity: int, attend: AttentionFunction) -> None:
        weight = model.transformer.wte.weight
        decoder = model.transformer
        self.model, self.attend = model, attend
        self.cache = SlotKVCache(len(decoder.h), slots, decoder.num_heads, decoder.head_dim, capacity,
                                 dtype=weight.dtype, device=weight.device)

    def run(self, items: Sequence[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """Append new rows to their slots and return each item's last hidden state.

        Args:
            items: (slot, embeddings (n, H) of that slot's next n rows), at most one item per slot.

        Returns:
            (len(items), H) the output after ln_f at each item's last row.
        """
        view = self.cache.packed([Segment(slot, self.cache.lengths[slot], rows.shape[0]) for slot, rows in items])
        embeds = torch.cat([rows for _, rows in items])[None]  # (1, N, H)
        rope = self.model.transformer.rotary.angles(view.positions[None])
        hidden, _ = self.model.transformer(embeds, rope, AttentionMask(), view.attention(self.attend), view)
        view.commit()
        return hidden[0, view.last_rows]


# ---------------------------------------------------------------------------------------------------------------
# Local decoder


class LocalRunner:
    """The local decoder over one frame's positions [h, wte(text id), emb_0(c_0), ..., emb_{nq-1}(c_{nq-1})].

    `step` feeds one position at a time: with a fixed (B, heads, nq + 1, head_dim) KV cache (`use_kv_cache`), or by
    re-running the whole prefix (the reference path). `run` feeds whole teacher-forced sequences at once
    (verification). All share the RoPE angles of positions 0..nq and the decoder call.
    """

    def __init__(self, model: Any, batch: int, nq: int, attend: AttentionFunction, use_kv_cache: bool = True) -> None:
        local = model.local_transformer
        weight = model.transformer.wte.weight
        self.local, self.attend = local, attend
        self.cos, self.sin = local.rotary.angles(torch.arange(nq + 1, device=weight.device)[None])  # (1, 1, L, D/2)
        self.rope = [(self.cos[..., p : p + 1, :], self.sin[..., p : p + 1, :]) for p in range(nq + 1)]
        self.cache = None
        if use_kv_cache:
            self.cache = local.new_cache(batch, nq + 1, dtype=weight.dtype, device=weight.device, track_padding=False)
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
        length = sequence.shape[1]
        rope = (self.cos[..., :length, :], self.sin[..., :length, :])
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


def _check_finite(frame: Frame, step: int, dtype: torch.dtype) -> bool:
    """One host sync per frame: raise on non-finite logits, return whether any row continues."""
    text_ok, audio_ok, any_continue = torch.stack(
        (frame.text_finite.all(), frame.audio_finite.all(), frame.continues.any())
    ).tolist()
    for ok, kind in ((text_ok, "text"), (audio_ok, "audio")):
        if not ok:
            raise RuntimeError(non_finite_message(kind, step, dtype))
    return any_continue


def non_finite_message(kind: str, step: int, dtype: torch.dtype) -> str:
    return (f"Non-finite {kind} logits at generation step {step} (model dtype {str(dtype).split('.')[-1]}): "
            "retry in float32 or with another attention backend")


# ---------------------------------------------------------------------------------------------------------------
# The loop


def generate_frames(model: Any, input_ids: torch.Tensor, mask: torch.Tensor, params: SamplingParams, *,
                    use_kv_cache: bool = True, generator: Optional[torch.Generator] = None) -> Iterator[dict]:
    """Stream frames for validated, left-padded prompt rows (see `MossTTSNanoForCausalLM.generate_stream`)."""
    config = model.config
    batch, device = input_ids.shape[0], input_ids.device
    nq = params.resolve_nq(config.n_vq)
    pad, slot = config.audio_pad_token_id, config.audio_assistant_slot_token_id
    attend_global, attend_local = model.attention_functions()
    global_cls = _CachedGlobal if use_kv_cache else _RecomputeGlobal
    runner = global_cls(model, input_ids, mask, input_ids.shape[1] + params.max_new_frames, attend_global)
    local = LocalRunner(model, batch, nq, attend_local, use_kv_cache)
    sampler = RowSampler.uniform(params, batch, generator, config.n_vq)
    consts = frame_constants(model)
    seen = None
    if params.audio_repetition_penalty != 1.0:
        seen = torch.zeros(nq, batch, max(consts.codebook_sizes[:nq]), dtype=torch.bool, device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    num_frames = torch.zeros(batch, dtype=torch.long, device=device)
    frames: list[torch.Tensor] = []
    rows = next_embeds = None
    for step in range(params.max_new_frames):
        h = runner.prefill() if step == 0 else runner.step(rows, next_embeds, active[:, None])
        frame_state = sample_frame(model, h, local, sampler, seen, active, consts,
                                   force_continue=step < params.min_new_frames)
        active = frame_state.continues
        if not _check_finite(frame_state, step, h.dtype):
            break
        frame = torch.full((batch, config.n_vq), pad, dtype=torch.long, device=device)
        frame[:, :nq] = frame_state.codes.masked_fill(~active[:, None], pad)
        rows = torch.cat((torch.where(active, slot, config.pad_token_id)[:, None], frame), dim=-1)[:, None]
        next_embeds = frame_state.next_embeds
        num_frames += active
        frames.append(frame)
        yield {"type": "frame", "step_index": step, "audio_token_ids": frame, "active_mask": active,
               "finished_mask": ~active}
    audio = torch.stack(frames, dim=1) if frames else torch.full((batch, 0, config.n_vq), pad, device=device)
    yield {"type": "final", "generation": GenerationOutput(
        audio_token_ids=audio, prompt_input_ids=input_ids, prompt_attention_mask=mask,
        finished_mask=~active, num_frames=num_frames,
    )}
