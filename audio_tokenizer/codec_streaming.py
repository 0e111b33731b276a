"""Stepwise runs of the codec's stacks, each through a streaming state (``StackStreamState``), as a mixin of
``MossAudioTokenizerModel``: chunked ``batch_encode`` / ``batch_decode`` (through the call's own state), upstream's
per-object ``streaming()`` context, and the frames of decode sessions (``create_decode_session``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

from .codec_inputs import pad_right, plan_chunk_steps
from .codec_layers import StackStreamState, StepGate
from .codec_outputs import MossAudioTokenizerDecoderOutput, MossAudioTokenizerEncoderOutput
from .codec_session import MossAudioTokenizerDecodeSession

# Longest streaming step: a chunk of Lc tokens attends context + Lc keys, so long calls (e.g. priming with a prompt)
# run in steps of 8 frames (256 tokens against a 1600-token window at the last released stage).
MAX_STEP_FRAMES = 8


class CodecStreaming:
    """The stepwise half of ``MossAudioTokenizerModel`` (mixed into the model class; uses its stacks and quantizer)."""

    def _new_stream_state(self, stack: nn.ModuleList, slots: int) -> StackStreamState:
        """Fresh streaming state of ``stack`` for ``slots`` rows, on the parameters' device (owned by the caller)."""
        return StackStreamState(self._stages(stack), slots, self.device)

    def _context_state(self, name: str) -> StackStreamState | None:
        """The ``streaming()`` context's state of the "encoder" or "decoder" stack (None outside the context)."""
        return None if self._streaming_context is None else self._streaming_context[name]

    # ----------------------------------------------------------------------------------- chunked one-shot

    def _encode_chunked(self, items: list[torch.Tensor], lengths: list[int], nq: int, chunk: int):
        frame = self.downsample_rate
        # Tails shorter than a frame hold no valid frame and nothing follows them: they are skipped.
        steps = [(size, active) for size, active in plan_chunk_steps(lengths, chunk, frame) if size >= frame]
        codes: list[list[torch.Tensor]] = [[] for _ in items]
        hidden: list[list[torch.Tensor]] = [[] for _ in items]
        positions = [0] * len(items)
        state = self._new_stream_state(self.encoder, len(items))  # this call's own: any other stream may run
        for size, active in steps:
            batch = items[0].new_zeros((len(items), self.number_channels, size))
            for row, is_active in enumerate(active):
                if is_active:
                    batch[row] = items[row][:, positions[row]: positions[row] + size]
                    positions[row] += size
            state.set_gate(StepGate.from_rows(active, self.device))
            step_hidden, _ = self._encode_hidden(batch, None, state)
            frames = torch.full((len(items),), size // frame, dtype=torch.int64, device=step_hidden.device)
            step_codes = self.quantizer.encode(step_hidden, frames, nq)
            for row in (r for r, is_active in enumerate(active) if is_active):
                codes[row].append(step_codes[:, row])
                hidden[row].append(step_hidden[row])
        return self._stack_chunked_encode(codes, hidden, nq)

    def _stack_chunked_encode(self, codes, hidden, nq: int) -> MossAudioTokenizerEncoderOutput:
        device = self.device
        width = self.config.quantizer_kwargs["input_dim"]
        code_rows = [torch.cat(c, dim=-1) if c else torch.zeros(nq, 0, dtype=torch.int64, device=device)
                     for c in codes]
        hidden_rows = [torch.cat(h, dim=-1) if h else torch.zeros(width, 0, device=device) for h in hidden]
        lengths = torch.tensor([c.shape[-1] for c in code_rows], dtype=torch.int64, device=device)
        return MossAudioTokenizerEncoderOutput(pad_right(code_rows).transpose(0, 1), lengths, pad_right(hidden_rows))

    def _decode_chunked(self, items: list[torch.Tensor], lengths: list[int], chunk: int):
        frame = self.downsample_rate
        pieces: list[list[torch.Tensor]] = [[] for _ in items]
        positions = [0] * len(items)
        state = self._new_stream_state(self.decoder, len(items))  # this call's own: any other stream may run
        for size, active in plan_chunk_steps(lengths, chunk, 1):
            codes = items[0].new_zeros((items[0].shape[0], len(items), size), device=self.device)
            for row in (r for r, is_active in enumerate(active) if is_active):
                codes[:, row] = items[row][:, positions[row]: positions[row] + size]
                positions[row] += size
            state.set_gate(StepGate.from_rows(active, self.device))
            audio = self._decode_embedding(self.quantizer.decode(codes), None, state)
            for row in (r for r, is_active in enumerate(active) if is_active):
                pieces[row].append(audio[row])
        empty = torch.zeros(self.number_channels, 0, device=self.device)
        rows = [torch.cat(p, dim=-1) if p else empty for p in pieces]
        audio_lengths = torch.tensor([n * frame for n in lengths], dtype=torch.int64, device=self.device)
        return MossAudioTokenizerDecoderOutput(pad_right(rows), audio_lengths)

    # ------------------------------------------------------------------------------------ public: streaming

    @contextlib.contextmanager
    def streaming(self, batch_size: int = 1) -> Iterator["MossAudioTokenizerModel"]:
        """Upstream's per-object streaming mode: encoder and decoder calls made on this model inside the context
        stream through one fresh state for ``batch_size`` rows, cleared on exit.

        The state belongs to the model object, so one caller at a time may use this mode (as upstream); decode
        sessions (``create_decode_session``) and every other call keep their own state and are unaffected.

        Raises:
            ValueError: ``batch_size`` is not a positive integer.
            RuntimeError: the model is already inside ``streaming()``.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
        if self._streaming_context is not None:
            raise RuntimeError("the model is already streaming; leave the current streaming() context first")
        self._streaming_context = {"encoder": self._new_stream_state(self.encoder, batch_size),
                                   "decoder": self._new_stream_state(self.decoder, batch_size)}
        try:
            yield self
        finally:
            self._streaming_context = None

    def _set_streaming_exec_mask(self, mask: torch.Tensor | Sequence[bool]) -> None:
        """Gate state updates per ``streaming()`` row: rows where ``mask`` is False compute but keep their state."""
        if self._streaming_context is None:
            raise RuntimeError("the model is not streaming; call this inside the streaming() context")
        rows = [bool(v) for v in torch.as_tensor(mask).reshape(-1).tolist()]
        slots = self._streaming_context["decoder"].num_slots
        if len(rows) != slots:
            raise ValueError(f"exec mask has {len(rows)} entries; the model streams {slots} rows")
        gate = StepGate.from_rows(rows, self.device)
        for state in self._streaming_context.values():
            state.set_gate(gate)

    def create_decode_session(self, max_batch_size: int, use_cuda_graph: bool = False
                              ) -> MossAudioTokenizerDecodeSession:
        """Open a streaming decode session with ``max_batch_size`` slots.

        The session owns its streaming state (per-stage key/value windows and offsets): any number of sessions
        can be open on one model at once, in one thread or several, beside one-shot encode/decode calls; closing
        one never touches another. One session is meant for one caller (do not step it from two threads at once).

        Raises:
            ValueError: ``max_batch_size <= 0``.
        """
        return MossAudioTokenizerDecodeSession(self, max_batch_size, use_cuda_graph)

    def _reset_batch_decode_streaming_state(self) -> None:
        """Close the ``batch_decode(streaming=True)`` session, if any, and clear its bookkeeping (idempotent)."""
        self._stream_decode.reset()

    @staticmethod
    def _session_segments(slot_lengths: list[int]) -> list[tuple[int, int, list[bool]]]:
        """Split ``0..max(slot_lengths)`` into runs of at most ``MAX_STEP_FRAMES`` frames that advance the same
        slots: ``(start, stop, rows)``."""
        bounds = sorted({0, *slot_lengths})
        return [(a, min(a + MAX_STEP_FRAMES, b), [n >= b for n in slot_lengths])
                for start, b in zip(bounds, bounds[1:]) for a in range(start, b, MAX_STEP_FRAMES)]

    def _decode_session_frames(self, codes: torch.Tensor, slot_lengths: list[int], state: StackStreamState
                               ) -> torch.Tensor:
        """Decode ``codes (nq, S, L)`` through the decoder state ``state``; frame f advances the slots with
        length > f.

        Why whole runs of frames per step (upstream steps one frame at a time): the decoder is causal within a
        chunk and the window rule ``0 <= p_t - p_j < ctx`` does not depend on the chunk size, so a run of frames
        that advances the same slots is one step with the same result (up to float rounding, well inside the
        spec's streaming tolerances), and it turns many tiny matmuls into a few larger ones.
        """
        outputs = []
        try:
            with self._compute_autocast(codes.device):
                for start, stop, rows in self._session_segments(slot_lengths):
                    state.set_gate(StepGate.from_rows(rows, codes.device))
                    x = self.quantizer.decode(codes[:, :, start:stop])  # (S, 768, n)
                    x, _ = self._run_stack(self.decoder, x, None, state)
                    outputs.append(x)
        finally:
            state.set_gate(StepGate())
        return self._deinterleave(torch.cat(outputs, dim=-1))
