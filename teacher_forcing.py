"""Teacher forcing and the deterministic measurements verification compares: a model-level computation.

`teacher_forced_logits` gives the logits of every generation step with given frames fed back instead of sampled
ones (the same computation as greedy generation, in one pass). The `measure_*` helpers run one deterministic
measurement each (global hidden states, greedy codes, teacher-forced logits, codec decode) and return CPU tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from . import compiled_step
from .generation import LocalRunner, audio_logits, frame_constants, text_logits
from .pipeline import decode_frames
from .sampling import resolve_nq
from .verification_metrics import all_finite

@dataclass
class TeacherForcedLogits:
    """Logits of every generation step when the given frames are fed back (teacher forcing).

    Attributes:
        text: (B, F, 2) logits of the two text candidates [continue slot, audio_end] per frame.
        audio: (B, F, nq, audio_vocab_size) logits of every codebook per frame (raw head outputs).
        codebook_sizes: valid code range per codebook (argmax looks only below it).
        step: the local step that computed them: "eager", or `compiled_step.status` of the compiled one.
    """

    text: torch.Tensor
    audio: torch.Tensor
    codebook_sizes: tuple[int, ...]
    step: str = "eager"

    def argmax_codes(self) -> torch.LongTensor:
        """(B, F, nq) greedy codes: argmax within each codebook's size, first index on ties."""
        columns = [self.audio[..., i, : self.codebook_sizes[i]].argmax(-1) for i in range(self.audio.shape[-2])]
        return torch.stack(columns, dim=-1)

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> "TeacherForcedLogits":
        # Copy first, then widen (see verification_metrics._flat64): the cast runs where the tensors arrive, not on
        # the accelerator.
        return TeacherForcedLogits(self.text.to(device).to(dtype), self.audio.to(device).to(dtype), self.codebook_sizes,
                                   self.step)


def _frame_rows(model: Any, audio_token_ids: torch.Tensor, nq: int, batch: int) -> torch.Tensor:
    """The rows generation feeds back after each frame: [continue slot, codes (channels >= nq padded)]."""
    config = model.config
    shape = tuple(audio_token_ids.shape)
    if len(shape) != 3 or shape[0] != batch or shape[2] != config.n_vq or shape[1] < 1:
        raise ValueError(f"audio_token_ids is {shape}: expected ({batch}, frames >= 1, {config.n_vq})")
    codes = audio_token_ids.long().clone()
    codes[..., nq:] = config.audio_pad_token_id
    slot = torch.full_like(codes[..., :1], config.audio_assistant_slot_token_id)
    return torch.cat((slot, codes), dim=-1)  # (B, F, n_vq + 1)


@torch.inference_mode()
def teacher_forced_logits(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    audio_token_ids: torch.Tensor,
    nq: Optional[int] = None,
    compile: Optional[bool] = None,
) -> TeacherForcedLogits:
    """Text and audio logits of every step of generation, with the given frames fed back instead of sampled ones.

    The same computation as greedy generation (docs/model.md) in one pass: the global decoder runs over the prompt
    rows plus the rows of frames 0..F-2 (the hidden state before frame t is the output at the row preceding it);
    the local decoder runs, per frame, over [h, wte(continue slot), emb_0(c_0), ..., emb_{nq-2}(c_{nq-2})].
    Position 0 gives the two text-candidate logits, position i + 1 codebook i's logits. Every frame is treated as
    produced by a row that continued (pass only real frames).

    Args:
        model: a `MossTTSNanoForCausalLM`.
        input_ids: (B, T, n_vq + 1) left-padded prompt rows.
        attention_mask: (B, T), False on padding; None means no padding.
        audio_token_ids: (B, F, n_vq) frames to feed back (F >= 1).
        nq: codebooks in use (1..n_vq, default all); channels >= nq are ignored.
        compile: run the local part through the compiled frame step (compiled_step.py), one frame at a time as
            generation runs it: True, False (eager) or None (the model's setting, `compiled_step.enable`). Where the
            compiled step falls back, eager runs; `step` of the result says which ran.

    Returns:
        `TeacherForcedLogits` on the model's device and in its dtype.

    Raises:
        ValueError: for malformed rows, mask, frames or nq.
    """
    config = model.config
    nq = resolve_nq(nq, config.n_vq)
    weight = model.transformer.wte.weight
    input_ids = model.check_input_ids(input_ids).to(weight.device)
    batch, length = input_ids.shape[:2]
    mask = model.check_attention_mask(attention_mask, batch, length)
    mask = torch.ones(batch, length, dtype=torch.bool) if mask is None else mask
    frames = _frame_rows(model, audio_token_ids.to(weight.device), nq, batch)  # (B, F, n_vq + 1)
    rows = torch.cat((input_ids, frames[:, :-1]), dim=1)
    rows_mask = torch.cat((mask.to(weight.device), torch.ones_like(frames[:, :-1, 0], dtype=torch.bool)), dim=1)
    attend_global, attend_local = model.attention_functions()
    hidden, _ = model.run_global(model.embed_rows(rows), rows_mask, None, attend_global)
    h = hidden[:, length - 1 :]  # (B, F, H): the state each frame is generated from
    wanted = compiled_step.enabled(model) if compile is None else compile
    graphs = compiled_step.graphs_for(model, create=True) if wanted else None
    compiled = compiled_step.teacher_forced_local(graphs, h, frames[..., 1:], nq, attend_local) if graphs else None
    if compiled is None:
        return _local_logits(model, h, frames[..., 1:], nq, attend_local)
    text, audio = compiled
    return TeacherForcedLogits(text, audio, tuple(config.audio_codebook_sizes[:nq]), compiled_step.status(model))


def _local_logits(model: Any, h: torch.Tensor, codes: torch.Tensor, nq: int, attend: Any) -> TeacherForcedLogits:
    """Run the local decoder teacher-forced for every frame at once: (B, F, H) states, (B, F, n_vq) codes."""
    batch, frames, hidden = h.shape
    consts = frame_constants(model)
    slot = consts.continue_embedding.expand(batch, frames, hidden)
    inputs = [h, slot] + [model.audio_embeddings[i](codes[..., i]) for i in range(nq - 1)]
    sequence = torch.stack(inputs, dim=2).reshape(batch * frames, nq + 1, hidden)  # (B * F, nq + 1, H)
    out = LocalRunner(model, batch * frames, nq, attend, use_kv_cache=False).run(sequence)
    text = text_logits(out[:, 0], consts)  # (B * F, 2)
    audio = torch.stack([audio_logits(model, out[:, i + 1], i) for i in range(nq)], dim=1)  # (B * F, nq, V)
    return TeacherForcedLogits(
        text=text.reshape(batch, frames, 2),
        audio=audio.reshape(batch, frames, nq, -1),
        codebook_sizes=tuple(model.config.audio_codebook_sizes[:nq]),
    )


# ---------------------------------------------------------------------------------------------------- measurements


def measure_hidden(model: Any, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(last global hidden states (B, T, H) as CPU float32, whether every layer's hidden states are finite)."""
    device = model.transformer.wte.weight.device
    with torch.no_grad():
        out = model(input_ids.to(device), mask.to(device), output_hidden_states=True)
    finite = all_finite(*out.hidden_states)
    return out.last_hidden_state.cpu().float(), finite


def measure_greedy(model: Any, input_ids: torch.Tensor, mask: torch.Tensor, frames: int, nq: int) -> torch.Tensor:
    """Greedy codes (real frames, n_vq) on CPU, repetition penalty 1.0 (so teacher forcing can reproduce them)."""
    device = model.transformer.wte.weight.device
    out = model.generate(input_ids.to(device), mask.to(device), max_new_frames=frames, do_sample=False,
                         audio_repetition_penalty=1.0, nq=nq)
    return out.audio_token_ids[0, : int(out.num_frames[0])].cpu()


def measure_logits(model: Any, input_ids: torch.Tensor, mask: torch.Tensor, codes: torch.Tensor,
                   nq: int) -> TeacherForcedLogits:
    """Teacher-forced logits of `codes` (frames, n_vq) as CPU float32."""
    return teacher_forced_logits(model, input_ids, mask, codes[None], nq).to("cpu")


def measure_codec(codec: Any, codes: torch.Tensor, nq: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Decode `codes` (frames, n_vq) on `device` with the codec's compute dtype set to `dtype` -> (2, N) CPU float32."""
    previous = codec.compute_dtype_name
    codec.to(device)
    codec.set_compute_dtype(dtype)
    try:
        return decode_frames(codec, [codes], nq)[0]
    finally:
        codec.set_compute_dtype(previous)
