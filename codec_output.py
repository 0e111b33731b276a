"""Codec output of the engine core: frames to 48 kHz stereo audio, streamed in windows or decoded once at the end.

Streaming: each stream decodes its frames in windows whose size depends only on how many frames that stream has
decoded so far (`window_frames`): the first frame alone (first audio as early as possible), then growing windows
up to `STREAM_MAX_WINDOW` (less codec overhead per frame). So a streamed request gives the same bytes whatever runs
beside it and however fast the machine is. End-only: a request nobody listens to while it runs (`inference`, a
non-streamed server response, a file) is decoded once, whole, when it ends (`decode_generated`): one-shot decoding
is cheaper than windows and its bytes depend only on the codes.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .text_chunking import pause_seconds_after

TARGET_SAMPLE_RATE = 48000
SAMPLES_PER_FRAME = 3840
# (frames decoded so far below which, window frames): 1 + 1 + 2 + 4 frames, then windows of STREAM_MAX_WINDOW.
STREAM_WINDOWS = ((1, 1), (2, 1), (4, 2), (8, 4))
STREAM_MAX_WINDOW = 8


def window_frames(decoded: int) -> int:
    """The decode window of a stream that has decoded `decoded` frames so far (deterministic, see the module)."""
    return next((frames for limit, frames in STREAM_WINDOWS if decoded < limit), STREAM_MAX_WINDOW)


def pause_waveform(chunk: str) -> torch.Tensor:
    """The silence after a voice-clone text chunk."""
    return torch.zeros(2, int(round(pause_seconds_after(chunk) * TARGET_SAMPLE_RATE)))


def join_with_pauses(waves: list[torch.Tensor], chunks: list[str]) -> torch.Tensor:
    """Concatenate chunk waveforms with the pause after each chunk but the last."""
    parts: list[torch.Tensor] = []
    for i, (wave, chunk) in enumerate(zip(waves, chunks)):
        parts.append(wave)
        if i + 1 < len(waves):
            parts.append(pause_waveform(chunk))
    return torch.cat(parts, dim=-1) if parts else torch.zeros(2, 0)


def decode_frames(codec: Any, codes: list[torch.Tensor], nq: int, batch_size: Optional[int] = None
                  ) -> list[torch.Tensor]:
    """Decode per-row ``[N_i, >=nq]`` codes into ``[2, 3840 * N_i]`` float32 waveforms (CPU), one shot each."""
    waves: list[torch.Tensor] = [torch.zeros(2, 0) for _ in codes]
    todo = [i for i, c in enumerate(codes) if c.shape[0] > 0]
    step = max(1, batch_size or len(todo) or 1)
    device = next(codec.parameters()).device
    for start in range(0, len(todo), step):
        rows = todo[start : start + step]
        batch = [codes[i][:, :nq].transpose(0, 1).to(device) for i in rows]  # (nq, N_i)
        out = codec.batch_decode(batch, num_quantizers=nq)
        for j, i in enumerate(rows):
            waves[i] = out.audio[j, :, : int(out.audio_lengths[j])].float().cpu()
    return waves


def decode_generated(codec: Any, codes: list[torch.Tensor], continuation: bool, prompt_codes: Optional[torch.Tensor],
                     nq: int, batch_size: Optional[int] = None) -> list[torch.Tensor]:
    """End-only decoding of a request's chunks: each voice-clone chunk alone; continuation as one continuous waveform
    (prompt codes, if any, and every chunk's codes decoded together, the prompt's audio dropped)."""
    if not continuation:
        return decode_frames(codec, codes, nq, batch_size)
    width = codes[0].shape[1] if codes else nq
    prompt = prompt_codes.cpu() if prompt_codes is not None else torch.zeros(0, width, dtype=torch.long)
    wave = decode_frames(codec, [torch.cat([prompt, *codes], dim=0)], nq)[0]
    return [wave[:, prompt.shape[0] * SAMPLES_PER_FRAME :]]


class CodecStreams:
    """Streaming decode sessions, in one of two layouts chosen once (`shared`):

    - shared: one multi-slot decode session for every stream, and one batched step per call. Best where a step's
      cost hardly depends on its rows (accelerators, launch-bound), or where the codec allows one session only.
    - one session per stream, a step per stream with frames. Best on a CPU: there the codec's cost grows with the
      rows it computes, and a multi-slot session computes every slot at every step, advancing or not.

    Each stream counts its decoded frames and holds its frames until its window (`window_frames`) is full.
    """

    def __init__(self, codec: Any, slots: int, shared: Optional[bool] = None) -> None:
        self.codec, self.slots = codec, slots
        self.shared = not separate_codec_sessions(codec) if shared is None else shared
        self.sessions: dict[Any, Any] = {}  # stream id -> its session (the shared one, or its own)
        self.pending: dict[Any, list[torch.Tensor]] = {}
        self.decoded: dict[Any, int] = {}
        self._shared: Any = None
        self.device = next(codec.parameters()).device

    def open(self, stream: Any, prime: Optional[torch.Tensor] = None, nq: int = 0) -> None:
        """Open `stream`; `prime` (n, >= nq) codes are decoded and their audio dropped (continuation's prompt)."""
        if not self.shared:
            self.sessions[stream] = self.codec.create_decode_session(1)
        else:
            if self._shared is None or self._shared.closed:
                self._shared = self.codec.create_decode_session(self.slots)
            self.sessions[stream] = self._shared
        self.sessions[stream].append(stream)
        self.pending[stream], self.decoded[stream] = [], 0
        if prime is not None and prime.shape[0]:
            self._decode({stream: prime[:, :nq]}, nq)

    def push(self, stream: Any, frame: torch.Tensor) -> bool:
        """Queue one (n_vq,) CPU frame; return whether the stream's window is full."""
        self.pending[stream].append(frame)
        return len(self.pending[stream]) >= window_frames(self.decoded[stream])

    def flush(self, streams: list[Any], nq: dict) -> dict:
        """Decode the pending frames of `streams` (one call per codebook count); stream id -> (2, n) audio."""
        out = {}
        for count in sorted({nq[s] for s in streams if self.pending.get(s)}):
            group = {s: torch.stack(self.pending[s])[:, :count] for s in streams
                     if self.pending.get(s) and nq[s] == count}
            out.update(self._decode(group, count))
            for s, frames in group.items():
                self.decoded[s] += frames.shape[0]
                self.pending[s] = []
        return out

    def close(self, stream: Any) -> None:
        self.pending.pop(stream, None)
        self.decoded.pop(stream, None)
        session = self.sessions.pop(stream, None)
        if session is None or session.closed:  # a failed decode closes its session
            return
        session.remove(stream)
        if not session.active_request_ids:  # release the state (the shared session reopens on demand)
            session.close()

    def close_all(self) -> None:
        for stream in list(self.sessions):
            self.close(stream)

    def _decode(self, codes: dict, nq: int) -> dict:
        """`codes` maps stream id -> (n, nq) new frames; returns stream id -> (2, 3840 n) CPU float32 audio."""
        if not self.shared:
            return {stream: self._step(self.sessions[stream], {stream: new}, nq)[stream]
                    for stream, new in codes.items()}
        return self._step(self._shared, codes, nq)

    def _step(self, session: Any, codes: dict, nq: int) -> dict:
        """One session step for `codes`; the session's other streams get no frames."""
        ids = list(session.active_request_ids)
        length = max(c.shape[0] for c in codes.values())
        batch = torch.zeros(nq, len(ids), length, dtype=torch.long)
        lengths = []
        for row, stream in enumerate(ids):
            new = codes.get(stream)
            lengths.append(0 if new is None else new.shape[0])
            if new is not None:
                batch[:, row, : new.shape[0]] = new.transpose(0, 1)
        _, audio, audio_lengths = session.step(ids, batch.to(self.device), lengths)
        return {stream: audio[row, :, : int(audio_lengths[row])].float().cpu()
                for row, stream in enumerate(ids) if stream in codes}


def separate_codec_sessions(codec: Any) -> bool:
    """One decode session per stream: on a CPU, when the codec can hold several sessions open at once."""
    return next(codec.parameters()).device.type == "cpu" and bool(getattr(codec, "independent_decode_sessions", False))
