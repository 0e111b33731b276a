"""Frame-by-frame generation for MOSS-TTS-Nano (TTS_SPEC §6).

A handful of small pieces: a global runner (prefill, then one row per step), a local runner (one codebook position
per step), one frame sampler, and the streaming loop that `generate` is built on. The cached runners use fixed-shape
preallocated KV caches with explicit positions; the recompute runners are the straightforward reference path
(`use_kv_cache=False`) and must give the same frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F

try:
    from .gpt2_decoder import AttentionFunction, AttentionMask, linear
    from .sampling import SamplingParams, apply_repetition_penalty, select_tokens
except ImportError:  # not part of a package: imported from the repository root or run as a script
    if __package__:  # inside a package (remote code): a real missing dependency, reported as itself
        raise
    from gpt2_decoder import AttentionFunction, AttentionMask, linear
    from sampling import SamplingParams, apply_repetition_penalty, select_tokens


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
# Local decoder runners


class _CachedLocal:
    """Local decoder with a fixed (B, heads, nq + 1, head_dim) KV cache and RoPE prepared once per position."""

    def __init__(self, model: Any, batch: int, nq: int, attend: AttentionFunction) -> None:
        local = model.local_transformer
        weight = model.transformer.wte.weight
        self.local, self.attend = local, attend
        self.cache = local.new_cache(batch, nq + 1, dtype=weight.dtype, device=weight.device, track_padding=False)
        positions = torch.arange(nq + 1, device=weight.device).expand(batch, nq + 1)  # (B, nq + 1)
        self.rope = [model.rotation(local, positions[:, p : p + 1]) for p in range(nq + 1)]  # one per position
        self.mask = AttentionMask()

    def reset(self) -> None:
        self.cache.reset()

    def step(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.local(x[:, None], self.rope[self.cache.length], self.mask, self.attend, self.cache)
        return out[:, 0]  # (B, H)


class _RecomputeLocal:
    """Reference path: re-run the whole local sequence for every codebook."""

    def __init__(self, model: Any, batch: int, nq: int, attend: AttentionFunction) -> None:
        self.model, self.local, self.attend = model, model.local_transformer, attend
        self.inputs: list[torch.Tensor] = []

    def reset(self) -> None:
        self.inputs = []

    def step(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x[:, None])
        sequence = torch.cat(self.inputs, dim=1)  # (B, L, H)
        positions = torch.arange(sequence.shape[1], device=sequence.device).expand(sequence.shape[:2])  # (B, L)
        out, _ = self.local(sequence, self.model.rotation(self.local, positions), AttentionMask(), self.attend, None)
        return out[:, -1]


# ---------------------------------------------------------------------------------------------------------------
# One frame


@dataclass
class _FrameConstants:
    candidate_ids: torch.Tensor  # (2,) [continue slot, audio_end]
    candidate_weights: torch.Tensor  # (2, H) rows of the tied text head
    continue_embedding: torch.Tensor  # (H,) wte(continue slot)
    codebook_sizes: list[int]


@dataclass
class _Frame:
    codes: torch.Tensor  # (B, nq)
    continues: torch.Tensor  # (B,) bool
    next_embeds: torch.Tensor  # (B, 1, H) embedding of the row [continue slot, codes]
    text_finite: torch.Tensor  # () bool
    audio_finite: torch.Tensor  # () bool


def _frame_constants(model: Any) -> _FrameConstants:
    config = model.config
    weight = model.text_lm_head.weight
    ids = torch.tensor([config.audio_assistant_slot_token_id, config.audio_end_token_id], device=weight.device)
    return _FrameConstants(
        candidate_ids=ids,
        candidate_weights=weight.index_select(0, ids),
        continue_embedding=model.transformer.wte.weight[config.audio_assistant_slot_token_id],
        codebook_sizes=list(config.audio_codebook_sizes),
    )


def _sample_frame(model: Any, h: torch.Tensor, local: Any, params: SamplingParams, nq: int,
                  seen: Optional[torch.Tensor], active: torch.Tensor, consts: _FrameConstants,
                  generator: Optional[torch.Generator], force_continue: bool = False) -> _Frame:
    """Local position 0 decides continue / audio_end from two text logits; positions 1..nq give the codes."""
    local.reset()
    text_logits = F.linear(local.step(h), consts.candidate_weights)  # (B, 2): only the two candidates
    choice = select_tokens(text_logits, do_sample=params.do_sample, temperature=params.text_temperature,
                           top_k=params.text_top_k, top_p=params.text_top_p, generator=generator)
    if force_continue:  # within min_new_frames: the codes below follow the "continue" token
        choice = torch.zeros_like(choice)
    x = model.transformer.wte(consts.candidate_ids[choice])  # (B, H)
    embeds = consts.continue_embedding
    codes, all_logits = [], []
    for channel in range(nq):
        head = model.audio_lm_heads[channel]
        logits = linear(local.step(x), head.weight, head.bias)  # (B, audio_vocab_size)
        if consts.codebook_sizes[channel] < logits.shape[-1]:  # heads have audio_vocab_size rows; codes < size
            logits = logits[:, : consts.codebook_sizes[channel]]
        all_logits.append(logits)
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen[channel], params.audio_repetition_penalty)
        code = select_tokens(logits, do_sample=params.do_sample, temperature=params.audio_temperature,
                             top_k=params.audio_top_k, top_p=params.audio_top_p, generator=generator)
        if seen is not None:
            seen[channel].scatter_(1, code[:, None], True)
        x = model.audio_embeddings[channel](code)
        embeds = embeds + x  # same order as embed_rows: wte(slot) + emb_0 + emb_1 + ...
        codes.append(code)
    return _Frame(
        codes=torch.stack(codes, dim=1),
        continues=active & (choice == 0),
        next_embeds=embeds[:, None],
        text_finite=torch.isfinite(text_logits).all(),
        audio_finite=torch.isfinite(torch.cat(all_logits, dim=-1)).all(),  # one check per frame, not per channel
    )


def _check_finite(frame: _Frame, step: int, dtype: torch.dtype) -> bool:
    """One host sync per frame: raise on non-finite logits, return whether any row continues."""
    text_ok, audio_ok, any_continue = torch.stack(
        (frame.text_finite, frame.audio_finite, frame.continues.any())
    ).tolist()
    for ok, kind in ((text_ok, "text"), (audio_ok, "audio")):
        if not ok:
            raise RuntimeError(
                f"Non-finite {kind} logits at generation step {step} (model dtype {str(dtype).split('.')[-1]}): "
                "retry in float32 or with another attention backend"
            )
    return any_continue


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
    global_cls, local_cls = (_CachedGlobal, _CachedLocal) if use_kv_cache else (_RecomputeGlobal, _RecomputeLocal)
    runner = global_cls(model, input_ids, mask, input_ids.shape[1] + params.max_new_frames, attend_global)
    local = local_cls(model, batch, nq, attend_local)
    consts = _frame_constants(model)
    seen = None
    if params.audio_repetition_penalty != 1.0:
        seen = torch.zeros(nq, batch, max(consts.codebook_sizes[:nq]), dtype=torch.bool, device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    num_frames = torch.zeros(batch, dtype=torch.long, device=device)
    frames: list[torch.Tensor] = []
    rows = next_embeds = None
    for step in range(params.max_new_frames):
        h = runner.prefill() if step == 0 else runner.step(rows, next_embeds, active[:, None])
        frame_state = _sample_frame(model, h, local, params, nq, seen, active, consts, generator,
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
