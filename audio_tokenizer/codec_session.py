"""Streaming decode: the slot-based decode session and the ``batch_decode(streaming=True)`` protocol on top of it."""

from __future__ import annotations

from typing import Hashable, Sequence

import torch
from transformers.utils import logging

from .codec_inputs import as_tensor

logger = logging.get_logger(__name__)


class MossAudioTokenizerDecodeSession:
    """Incremental decoding of several code streams that share ``max_batch_size`` physical slots.

    Every ``step`` decodes the call's frames in runs that advance the same slots (up to 8 frames per run); a frame's
    audio (3840 samples per channel) depends only on that frame and earlier ones, so any split of a stream into calls
    gives the same audio up to float rounding (within the spec's 1e-6 P streaming tolerance).

    The session owns its decoder state (``state``: per-stage key/value windows, offsets); the model only lends its
    weights. Why (upstream allows one session per model): a server keeps one stream per request on one shared codec,
    and interleaved requests must not see each other's history. Any number of sessions may be open on one model.

    Args:
        model: the ``MossAudioTokenizerModel``.
        max_batch_size: number of physical slots S.
        use_cuda_graph: accepted for upstream compatibility and ignored (a warning is logged).

    Raises:
        ValueError: ``max_batch_size`` is not a positive integer.
    """

    def __init__(self, model, max_batch_size: int, use_cuda_graph: bool = False) -> None:
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size <= 0:
            raise ValueError(f"max_batch_size={max_batch_size!r} must be a positive integer")
        if use_cuda_graph:
            logger.warning_once("use_cuda_graph=True is ignored: this codec decodes without CUDA graphs")
        self.model = model
        self.max_batch_size = max_batch_size
        self.active_request_ids: list[Hashable] = []
        self._slot_of: dict[Hashable, int] = {}
        self._free_slots = list(range(max_batch_size))
        self.code_offsets: dict[Hashable, int] = {}
        self.audio_offsets: dict[Hashable, int] = {}
        self._closed = False
        self.state = model._new_stream_state(model.decoder, max_batch_size)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "MossAudioTokenizerDecodeSession":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this decode session is closed; create a new one with model.create_decode_session()")

    def append(self, request_id: Hashable) -> int:
        """Give ``request_id`` the lowest free slot and add it at the end of ``active_request_ids``.

        Returns:
            the slot index.

        Raises:
            RuntimeError: the id is already active, no slot is free, or the session is closed.
        """
        self._check_open()
        if request_id in self._slot_of:
            raise RuntimeError(f"request_id={request_id!r} is already active in this decode session")
        if not self._free_slots:
            raise RuntimeError(f"all {self.max_batch_size} slots of this decode session are in use")
        slot = self._free_slots.pop(0)
        self._slot_of[request_id] = slot
        self.active_request_ids.append(request_id)
        self.code_offsets[request_id] = 0
        self.audio_offsets[request_id] = 0
        return slot

    @torch.inference_mode()
    def remove(self, request_id: Hashable) -> None:
        """Reset the slot of ``request_id`` and free it.

        Raises:
            RuntimeError: unknown ``request_id`` or closed session.
        """
        self._check_open()
        if request_id not in self._slot_of:
            raise RuntimeError(f"request_id={request_id!r} is not active in this decode session")
        slot = self._slot_of.pop(request_id)
        self.active_request_ids.remove(request_id)
        self.code_offsets.pop(request_id, None)
        self.audio_offsets.pop(request_id, None)
        self.state.reset_slot(slot)
        self._free_slots.append(slot)
        self._free_slots.sort()

    def _pack(self, codes, code_lengths, rows: int, validate: bool) -> tuple[torch.Tensor, list[int]]:
        codes = as_tensor(codes, "codes")
        if codes.dim() == 2:
            codes = codes[:, None]
        if codes.dim() != 3 or codes.shape[1] != rows:
            raise ValueError(f"codes has shape {tuple(codes.shape)}; expected (num_quantizers, {rows}, frames)")
        if validate:
            codes = self.model._check_code_matrix(codes.reshape(codes.shape[0], -1), "codes").view(codes.shape)
        lengths = [int(n) for n in torch.as_tensor(code_lengths).reshape(-1).tolist()]
        if len(lengths) != rows or any(not 0 <= n <= codes.shape[-1] for n in lengths) or not any(lengths):
            raise ValueError(f"code_lengths={lengths} must hold {rows} values in 0..{codes.shape[-1]}, one > 0")
        packed = codes.new_zeros((codes.shape[0], self.max_batch_size, max(lengths)))  # (nq, S, L)
        slot_lengths = [0] * self.max_batch_size
        for row, request_id in enumerate(self.active_request_ids):
            slot = self._slot_of[request_id]
            packed[:, slot] = codes[:, row, : packed.shape[-1]]
            slot_lengths[slot] = lengths[row]
        return packed, slot_lengths

    @torch.inference_mode()
    def step(self, request_ids: Sequence[Hashable], codes: torch.Tensor, code_lengths: torch.Tensor | Sequence[int]
             ) -> tuple[list[Hashable], torch.Tensor, torch.Tensor]:
        """Decode the next frames of every active request.

        Args:
            request_ids: exactly ``active_request_ids``, in order.
            codes: ``(nq, n, L)`` (or ``(nq, L)`` for one request) integer codes in ``[0, codebook_size)``.
            code_lengths: ``(n,)`` new frames per request, each in ``0..L``, at least one > 0.

        Returns:
            ``(request_ids, audio (n, channels, 3840 * max len) zero-padded, audio_lengths (n,) int64)``.

        Raises:
            ValueError: ids out of order, bad shapes, codes or lengths. Any error during decoding closes the session.
        """
        return self._step(request_ids, codes, code_lengths, validate=True)

    def _step(self, request_ids, codes, code_lengths, validate: bool):
        self._check_open()
        request_ids = list(request_ids)
        if request_ids != self.active_request_ids:
            raise ValueError(f"request_ids={request_ids} must equal active_request_ids={self.active_request_ids}")
        packed, slot_lengths = self._pack(codes, code_lengths, len(request_ids), validate)
        try:
            audio = self.model._decode_session_frames(packed.to(self.model.device), slot_lengths, self.state)
        except BaseException:
            self.close()
            raise
        slots = [self._slot_of[r] for r in request_ids]
        frame = self.model.downsample_rate
        lengths = [slot_lengths[s] for s in slots]
        audio = audio[torch.tensor(slots, device=audio.device)]
        audio_lengths = torch.tensor([n * frame for n in lengths], dtype=torch.int64)
        sample = torch.arange(audio.shape[-1], device=audio.device)
        audio = torch.where(sample < audio_lengths.to(audio.device)[:, None, None], audio, 0.0)
        for request_id, n in zip(request_ids, lengths):
            self.code_offsets[request_id] += n
            self.audio_offsets[request_id] += n * frame
        return request_ids, audio, audio_lengths

    def close(self) -> None:
        """Free this session's state (idempotent); other sessions on the model are untouched."""
        self._closed = True
        self.state = None


class StreamingDecodeController:
    """Bookkeeping of ``batch_decode(streaming=True)``: row identity, new requests and ``finalize_indices``.

    Upstream's streaming API keeps one stream per model object; this controller is that one default session, for
    callers that use the API alone. Concurrent streams each open their own ``create_decode_session``.
    """

    def __init__(self, model) -> None:
        self.model = model
        self.session: MossAudioTokenizerDecodeSession | None = None
        self.max_batch_size: int | None = None
        self.next_request_id = 0

    def reset(self) -> None:
        """Close the session, if any, and forget its bookkeeping (idempotent)."""
        session, self.session = self.session, None
        self.max_batch_size, self.next_request_id = None, 0
        if session is not None:
            session.close()

    def _ensure_session(self, rows: int, max_batch_size, use_cuda_graph: bool) -> MossAudioTokenizerDecodeSession:
        if self.session is not None and self.session.closed:
            self.reset()
        if self.session is None:
            size = rows if max_batch_size is None else max_batch_size
            self.session = self.model.create_decode_session(size, use_cuda_graph)
            self.max_batch_size, self.next_request_id = size, 0
        elif max_batch_size is not None and max_batch_size != self.max_batch_size:
            raise ValueError(f"max_batch_size={max_batch_size!r} differs from this stream's {self.max_batch_size}; "
                             "pass it unchanged or use reset_stream=True")
        if rows > self.max_batch_size:
            raise ValueError(f"{rows} code rows exceed this stream's max_batch_size={self.max_batch_size}")
        return self.session

    @staticmethod
    def _check_finalize(finalize_indices, active: int) -> list[int]:
        indices = [] if finalize_indices is None else [int(i) for i in finalize_indices]
        if len(set(indices)) != len(indices) or any(not 0 <= i < active for i in indices):
            raise ValueError(f"finalize_indices={indices} must be unique indices into the {active} rows that were "
                             "active before this call")
        return indices

    def decode(self, items: list[torch.Tensor], max_batch_size, finalize_indices, reset_stream: bool,
               use_cuda_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One streaming call; ``items`` are validated ``(nq, N_i)`` codes. Returns ``(audio, audio_lengths)``."""
        if reset_stream:
            self.reset()
        session = self._ensure_session(len(items), max_batch_size, use_cuda_graph)
        active = list(session.active_request_ids)
        if len(items) < len(active):
            raise ValueError(f"{len(items)} code rows given but {len(active)} rows are active; pass a "
                             "(num_quantizers, 0) row for a request without new frames")
        finalize = self._check_finalize(finalize_indices, len(active))
        lengths = [item.shape[-1] for item in items]
        if not any(lengths):
            self.reset()
            raise ValueError("every row of this streaming batch_decode call is empty; the stream was closed")
        try:
            for _ in range(len(items) - len(active)):
                session.append(self.next_request_id)
                self.next_request_id += 1
            codes = self.model._pad_codes(items)  # (nq, n, L)
            _, audio, audio_lengths = session._step(session.active_request_ids, codes, lengths, validate=False)
            for index in finalize:
                session.remove(active[index])
        except BaseException:
            self.reset()
            raise
        return audio, audio_lengths
