"""The model runner of the engine core: one batched frame step over the slots of a preallocated KV cache.

A step takes one row per running sequence: a newcomer's prompt rows (its prefill) or its next frame row. Prompts
run each in a forward of their own (a prefill is compute-bound: batching it gains nothing on a CPU, and alone it
computes exactly what a solo run computes); the continuing rows run together in one decode forward. Then one local
codebook loop covers every row (`generation.sample_frame`: per-row sampling settings, repetition-penalty state and
random generator, `sampling.RowSampler`). One host synchronisation per step.

The slot KV cache is preallocated (grown, in steps of CAPACITY_STEP rows, only when a longer request comes) and
written in place at explicit positions, so a later graph capture of the decode step (CUDA / NPU graphs) wraps it
without a rewrite. The kernels come from the model's kernel plan, resolved once for its device, dtype and weight precision.

Batch invariance (`batch_invariant=True`): products inside `batched_products(row_invariant=True)` (see there) and
attention per row with the shapes of a solo run, so a row's results do not depend on its neighbours. Otherwise the
step uses the fastest products for its row count and one attention call for all rows.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from .compiled_step import enabled as compile_enabled, graphs_for
from .generation import LocalRunner, frame_constants, sample_frame
from .attention import ATTENTION_FUNCTIONS, AttentionMask
from .kv_cache import Segment, SlotKVCache, write_rows
from .linear_kernels import batched_products
from .sampling import RowSampler, SamplingParams

_NO_MASK = AttentionMask()
CAPACITY_STEP = 64  # the slot cache grows in multiples of this many rows


@dataclass
class RowInput:
    """One row of a step: a slot, the prompt rows when its sequence starts (else None: its next frame row), its
    sampling settings and generator, and whether "continue" is forced (within min_new_frames)."""

    slot: int
    prompt: Optional[torch.Tensor]
    params: SamplingParams
    generator: Optional[torch.Generator]
    forced: bool = False


@dataclass
class StepResult:
    """A step's outcome per row (CPU): codes (B, n_vq), pad at and above each row's nq; finite; continues."""

    codes: torch.Tensor
    text_finite: list
    audio_finite: list
    continues: list


class SlotGlobal:
    """The global decoder over the slots of a `SlotKVCache`: a prompt in a forward of its own (`prefill`), and one
    decode forward for one new row of each of several slots (`decode`), with each sequence's positions its own."""

    def __init__(self, model: Any, slots: int, capacity: int, attend: Any, batch_invariant: bool = False) -> None:
        weight = model.transformer.wte.weight
        decoder = model.transformer
        self.model, self.attend, self.batch_invariant = model, attend, batch_invariant
        self.cache = SlotKVCache(len(decoder.h), slots, decoder.num_heads, decoder.head_dim, capacity,
                                 dtype=weight.dtype, device=weight.device)
        self.captures: Any = None  # step_capture.DecodeCaptures when the runner's steps are captured graphs

    def reserve(self, rows: int) -> None:
        self.cache.reserve(-(-rows // CAPACITY_STEP) * CAPACITY_STEP)

    def release(self, slot: int) -> None:
        self.cache.release(slot)

    def run(self, items: Sequence[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """Append new rows (n, H) to their slots in one packed forward; (len(items), H) outputs at each last row."""
        view = self.cache.packed([Segment(slot, self.cache.lengths[slot], rows.shape[0]) for slot, rows in items])
        embeds = torch.cat([rows for _, rows in items])[None]  # (1, N, H)
        rope = self.model.rotation(self.model.transformer, view.positions[None])
        hidden, _ = self.model.transformer(embeds, rope, _NO_MASK, view.attention(self.attend), view)
        view.commit()
        return hidden[0, view.last_rows]

    def prefill(self, slot: int, embeds: torch.Tensor) -> torch.Tensor:
        """A sequence's prompt embeddings (T, H) into `slot`; its last output (H,)."""
        return self.run([(slot, embeds)])[0]

    def decode(self, slots: list[int], embeds: torch.Tensor) -> torch.Tensor:
        """One new row (B, 1, H) for each of `slots`; outputs (B, H)."""
        if self.captures is not None:
            out = self.captures.decode(self, slots, embeds)
            if out is not None:
                return out
        view = _DecodeView(self.cache, slots, self.batch_invariant)
        rope = self.model.rotation(self.model.transformer, view.positions[:, None])
        out, _ = self.model.transformer(embeds, rope, _NO_MASK, view.attention(self.attend), view)
        view.commit()
        return out[:, 0]


def decode_key_mask(positions: torch.Tensor, keys: int) -> AttentionMask:
    """The mask of a decode step over `keys` keys whose rows sit at `positions` (B,): row b sees keys 0..positions[b]
    (keys right-padded per row, every query real; `build_attention_mask` is for left padding). Device ops only, so a
    captured decode builds it inside its graph (step_capture.py)."""
    valid = torch.arange(keys, device=positions.device)[None] <= positions[:, None]  # (B, keys)
    return AttentionMask(dense=valid[:, None, None, :], key_valid=valid,
                         query_valid=torch.ones(positions.shape[0], 1, dtype=torch.bool, device=positions.device))


class _DecodeView:
    """One decode forward's view of a `SlotKVCache`: writes each row's key/value at its slot's next position and
    attends each row to its own slot. Slots that form one ascending run share one attention call (a key mask when
    their lengths differ); otherwise, and when batch-invariant, one call per row with the shapes of a solo run."""

    def __init__(self, cache: SlotKVCache, slots: list[int], per_row: bool) -> None:
        self.cache, self.slots = cache, slots
        device = cache.keys[0].device
        self.lengths = [cache.lengths[s] for s in slots]
        self.positions = torch.tensor(self.lengths, device=device)
        self.index = torch.tensor(slots, device=device)
        self.end = max(self.lengths) + 1
        first = slots[0]
        self.run = None if per_row or slots != list(range(first, first + len(slots))) else (first, first + len(slots))
        self.mask = _NO_MASK
        if self.run is not None and len(set(self.lengths)) > 1:
            self.mask = decode_key_mask(self.positions, self.end)
        self.length = 0  # GPT2Decoder.forward advances it; `commit` is what counts

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        if len(self.slots) == 1:  # a plain slice write (no index tensors)
            slot, pos = self.slots[0], self.lengths[0]
            keys[slot, :, pos] = key[0, :, 0]
            values[slot, :, pos] = value[0, :, 0]
            return keys, values
        return write_rows(keys, values, self.index, self.positions, key, value)

    def attention(self, attend: Any) -> Any:
        def slot_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: AttentionMask,
                           scale: float) -> torch.Tensor:
            if self.run is not None:
                first, last = self.run
                return attend(q, keys[first:last, :, : self.end], values[first:last, :, : self.end], self.mask, scale)
            outputs = [attend(q[i : i + 1], keys[s : s + 1, :, : n + 1], values[s : s + 1, :, : n + 1], _NO_MASK, scale)
                       for i, (s, n) in enumerate(zip(self.slots, self.lengths))]
            return torch.cat(outputs)

        return slot_attention

    def commit(self) -> None:
        for slot, length in zip(self.slots, self.lengths):
            self.cache.lengths[slot] = length + 1


class RecomputeGlobal:
    """Reference path (`use_kv_cache=False`): every step re-runs each sequence's whole history, alone."""

    def __init__(self, model: Any, slots: int, capacity: int, attend: Any, batch_invariant: bool = False) -> None:
        self.model, self.attend = model, attend
        self.history: list[list[torch.Tensor]] = [[] for _ in range(slots)]

    def reserve(self, rows: int) -> None:
        pass

    def release(self, slot: int) -> None:
        self.history[slot] = []

    def prefill(self, slot: int, embeds: torch.Tensor) -> torch.Tensor:
        self.history[slot] = [embeds]
        return self._run(slot)

    def decode(self, slots: list[int], embeds: torch.Tensor) -> torch.Tensor:
        for slot, row in zip(slots, embeds):
            self.history[slot].append(row)
        return torch.stack([self._run(slot) for slot in slots])

    def _run(self, slot: int) -> torch.Tensor:
        embeds = torch.cat(self.history[slot])[None]  # (1, T, H)
        mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        hidden, _ = self.model.run_global(embeds, mask, None, self.attend)
        return hidden[0, -1]


class ModelRunner:
    """One batched frame step for the sequences in `slots` slots (see the module docstring).

    Args:
        model: the model (only read).
        slots: sequences at once.
        use_kv_cache: the slot KV cache (False: the recompute reference path).
        batch_invariant: a row's results do not depend on the other rows of the step.
        batched_products_mode: run the steps inside `batched_products` (a shared engine's steps; a private core's
            rows are one caller's, which needs no such products).
        compile: the compiled local frame (`compiled_step`): True, False (eager) or None (the model's setting,
            `compiled_step.enable`). Batch-invariant runners stay eager (a graph's bucket padding shares products).
    """

    def __init__(self, model: Any, slots: int, *, use_kv_cache: bool = True, batch_invariant: bool = False,
                 batched_products_mode: bool = False, compile: Optional[bool] = None) -> None:
        self.model, self.slots, self.batch_invariant = model, slots, batch_invariant
        self.batched = batched_products_mode or batch_invariant
        config = model.config
        self.device = model.transformer.wte.weight.device
        global_name, local_name = model.kernel_plan().attention  # resolved once for this runner
        self.attend_local = ATTENTION_FUNCTIONS[local_name]
        global_cls = SlotGlobal if use_kv_cache else RecomputeGlobal
        self.global_ = global_cls(model, slots, CAPACITY_STEP, ATTENTION_FUNCTIONS[global_name], batch_invariant)
        self.use_kv_cache = use_kv_cache
        self.consts = frame_constants(model)
        self.seen = torch.zeros(config.n_vq, slots, max(config.audio_codebook_sizes), dtype=torch.bool,
                                device=self.device)
        self.next_embeds: list[Optional[torch.Tensor]] = [None] * slots
        self._locals: dict[tuple[int, int], LocalRunner] = {}
        self._sampler_key: Any = None
        self._sampler: Optional[RowSampler] = None
        wanted = compile_enabled(model) if compile is None else compile
        self.graphs = graphs_for(model, create=True) if wanted and use_kv_cache \
            and not batch_invariant else None
        if self.graphs is not None and self.graphs.backend == "capture":  # the decode is recorded too (per runner)
            from .step_capture import DecodeCaptures  # imported when first used: step_capture imports this module

            self.global_.captures = DecodeCaptures(self.graphs)

    def begin(self, slot: int, rows: int) -> None:
        """Free `slot` for a new sequence of up to `rows` rows (prompt plus frames)."""
        self.global_.release(slot)
        self.global_.reserve(rows)
        self.seen[:, slot] = False
        self.next_embeds[slot] = None

    def release(self, slot: int) -> None:
        self.global_.release(slot)
        self.next_embeds[slot] = None

    def checkpoint(self, slots: list[int]) -> list:
        """What a failed step may have advanced for `slots` (`restore` puts it back): lengths and next rows."""
        if isinstance(self.global_, SlotGlobal):
            lengths = [self.global_.cache.lengths[s] for s in slots]
        else:
            lengths = [len(self.global_.history[s]) for s in slots]
        return [(s, n, self.next_embeds[s]) for s, n in zip(slots, lengths)]

    def restore(self, saved: list) -> None:
        for slot, length, embeds in saved:
            if isinstance(self.global_, SlotGlobal):
                self.global_.cache.lengths[slot] = length
            else:
                del self.global_.history[slot][length:]
            self.next_embeds[slot] = embeds

    @torch.inference_mode()
    def step(self, rows: Sequence[RowInput]) -> StepResult:
        """One frame for every row of `rows` (at most one per slot)."""
        context = batched_products(row_invariant=self.batch_invariant) if self.batched else contextlib.nullcontext()
        with context:
            h = self._global_step(rows)
            return self._local_step(rows, h)

    def _global_step(self, rows: Sequence[RowInput]) -> torch.Tensor:
        out: dict[int, torch.Tensor] = {}
        for row in rows:
            if row.prompt is not None:
                out[row.slot] = self.global_.prefill(row.slot, self.model.embed_rows(row.prompt[None])[0])
        steps = [row.slot for row in rows if row.prompt is None]
        if steps:
            embeds = torch.stack([self.next_embeds[slot] for slot in steps])  # (B, 1, H)
            out.update(zip(steps, self.global_.decode(steps, embeds)))
        return torch.stack([out[row.slot] for row in rows])  # (B, H)

    def _row_sampler(self, rows: Sequence[RowInput]) -> RowSampler:
        key = tuple((id(row.params), id(row.generator)) for row in rows)
        if key != self._sampler_key:
            generators = [row.generator for row in rows]
            shared = all(g is generators[0] for g in generators)  # one generator for all: drawn as one batch
            self._sampler = RowSampler([row.params for row in rows], generators[0] if shared else generators,
                                       self.model.config.n_vq)
            self._sampler_key = key
        return self._sampler

    def _local_runner(self, batch: int, nq: int) -> LocalRunner:
        key = (batch, nq)
        if key not in self._locals:
            self._locals[key] = LocalRunner(self.model, batch, nq, self.attend_local, self.use_kv_cache)
        return self._locals[key]

    def _local_step(self, rows: Sequence[RowInput], h: torch.Tensor) -> StepResult:
        config = self.model.config
        sampler = self._row_sampler(rows)
        slots = [row.slot for row in rows]
        index = torch.tensor(slots, device=self.device)
        seen = self.seen[: sampler.nq, index] if sampler.tracks_repetition else None  # (nq, B, V) copy
        active = torch.ones(len(rows), dtype=torch.bool, device=self.device)
        forced = [row.forced for row in rows]
        force = (all(forced) or torch.tensor(forced, device=self.device)) if any(forced) else False
        compiled = self.graphs.frame(len(rows), sampler, self.attend_local) if self.graphs is not None else None
        result = compiled.run(h, sampler, seen, torch.tensor(forced, device=self.device)) if compiled else None
        if result is not None:
            frame, seen = result
        else:
            frame = sample_frame(self.model, h, self._local_runner(len(rows), sampler.nq), sampler, seen, active,
                                 self.consts, force_continue=force)
        if seen is not None:
            self.seen[: sampler.nq, index] = seen
        for i, slot in enumerate(slots):
            self.next_embeds[slot] = frame.next_embeds[i]
        codes = torch.full((len(rows), config.n_vq), config.audio_pad_token_id, dtype=torch.long, device=self.device)
        counts = set(sampler.row_nq)
        if len(counts) == 1:
            codes[:, : sampler.nq] = frame.codes[:, : sampler.nq]
        for nq in counts if len(counts) > 1 else ():  # channels at or above a row's own nq hold the pad code
            chosen = torch.tensor([n == nq for n in sampler.row_nq], device=self.device)[:, None]
            codes[:, :nq] = torch.where(chosen, frame.codes[:, :nq], codes[:, :nq])
        flags = torch.stack((frame.text_finite, frame.audio_finite, frame.continues), dim=1).long()
        host = torch.cat((codes, flags), dim=1).cpu()  # the step's one host synchronisation
        text_ok, audio_ok, continues = host[:, -3:].bool().t().tolist()
        return StepResult(host[:, :-3], text_ok, audio_ok, continues)
