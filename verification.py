"""Acceptance checks of MOSS-TTS-Nano on a device and dtype against the CPU float32 reference (verify_npu.py).

Only deterministic work is compared (sampled audio legitimately differs between devices): global hidden states of
the prompt rows; teacher-forced logits (the reference prompt rows plus the reference greedy frames through the
global and local decoders: the two text-candidate logits and every codebook's audio logits per frame); greedy codes
(agreement, first divergent frame); codec decode of identical codes (SNR, max abs difference / peak, CODEC_SPEC §7).
A short sampled `model.inference(...)` run (its first frames forced, so that the model's decision to stop cannot end
it) must give finite audio without a float32 retry. Every check captures its own exceptions (device-side errors
included), so one failure never ends the run.
"""

from __future__ import annotations

import datetime
import gc
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from . import devices
from .generation import LocalRunner, audio_logits, frame_constants, text_logits
from .pipeline import decode_frames, encode_prompt_audio
from .prompting import infer_mode

logger = logging.getLogger(__name__)

REPORT_FORMAT = "moss-tts-nano-verification/1"
SMOKE_MIN_FRAMES = 4  # the smoke run generates at least this many frames (fewer only when max_new_frames is lower)
JSON_NAME = "npu_verification_report.json"
TABLE_NAME = "npu_verification_report.md"
REFERENCE_DEVICE = torch.device("cpu")
REFERENCE_DTYPE = torch.float32
REFERENCE_NOTE = (
    "CPU float32 is the reference: its agreement checks compare it with itself and pass by definition "
    "(finiteness is still checked)"
)
DTYPE_NAMES = {
    "auto": None, "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
    "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}

# ---------------------------------------------------------------------------------------------------- tolerances


@dataclass(frozen=True)
class Tolerance:
    """What a (device, dtype) run must meet against the CPU float32 reference.

    Attributes:
        dtype: the model dtype these limits are for.
        min_cosine: teacher-forced text and audio logits and the global hidden states.
        max_abs_rel: max |logits - reference| / max(1, max |reference logits|).
        min_argmax_agreement: fraction of teacher-forced audio argmaxes equal to the reference greedy codes.
        min_divergence_fraction: greedy codes: first divergent frame / frames (identical codes always pass).
        codec_max_abs_rel: max |waveform - reference| / peak |reference| (CODEC_SPEC §7 checks 11 and 12).
        codec_min_snr_db: signal-to-noise ratio of the decoded waveform against the reference.
        rationale: why these limits.
    """

    dtype: str
    min_cosine: float
    max_abs_rel: float
    min_argmax_agreement: float
    min_divergence_fraction: float
    codec_max_abs_rel: float
    codec_min_snr_db: float
    rationale: str


TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(
        "float32", 0.99999, 1e-3, 0.99, 0.5, 1e-4, 60.0,
        "fp32 on an accelerator only reorders reductions and fuses kernels: ~1e-6 relative per op, ~1e-5 after "
        "12 + 1 layers, while a wrong kernel (mask, RoPE, TF32/HF32 left on) shows > 1e-3. Greedy codes flip only "
        "at rare exact near-ties: identical, or diverging in the second half of the run. Codec: CODEC_SPEC §7 "
        "check 11 (<= 1e-4 * peak, i.e. > 70 dB SNR for speech-like audio; 60 dB leaves margin)."),
    "float16": Tolerance(
        "float16", 0.999, 5e-2, 0.9, 0.0, 5e-2, 15.0,
        "fp16 rounds every matmul and LayerNorm input to an 11-bit significand (unit roundoff 4.9e-4), ~1e-3 "
        "relative after 12 layers. Greedy decoding feeds its choices back, so one flipped near-tie changes every "
        "later frame: the divergence is reported, not gated; the teacher-forced logits and their argmax agreement "
        "bound the per-step error instead. Codec: CODEC_SPEC §7 check 12 (finite, <= 5e-2 * peak; ~15 dB SNR)."),
    "bfloat16": Tolerance(
        "bfloat16", 0.995, 1e-1, 0.8, 0.0, 5e-2, 15.0,
        "bf16 has an 8-bit significand (unit roundoff 3.9e-3), 8x coarser than fp16: looser logit limits; greedy "
        "divergence reported, not gated (as for fp16). Codec: CODEC_SPEC §7 check 12. Observed with the released-"
        "size demo on CPU: cosine 0.99999, argmax agreement 0.98, codec 37 dB."),
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def tolerance_for(dtype: str | torch.dtype) -> Tolerance:
    """The tolerances of a model dtype.

    Args:
        dtype: a torch dtype or a name ("float32"/"fp32", "float16"/"fp16", "bfloat16"/"bf16").

    Returns:
        The `Tolerance` for that dtype.

    Raises:
        ValueError: for any other dtype.
    """
    resolved = DTYPE_NAMES.get(dtype.strip().lower()) if isinstance(dtype, str) else dtype
    name = dtype_name(resolved) if isinstance(resolved, torch.dtype) else None
    if name not in TOLERANCES:
        raise ValueError(f"dtype={dtype!r} has no tolerances; allowed: {', '.join(TOLERANCES)} (or fp32/fp16/bf16)")
    return TOLERANCES[name]


# ---------------------------------------------------------------------------------------------------- metrics


def _flat64(tensor: Any) -> torch.Tensor:
    # Why copy first, then widen: `.to("cpu", torch.float64)` converts on the source device before the copy, and an
    # NPU has no float64 kernels for most ops (and would hold a 4x larger temporary).
    return torch.as_tensor(tensor).detach().cpu().to(torch.float64).flatten()


def _same_shape(reference: torch.Tensor, other: torch.Tensor, what: str) -> None:
    if tuple(reference.shape) != tuple(other.shape):
        raise ValueError(f"{what}: shapes differ, reference {tuple(reference.shape)} vs {tuple(other.shape)}")


def all_finite(*tensors: torch.Tensor) -> bool:
    """True when every element of every tensor is finite (empty tensors count as finite)."""
    return all(bool(torch.isfinite(torch.as_tensor(t)).all()) for t in tensors)


def cosine_similarity(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Cosine of the flattened tensors in float64: nan if either is non-finite, 1.0 if both are zero.

    Raises:
        ValueError: when the shapes differ.
    """
    _same_shape(reference, other, "cosine_similarity")
    a, b = _flat64(reference), _flat64(other)
    if not (all_finite(a) and all_finite(b)):
        return math.nan
    if torch.equal(a, b):
        return 1.0  # exactly, not 1 - 1e-16
    norm_a, norm_b = float(a.norm()), float(b.norm())
    if norm_a == 0.0 or norm_b == 0.0:
        return 1.0 if norm_a == norm_b else 0.0
    return max(-1.0, min(1.0, float(a @ b) / (norm_a * norm_b)))


def max_abs_difference(reference: torch.Tensor, other: torch.Tensor) -> float:
    """max |reference - other| in float64 (0.0 for empty tensors, nan when anything is non-finite).

    Raises:
        ValueError: when the shapes differ.
    """
    _same_shape(reference, other, "max_abs_difference")
    diff = (_flat64(reference) - _flat64(other)).abs()
    if diff.numel() == 0:
        return 0.0
    return float(diff.max()) if all_finite(diff) else math.nan


def snr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    """10 log10(sum reference^2 / sum (reference - other)^2): inf when identical, nan when non-finite.

    Raises:
        ValueError: when the shapes differ.
    """
    _same_shape(reference, other, "snr_db")
    a, b = _flat64(reference), _flat64(other)
    if not (all_finite(a) and all_finite(b)):
        return math.nan
    noise = float((a - b).pow(2).sum())
    if noise == 0.0:
        return math.inf
    signal = float(a.pow(2).sum())
    return 10.0 * math.log10(signal / noise) if signal > 0.0 else -math.inf


def first_divergent_frame(reference_codes: torch.Tensor, codes: torch.Tensor) -> Optional[int]:
    """Index of the first frame (row of a (frames, channels) code matrix) that differs; None when identical.

    When one sequence is a prefix of the other, the first frame past the shorter one is the divergence.

    Raises:
        ValueError: when the inputs are not 2-D or their channel counts differ.
    """
    if reference_codes.dim() != 2 or codes.dim() != 2 or reference_codes.shape[1] != codes.shape[1]:
        raise ValueError(f"codes must be (frames, channels) with equal channels, got "
                         f"{tuple(reference_codes.shape)} and {tuple(codes.shape)}")
    common = min(reference_codes.shape[0], codes.shape[0])
    differs = (reference_codes[:common].cpu() != codes[:common].cpu()).any(dim=1)
    if bool(differs.any()):
        return int(differs.nonzero()[0])
    return None if reference_codes.shape[0] == codes.shape[0] else common


def code_agreement(reference_codes: torch.Tensor, codes: torch.Tensor) -> float:
    """Fraction of equal codes over the longer of the two (frames, channels) matrices (missing frames disagree)."""
    if first_divergent_frame(reference_codes, codes) is None:
        return 1.0
    common = min(reference_codes.shape[0], codes.shape[0])
    equal = int((reference_codes[:common].cpu() == codes[:common].cpu()).sum())
    total = max(reference_codes.shape[0], codes.shape[0]) * reference_codes.shape[1]
    return equal / total


# ---------------------------------------------------------------------------------------------------- teacher forcing


@dataclass
class TeacherForcedLogits:
    """Logits of every generation step when the given frames are fed back (teacher forcing).

    Attributes:
        text: (B, F, 2) logits of the two text candidates [continue slot, audio_end] per frame.
        audio: (B, F, nq, audio_vocab_size) logits of every codebook per frame (raw head outputs).
        codebook_sizes: valid code range per codebook (argmax looks only below it).
    """

    text: torch.Tensor
    audio: torch.Tensor
    codebook_sizes: tuple[int, ...]

    def argmax_codes(self) -> torch.LongTensor:
        """(B, F, nq) greedy codes: argmax within each codebook's size, first index on ties."""
        columns = [self.audio[..., i, : self.codebook_sizes[i]].argmax(-1) for i in range(self.audio.shape[-2])]
        return torch.stack(columns, dim=-1)

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> "TeacherForcedLogits":
        # Copy first, then widen (see `_flat64`): the cast runs where the tensors arrive, not on the accelerator.
        return TeacherForcedLogits(self.text.to(device).to(dtype), self.audio.to(device).to(dtype), self.codebook_sizes)


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
) -> TeacherForcedLogits:
    """Text and audio logits of every step of generation, with the given frames fed back instead of sampled ones.

    The same computation as greedy generation (TTS_SPEC §6) in one pass: the global decoder runs over the prompt
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

    Returns:
        `TeacherForcedLogits` on the model's device and in its dtype.

    Raises:
        ValueError: for malformed rows, mask, frames or nq.
    """
    config = model.config
    nq = config.n_vq if nq is None else nq
    if isinstance(nq, bool) or not isinstance(nq, int) or not 1 <= nq <= config.n_vq:
        raise ValueError(f"nq={nq!r} must be an integer within 1..{config.n_vq}")
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
    return _local_logits(model, h, frames[..., 1:], nq, attend_local)


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


# ---------------------------------------------------------------------------------------------------- reference


@dataclass
class Reference:
    """The CPU float32 run every other (device, dtype) is compared with (CPU tensors)."""

    input_ids: torch.Tensor  # (1, T, n_vq + 1) prompt rows
    attention_mask: torch.Tensor  # (1, T) bool
    nq: int
    hidden: torch.Tensor  # (1, T, H) global hidden states after ln_f
    hidden_finite: bool  # every layer finite
    codes: torch.Tensor  # (F, n_vq) greedy codes
    logits: TeacherForcedLogits  # teacher-forced on `codes`
    waveform: torch.Tensor  # (2, 3840 F) codec decode of `codes`
    prompt_frames: int


@dataclass(frozen=True)
class VerificationSettings:
    """What to synthesise and how long.

    Attributes:
        text: the text of the prompt (short: every check runs it).
        max_new_frames: frames of the greedy and inference runs.
        seed: seed of the sampled inference run.
        nq: codebooks in use (None: all).
        inference_kwargs: sampling settings of the inference smoke run.
        sample_dir: where the smoke run writes `<device>_<dtype>.wav` (None: nothing written).
    """

    text: str
    max_new_frames: int = 8
    seed: int = 0
    nq: Optional[int] = None
    inference_kwargs: dict = field(default_factory=dict)
    sample_dir: Optional[Path] = None


@dataclass
class ModelSource:
    """Where models come from.

    Attributes:
        load_model: (device, dtype) -> model on that device in that dtype, eval mode, attention configured.
        load_tools: the CPU float32 model -> (text tokenizer, codec, prompt audio): the prompt audio is a (2, N)
            48 kHz waveform (voice_clone) or None (continuation without prompt).
        description: one line for the report.
    """

    load_model: Callable[[torch.device, torch.dtype], Any]
    load_tools: Callable[[Any], tuple[Any, Any, Optional[torch.Tensor]]]
    description: str


def compute_reference(model: Any, tokenizer: Any, codec: Any, prompt_audio: Optional[torch.Tensor],
                      settings: VerificationSettings) -> Reference:
    """Run every deterministic measurement on the CPU float32 model.

    Raises:
        RuntimeError: when the reference greedy run produces no frame (nothing to compare).
    """
    codec.to(REFERENCE_DEVICE)
    prompt_codes = None if prompt_audio is None else encode_prompt_audio(codec, prompt_audio)
    mode = infer_mode(None, has_prompt_audio=prompt_codes is not None, has_prompt_text=False)
    input_ids, mask = model.build_inference_input_ids(tokenizer, settings.text, mode=mode,
                                                      prompt_audio_codes=prompt_codes, nq=settings.nq)
    input_ids, mask = input_ids.cpu(), mask.cpu()
    nq = settings.nq or model.config.n_vq
    hidden, hidden_finite = measure_hidden(model, input_ids, mask)
    codes = measure_greedy(model, input_ids, mask, settings.max_new_frames, nq)
    if codes.shape[0] == 0:
        raise RuntimeError("the reference greedy run chose audio_end at once (no frame to compare); try another --text")
    return Reference(
        input_ids=input_ids, attention_mask=mask, nq=nq, hidden=hidden, hidden_finite=hidden_finite, codes=codes,
        logits=measure_logits(model, input_ids, mask, codes, nq),
        waveform=measure_codec(codec, codes, nq, REFERENCE_DEVICE, REFERENCE_DTYPE),
        prompt_frames=0 if prompt_codes is None else int(prompt_codes.shape[0]),
    )


# ---------------------------------------------------------------------------------------------------- judging


@dataclass
class Outcome:
    """What a check found: pass/fail, the numbers, an optional note, a value for later use (the loaded model)."""

    passed: bool
    metrics: dict[str, Any] = field(default_factory=dict)
    note: Optional[str] = None
    value: Any = None


def _judge_hidden(hidden: torch.Tensor, finite: bool, reference: Reference, tol: Tolerance) -> Outcome:
    cosine = cosine_similarity(reference.hidden, hidden)
    metrics = {"finite": finite, "cosine": cosine, "max_abs_diff": max_abs_difference(reference.hidden, hidden)}
    return Outcome(finite and cosine >= tol.min_cosine, metrics)


def _judge_logits(logits: TeacherForcedLogits, reference: Reference, tol: Tolerance) -> Outcome:
    finite = all_finite(logits.text, logits.audio)
    metrics: dict[str, Any] = {"finite": finite, "frames": int(logits.text.shape[1])}
    passed = finite
    for kind in ("text", "audio"):
        ref, got = getattr(reference.logits, kind), getattr(logits, kind)
        cosine, max_abs = cosine_similarity(ref, got), max_abs_difference(ref, got)
        rel = max_abs / max(1.0, float(ref.abs().max()))  # relative to the logit scale, at least 1
        metrics.update({f"{kind}_cosine": cosine, f"{kind}_max_abs_diff": max_abs, f"{kind}_max_abs_rel": rel})
        passed = passed and cosine >= tol.min_cosine and rel <= tol.max_abs_rel
    expected = reference.codes[None, :, : reference.nq]
    agreement = float((logits.argmax_codes() == expected).double().mean())
    continues = bool((logits.text.argmax(-1) == 0).all())
    metrics.update({"argmax_agreement": agreement, "text_decisions_continue": continues})
    return Outcome(passed and agreement >= tol.min_argmax_agreement, metrics)


def _judge_codes(codes: torch.Tensor, reference: Reference, tol: Tolerance) -> Outcome:
    frames = int(reference.codes.shape[0])
    first = first_divergent_frame(reference.codes, codes)
    metrics = {"frames": int(codes.shape[0]), "reference_frames": frames, "first_divergent_frame": first,
               "agreement": code_agreement(reference.codes, codes), "identical": first is None}
    if first is None:
        return Outcome(True, metrics)
    gated = tol.min_divergence_fraction > 0.0
    note = f"greedy codes diverge from frame {first} of {frames}" + (
        f" (allowed from frame {math.ceil(tol.min_divergence_fraction * frames)})" if gated
        else f"; reported, not gated in {tol.dtype} (see tolerances)")
    return Outcome(first / frames >= tol.min_divergence_fraction, metrics, note)


def _judge_codec(waveform: torch.Tensor, reference: Reference, tol: Tolerance) -> Outcome:
    finite = all_finite(waveform)
    peak = float(reference.waveform.abs().max()) if reference.waveform.numel() else 0.0
    max_abs = max_abs_difference(reference.waveform, waveform)
    rel = max_abs / peak if peak > 0 else (0.0 if max_abs == 0.0 else math.inf)
    snr = snr_db(reference.waveform, waveform)
    metrics = {"finite": finite, "samples": int(waveform.shape[-1]), "peak": peak, "max_abs_diff": max_abs,
               "max_abs_rel": rel, "snr_db": snr}
    return Outcome(finite and rel <= tol.codec_max_abs_rel and snr >= tol.codec_min_snr_db, metrics)


def run_inference_smoke(model: Any, tokenizer: Any, codec: Any, prompt_audio: Optional[torch.Tensor],
                        settings: VerificationSettings, label: str) -> Outcome:
    """A short sampled `model.inference` run: it must give its frames as finite audio without a float32 retry.

    It checks that sampling and decoding work on the device, not when the model chooses to stop: the first
    `smoke_frames(settings)` frames are forced (min_new_frames), so a checkpoint that ends at once still runs.
    """
    path = None if settings.sample_dir is None else settings.sample_dir / f"{label}.wav"
    minimum = smoke_frames(settings)
    result = model.inference(settings.text, path, text_tokenizer=tokenizer, audio_tokenizer=codec,
                             prompt_audio=prompt_audio, max_new_frames=settings.max_new_frames,
                             seed=settings.seed, nq=settings.nq, min_new_frames=minimum, **settings.inference_kwargs)
    waveform, frames = result["waveform"], int(result["frames"])
    finite = all_finite(waveform)
    fallback = bool(result["float32_fallback"])  # a retry means the dtype itself failed numerically
    metrics = {"frames": frames, "min_frames": minimum, "seconds_of_audio": waveform.shape[-1] / result["sample_rate"],
               "waveform_finite": finite, "float32_fallback": fallback, "audio_path": result["audio_path"]}
    problems = []
    if frames < minimum:
        problems.append(f"the model ended after {frames} frames although {minimum} were forced")
    if not finite:
        problems.append("the waveform has NaN or Inf samples")
    if fallback:
        problems.append("generation failed numerically and only the float32 retry succeeded")
    return Outcome(not problems, metrics, "; ".join(problems) or None)


def smoke_frames(settings: VerificationSettings) -> int:
    """Frames the smoke run always generates: a few, never more than it may generate."""
    return min(SMOKE_MIN_FRAMES, settings.max_new_frames)


# ---------------------------------------------------------------------------------------------------- checks


@dataclass
class CheckResult:
    """One check of one (device, dtype)."""

    name: str
    passed: bool
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None
    note: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "seconds": round(self.seconds, 3), "error": self.error,
                "note": self.note, **self.metrics}


def _describe_error(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else '(no message)'}"


def run_check(name: str, device: Optional[torch.device], body: Callable[[], Outcome]) -> tuple[CheckResult, Any]:
    """Run one check, synchronising the device inside it so asynchronous device errors land on this check.

    Returns:
        (the result, the outcome's value or None). Exceptions become a failed result with the error text.
    """
    start = time.perf_counter()
    try:
        outcome = body()
        if device is not None:
            devices.synchronize(device)
    except Exception as exc:  # noqa: BLE001  (every failure is reported, the run goes on)
        logger.debug("check %s failed", name, exc_info=True)
        return CheckResult(name, False, time.perf_counter() - start, error=_describe_error(exc)), None
    result = CheckResult(name, bool(outcome.passed), time.perf_counter() - start, outcome.metrics, note=outcome.note)
    return result, outcome.value


def _skipped(name: str, reason: str) -> CheckResult:
    return CheckResult(name, False, error=f"not run: {reason}")


# ---------------------------------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """One requested (device, dtype); `unavailable` holds the reason when the device cannot be used."""

    spec: str
    device: Optional[torch.device]
    dtype: Optional[torch.dtype]
    unavailable: Optional[str] = None

    @property
    def is_reference(self) -> bool:
        return self.device == REFERENCE_DEVICE and self.dtype == REFERENCE_DTYPE

    @property
    def label(self) -> str:
        """File-name-safe `<device>_<dtype>`."""
        return f"{self.device or self.spec}_{dtype_name(self.dtype) if self.dtype else 'none'}".replace(":", "-")


# ---------------------------------------------------------------------------------------------------- running


@dataclass
class TargetResult:
    """Every check of one target; it passes when the device was available and every check passed."""

    target: Target
    checks: list[CheckResult] = field(default_factory=list)
    device_name: Optional[str] = None

    @property
    def passed(self) -> bool:
        return self.target.unavailable is None and bool(self.checks) and all(c.passed for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        target = self.target
        return {
            "device": str(target.device) if target.device is not None else target.spec,
            "requested": target.spec,
            "dtype": dtype_name(target.dtype) if target.dtype is not None else None,
            "available": target.unavailable is None,
            "error": target.unavailable,
            "device_name": self.device_name,
            "is_reference": target.is_reference,
            "passed": self.passed,
            "checks": {check.name: check.to_dict() for check in self.checks},
        }


@dataclass
class _Context:
    source: ModelSource
    settings: VerificationSettings
    tokenizer: Any = None
    codec: Any = None
    prompt_audio: Optional[torch.Tensor] = None
    reference: Optional[Reference] = None
    reference_error: Optional[str] = None
    reference_seconds: float = 0.0


AGREEMENT_CHECKS = ("hidden_states", "teacher_forced_logits", "greedy_codes", "codec_decode")


def _agreement_bodies(model: Any, target: Target, context: _Context) -> dict[str, Callable[[], Outcome]]:
    ref, tol = context.reference, tolerance_for(target.dtype)
    if target.is_reference:  # compare the reference with itself: only finiteness can fail
        return {
            "hidden_states": lambda: _judge_hidden(ref.hidden, ref.hidden_finite, ref, tol),
            "teacher_forced_logits": lambda: _judge_logits(ref.logits, ref, tol),
            "greedy_codes": lambda: _judge_codes(ref.codes, ref, tol),
            "codec_decode": lambda: _judge_codec(ref.waveform, ref, tol),
        }
    ids, mask, nq = ref.input_ids, ref.attention_mask, ref.nq
    return {
        "hidden_states": lambda: _judge_hidden(*measure_hidden(model, ids, mask), ref, tol),
        "teacher_forced_logits": lambda: _judge_logits(measure_logits(model, ids, mask, ref.codes, nq), ref, tol),
        "greedy_codes": lambda: _judge_codes(
            measure_greedy(model, ids, mask, context.settings.max_new_frames, nq), ref, tol),
        "codec_decode": lambda: _judge_codec(
            measure_codec(context.codec, ref.codes, nq, target.device, target.dtype), ref, tol),
    }


def _checks_on_model(model: Any, target: Target, context: _Context) -> list[CheckResult]:
    results = []
    if context.reference is None:
        reason = f"no CPU float32 reference ({context.reference_error})"
        results = [_skipped(name, reason) for name in AGREEMENT_CHECKS]
    else:
        for name, body in _agreement_bodies(model, target, context).items():
            result, _ = run_check(name, target.device, body)
            if target.is_reference:
                result.note = REFERENCE_NOTE
            results.append(result)
    if context.tokenizer is None:
        results.append(_skipped("inference", f"no tokenizer/codec ({context.reference_error})"))
        return results
    smoke = lambda: run_inference_smoke(model, context.tokenizer, context.codec, context.prompt_audio,  # noqa: E731
                                        context.settings, target.label)
    results.append(run_check("inference", target.device, smoke)[0])
    return results


def _load_check(target: Target, context: _Context) -> tuple[CheckResult, Any]:
    def body() -> Outcome:
        model = context.source.load_model(target.device, target.dtype)
        plan = model.kernel_plan()
        global_impl, local_impl = plan.attention
        parameter = next(model.parameters())
        kernels = plan.describe()  # which path this device runs, e.g. rope "complex (cpu fast path)" / "real"
        metrics = {"attention": {"global": global_impl, "local": local_impl}, "rope": kernels["rope"],
                   "linear": kernels["linear"], "rope_reason": plan.reasons.get("rope"),
                   "attention_reason": plan.reasons.get("attention"), "parameter_dtype": dtype_name(parameter.dtype),
                   "parameter_device": str(parameter.device)}
        return Outcome(parameter.dtype == target.dtype, metrics, value=model)

    return run_check("load", target.device, body)


def _device_name(device: torch.device) -> Optional[str]:
    try:
        return devices.describe_environment(device)["device_name"]
    except Exception as exc:  # noqa: BLE001  (a name is nice to have, never worth failing for)
        return f"unknown ({_describe_error(exc)})"


def _verify_target(target: Target, context: _Context,
                   preloaded: Optional[tuple[CheckResult, Any]] = None) -> TargetResult:
    """Load the model (or take `preloaded` (load result, model or None)) and run every check on one target."""
    result = TargetResult(target)
    if target.unavailable is not None:
        return result
    result.device_name = _device_name(target.device)
    load, model = preloaded if preloaded is not None else _load_check(target, context)
    result.checks.append(load)
    if model is None:
        result.checks += [_skipped(name, "the model did not load") for name in AGREEMENT_CHECKS + ("inference",)]
        return result
    try:
        result.checks += _checks_on_model(model, target, context)
    finally:
        del model
        gc.collect()
    return result


def _prepare_reference(context: _Context) -> tuple[CheckResult, Any]:
    """Load the CPU float32 model, its tokenizer and codec, and compute the reference (errors are recorded)."""
    started = time.perf_counter()
    load, model = _load_check(Target("cpu", REFERENCE_DEVICE, REFERENCE_DTYPE), context)
    if model is None:
        context.reference_error = f"the CPU float32 model did not load: {load.error}"
        return load, None
    try:
        context.tokenizer, context.codec, context.prompt_audio = context.source.load_tools(model)
        context.reference = compute_reference(model, context.tokenizer, context.codec, context.prompt_audio,
                                              context.settings)
    except Exception as exc:  # noqa: BLE001  (reported; the other targets still load and run)
        logger.debug("reference failed", exc_info=True)
        context.reference_error = _describe_error(exc)
    context.reference_seconds = time.perf_counter() - started
    return load, model


def run_verification(targets: Sequence[Target], source: ModelSource, settings: VerificationSettings) -> dict[str, Any]:
    """Compute the CPU float32 reference, verify every target, and return the report (a JSON-ready dict).

    Args:
        targets: the (device, dtype) pairs; unavailable ones are reported as failed.
        source: how to load models, tokenizer, codec and prompt audio.
        settings: text, frames, seed, sampling of the smoke run.

    Returns:
        The report: format, created_utc, overall_pass, model, settings, environment, reference, tolerances,
        results (one per target), summary. Exceptions of single checks are recorded there, never raised.
    """
    context = _Context(source, settings)
    results: dict[int, TargetResult] = {}
    if any(t.unavailable is None for t in targets):
        preloaded = _prepare_reference(context)
        for index, target in enumerate(targets):
            if target.is_reference:  # reuse the reference model rather than loading it twice
                results[index] = _verify_target(target, context, preloaded)
        del preloaded
        gc.collect()
    else:
        context.reference_error = "not computed: no requested device is available"
    for index, target in enumerate(targets):
        if index not in results:
            results[index] = _verify_target(target, context)
    return _build_report([results[i] for i in range(len(targets))], context)


def _environment(results: Sequence[TargetResult]) -> dict[str, Any]:
    """devices.describe_environment of the first accelerator verified (else the CPU): versions and device name."""
    accelerators = [r.target.device for r in results if r.target.device is not None and r.target.device.type != "cpu"]
    try:
        return devices.describe_environment(accelerators[0] if accelerators else REFERENCE_DEVICE)
    except Exception as exc:  # noqa: BLE001  (the report must still be written)
        return {"error": _describe_error(exc), **devices.describe_environment(REFERENCE_DEVICE)}


def _build_report(results: Sequence[TargetResult], context: _Context) -> dict[str, Any]:
    reference, settings = context.reference, context.settings
    return {
        "format": REPORT_FORMAT,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "overall_pass": bool(results) and all(r.passed for r in results),
        "model": context.source.description,
        "settings": {"text": settings.text, "max_new_frames": settings.max_new_frames, "seed": settings.seed,
                     "nq": settings.nq, "inference_sampling": settings.inference_kwargs,
                     "mode": None if context.tokenizer is None else
                     "continuation" if context.prompt_audio is None else "voice_clone"},
        "environment": _environment(results),
        "reference": {
            "device": str(REFERENCE_DEVICE), "dtype": dtype_name(REFERENCE_DTYPE), "ok": reference is not None,
            "error": context.reference_error, "seconds": round(context.reference_seconds, 3), "note": REFERENCE_NOTE,
            "prompt_rows": None if reference is None else int(reference.input_ids.shape[1]),
            "prompt_frames": None if reference is None else reference.prompt_frames,
            "greedy_frames": None if reference is None else int(reference.codes.shape[0]),
        },
        "tolerances": {name: asdict(tol) for name, tol in TOLERANCES.items()},
        "results": [r.to_dict() for r in results],
        "summary": {"targets": len(results), "passed": sum(r.passed for r in results),
                    "unavailable": sum(r.target.unavailable is not None for r in results)},
    }
