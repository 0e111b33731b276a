"""The speech server's response formats: wav, pcm, flac, mp3, opus and aac, whole or as they are generated.

The model speaks 48 kHz stereo. A response is that audio, optionally time-stretched (``speed``, FFmpeg's
pitch-preserving ``atempo`` filter) and laid out in the server's output layout (``48k-stereo``, or OpenAI's
``24k-mono``), then 16-bit PCM, a WAV (an open-length header when streamed), FLAC (libsndfile, whole only: its
header holds the length) or an mp3 / Ogg Opus / ADTS AAC stream encoded by FFmpeg through PyAV. Every step keeps
its state across pieces, so feeding the audio in pieces gives the bytes of feeding it whole.
"""

from __future__ import annotations

import importlib
import io
import struct
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import torch

MODEL_SAMPLE_RATE, MODEL_CHANNELS = 48000, 2
BYTES_PER_SAMPLE = 2  # 16-bit PCM
MIN_SPEED, MAX_SPEED = 0.25, 4.0


@dataclass(frozen=True)
class AudioLayout:
    """Sample rate and channel count of the audio a response carries."""

    sample_rate: int
    channels: int

    @property
    def native(self) -> bool:
        return (self.sample_rate, self.channels) == (MODEL_SAMPLE_RATE, MODEL_CHANNELS)


OUTPUT_LAYOUTS = {"48k-stereo": AudioLayout(48000, 2), "24k-mono": AudioLayout(24000, 1)}


@dataclass(frozen=True)
class ResponseFormat:
    media_type: str
    streamable: bool
    container: str | None = None  # FFmpeg muxer and encoder, for the compressed formats
    codec: str | None = None
    options: tuple = ()  # muxer options



RESPONSE_FORMATS = {
    "mp3": ResponseFormat("audio/mpeg", True, "mp3", "libmp3lame"),
    "opus": ResponseFormat("audio/opus", True, "ogg", "libopus", (("page_duration", "100000"),)),  # 100 ms pages
    "aac": ResponseFormat("audio/aac", True, "adts", "aac"),
    "flac": ResponseFormat("audio/flac", False),
    "wav": ResponseFormat("audio/wav", True),
    "pcm": ResponseFormat("audio/pcm", True),
}


def _av() -> Any:
    try:
        return importlib.import_module("av")
    except ImportError as exc:
        raise RuntimeError("mp3, opus, aac and speed need PyAV: pip install -r requirements-serve.txt") from exc


def clipped_samples(waveform: torch.Tensor) -> np.ndarray:
    """``[channels, n]`` float32 samples in [-1, 1] (NaN as 0), as a NumPy array.

    Why NumPy: these conversions run in the server's request threads. A torch operation that large runs on an
    OpenMP thread team of the calling thread, and once a second thread of the process holds a team, GNU OpenMP cuts
    the spin-wait of every team (more pooled threads than CPUs): the engine's frame step then ran about 30% slower
    (2-core Zen 4, docs/performance.md). NumPy uses no OpenMP."""
    samples = waveform.detach().float().cpu().numpy()
    return np.clip(np.nan_to_num(samples, nan=0.0), -1.0, 1.0)


def pcm16(waveform: torch.Tensor) -> bytes:
    """``[channels, n]`` float audio to interleaved 16-bit little-endian PCM (clipped; scaled like libsndfile)."""
    ints = np.rint(clipped_samples(waveform) * np.float32(32767.0)).astype("<i2")  # (C, n); half to even like torch
    return np.ascontiguousarray(ints.T).tobytes()


def wav_header(frames: int | None, layout: AudioLayout = OUTPUT_LAYOUTS["48k-stereo"]) -> bytes:
    """A 44-byte PCM WAV header; ``frames=None`` writes the open length (0xFFFFFFFF) of a stream."""
    block = layout.channels * BYTES_PER_SAMPLE
    data = 0xFFFFFFFF if frames is None else frames * block
    riff = 0xFFFFFFFF if frames is None else 36 + data
    return struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", riff, b"WAVE", b"fmt ", 16, 1, layout.channels,
                       layout.sample_rate, layout.sample_rate * block, block, 8 * BYTES_PER_SAMPLE, b"data", data)


def atempo_factors(speed: float) -> list[float]:
    """``speed`` as a chain of atempo factors each within [0.5, 2] (the range every FFmpeg release accepts)."""
    if not MIN_SPEED <= speed <= MAX_SPEED:
        raise ValueError(f"speed must be in [{MIN_SPEED}, {MAX_SPEED}], got {speed}")
    factors = []
    while speed < 0.5:
        factors.append(0.5)
        speed /= 0.5
    while speed > 2.0:
        factors.append(2.0)
        speed /= 2.0
    return [*factors, speed]


class PcmShaper:
    """Model audio in pieces to 16-bit interleaved PCM in ``layout`` at ``speed`` (an FFmpeg filter graph when either
    differs from the model's audio; the graph keeps its state between pieces)."""

    def __init__(self, layout: AudioLayout, speed: float = 1.0) -> None:
        self.layout, self.speed = layout, speed
        self.graph = None if layout.native and speed == 1.0 else self._build_graph()
        self.pts = 0

    def _build_graph(self) -> Any:
        av = _av()
        graph = av.filter.Graph()
        node = graph.add_abuffer(format="fltp", sample_rate=MODEL_SAMPLE_RATE, layout="stereo",
                                 time_base=Fraction(1, MODEL_SAMPLE_RATE))
        chain = [("atempo", f"{factor:.6f}") for factor in atempo_factors(self.speed) if factor != 1.0]
        mono = "mono" if self.layout.channels == 1 else "stereo"
        chain.append(("aformat", f"sample_fmts=s16:sample_rates={self.layout.sample_rate}:channel_layouts={mono}"))
        for name, arguments in chain:
            step = graph.add(name, arguments)
            node.link_to(step)
            node = step
        sink = graph.add("abuffersink")
        node.link_to(sink)
        graph.configure()
        return graph

    def feed(self, waveform: torch.Tensor) -> bytes:
        if self.graph is None:
            return pcm16(waveform)
        if waveform.shape[-1] == 0:
            return b""
        samples = clipped_samples(waveform)
        frame = _av().AudioFrame.from_ndarray(np.ascontiguousarray(samples), format="fltp", layout="stereo")
        frame.sample_rate, frame.pts, frame.time_base = MODEL_SAMPLE_RATE, self.pts, Fraction(1, MODEL_SAMPLE_RATE)
        self.pts += samples.shape[-1]
        self.graph.push(frame)
        return self._pull()

    def finish(self) -> bytes:
        if self.graph is None:
            return b""
        self.graph.push(None)
        return self._pull()

    def _pull(self) -> bytes:
        av, out = _av(), []
        while True:
            try:
                frame = self.graph.pull()
            except (av.BlockingIOError, av.EOFError):
                return b"".join(out)
            out.append(frame.to_ndarray().astype("<i2", copy=False).tobytes())


class _Sink(io.RawIOBase):
    """What FFmpeg's muxer writes, collected until taken."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data, self.parts = b"".join(self.parts), []
        return data


class _CompressedWriter:
    """16-bit PCM pieces into an FFmpeg encoder and muxer (mp3, Ogg Opus, ADTS AAC)."""

    def __init__(self, fmt: ResponseFormat, layout: AudioLayout) -> None:
        av = _av()
        self.layout, self.sink = layout, _Sink()
        # bitexact: no random Ogg serial number or encoder tag, so equal audio gives equal bytes
        options = {"fflags": "+bitexact", **dict(fmt.options)}
        self.container = av.open(self.sink, "w", format=fmt.container, options=options)
        self.stream = self.container.add_stream(fmt.codec, rate=layout.sample_rate,
                                                layout="mono" if layout.channels == 1 else "stereo")

    def write(self, pcm: bytes) -> bytes:
        if pcm:
            samples = np.frombuffer(pcm, dtype="<i2").reshape(1, -1)  # packed: (1, n * channels)
            frame = _av().AudioFrame.from_ndarray(samples, format="s16", layout=self.stream.layout.name)
            frame.sample_rate = self.layout.sample_rate
            self._mux(self.stream.encode(frame))
        return self.sink.take()

    def close(self) -> bytes:
        self._mux(self.stream.encode(None))
        self.container.close()
        return self.sink.take()

    def _mux(self, packets: list) -> None:
        for packet in packets:
            self.container.mux(packet)


class AudioEncoder:
    """One response's audio, fed in pieces as it is generated; ``feed`` returns the bytes ready to send.

    Args:
        response_format: a key of RESPONSE_FORMATS.
        layout: the output layout.
        speed: 0.25-4.0; 1.0 leaves the audio untouched.
        stream: True for a body of unknown length (WAV: open-length header); FLAC cannot stream.
    """

    def __init__(self, response_format: str, layout: AudioLayout, speed: float = 1.0, stream: bool = False) -> None:
        self.format, self.layout, self.stream = response_format, layout, stream
        fmt = RESPONSE_FORMATS[response_format]
        if stream and not fmt.streamable:
            raise ValueError(f"response_format '{response_format}' cannot be streamed")
        self.shaper = PcmShaper(layout, speed)
        self.writer = _CompressedWriter(fmt, layout) if fmt.codec else None
        self.pending: list[bytes] = []  # whole wav / flac: the PCM until the length is known
        self.header_sent = False

    def feed(self, waveform: torch.Tensor) -> bytes:
        return self._emit(self.shaper.feed(waveform))

    def finish(self) -> bytes:
        tail = self._emit(self.shaper.finish())
        if self.writer is not None:
            return tail + self.writer.close()
        if self.stream or self.format == "pcm":
            return tail
        pcm = b"".join(self.pending)
        if self.format == "wav":
            return wav_header(len(pcm) // (self.layout.channels * BYTES_PER_SAMPLE), self.layout) + pcm
        return flac_bytes(pcm, self.layout)

    def _emit(self, pcm: bytes) -> bytes:
        if self.writer is not None:
            return self.writer.write(pcm)
        if self.format == "pcm":
            return pcm
        if not self.stream:
            self.pending.append(pcm)
            return b""
        head = b"" if self.header_sent else wav_header(None, self.layout)
        self.header_sent = True
        return head + pcm


def encode_audio(waveform: torch.Tensor, response_format: str, layout: AudioLayout = OUTPUT_LAYOUTS["48k-stereo"],
                 speed: float = 1.0) -> bytes:
    """A complete file (or raw PCM) of ``[2, n]`` 48 kHz float audio."""
    encoder = AudioEncoder(response_format, layout, speed)
    return encoder.feed(waveform) + encoder.finish()


def flac_bytes(pcm: bytes, layout: AudioLayout) -> bytes:
    import soundfile

    samples = np.frombuffer(pcm, dtype="<i2").reshape(-1, layout.channels)
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, layout.sample_rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()
